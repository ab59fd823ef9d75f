//! Reading stored reports back, one connection at a time, for `kohaku migrate --summaries`.

use kohaku_sink::{
    reports_from_stored, Connection as SoraConnection, Report, SinkError, StoredObject,
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
    let stored_connection = connection
        .query_row(
            "SELECT channel_id, session_id, client_id, bundle_id, group_id, label, version, \
             node_name, role, multistream, simulcast, spotlight \
             FROM sora_connection WHERE connection_id = ?1",
            [&connection_id],
            |row| {
                Ok(SoraConnection {
                    channel_id: row.get(0)?,
                    session_id: row.get(1)?,
                    client_id: row.get(2)?,
                    connection_id: connection_id.clone(),
                    bundle_id: row.get(3)?,
                    group_id: row.get(4)?,
                    label: row.get(5)?,
                    version: row.get(6)?,
                    node_name: row.get(7)?,
                    role: row.get(8)?,
                    multistream: row.get(9)?,
                    simulcast: row.get(10)?,
                    spotlight: row.get(11)?,
                })
            },
        )
        .optional()
        .map_err(fail("sqlite: cannot read sora_connection"))?;
    let mut statement = connection
        .prepare(
            "SELECT channel_id, session_id, client_id, bundle_id, sora_timestamp, received_at, \
             rtc_type, rtc_id, rtc_timestamp, rtc_data FROM rtc_stats WHERE connection_id = ?1 \
             ORDER BY sora_timestamp, rtc_timestamp",
        )
        .map_err(fail("sqlite: cannot read rtc_stats"))?;
    let objects = statement
        .query_map([&connection_id], |row| {
            Ok(StoredObject {
                channel_id: row.get(0)?,
                session_id: row.get(1)?,
                client_id: row.get(2)?,
                bundle_id: row.get(3)?,
                sora_timestamp: row.get(4)?,
                received_at: row.get(5)?,
                rtc_type: row.get(6)?,
                rtc_id: row.get(7)?,
                rtc_timestamp: row.get(8)?,
                rtc_data: row.get(9)?,
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(fail("sqlite: cannot read rtc_stats"))?;
    let reports = reports_from_stored("sqlite", &connection_id, stored_connection, objects)?;
    Ok(Some((connection_id, reports)))
}
