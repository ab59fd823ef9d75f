//! Reading back what the sink stored, for this crate's conformance test and Kohaku's end-to-end
//! tests; behind the `testkit` feature so that nothing test-only is in a release build.

use std::path::Path;

use rusqlite::{params, Connection};

/// One row of `rtc_stats` as stored: the text columns exactly as written.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub channel_id: String,
    pub session_id: String,
    pub client_id: String,
    pub connection_id: String,
    pub bundle_id: Option<String>,
    pub rtc_type: String,
    pub rtc_id: String,
    pub rtc_timestamp: f64,
    pub rtc_data: String,
    pub sora_timestamp: String,
    pub received_at: String,
}

impl StoredRow {
    /// The idempotency key: `(connection_id, rtc_id, rtc_timestamp bits)`.
    pub fn key(&self) -> (String, String, u64) {
        (
            self.connection_id.clone(),
            self.rtc_id.clone(),
            self.rtc_timestamp.to_bits(),
        )
    }
}

/// Every row of `rtc_stats` in the database at `path`, or only `connection_id`'s.
pub fn stored_rows(path: &Path, connection_id: Option<&str>) -> Vec<StoredRow> {
    let connection = Connection::open(path).expect("open sqlite");
    let mut statement = connection
        .prepare(
            "SELECT channel_id, session_id, client_id, connection_id, bundle_id, rtc_type, rtc_id, \
             rtc_timestamp, rtc_data, sora_timestamp, received_at FROM rtc_stats \
             WHERE ?1 IS NULL OR connection_id = ?1",
        )
        .expect("prepare");
    statement
        .query_map(params![connection_id], |row| {
            Ok(StoredRow {
                channel_id: row.get(0)?,
                session_id: row.get(1)?,
                client_id: row.get(2)?,
                connection_id: row.get(3)?,
                bundle_id: row.get(4)?,
                rtc_type: row.get(5)?,
                rtc_id: row.get(6)?,
                rtc_timestamp: row.get(7)?,
                rtc_data: row.get(8)?,
                sora_timestamp: row.get(9)?,
                received_at: row.get(10)?,
            })
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// The one value `sql` selects, e.g. a `count(*)`.
pub fn query_i64(path: &Path, sql: &str) -> i64 {
    Connection::open(path)
        .expect("open sqlite")
        .query_row(sql, [], |row| row.get(0))
        .expect("query")
}
