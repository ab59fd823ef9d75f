//! The kohaku-sink conformance suite and the backend's own behaviour, against a real PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kohaku_sink::testkit::conformance::{self, ConformanceTarget, StoredConnection, StoredStats};
use kohaku_sink::testkit::sample;
use kohaku_sink::{parse_timestamp, Connection, RawJson, StatsObject, StatsSink};
use kohaku_timescaledb::testkit::fresh_database;
use kohaku_timescaledb::{ExtensionMode, Flavor, TimescaleOptions, TimescaleSink};
use sqlx::postgres::PgPool;
use sqlx::Row;

/// ISO-8601 UTC with microseconds, the shape `parse_timestamp` reads.
const ISO: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'";

struct PgTarget {
    sink: Arc<TimescaleSink>,
    reader: PgPool,
    /// A transaction holding an exclusive lock on rtc_stats plays the part of an outage.
    locker: tokio::sync::Mutex<Option<sqlx::Transaction<'static, sqlx::Postgres>>>,
}

async fn sink_for(url: &str) -> TimescaleSink {
    let mut options = TimescaleOptions::new(url);
    options.statement_timeout = Duration::from_millis(500);
    options.acquire_timeout = Duration::from_secs(2);
    // The samples are dated 2025: a retention sweep would delete them.
    options.settings.retention_days = 0;
    TimescaleSink::connect(options).expect("sink")
}

impl PgTarget {
    async fn new() -> Self {
        let url = fresh_database("conformance").await;
        let sink = Arc::new(sink_for(&url).await);
        sink.migrate().await.expect("migrate");
        Self {
            sink,
            reader: PgPool::connect(&url).await.expect("reader"),
            locker: tokio::sync::Mutex::new(None),
        }
    }
}

fn time(row: &sqlx::postgres::PgRow, column: &str) -> kohaku_sink::OffsetDateTime {
    let text: String = row.get(column);
    parse_timestamp(&text).unwrap_or_else(|err| panic!("{column} {text:?}: {err}"))
}

#[async_trait]
impl ConformanceTarget for PgTarget {
    fn sink(&self) -> Arc<dyn StatsSink> {
        self.sink.clone()
    }

    async fn stored_stats(&self, connection_id: &str) -> Vec<StoredStats> {
        let sql = format!(
            "SELECT channel_id, session_id, client_id, connection_id, bundle_id, rtc_type, rtc_id, rtc_timestamp, \
             rtc_data::text AS rtc_data, to_char(sora_timestamp AT TIME ZONE 'UTC', {ISO}) AS sora_timestamp, \
             to_char(received_at AT TIME ZONE 'UTC', {ISO}) AS received_at, \
             (extract(epoch FROM rtc_time) * 1000 - rtc_timestamp)::double precision AS time_skew_ms \
             FROM rtc_stats WHERE connection_id = $1"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(connection_id)
            .fetch_all(&self.reader)
            .await
            .expect("query rtc_stats");
        rows.iter()
            .map(|row| {
                let skew: f64 = row.get("time_skew_ms");
                assert!(
                    skew.abs() < 0.001,
                    "rtc_time is rtc_timestamp as a time (skew {skew} ms)"
                );
                let data: String = row.get("rtc_data");
                StoredStats {
                    channel_id: row.get("channel_id"),
                    session_id: row.get("session_id"),
                    client_id: row.get("client_id"),
                    connection_id: row.get("connection_id"),
                    bundle_id: row.get("bundle_id"),
                    rtc_type: row.get("rtc_type"),
                    rtc_id: row.get("rtc_id"),
                    rtc_timestamp: row.get("rtc_timestamp"),
                    rtc_data: serde_json::from_str(&data).expect("rtc_data is JSON"),
                    sora_timestamp: time(row, "sora_timestamp"),
                    received_at: time(row, "received_at"),
                }
            })
            .collect()
    }

    async fn stored_connection(&self, connection_id: &str) -> Option<StoredConnection> {
        let sql = format!(
            "SELECT channel_id, session_id, client_id, connection_id, bundle_id, group_id, label, version, node_name, role, \
             multistream, simulcast, spotlight, to_char(first_seen AT TIME ZONE 'UTC', {ISO}) AS first_seen, \
             to_char(last_seen AT TIME ZONE 'UTC', {ISO}) AS last_seen FROM sora_connection WHERE connection_id = $1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(connection_id)
            .fetch_optional(&self.reader)
            .await
            .expect("query sora_connection")?;
        Some(StoredConnection {
            connection: Connection {
                channel_id: row.get("channel_id"),
                session_id: row.get("session_id"),
                client_id: row.get("client_id"),
                connection_id: row.get("connection_id"),
                bundle_id: row.get("bundle_id"),
                group_id: row.get("group_id"),
                label: row.get("label"),
                version: row.get("version"),
                node_name: row.get("node_name"),
                role: row.get("role"),
                multistream: row.get("multistream"),
                simulcast: row.get("simulcast"),
                spotlight: row.get("spotlight"),
            },
            first_seen: time(&row, "first_seen"),
            last_seen: time(&row, "last_seen"),
        })
    }

    async fn make_unavailable(&self) {
        let mut tx = self.reader.begin().await.expect("begin");
        sqlx::query("LOCK TABLE rtc_stats IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .expect("lock");
        *self.locker.lock().await = Some(tx);
    }

    async fn make_available(&self) {
        if let Some(tx) = self.locker.lock().await.take() {
            tx.rollback().await.expect("release the lock");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_conformance_suite() {
    let target = PgTarget::new().await;
    conformance::run_all(&target).await;
    let flavor = target.sink.flavor().expect("migrated");
    assert!(
        kohaku_timescaledb::testkit::is_expected_flavor(&flavor),
        "{flavor:?} on a {} server",
        kohaku_timescaledb::testkit::server_flavor()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_upgraded_and_migrations_are_idempotent() {
    let url = fresh_database("upgrade").await;
    let sink = sink_for(&url).await;
    assert_eq!(sink.migrate_to(1).await.expect("version 1"), 1);
    // What a Kohaku of schema version 1 wrote; this build's writer fills columns added since.
    let reader = PgPool::connect(&url).await.unwrap();
    let report = sample::every_type_report(sample::connection(7), 1_753_423_611_556.5);
    let connection = &report.connection;
    for object in &report.stats {
        sqlx::query(
            "INSERT INTO rtc_stats (rtc_time, channel_id, session_id, client_id, connection_id, \
             bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) \
             VALUES (to_timestamp($8 / 1000.0), $1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, now(), now())",
        )
        .bind(&connection.channel_id)
        .bind(&connection.session_id)
        .bind(&connection.client_id)
        .bind(&connection.connection_id)
        .bind(&connection.bundle_id)
        .bind(&object.rtc_type)
        .bind(&object.rtc_id)
        .bind(object.rtc_timestamp)
        .bind(object.rtc_data.get())
        .execute(&reader)
        .await
        .expect("write at version 1");
    }
    sqlx::query(
        "INSERT INTO sora_connection (channel_id, session_id, client_id, connection_id, label, \
         version, node_name, role, simulcast, spotlight, first_seen, last_seen) \
         VALUES ($1, $2, $3, $4, 'l', 'v', 'n', 'sendrecv', false, false, \
         '2025-07-25T00:00:00Z', '2025-07-25T00:00:00Z')",
    )
    .bind(&connection.channel_id)
    .bind(&connection.session_id)
    .bind(&connection.client_id)
    .bind(&connection.connection_id)
    .execute(&reader)
    .await
    .expect("connection at version 1");
    let written = report.stats.len() as u64;

    sink.migrate().await.expect("upgrade");
    sink.migrate().await.expect("again: a no-op");
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM kohaku_schema_migrations ORDER BY version")
            .fetch_all(&reader)
            .await
            .unwrap();
    let every: Vec<i32> = kohaku_timescaledb::schema::MIGRATIONS
        .iter()
        .map(|(version, _, _)| *version)
        .collect();
    assert_eq!(versions, every);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rtc_stats")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(rows as u64, written, "data survives the upgrade");
    // The typed views read the rows written before the upgrade.
    let outbound: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rtc_outbound_rtp WHERE bytes_sent IS NOT NULL")
            .fetch_one(&reader)
            .await
            .unwrap();
    assert!(outbound > 0);
    let rates: i64 = sqlx::query_scalar("SELECT count(*) FROM rtc_outbound_rtp_rates")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(rates, outbound, "one rate row per sample");
    // The old connection has no group; the next webhook report of it sets one.
    let group_of = || {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT group_id FROM sora_connection WHERE connection_id = $1",
        )
        .bind(&connection.connection_id)
        .fetch_one(&reader)
    };
    assert_eq!(group_of().await.unwrap(), None);
    let mut grouped = sample::report(connection.clone(), 1_753_423_699_000.0, 2);
    grouped.connection.group_id = Some("G7".into());
    sink.write(&sample::batch([grouped]))
        .await
        .expect("write after the upgrade");
    assert_eq!(group_of().await.unwrap().as_deref(), Some("G7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_postgres_refuses_is_reported_and_the_rest_stored() {
    let url = fresh_database("refused").await;
    let sink = sink_for(&url).await;
    sink.migrate().await.unwrap();
    let mut report = sample::report(sample::connection(8), 1_753_423_611_556.5, 10);
    // jsonb cannot hold \u0000, nor a lone surrogate; the latter only the database detects.
    report.stats.push(StatsObject {
        rtc_id: "NUL".into(),
        rtc_type: "codec".into(),
        rtc_timestamp: 1_753_423_611_556.5,
        rtc_data: RawJson::from_string(
            r#"{"id":"NUL","type":"codec","timestamp":1753423611556.5,"x":"a\u0000b"}"#.into(),
        )
        .unwrap(),
    });
    report.stats.push(StatsObject {
        rtc_id: "SURROGATE".into(),
        rtc_type: "codec".into(),
        rtc_timestamp: 1_753_423_611_556.5,
        rtc_data: RawJson::from_string(
            r#"{"id":"SURROGATE","type":"codec","timestamp":1753423611556.5,"x":"\udc00"}"#.into(),
        )
        .unwrap(),
    });
    let other = sample::report(sample::connection(9), 1_753_423_611_556.5, 5);
    let result = sink
        .write(&sample::batch([report, other]))
        .await
        .expect("the batch is written");
    assert_eq!(result.written, 15);
    let mut refused: Vec<&str> = result
        .rejected
        .iter()
        .map(|row| row.rtc_id.as_str())
        .collect();
    refused.sort();
    assert_eq!(refused, ["NUL", "SURROGATE"]);
    assert!(result.rejected.iter().all(|row| !row.reason.is_empty()));
    let reader = PgPool::connect(&url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rtc_stats")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(rows, 15);
    let connections: i64 = sqlx::query_scalar("SELECT count(*) FROM sora_connection")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(connections, 2);
}

/// Rows and connections older than `retention_days` go, on whatever server: deleted by Kohaku on
/// plain PostgreSQL, dropped with their chunk by Kohaku on Apache-only TimescaleDB, by the
/// retention policy (run here at once) on TimescaleDB; the connection whose stats are all gone
/// goes with them, the recent ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_rows_and_their_connections_on_every_server() {
    let url = fresh_database("retention").await;
    let mut options = TimescaleOptions::new(&url);
    options.settings.retention_days = 30;
    let sink = TimescaleSink::connect(options).unwrap();
    sink.migrate().await.unwrap();
    let now_ms = kohaku_sink::OffsetDateTime::now_utc().unix_timestamp() as f64 * 1000.0;
    let old = sample::report(sample::connection(10), now_ms - 40.0 * 86_400_000.0, 7);
    let recent = sample::report(sample::connection(11), now_ms - 86_400_000.0, 4);
    let recent_connection = recent.connection.connection_id.clone();
    sink.write(&sample::batch([old, recent])).await.unwrap();
    let reader = PgPool::connect(&url).await.unwrap();
    if let Some(Flavor::TimescaleDb { .. }) = sink.flavor() {
        let job: i32 = sqlx::query_scalar(
            "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'",
        )
        .fetch_one(&reader)
        .await
        .unwrap();
        sqlx::query("CALL run_job($1)")
            .bind(job)
            .execute(&reader)
            .await
            .unwrap();
    }
    sink.enforce_retention().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM rtc_stats")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(left, 4, "the old rows are gone, the recent ones stay");
    let connections: Vec<String> = sqlx::query_scalar("SELECT connection_id FROM sora_connection")
        .fetch_all(&reader)
        .await
        .unwrap();
    assert_eq!(
        connections,
        [recent_connection],
        "the emptied connection goes too"
    );
    assert_eq!(sink.enforce_retention().await.unwrap(), 0);
    let counters = sink.counters();
    let value = |name: &str| counters.iter().find(|c| c.name == name).map(|c| c.value);
    // Kohaku's hourly task may have run a sweep too: the counters hold what both did.
    match sink.flavor().expect("migrated") {
        Flavor::PlainPostgres => assert_eq!(value("retention_deleted_rows"), Some(7)),
        Flavor::ApacheOnly { .. } => assert!(value("retention_dropped_chunks").unwrap() >= 1),
        Flavor::TimescaleDb { .. } => {
            assert_eq!(
                value("retention_deleted_rows"),
                Some(0),
                "the policy did it"
            )
        }
    }
    assert_eq!(value("retention_deleted_connections"), Some(1));
    assert!(value("retention_runs").unwrap() >= 2);
}

/// The row-by-row sweep (plain PostgreSQL's) run on a hypertable, as a Kohaku with
/// `extension = "off"` would: it deletes exactly the expired rows. It once matched rows by `ctid`,
/// which is unique only within one chunk, and deleted recent rows of other chunks too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_row_sweep_deletes_only_expired_rows_even_on_a_hypertable() {
    let url = fresh_database("sweep").await;
    let mut options = TimescaleOptions::new(&url);
    // No policy of TimescaleDB's own may touch the rows before the sweep.
    options.settings.retention_days = 0;
    options.settings.compress_after_days = 0;
    options.settings.chunk_interval = "1 hour".into();
    let sink = TimescaleSink::connect(options.clone()).unwrap();
    sink.migrate().await.unwrap();
    let now_ms = kohaku_sink::OffsetDateTime::now_utc().unix_timestamp() as f64 * 1000.0;
    // Many chunks of recent rows beside the expired ones, so that equal ctids exist in several.
    let mut reports = vec![sample::report(
        sample::connection(20),
        now_ms - 40.0 * 86_400_000.0,
        7,
    )];
    for hour in 1..=6 {
        reports.push(sample::report(
            sample::connection(20 + hour),
            now_ms - f64::from(hour as u32) * 3_600_000.0,
            7,
        ));
    }
    sink.write(&sample::batch(reports)).await.unwrap();
    options.extension = ExtensionMode::Off;
    options.settings.retention_days = 30;
    let plain = TimescaleSink::connect(options).unwrap();
    plain.migrate().await.unwrap();
    assert_eq!(plain.flavor(), Some(Flavor::PlainPostgres));
    plain.enforce_retention().await.unwrap();
    // Its hourly task may have swept first: count what both deleted.
    let counters = plain.counters();
    let deleted = counters
        .iter()
        .find(|c| c.name == "retention_deleted_rows")
        .map(|c| c.value);
    assert_eq!(deleted, Some(7));
    let reader = PgPool::connect(&url).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM rtc_stats")
        .fetch_one(&reader)
        .await
        .unwrap();
    assert_eq!(left, 42);
}

#[tokio::test]
async fn errors_never_show_the_password() {
    // Nothing listens on port 9: the connection is refused.
    let mut options = TimescaleOptions::new("postgres://kohaku:hunter2@127.0.0.1:9/stats");
    options.acquire_timeout = Duration::from_millis(500);
    let sink = TimescaleSink::connect(options).unwrap();
    assert_eq!(
        sink.redacted_uri(),
        "postgres://kohaku:***@127.0.0.1:9/stats"
    );
    let err = sink.health().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(!err.detailed().contains("hunter2"));
    let err = sink.migrate().await.unwrap_err();
    assert!(err.is_transient());
    assert!(!err.detailed().contains("hunter2"));
    let err = TimescaleSink::connect(TimescaleOptions::new("mysql://kohaku:hunter2@h/db"))
        .err()
        .unwrap();
    assert!(!err.detailed().contains("hunter2"), "{}", err.detailed());
}

/// The summary table has exactly the columns `kohaku_sink` declares, after its key; a report
/// written three times (twice in one batch, once more later) leaves one summary, holding every
/// figure of the report's; a NUL in a text figure is stored as NULL instead of failing the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_have_the_declared_columns_and_are_stored_once() {
    use kohaku_sink::{summary_columns, SummaryNumber, SummaryText};
    let target = PgTarget::new().await;
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = 'rtc_report_summary' \
         ORDER BY ordinal_position",
    )
    .fetch_all(&target.reader)
    .await
    .unwrap();
    let key = [
        "rtc_time",
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

    let mut report = sample::report(sample::connection(41), 1_753_423_611_556.5, 6);
    let mut summary = report.summary().cloned().expect("samples carry a summary");
    summary.set_text(SummaryText::VideoCodec, Some("video/\0VP8".into()));
    report.set_summary(Some(summary.clone()));
    target
        .sink
        .write(&sample::batch([report.clone(), report.clone()]))
        .await
        .unwrap();
    target.sink.write(&sample::batch([report])).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rtc_report_summary")
        .fetch_one(&target.reader)
        .await
        .unwrap();
    assert_eq!(rows, 1, "one summary per report");
    for which in SummaryNumber::ALL {
        let stored: Option<f64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM rtc_report_summary",
            which.column()
        )))
        .fetch_one(&target.reader)
        .await
        .unwrap();
        assert_eq!(stored, summary.number(*which), "{}", which.column());
    }
    for which in SummaryText::ALL {
        let stored: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM rtc_report_summary",
            which.column()
        )))
        .fetch_one(&target.reader)
        .await
        .unwrap();
        let expected = summary.text(*which).filter(|text| !text.contains('\0'));
        assert_eq!(stored.as_deref(), expected, "{}", which.column());
    }
    let (time, exact): (f64, f64) = sqlx::query_as(
        "SELECT extract(epoch FROM rtc_time)::float8 * 1000, rtc_timestamp FROM rtc_report_summary",
    )
    .fetch_one(&target.reader)
    .await
    .unwrap();
    assert_eq!(exact, summary.rtc_timestamp);
    assert!(
        (time - summary.rtc_timestamp).abs() < 0.001,
        "rtc_time {time}"
    );
}
