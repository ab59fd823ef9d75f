//! The kohaku-sink conformance suite against a real SQLite file.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kohaku_sink::testkit::conformance::{self, ConformanceTarget, StoredConnection, StoredStats};
use kohaku_sink::{parse_timestamp, Connection as SoraConnection, StatsSink};
use kohaku_sqlite::{Config, SqliteSink};
use rusqlite::{params, Connection, OptionalExtension};

struct SqliteTarget {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    sink: Arc<SqliteSink>,
    /// A second connection holding the write lock plays the part of an outage.
    locker: Mutex<Option<Connection>>,
}

impl SqliteTarget {
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kohaku.db");
        let mut options = Config::at(&path);
        options.busy_timeout_ms = 200;
        let sink = Arc::new(SqliteSink::open(&options).expect("open"));
        sink.migrate().await.expect("migrate");
        Self {
            _dir: dir,
            path,
            sink,
            locker: Mutex::new(None),
        }
    }

    fn reader(&self) -> Connection {
        Connection::open(&self.path).expect("reader connection")
    }
}

fn time_column(row: &rusqlite::Row<'_>, index: usize) -> kohaku_sink::OffsetDateTime {
    let text: String = row.get(index).expect("time column");
    time_text(&text)
}

fn time_text(text: &str) -> kohaku_sink::OffsetDateTime {
    parse_timestamp(text).unwrap_or_else(|err| panic!("stored time {text:?} does not parse: {err}"))
}

#[async_trait]
impl ConformanceTarget for SqliteTarget {
    fn sink(&self) -> Arc<dyn StatsSink> {
        self.sink.clone()
    }

    async fn stored_stats(&self, connection_id: &str) -> Vec<StoredStats> {
        kohaku_sqlite::testkit::stored_rows(&self.path, Some(connection_id))
            .into_iter()
            .map(|row| StoredStats {
                channel_id: row.channel_id,
                session_id: row.session_id,
                client_id: row.client_id,
                connection_id: row.connection_id,
                bundle_id: row.bundle_id,
                rtc_type: row.rtc_type,
                rtc_id: row.rtc_id,
                rtc_timestamp: row.rtc_timestamp,
                rtc_data: serde_json::from_str(&row.rtc_data).expect("rtc_data is JSON"),
                sora_timestamp: time_text(&row.sora_timestamp),
                received_at: time_text(&row.received_at),
            })
            .collect()
    }

    async fn stored_connection(&self, connection_id: &str) -> Option<StoredConnection> {
        self.reader()
            .query_row(
                "SELECT channel_id, session_id, client_id, connection_id, bundle_id, label, version, node_name, \
                 role, multistream, simulcast, spotlight, first_seen, last_seen, group_id \
                 FROM sora_connection WHERE connection_id = ?1",
                params![connection_id],
                |row| {
                    Ok(StoredConnection {
                        connection: SoraConnection {
                            channel_id: row.get(0)?,
                            session_id: row.get(1)?,
                            client_id: row.get(2)?,
                            connection_id: row.get(3)?,
                            bundle_id: row.get(4)?,
                            group_id: row.get(14)?,
                            label: row.get(5)?,
                            version: row.get(6)?,
                            node_name: row.get(7)?,
                            role: row.get(8)?,
                            multistream: row.get(9)?,
                            simulcast: row.get(10)?,
                            spotlight: row.get(11)?,
                        },
                        first_seen: time_column(row, 12),
                        last_seen: time_column(row, 13),
                    })
                },
            )
            .optional()
            .expect("query connection")
    }

    async fn make_unavailable(&self) {
        let locker = self.reader();
        locker
            .execute_batch("BEGIN EXCLUSIVE")
            .expect("take the write lock");
        *self.locker.lock().expect("locker") = Some(locker);
    }

    async fn make_available(&self) {
        if let Some(locker) = self.locker.lock().expect("locker").take() {
            locker
                .execute_batch("ROLLBACK")
                .expect("release the write lock");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_passes_the_conformance_suite() {
    let target = SqliteTarget::new().await;
    conformance::run_all(&target).await;
}

/// Migrations are numbered 1, 2, … without gaps, so as many rows as the newest version.
const MIGRATIONS_APPLIED: i64 = kohaku_sqlite::SCHEMA_VERSION;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_version_is_recorded_and_reopening_keeps_data() {
    let target = SqliteTarget::new().await;
    conformance::round_trip_every_type(&target).await;
    let version: i64 = target
        .reader()
        .query_row(
            "SELECT max(version) FROM kohaku_schema_migrations",
            [],
            |row| row.get(0),
        )
        .expect("version");
    assert_eq!(version, kohaku_sqlite::SCHEMA_VERSION);

    // A second Kohaku start on the same file migrates nothing and sees the same rows.
    let reopened = SqliteSink::open(&Config::at(&target.path)).expect("reopen");
    reopened.migrate().await.expect("migrate again");
    let migrations: i64 = target
        .reader()
        .query_row("SELECT count(*) FROM kohaku_schema_migrations", [], |row| {
            row.get(0)
        })
        .expect("count");
    assert_eq!(migrations, MIGRATIONS_APPLIED, "each applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_refused_with_a_clear_message() {
    let target = SqliteTarget::new().await;
    target
        .reader()
        .execute(
            "INSERT INTO kohaku_schema_migrations (version, name, applied_at) VALUES (99, 'future', 'x')",
            [],
        )
        .expect("fake future version");
    let err = target.sink.migrate().await.expect_err("must refuse");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("version 99"), "{err}");
}

/// A database an older Kohaku (schema version 2, before `group_id`) filled is upgraded in place:
/// its rows stay, its connections have no group, and the next report of a connection sets one.
#[tokio::test]
async fn a_database_of_an_older_version_is_upgraded_in_place() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("old.db");
    {
        let old = Connection::open(&path).expect("open");
        old.execute_batch(concat!(
            include_str!("../../../schemas/sqlite/0001_init.sql"),
            include_str!("../../../schemas/sqlite/0002_views.sql"),
            "CREATE TABLE kohaku_schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL);
             INSERT INTO kohaku_schema_migrations VALUES (1, 'init', '2025-07-25T00:00:00.000000Z'), (2, 'views', '2025-07-25T00:00:00.000000Z');
             INSERT INTO rtc_stats VALUES ('ch', 's', 'c', 'OLDCONNECTION0000000000000', NULL, 'codec', 'C1', 1753423611556.5, '{\"id\":\"C1\"}', '2025-07-25T00:00:00.000000Z', '2025-07-25T00:00:00.000000Z');
             INSERT INTO sora_connection VALUES ('ch', 's', 'c', 'OLDCONNECTION0000000000000', NULL, 'l', 'v', 'n', 'sendrecv', NULL, 0, 0, '2025-07-25T00:00:00.000000Z', '2025-07-25T00:00:00.000000Z');"
        ))
        .expect("schema version 2 with data");
    }
    let sink = SqliteSink::open(&Config::at(&path)).expect("open");
    sink.migrate().await.expect("upgrade");
    sink.migrate().await.expect("again: a no-op");
    let reader = Connection::open(&path).expect("open");
    let versions: Vec<i64> = reader
        .prepare("SELECT version FROM kohaku_schema_migrations ORDER BY version")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    assert_eq!(kohaku_sqlite::SCHEMA_VERSION, 4);
    let group_of = || -> Option<String> {
        reader
            .query_row(
                "SELECT group_id FROM sora_connection WHERE connection_id = 'OLDCONNECTION0000000000000'",
                [],
                |row| row.get(0),
            )
            .expect("old connection kept")
    };
    assert_eq!(group_of(), None);
    let mut report = kohaku_sink::testkit::sample::report(
        kohaku_sink::testkit::sample::connection(1),
        1_753_423_699_000.0,
        2,
    );
    report.connection.connection_id = "OLDCONNECTION0000000000000".into();
    report.connection.group_id = Some("G1".into());
    let written = sink
        .write(&kohaku_sink::testkit::sample::batch([report]))
        .await
        .expect("write after the upgrade");
    assert_eq!(written.written, 2);
    assert_eq!(group_of().as_deref(), Some("G1"));
    let rows: i64 = reader
        .query_row("SELECT count(*) FROM rtc_stats", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 3, "the old row stays");
}

/// The summary table has exactly the columns `kohaku_sink` declares, after its key; a report
/// written three times (twice in one batch, once more later) leaves one summary, holding every
/// figure of the report's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_have_the_declared_columns_and_are_stored_once() {
    use kohaku_sink::testkit::sample;
    use kohaku_sink::{summary_columns, SummaryNumber, SummaryText};
    let target = SqliteTarget::new().await;
    let reader = target.reader();
    let columns: Vec<String> = reader
        .prepare("SELECT name FROM pragma_table_info('rtc_report_summary') ORDER BY cid")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = [
        "channel_id",
        "session_id",
        "client_id",
        "connection_id",
        "rtc_timestamp",
        "sora_timestamp",
    ];
    assert_eq!(columns[..key.len()], key);
    assert_eq!(
        columns[key.len()..].to_vec(),
        summary_columns().map(str::to_owned).collect::<Vec<_>>()
    );

    let report = sample::report(sample::connection(41), 1_753_423_611_556.5, 6);
    let summary = report.summary().cloned().expect("samples carry a summary");
    target
        .sink
        .write(&sample::batch([report.clone(), report.clone()]))
        .await
        .unwrap();
    target.sink.write(&sample::batch([report])).await.unwrap();
    let rows: i64 = reader
        .query_row("SELECT count(*) FROM rtc_report_summary", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(rows, 1, "one summary per report");
    for which in SummaryNumber::ALL {
        let stored: Option<f64> = reader
            .query_row(
                &format!("SELECT {} FROM rtc_report_summary", which.column()),
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(stored, summary.number(*which), "{}", which.column());
    }
    for which in SummaryText::ALL {
        let stored: Option<String> = reader
            .query_row(
                &format!("SELECT {} FROM rtc_report_summary", which.column()),
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(
            stored.as_deref(),
            summary.text(*which),
            "{}",
            which.column()
        );
    }
    let time: f64 = reader
        .query_row("SELECT rtc_timestamp FROM rtc_report_summary", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(time, summary.rtc_timestamp);
}
