//! Writing a batch: COPY into a per-session staging table, one `INSERT … SELECT … ON CONFLICT DO
//! NOTHING`, the connections upserted in the same transaction; row by row when the server refuses
//! the batch for one row's content.

use std::collections::HashMap;

use std::sync::LazyLock;

use kohaku_sink::{
    format_timestamp, summary_columns, Connection, RejectedRow, Report, SinkError, StatsBatch,
    StatsObject, SummaryNumber, SummaryText, WriteReport,
};
use sqlx::{Postgres, QueryBuilder};

use crate::error::{classify, is_data_error};
use crate::TimescaleSink;

/// Bytes of COPY data sent per message.
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// Connections upserted per statement: 15 parameters each, below PostgreSQL's 65535 limit.
const CONNECTIONS_PER_UPSERT: usize = 4_000;
/// The summaries' insert: one array per column, unnested, so that a batch's summaries are one
/// prepared statement whatever their number (a VALUES list of 46 parameters a row was planned
/// anew for every batch).
static INSERT_SUMMARIES: LazyLock<String> = LazyLock::new(|| {
    let columns: Vec<&str> = summary_columns().collect();
    let mut arrays = vec![
        "$1::float8[]".to_owned(),
        "$2::text[]".to_owned(),
        "$3::text[]".to_owned(),
        "$4::text[]".to_owned(),
        "$5::text[]".to_owned(),
        "$6::text[]".to_owned(),
    ];
    for (index, _) in SummaryNumber::ALL.iter().enumerate() {
        arrays.push(format!("${}::float8[]", index + 7));
    }
    for (index, _) in SummaryText::ALL.iter().enumerate() {
        arrays.push(format!("${}::text[]", index + 7 + SummaryNumber::ALL.len()));
    }
    let list = columns.join(", ");
    let selected: Vec<String> = columns.iter().map(|column| format!("u.{column}")).collect();
    format!(
        "INSERT INTO rtc_report_summary (rtc_time, channel_id, session_id, client_id, \
         connection_id, rtc_timestamp, sora_timestamp, {list}) \
         SELECT to_timestamp(u.rtc_timestamp / 1000.0), u.channel_id, u.session_id, u.client_id, \
         u.connection_id, u.rtc_timestamp, u.sora_timestamp::timestamptz, {} \
         FROM UNNEST({}) AS u(rtc_timestamp, channel_id, session_id, client_id, connection_id, \
         sora_timestamp, {list}) \
         ON CONFLICT (connection_id, rtc_time, rtc_timestamp) DO NOTHING",
        selected.join(", "),
        arrays.join(", ")
    )
});

const CREATE_STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS kohaku_rtc_stats_stage (\
     channel_id text, session_id text, client_id text, connection_id text, bundle_id text, \
     rtc_type text, rtc_id text, rtc_timestamp double precision, rtc_data text, \
     sora_timestamp timestamptz, received_at timestamptz) ON COMMIT DELETE ROWS";

const COPY_STAGE: &str =
    "COPY kohaku_rtc_stats_stage (channel_id, session_id, client_id, connection_id, \
     bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) FROM STDIN";

const INSERT_FROM_STAGE: &str = "INSERT INTO rtc_stats (rtc_time, channel_id, session_id, client_id, \
     connection_id, bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) \
     SELECT to_timestamp(rtc_timestamp / 1000.0), channel_id, session_id, client_id, connection_id, \
     bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data::jsonb, sora_timestamp, received_at \
     FROM kohaku_rtc_stats_stage ON CONFLICT DO NOTHING";

const INSERT_ONE: &str = "INSERT INTO rtc_stats (rtc_time, channel_id, session_id, client_id, \
     connection_id, bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) \
     VALUES (to_timestamp($8 / 1000.0), $1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::timestamptz, \
     $11::timestamptz) ON CONFLICT DO NOTHING";

const CONNECTION_COLUMNS: &str = "INSERT INTO sora_connection (channel_id, session_id, client_id, \
     connection_id, bundle_id, label, version, node_name, role, multistream, simulcast, spotlight, \
     first_seen, last_seen, group_id) ";

/// Metadata follows the newest report; first/last seen only widen.
const CONNECTION_CONFLICT: &str = " ON CONFLICT (connection_id) DO UPDATE SET \
     first_seen = LEAST(sora_connection.first_seen, EXCLUDED.first_seen), \
     last_seen = GREATEST(sora_connection.last_seen, EXCLUDED.last_seen), \
     channel_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.channel_id ELSE sora_connection.channel_id END, \
     session_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.session_id ELSE sora_connection.session_id END, \
     client_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.client_id ELSE sora_connection.client_id END, \
     bundle_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.bundle_id ELSE sora_connection.bundle_id END, \
     group_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.group_id ELSE sora_connection.group_id END, \
     label = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.label ELSE sora_connection.label END, \
     version = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.version ELSE sora_connection.version END, \
     node_name = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.node_name ELSE sora_connection.node_name END, \
     role = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.role ELSE sora_connection.role END, \
     multistream = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.multistream ELSE sora_connection.multistream END, \
     simulcast = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.simulcast ELSE sora_connection.simulcast END, \
     spotlight = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.spotlight ELSE sora_connection.spotlight END";

impl TimescaleSink {
    pub(crate) async fn write_batch(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
        let mut report = WriteReport::default();
        let mut rows: Vec<(&Report, &StatsObject)> = Vec::with_capacity(batch.row_count());
        let mut connections: Vec<&Report> = Vec::with_capacity(batch.reports().len());
        for stats_report in batch.reports() {
            if let Some(reason) = connection_problem(&stats_report.connection) {
                report.rejected.extend(
                    stats_report
                        .stats
                        .iter()
                        .map(|object| rejected(stats_report, object, &reason)),
                );
                continue;
            }
            connections.push(stats_report);
            for object in &stats_report.stats {
                match object_problem(object) {
                    Some(reason) => report
                        .rejected
                        .push(rejected(stats_report, object, &reason)),
                    None => rows.push((stats_report, object)),
                }
            }
        }

        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(classify("timescaledb: cannot begin a transaction"))?;
        sqlx::query(CREATE_STAGE)
            .execute(&mut *tx)
            .await
            .map_err(classify("timescaledb: cannot create the staging table"))?;
        let mut copy = tx
            .copy_in_raw(COPY_STAGE)
            .await
            .map_err(classify("timescaledb: cannot start COPY"))?;
        let mut buffer = Vec::with_capacity(COPY_CHUNK_BYTES + 4096);
        for (stats_report, object) in &rows {
            encode_copy_row(&mut buffer, stats_report, object);
            if buffer.len() >= COPY_CHUNK_BYTES {
                copy.send(std::mem::take(&mut buffer))
                    .await
                    .map_err(classify("timescaledb: COPY failed"))?;
            }
        }
        if !buffer.is_empty() {
            copy.send(buffer)
                .await
                .map_err(classify("timescaledb: COPY failed"))?;
        }
        copy.finish()
            .await
            .map_err(classify("timescaledb: COPY failed"))?;

        let moved = sqlx::query(INSERT_FROM_STAGE).execute(&mut *tx).await;
        let written = match moved {
            Ok(done) => done.rows_affected(),
            Err(err) if is_data_error(&err) => {
                // One value PostgreSQL refuses (e.g. a JSON escape jsonb cannot hold) fails the
                // whole statement: find it row by row so the rest is still stored.
                drop(tx);
                tracing::warn!(error = %err, rows = rows.len(), "timescaledb: batch refused by the database; writing it row by row");
                return self.write_row_by_row(&rows, &connections, report).await;
            }
            Err(err) => return Err(classify("timescaledb: cannot insert rtc_stats")(err)),
        };
        upsert_connections(&mut tx, &connections).await?;
        insert_summaries(&mut tx, &connections).await?;
        tx.commit()
            .await
            .map_err(classify("timescaledb: cannot commit"))?;
        report.written = written;
        report.duplicates = rows.len() as u64 - written;
        Ok(report)
    }

    pub(crate) async fn write_row_by_row(
        &self,
        rows: &[(&Report, &StatsObject)],
        connections: &[&Report],
        mut report: WriteReport,
    ) -> Result<WriteReport, SinkError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(classify("timescaledb: cannot begin a transaction"))?;
        for (stats_report, object) in rows {
            sqlx::query("SAVEPOINT kohaku_row")
                .execute(&mut *tx)
                .await
                .map_err(classify("timescaledb: cannot set a savepoint"))?;
            let connection = &stats_report.connection;
            let inserted = sqlx::query(INSERT_ONE)
                .bind(&connection.channel_id)
                .bind(&connection.session_id)
                .bind(&connection.client_id)
                .bind(&connection.connection_id)
                .bind(&connection.bundle_id)
                .bind(&object.rtc_type)
                .bind(&object.rtc_id)
                .bind(object.rtc_timestamp)
                .bind(object.rtc_data.get())
                .bind(format_timestamp(stats_report.sora_timestamp))
                .bind(format_timestamp(stats_report.received_at))
                .execute(&mut *tx)
                .await;
            match inserted {
                Ok(done) => {
                    report.written += done.rows_affected();
                    report.duplicates += 1 - done.rows_affected();
                    sqlx::query("RELEASE SAVEPOINT kohaku_row")
                        .execute(&mut *tx)
                        .await
                        .map_err(classify("timescaledb: cannot release a savepoint"))?;
                }
                Err(err) if is_data_error(&err) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT kohaku_row")
                        .execute(&mut *tx)
                        .await
                        .map_err(classify("timescaledb: cannot roll back to a savepoint"))?;
                    report
                        .rejected
                        .push(rejected(stats_report, object, &err.to_string()));
                }
                Err(err) => return Err(classify("timescaledb: cannot insert rtc_stats")(err)),
            }
        }
        upsert_connections(&mut tx, connections).await?;
        insert_summaries(&mut tx, connections).await?;
        tx.commit()
            .await
            .map_err(classify("timescaledb: cannot commit"))?;
        Ok(report)
    }
}

pub(crate) async fn upsert_connections(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    reports: &[&Report],
) -> Result<(), SinkError> {
    // One row per connection: PostgreSQL refuses to update the same row twice in one statement.
    let mut merged: HashMap<&str, (&Connection, String, String, String)> = HashMap::new();
    for report in reports {
        let seen = format_timestamp(report.sora_timestamp);
        merged
            .entry(report.connection.connection_id.as_str())
            .and_modify(|(connection, first, last, _)| {
                if seen > *last {
                    *connection = &report.connection;
                    last.clone_from(&seen);
                }
                if seen < *first {
                    first.clone_from(&seen);
                }
            })
            .or_insert_with(|| (&report.connection, seen.clone(), seen.clone(), seen));
    }
    let merged: Vec<_> = merged.into_values().collect();
    for chunk in merged.chunks(CONNECTIONS_PER_UPSERT) {
        let mut query = QueryBuilder::<Postgres>::new(CONNECTION_COLUMNS);
        query.push_values(chunk, |mut row, (connection, first_seen, last_seen, _)| {
            row.push_bind(&connection.channel_id)
                .push_bind(&connection.session_id)
                .push_bind(&connection.client_id)
                .push_bind(&connection.connection_id)
                .push_bind(&connection.bundle_id)
                .push_bind(&connection.label)
                .push_bind(&connection.version)
                .push_bind(&connection.node_name)
                .push_bind(&connection.role)
                .push_bind(connection.multistream)
                .push_bind(connection.simulcast)
                .push_bind(connection.spotlight)
                .push_bind(first_seen.as_str())
                .push_unseparated("::timestamptz")
                .push_bind(last_seen.as_str())
                .push_unseparated("::timestamptz")
                .push_bind(&connection.group_id);
        });
        query.push(CONNECTION_CONFLICT);
        query
            .build()
            .execute(&mut **tx)
            .await
            .map_err(classify("timescaledb: cannot upsert sora_connection"))?;
    }
    Ok(())
}

/// Inserts the reports' summaries; a report sent twice keeps its first. A text PostgreSQL cannot
/// hold (a NUL decoded from the client's JSON) is stored as NULL rather than failing the batch.
pub(crate) async fn insert_summaries(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    reports: &[&Report],
) -> Result<(), SinkError> {
    let summarized: Vec<_> = reports
        .iter()
        .filter_map(|report| report.summary().map(|summary| (*report, summary)))
        .collect();
    if summarized.is_empty() {
        return Ok(());
    }
    let column = |value: fn(&Report) -> &str| -> Vec<&str> {
        summarized.iter().map(|(report, _)| value(report)).collect()
    };
    let mut query = sqlx::query(sqlx::AssertSqlSafe(INSERT_SUMMARIES.as_str()))
        .bind(
            summarized
                .iter()
                .map(|(_, summary)| summary.rtc_timestamp)
                .collect::<Vec<f64>>(),
        )
        .bind(column(|report| &report.connection.channel_id))
        .bind(column(|report| &report.connection.session_id))
        .bind(column(|report| &report.connection.client_id))
        .bind(column(|report| &report.connection.connection_id))
        .bind(
            summarized
                .iter()
                .map(|(report, _)| format_timestamp(report.sora_timestamp))
                .collect::<Vec<String>>(),
        );
    for which in SummaryNumber::ALL {
        query = query.bind(
            summarized
                .iter()
                .map(|(_, summary)| summary.number(*which))
                .collect::<Vec<Option<f64>>>(),
        );
    }
    for which in SummaryText::ALL {
        query = query.bind(
            summarized
                .iter()
                .map(|(_, summary)| {
                    summary
                        .text(*which)
                        .filter(|text| !text.contains('\0'))
                        .map(str::to_owned)
                })
                .collect::<Vec<Option<String>>>(),
        );
    }
    query
        .execute(&mut **tx)
        .await
        .map_err(classify("timescaledb: cannot insert rtc_report_summary"))?;
    Ok(())
}

/// One line of COPY's text format. Public for `benches/encode.rs`.
#[doc(hidden)]
pub fn encode_copy_row(buffer: &mut Vec<u8>, report: &Report, object: &StatsObject) {
    let connection = &report.connection;
    for field in [
        Some(connection.channel_id.as_str()),
        Some(connection.session_id.as_str()),
        Some(connection.client_id.as_str()),
        Some(connection.connection_id.as_str()),
        connection.bundle_id.as_deref(),
        Some(object.rtc_type.as_str()),
        Some(object.rtc_id.as_str()),
    ] {
        push_copy_field(buffer, field);
        buffer.push(b'\t');
    }
    // `{:?}` prints the shortest text that parses back to the same f64.
    buffer.extend_from_slice(format!("{:?}", object.rtc_timestamp).as_bytes());
    buffer.push(b'\t');
    push_copy_field(buffer, Some(object.rtc_data.get()));
    buffer.push(b'\t');
    buffer.extend_from_slice(format_timestamp(report.sora_timestamp).as_bytes());
    buffer.push(b'\t');
    buffer.extend_from_slice(format_timestamp(report.received_at).as_bytes());
    buffer.push(b'\n');
}

pub(crate) fn push_copy_field(buffer: &mut Vec<u8>, value: Option<&str>) {
    let Some(value) = value else {
        buffer.extend_from_slice(b"\\N");
        return;
    };
    for byte in value.bytes() {
        match byte {
            b'\\' => buffer.extend_from_slice(b"\\\\"),
            b'\n' => buffer.extend_from_slice(b"\\n"),
            b'\r' => buffer.extend_from_slice(b"\\r"),
            b'\t' => buffer.extend_from_slice(b"\\t"),
            other => buffer.push(other),
        }
    }
}

/// PostgreSQL text cannot hold NUL.
pub(crate) fn connection_problem(connection: &Connection) -> Option<String> {
    let fields = [
        ("channel_id", connection.channel_id.as_str()),
        ("session_id", &connection.session_id),
        ("client_id", &connection.client_id),
        ("connection_id", &connection.connection_id),
        (
            "bundle_id",
            connection.bundle_id.as_deref().unwrap_or_default(),
        ),
        (
            "group_id",
            connection.group_id.as_deref().unwrap_or_default(),
        ),
        ("label", &connection.label),
        ("version", &connection.version),
        ("node_name", &connection.node_name),
        ("role", &connection.role),
    ];
    fields
        .iter()
        .find(|(_, value)| value.contains('\0'))
        .map(|(name, _)| {
            format!("{name} contains a NUL character, which PostgreSQL text cannot store")
        })
}

/// Values PostgreSQL is known to refuse, caught before they can fail a whole batch.
pub(crate) fn object_problem(object: &StatsObject) -> Option<String> {
    if object.rtc_id.contains('\0') || object.rtc_type.contains('\0') {
        return Some(
            "id or type contains a NUL character, which PostgreSQL text cannot store".into(),
        );
    }
    if has_nul_escape(object.rtc_data.get()) {
        return Some("the object contains \\u0000, which PostgreSQL jsonb cannot store".into());
    }
    None
}

/// Whether the JSON text holds the escape `\u0000` (not merely an escaped backslash before it).
pub(crate) fn has_nul_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' {
            if bytes.get(index + 1) == Some(&b'u')
                && bytes.get(index + 2..index + 6) == Some(b"0000".as_slice())
            {
                return true;
            }
            index += 2;
        } else {
            index += 1;
        }
    }
    false
}

pub(crate) fn rejected(report: &Report, object: &StatsObject, reason: &str) -> RejectedRow {
    RejectedRow {
        connection_id: report.connection.connection_id.clone(),
        rtc_id: object.rtc_id.clone(),
        rtc_timestamp: object.rtc_timestamp,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_are_found_but_escaped_backslashes_are_not() {
        assert!(has_nul_escape(r#"{"a":"x\u0000y"}"#));
        assert!(!has_nul_escape(r#"{"a":"x\\u0000y"}"#));
        assert!(has_nul_escape(r#"{"a":"x\\\u0000y"}"#));
        assert!(!has_nul_escape(r#"{"a":"\u0001"}"#));
    }

    #[test]
    fn copy_fields_are_escaped() {
        let mut buffer = Vec::new();
        push_copy_field(&mut buffer, Some("a\tb\nc\\d\re"));
        assert_eq!(buffer, b"a\\tb\\nc\\\\d\\re");
        buffer.clear();
        push_copy_field(&mut buffer, None);
        assert_eq!(buffer, b"\\N");
    }
}
