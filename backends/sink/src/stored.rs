//! Stored rows read back into reports (`kohaku migrate --summaries`): what every backend's
//! [`crate::StatsSink::stored_reports_after`] does once it has read a connection's rows.

use crate::{parse_timestamp, Connection, RawJson, Report, SinkError, StatsObject};

/// One stored stats object with what its row says of its report, as a backend reads it back
/// (times as [`crate::format_timestamp`] writes them).
#[derive(Debug, Clone)]
pub struct StoredObject {
    pub channel_id: String,
    pub session_id: String,
    pub client_id: String,
    pub bundle_id: Option<String>,
    pub sora_timestamp: String,
    pub received_at: String,
    pub rtc_type: String,
    pub rtc_id: String,
    pub rtc_timestamp: f64,
    pub rtc_data: String,
}

/// Rebuilds a connection's reports from its stored objects, given in Sora's time order:
/// consecutive objects with one `sora_timestamp` are one report. `connection` is the connection as
/// stored (its metadata; `None` when it has no row), so that writing the reports again changes
/// nothing; each report keeps its own channel, session, client and bundle ids. `backend` names
/// the store in errors.
pub fn reports_from_stored(
    backend: &str,
    connection_id: &str,
    connection: Option<Connection>,
    objects: impl IntoIterator<Item = StoredObject>,
) -> Result<Vec<Report>, SinkError> {
    let template = connection.unwrap_or_else(|| Connection {
        connection_id: connection_id.to_owned(),
        ..Connection::default()
    });
    let time = |text: &str| {
        parse_timestamp(text).map_err(|err| SinkError::Permanent {
            message: format!("{backend}: stored time {text:?} does not parse"),
            source: Some(Box::new(err)),
        })
    };
    let mut reports: Vec<(String, Report)> = Vec::new();
    for stored in objects {
        let object = StatsObject {
            rtc_type: stored.rtc_type,
            rtc_id: stored.rtc_id,
            rtc_timestamp: stored.rtc_timestamp,
            rtc_data: RawJson::from_string(stored.rtc_data).map_err(|err| {
                SinkError::Permanent {
                    message: format!("{backend}: a stored object of {connection_id} is not JSON"),
                    source: Some(Box::new(err)),
                }
            })?,
        };
        match reports.last_mut() {
            Some((at, report)) if *at == stored.sora_timestamp => report.stats.push(object),
            _ => {
                let connection = Connection {
                    channel_id: stored.channel_id,
                    session_id: stored.session_id,
                    client_id: stored.client_id,
                    bundle_id: stored.bundle_id,
                    ..template.clone()
                };
                let report = Report::new(
                    connection,
                    time(&stored.sora_timestamp)?,
                    time(&stored.received_at)?,
                    vec![object],
                );
                reports.push((stored.sora_timestamp, report));
            }
        }
    }
    Ok(reports.into_iter().map(|(_, report)| report).collect())
}
