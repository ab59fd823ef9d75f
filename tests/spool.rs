//! The durable spool end to end: what Kohaku answered 204 reaches every sink, through a sink
//! that cannot write, a full spool, a shutdown that cannot finish, a torn segment, and (with
//! PostgreSQL) a second sink and a SIGKILL.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use http::StatusCode;
use kohaku::config::{Config, SinksConfig, SpoolConfig, SqliteSinkConfig};
use kohaku::spool::{FsyncPolicy, Spool, SpoolOptions};
use kohaku_sink::OffsetDateTime;

const OBJECTS_PER_REPORT: usize = 10;

fn spooled_config(dir: &Path, max_bytes: u64) -> Config {
    let mut config = test_config();
    config.server.max_body_bytes = 16 * 1024;
    config.pipeline.shutdown_timeout_secs = 2;
    config.spool = Some(SpoolConfig {
        dir: dir.join("spool"),
        max_bytes,
        ..SpoolConfig::default()
    });
    config.sinks = Some(SinksConfig {
        sqlite: Some(SqliteSinkConfig {
            path: dir.join("stats.db"),
            busy_timeout_ms: 20,
        }),
        timescaledb: None,
    });
    config
}

/// Holds SQLite's write lock, as a long-running writer would: Kohaku's writes fail as busy
/// (transient) until it is dropped.
struct WriteLock(rusqlite::Connection);

impl WriteLock {
    fn take(db: &Path) -> Self {
        let connection = rusqlite::Connection::open(db).expect("open sqlite");
        connection
            .execute_batch("BEGIN EXCLUSIVE")
            .expect("take the write lock");
        Self(connection)
    }
}

/// Connection ids of reports answered 204, counted from the client side.
#[derive(Default)]
struct Acknowledged(BTreeSet<String>);

impl Acknowledged {
    fn objects(&self) -> i64 {
        (self.0.len() * OBJECTS_PER_REPORT) as i64
    }
}

fn stored_connections(db: &Path) -> BTreeSet<String> {
    sqlite_rows(db)
        .into_iter()
        .map(|row| row.connection_id)
        .collect()
}

async fn wait_for_health(exporter: &H2, status: StatusCode) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = exporter.get("/health").await;
        if answer.status == status {
            return answer.json();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health stays {}: {}",
            answer.status,
            answer.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_cannot_write_fills_the_spool_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config = spooled_config(dir.path(), 128 * 1024);
    let db = dir.path().join("stats.db");
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;
    let exporter = H2::connect(app.exporter_addr()).await;

    let lock = WriteLock::take(&db);
    let mut acknowledged = Acknowledged::default();
    let mut seed = 0;
    let refused = loop {
        let answer = client
            .post_report(small_report(seed, OBJECTS_PER_REPORT).to_string())
            .await;
        match answer.status {
            StatusCode::NO_CONTENT => {
                acknowledged.0.insert(sora_id(seed));
            }
            StatusCode::SERVICE_UNAVAILABLE => break answer,
            other => panic!("unexpected {other}: {}", answer.text()),
        }
        seed += 1;
        assert!(seed < 10_000, "the spool never filled");
    };
    assert_eq!(refused.json()["field"], "spool", "{}", refused.text());
    assert_contains(&refused.json()["error"].to_string(), "spool.max_bytes");
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(acknowledged.0.len() > 20, "{} accepted", acknowledged.0.len());

    let health = wait_for_health(&exporter, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(health["failing"], serde_json::json!(["sqlite"]));
    assert!(health["spool"]["bytes"].as_u64().unwrap() > 64 * 1024, "{health}");
    assert_eq!(health["spool"]["max_bytes"], 128 * 1024);
    assert!(health["spool"]["oldest_unsent_seconds"]["sqlite"].as_f64().unwrap() > 0.0);
    let metrics = exporter.get("/metrics").await.text();
    assert!(metric(&metrics, "kohaku_spool_bytes").unwrap() > 64.0 * 1024.0);
    assert!(metric(&metrics, "kohaku_spool_oldest_unsent_seconds{sink=\"sqlite\"}").unwrap() > 0.0);
    assert_eq!(
        metric(
            &metrics,
            "kohaku_http_requests_total{path=\"/collector\",status=\"503\"}"
        ),
        Some(1.0)
    );
    assert!(metric(&metrics, "kohaku_sink_retries_total{sink=\"sqlite\"}").unwrap() >= 1.0);

    // Shutdown cannot flush into a locked database: nothing is dropped, the spool keeps it.
    let summary = app.shutdown().await;
    assert_eq!(summary.dropped_rows, 0);
    drop(lock);
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), 0);

    // The next start replays the spool; new reports are accepted again.
    let app = start(&config, build_sinks(&config).await).await;
    let stored = wait_for_sqlite_rows(&db, acknowledged.objects(), Duration::from_secs(20)).await;
    assert_eq!(stored, acknowledged.objects());
    assert_eq!(stored_connections(&db), acknowledged.0);
    let client = H2::connect(app.ingest_addr()).await;
    let exporter = H2::connect(app.exporter_addr()).await;
    let answer = client
        .post_report(small_report(seed, OBJECTS_PER_REPORT).to_string())
        .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    wait_for_sqlite_rows(&db, stored + OBJECTS_PER_REPORT as i64, Duration::from_secs(10)).await;
    let health = wait_for_health(&exporter, StatusCode::OK).await;
    assert_eq!(health["spool"]["oldest_unsent_seconds"]["sqlite"], 0.0);
    assert!(
        health["spool"]["segments"].as_u64().unwrap() <= 2,
        "delivered segments are deleted: {health}"
    );
    eprintln!(
        "spool full: acknowledged {} objects, stored {}",
        acknowledged.objects(),
        stored
    );
    assert_eq!(app.shutdown().await.dropped_rows, 0);
}

fn segments(spool: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(spool)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    paths.sort();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_segments_are_cut_at_start_up_and_their_intact_records_stored() {
    let dir = tempfile::tempdir().unwrap();
    let config = spooled_config(dir.path(), 1 << 20);
    let spool_dir = config.spool.as_ref().unwrap().dir.clone();
    // A crashed Kohaku's spool: the fixture reports, written before any sink read them.
    let reports = fixture_reports("sora-logs/rtc_stats.sample.jsonl");
    {
        let mut spool = Spool::open(&SpoolOptions {
            dir: spool_dir.clone(),
            max_bytes: 256 * 1024,
            fsync: FsyncPolicy::Always,
        })
        .unwrap();
        let appender = spool.appender();
        for report in &reports {
            appender
                .append(OffsetDateTime::now_utc(), report.body.clone().into())
                .await
                .unwrap();
        }
        spool.close_writer().await;
    }
    // Cut the last record of the first and of the last non-empty segment in the middle.
    let mut cut = BTreeSet::new();
    let mut index = 0;
    let files = segments(&spool_dir);
    let with_records: Vec<(PathBuf, usize, std::ops::Range<usize>)> = files
        .iter()
        .filter_map(|path| {
            let bytes = std::fs::read(path).unwrap();
            let (spans, stopped) = kohaku::spool::record::scan(&bytes[8..]);
            assert_eq!(stopped, None);
            let first = index;
            index += spans.len();
            spans.last().cloned().map(|last| (path.clone(), first + spans.len() - 1, last))
        })
        .collect();
    assert_eq!(index, reports.len());
    assert!(with_records.len() >= 3, "{} segments", with_records.len());
    for (path, record, span) in [&with_records[0], with_records.last().unwrap()] {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(8 + (span.start + span.len() / 2) as u64).unwrap();
        cut.insert(*record);
    }

    let app = start(&config, build_sinks(&config).await).await;
    let expected: BTreeSet<(String, String, u64)> = reports
        .iter()
        .enumerate()
        .filter(|(index, _)| !cut.contains(index))
        .flat_map(|(_, report)| {
            report.objects.iter().map(|object| {
                (
                    report.connection_id.clone(),
                    object.rtc_id.clone(),
                    object.rtc_timestamp.to_bits(),
                )
            })
        })
        .collect();
    let db = dir.path().join("stats.db");
    let stored = wait_for_sqlite_rows(&db, expected.len() as i64, Duration::from_secs(20)).await;
    assert_eq!(stored, expected.len() as i64);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keys: BTreeSet<_> = sqlite_rows(&db).iter().map(StoredRow::key).collect();
    assert_eq!(keys, expected, "exactly the intact records are stored");
    assert_eq!(app.shutdown().await.dropped_rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_kohaku_cannot_take_the_same_spool() {
    let dir = tempfile::tempdir().unwrap();
    let config = spooled_config(dir.path(), 1 << 20);
    let app = start(&config, build_sinks(&config).await).await;
    let second = kohaku::app::App::start(
        &Config {
            server: kohaku::config::ServerConfig {
                listen_port: 0,
                ..config.server.clone()
            },
            ..config.clone()
        },
        build_sinks(&config).await,
    )
    .await;
    let err = second.err().expect("refused").to_string();
    assert_contains(&err, "in use by another Kohaku");
    assert_contains(&err, "spool");
    app.shutdown().await;
}
