//! Reading stored reports back, one connection at a time, for `kohaku migrate --summaries`.

use kohaku_sink::{
    reports_from_stored, Connection as SoraConnection, Report, SinkError, StoredObject,
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
        let stored_connection = sqlx::query(
            "SELECT channel_id, session_id, client_id, bundle_id, group_id, label, version, \
             node_name, role, multistream, simulcast, spotlight \
             FROM sora_connection WHERE connection_id = $1",
        )
        .bind(&connection_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify("timescaledb: cannot read sora_connection"))?
        .map(|row| SoraConnection {
            channel_id: row.get("channel_id"),
            session_id: row.get("session_id"),
            client_id: row.get("client_id"),
            connection_id: connection_id.clone(),
            bundle_id: row.get("bundle_id"),
            group_id: row.get("group_id"),
            label: row.get("label"),
            version: row.get("version"),
            node_name: row.get("node_name"),
            role: row.get("role"),
            multistream: row.get("multistream"),
            simulcast: row.get("simulcast"),
            spotlight: row.get("spotlight"),
        });
        let objects = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT channel_id, session_id, client_id, bundle_id, rtc_type, rtc_id, rtc_timestamp, \
             rtc_data::text AS rtc_data, to_char(sora_timestamp AT TIME ZONE 'UTC', {ISO}) AS sora, \
             to_char(received_at AT TIME ZONE 'UTC', {ISO}) AS received \
             FROM rtc_stats WHERE connection_id = $1 ORDER BY sora_timestamp, rtc_time"
        )))
        .bind(&connection_id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify("timescaledb: cannot read rtc_stats"))?
        .into_iter()
        .map(|row| StoredObject {
            channel_id: row.get("channel_id"),
            session_id: row.get("session_id"),
            client_id: row.get("client_id"),
            bundle_id: row.get("bundle_id"),
            sora_timestamp: row.get("sora"),
            received_at: row.get("received"),
            rtc_type: row.get("rtc_type"),
            rtc_id: row.get("rtc_id"),
            rtc_timestamp: row.get("rtc_timestamp"),
            rtc_data: row.get("rtc_data"),
        });
        let reports =
            reports_from_stored("timescaledb", &connection_id, stored_connection, objects)?;
        Ok(Some((connection_id, reports)))
    }
}
