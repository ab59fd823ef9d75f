//! Reading stored reports back, one connection at a time, for `kohaku migrate --summaries`.

use kohaku_sink::{
    parse_timestamp, Connection as SoraConnection, RawJson, Report, SinkError, StatsObject,
};
use sqlx::Row;

use crate::error::classify;
use crate::TimescaleSink;

/// How a timestamptz is read back: the text `parse_timestamp` reads.
const ISO: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'";

impl TimescaleSink {
    pub(crate) async fn read_stored_reports_after(
        &self,
        after: Option<&str>,
    ) -> Result<Option<(String, Vec<Report>)>, SinkError> {
        let next: Option<String> =
            sqlx::query_scalar("SELECT min(connection_id) FROM rtc_stats WHERE connection_id > $1")
                .bind(after.unwrap_or(""))
                .fetch_one(&self.pool)
                .await
                .map_err(classify("timescaledb: cannot find the next connection"))?;
        let Some(connection_id) = next else {
            return Ok(None);
        };
        // The connection's metadata as stored, so that writing the reports again changes nothing.
        let metadata = sqlx::query(
            "SELECT label, version, node_name, role, multistream, simulcast, spotlight, group_id \
             FROM sora_connection WHERE connection_id = $1",
        )
        .bind(&connection_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify("timescaledb: cannot read sora_connection"))?;
        let metadata = match metadata {
            Some(row) => (
                row.get::<String, _>(0),
                row.get::<String, _>(1),
                row.get::<String, _>(2),
                row.get::<String, _>(3),
                row.get::<Option<bool>, _>(4),
                row.get::<bool, _>(5),
                row.get::<bool, _>(6),
                row.get::<Option<String>, _>(7),
            ),
            None => Default::default(),
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT channel_id, session_id, client_id, bundle_id, rtc_type, rtc_id, rtc_timestamp, \
             rtc_data::text AS rtc_data, to_char(sora_timestamp AT TIME ZONE 'UTC', {ISO}) AS sora, \
             to_char(received_at AT TIME ZONE 'UTC', {ISO}) AS received \
             FROM rtc_stats WHERE connection_id = $1 ORDER BY sora_timestamp, rtc_time"
        )))
        .bind(&connection_id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify("timescaledb: cannot read rtc_stats"))?;
        let time = |text: &str| {
            parse_timestamp(text).map_err(|err| SinkError::Permanent {
                message: format!("timescaledb: stored time {text:?} does not parse"),
                source: Some(Box::new(err)),
            })
        };
        let mut reports: Vec<(String, Report)> = Vec::new();
        for row in rows {
            let sora_timestamp: String = row.get("sora");
            let object = StatsObject {
                rtc_type: row.get("rtc_type"),
                rtc_id: row.get("rtc_id"),
                rtc_timestamp: row.get("rtc_timestamp"),
                rtc_data: RawJson::from_string(row.get("rtc_data")).map_err(|err| {
                    SinkError::Permanent {
                        message: format!(
                            "timescaledb: a stored object of {connection_id} is not JSON"
                        ),
                        source: Some(Box::new(err)),
                    }
                })?,
            };
            match reports.last_mut() {
                Some((at, report)) if *at == sora_timestamp => report.stats.push(object),
                _ => {
                    let (
                        label,
                        version,
                        node_name,
                        role,
                        multistream,
                        simulcast,
                        spotlight,
                        group_id,
                    ) = metadata.clone();
                    let sora = SoraConnection {
                        channel_id: row.get("channel_id"),
                        session_id: row.get("session_id"),
                        client_id: row.get("client_id"),
                        connection_id: connection_id.clone(),
                        bundle_id: row.get("bundle_id"),
                        group_id,
                        label,
                        version,
                        node_name,
                        role,
                        multistream,
                        simulcast,
                        spotlight,
                    };
                    let received: String = row.get("received");
                    let report =
                        Report::new(sora, time(&sora_timestamp)?, time(&received)?, vec![object]);
                    reports.push((sora_timestamp, report));
                }
            }
        }
        Ok(Some((
            connection_id,
            reports.into_iter().map(|(_, report)| report).collect(),
        )))
    }
}
