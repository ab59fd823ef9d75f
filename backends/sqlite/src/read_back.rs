//! Reading stored reports back, one connection at a time, for `kohaku migrate --summaries`.

use kohaku_sink::{
    parse_timestamp, Connection as SoraConnection, RawJson, Report, SinkError, StatsObject,
};
use rusqlite::{Connection, OptionalExtension};

use crate::error::classify;

pub(crate) fn stored_reports_after(
    connection: &Connection,
    after: Option<&str>,
) -> Result<Option<(String, Vec<Report>)>, SinkError> {
    let fail = |what: &'static str| move |err| classify(what, err);
    let next: Option<String> = connection
        .query_row(
            "SELECT min(connection_id) FROM rtc_stats WHERE connection_id > ?1",
            [after.unwrap_or("")],
            |row| row.get(0),
        )
        .map_err(fail("sqlite: cannot find the next connection"))?;
    let Some(connection_id) = next else {
        return Ok(None);
    };
    // The connection's metadata as stored, so that writing the reports again changes nothing.
    let metadata = connection
        .query_row(
            "SELECT label, version, node_name, role, multistream, simulcast, spotlight, group_id \
             FROM sora_connection WHERE connection_id = ?1",
            [&connection_id],
            |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, Option<bool>>(4)?,
                    row.get::<_, bool>(5)?,
                    row.get::<_, bool>(6)?,
                    row.get::<_, Option<String>>(7)?,
                ))
            },
        )
        .optional()
        .map_err(fail("sqlite: cannot read sora_connection"))?
        .unwrap_or_default();
    let mut statement = connection
        .prepare(
            "SELECT channel_id, session_id, client_id, bundle_id, rtc_type, rtc_id, rtc_timestamp, \
             rtc_data, sora_timestamp, received_at FROM rtc_stats WHERE connection_id = ?1 \
             ORDER BY sora_timestamp, rtc_timestamp",
        )
        .map_err(fail("sqlite: cannot read rtc_stats"))?;
    let mut rows = statement
        .query([&connection_id])
        .map_err(fail("sqlite: cannot read rtc_stats"))?;
    let mut reports: Vec<(String, Report)> = Vec::new();
    while let Some(row) = rows.next().map_err(fail("sqlite: cannot read rtc_stats"))? {
        let read = |index: usize| -> Result<String, SinkError> {
            row.get(index)
                .map_err(|err| classify("sqlite: cannot read rtc_stats", err))
        };
        let sora_timestamp = read(8)?;
        let object = StatsObject {
            rtc_type: read(4)?,
            rtc_id: read(5)?,
            rtc_timestamp: row.get(6).map_err(fail("sqlite: cannot read rtc_stats"))?,
            rtc_data: RawJson::from_string(read(7)?).map_err(|err| SinkError::Permanent {
                message: format!("sqlite: a stored object of {connection_id} is not JSON"),
                source: Some(Box::new(err)),
            })?,
        };
        match reports.last_mut() {
            Some((time, report)) if *time == sora_timestamp => report.stats.push(object),
            _ => {
                let time = |text: &str| {
                    parse_timestamp(text).map_err(|err| SinkError::Permanent {
                        message: format!("sqlite: stored time {text:?} does not parse"),
                        source: Some(Box::new(err)),
                    })
                };
                let (label, version, node_name, role, multistream, simulcast, spotlight, group_id) =
                    metadata.clone();
                let bundle_id: Option<String> =
                    row.get(3).map_err(fail("sqlite: cannot read rtc_stats"))?;
                let sora = SoraConnection {
                    channel_id: read(0)?,
                    session_id: read(1)?,
                    client_id: read(2)?,
                    connection_id: connection_id.clone(),
                    bundle_id,
                    group_id,
                    label,
                    version,
                    node_name,
                    role,
                    multistream,
                    simulcast,
                    spotlight,
                };
                let report =
                    Report::new(sora, time(&sora_timestamp)?, time(&read(9)?)?, vec![object]);
                reports.push((sora_timestamp, report));
            }
        }
    }
    Ok(Some((
        connection_id,
        reports.into_iter().map(|(_, report)| report).collect(),
    )))
}
