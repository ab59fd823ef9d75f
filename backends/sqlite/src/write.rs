//! Writing a batch: one transaction, the stats inserted idempotently and each report's connection
//! upserted.

use std::sync::LazyLock;

use kohaku_sink::{
    format_timestamp, summary_columns, Report, ReportSummary, SinkError, StatsBatch, WriteReport,
};
use rusqlite::types::ToSqlOutput;
use rusqlite::{params, params_from_iter, Connection};

use crate::error::classify;

const INSERT_STATS: &str =
    "INSERT INTO rtc_stats (channel_id, session_id, client_id, connection_id, bundle_id, \
     rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
     ON CONFLICT (connection_id, rtc_timestamp, rtc_id) DO NOTHING";

// A late, older report must not move last_seen backwards nor overwrite newer metadata.
const UPSERT_CONNECTION: &str = "INSERT INTO sora_connection (channel_id, session_id, client_id, connection_id, \
     bundle_id, label, version, node_name, role, multistream, simulcast, spotlight, first_seen, last_seen, group_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, ?14) \
     ON CONFLICT (connection_id) DO UPDATE SET \
       first_seen = min(first_seen, excluded.first_seen), \
       last_seen = max(last_seen, excluded.last_seen), \
       channel_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.channel_id ELSE channel_id END, \
       session_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.session_id ELSE session_id END, \
       client_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.client_id ELSE client_id END, \
       bundle_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.bundle_id ELSE bundle_id END, \
       group_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.group_id ELSE group_id END, \
       label = CASE WHEN excluded.last_seen >= last_seen THEN excluded.label ELSE label END, \
       version = CASE WHEN excluded.last_seen >= last_seen THEN excluded.version ELSE version END, \
       node_name = CASE WHEN excluded.last_seen >= last_seen THEN excluded.node_name ELSE node_name END, \
       role = CASE WHEN excluded.last_seen >= last_seen THEN excluded.role ELSE role END, \
       multistream = CASE WHEN excluded.last_seen >= last_seen THEN excluded.multistream ELSE multistream END, \
       simulcast = CASE WHEN excluded.last_seen >= last_seen THEN excluded.simulcast ELSE simulcast END, \
       spotlight = CASE WHEN excluded.last_seen >= last_seen THEN excluded.spotlight ELSE spotlight END";

/// The summary's insert, its columns from [`summary_columns`]; a report sent twice keeps its first
/// summary.
static INSERT_SUMMARY: LazyLock<String> = LazyLock::new(|| {
    let columns: Vec<&str> = summary_columns().collect();
    let placeholders = vec!["?"; 6 + columns.len()].join(", ");
    format!(
        "INSERT INTO rtc_report_summary (channel_id, session_id, client_id, connection_id, \
         rtc_timestamp, sora_timestamp, {}) VALUES ({placeholders}) \
         ON CONFLICT (connection_id, rtc_timestamp) DO NOTHING",
        columns.join(", ")
    )
});

/// The values of one summary row, in [`INSERT_SUMMARY`]'s order.
fn summary_values<'a>(
    report: &'a Report,
    summary: &'a ReportSummary,
    sora_timestamp: &'a str,
) -> impl Iterator<Item = ToSqlOutput<'a>> {
    let connection = &report.connection;
    [
        connection.channel_id.as_str(),
        connection.session_id.as_str(),
        connection.client_id.as_str(),
        connection.connection_id.as_str(),
    ]
    .into_iter()
    .map(ToSqlOutput::from)
    .chain([
        ToSqlOutput::from(summary.rtc_timestamp),
        ToSqlOutput::from(sora_timestamp),
    ])
    .chain(summary.numbers().map(|(_, value)| match value {
        Some(value) => ToSqlOutput::from(value),
        None => ToSqlOutput::from(rusqlite::types::Null),
    }))
    .chain(summary.texts().map(|(_, value)| match value {
        Some(value) => ToSqlOutput::from(value),
        None => ToSqlOutput::from(rusqlite::types::Null),
    }))
}

pub(crate) fn write_batch(
    connection: &mut Connection,
    batch: &StatsBatch,
) -> Result<WriteReport, SinkError> {
    let fail = |what: &'static str| move |err| classify(what, err);
    let tx = connection
        .transaction()
        .map_err(fail("sqlite: cannot begin transaction"))?;
    let mut report = WriteReport::default();
    {
        let mut insert_stats = tx
            .prepare_cached(INSERT_STATS)
            .map_err(fail("sqlite: cannot prepare insert"))?;
        let mut upsert_connection = tx
            .prepare_cached(UPSERT_CONNECTION)
            .map_err(fail("sqlite: cannot prepare connection upsert"))?;
        let mut insert_summary = tx
            .prepare_cached(&INSERT_SUMMARY)
            .map_err(fail("sqlite: cannot prepare summary insert"))?;
        for stats_report in batch.reports() {
            let Report {
                connection,
                sora_timestamp,
                received_at,
                stats,
                ..
            } = stats_report.as_ref();
            let sora_timestamp = format_timestamp(*sora_timestamp);
            let received_at = format_timestamp(*received_at);
            upsert_connection
                .execute(params![
                    connection.channel_id,
                    connection.session_id,
                    connection.client_id,
                    connection.connection_id,
                    connection.bundle_id,
                    connection.label,
                    connection.version,
                    connection.node_name,
                    connection.role,
                    connection.multistream,
                    connection.simulcast,
                    connection.spotlight,
                    sora_timestamp,
                    connection.group_id,
                ])
                .map_err(fail("sqlite: cannot upsert sora_connection"))?;
            if let Some(summary) = stats_report.summary() {
                insert_summary
                    .execute(params_from_iter(summary_values(
                        stats_report,
                        summary,
                        &sora_timestamp,
                    )))
                    .map_err(fail("sqlite: cannot insert into rtc_report_summary"))?;
            }
            for object in stats {
                let inserted = insert_stats
                    .execute(params![
                        connection.channel_id,
                        connection.session_id,
                        connection.client_id,
                        connection.connection_id,
                        connection.bundle_id,
                        object.rtc_type,
                        object.rtc_id,
                        object.rtc_timestamp,
                        object.rtc_data.get(),
                        sora_timestamp,
                        received_at,
                    ])
                    .map_err(fail("sqlite: cannot insert into rtc_stats"))?;
                if inserted == 0 {
                    report.duplicates += 1;
                } else {
                    report.written += 1;
                }
            }
        }
    }
    tx.commit().map_err(fail("sqlite: cannot commit"))?;
    Ok(report)
}
