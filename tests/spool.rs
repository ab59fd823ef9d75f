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
use kohaku::sora::Protocol;
use kohaku::spool::{FsyncPolicy, Spool, SpoolOptions};
use kohaku_sink::OffsetDateTime;

const OBJECTS_PER_REPORT: usize = 10;
const HEALTH_WAIT: Duration = Duration::from_secs(10);

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
        ..SinksConfig::default()
    });
    config
}

/// Holds SQLite's write lock, as a long-running writer would: Kohaku's writes fail as busy
/// (transient) until it is dropped.
struct WriteLock {
    _holder: rusqlite::Connection,
}

impl WriteLock {
    fn take(db: &Path) -> Self {
        let connection = rusqlite::Connection::open(db).expect("open sqlite");
        connection
            .execute_batch("BEGIN EXCLUSIVE")
            .expect("take the write lock");
        Self {
            _holder: connection,
        }
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

/// Sends reports until one is refused with 503: what was acknowledged, the refusal, and the seed
/// of the refused report.
async fn send_until_refused(client: &H2) -> (Acknowledged, Answer, u64) {
    let mut acknowledged = Acknowledged::default();
    for seed in 0..10_000 {
        let answer = client
            .post_report(small_report(seed, OBJECTS_PER_REPORT).to_string())
            .await;
        match answer.status {
            StatusCode::NO_CONTENT => {
                acknowledged.0.insert(sora_id(seed));
            }
            StatusCode::SERVICE_UNAVAILABLE => return (acknowledged, answer, seed),
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    panic!("10,000 reports and no 503");
}

fn stored_connections(db: &Path) -> BTreeSet<String> {
    sqlite_rows(db)
        .into_iter()
        .map(|row| row.connection_id)
        .collect()
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
    let (acknowledged, refused, seed) = send_until_refused(&client).await;
    assert_eq!(refused.json()["field"], "spool", "{}", refused.text());
    assert_contains(&refused.json()["error"].to_string(), "spool.max_bytes");
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(
        acknowledged.0.len() > 20,
        "{} accepted",
        acknowledged.0.len()
    );

    let health = wait_for_health(&exporter, StatusCode::SERVICE_UNAVAILABLE, HEALTH_WAIT).await;
    assert_eq!(health["failing"], serde_json::json!(["sqlite"]));
    assert!(
        health["spool"]["bytes"].as_u64().unwrap() > 64 * 1024,
        "{health}"
    );
    assert_eq!(health["spool"]["max_bytes"], 128 * 1024);
    assert!(
        health["spool"]["oldest_unsent_seconds"]["sqlite"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let metrics = exporter.get("/metrics").await.text();
    assert!(metric(&metrics, "kohaku_spool_bytes").unwrap() > 64.0 * 1024.0);
    assert!(
        metric(
            &metrics,
            "kohaku_spool_oldest_unsent_seconds{sink=\"sqlite\"}"
        )
        .unwrap()
            > 0.0
    );
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
    // The rows are visible a moment before the sink's cursor moves and the replayed segments are
    // deleted; until then the spool is still full.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&exporter.get("/metrics").await.text(), "kohaku_spool_bytes")
        .is_none_or(|bytes| bytes > 64.0 * 1024.0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = client
        .post_report(small_report(seed, OBJECTS_PER_REPORT).to_string())
        .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    wait_for_sqlite_rows(
        &db,
        stored + OBJECTS_PER_REPORT as i64,
        Duration::from_secs(10),
    )
    .await;
    let health = wait_for_health(&exporter, StatusCode::OK, HEALTH_WAIT).await;
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
    let config = spooled_config(dir.path(), 4 << 20);
    let spool_dir = config.spool.as_ref().unwrap().dir.clone();
    // A crashed Kohaku's spool: the fixture reports, written before any sink read them: Sora's
    // as exporter bodies, Chromium's as stats webhooks.
    let exporter_reports = fixture_reports("sora-logs/rtc_stats.sample.jsonl");
    let webhooks = fixture_webhooks("chromium/rtc_stats.chromium-av.jsonl");
    let spooled: Vec<(Protocol, &FixtureReport)> = exporter_reports
        .iter()
        .map(|report| (Protocol::Exporter, report))
        .chain(webhooks.iter().map(|report| (Protocol::Webhook, report)))
        .collect();
    let reports: Vec<&FixtureReport> = spooled.iter().map(|(_, report)| *report).collect();
    {
        let mut spool = Spool::open(&SpoolOptions {
            dir: spool_dir.clone(),
            max_bytes: 1 << 20,
            fsync: FsyncPolicy::Always,
        })
        .unwrap();
        let appender = spool.appender();
        for (protocol, report) in &spooled {
            appender
                .append(
                    OffsetDateTime::now_utc(),
                    *protocol,
                    report.body.clone().into(),
                )
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
            let (spans, stopped) =
                kohaku::spool::record::scan(&bytes[8..], kohaku::spool::record::Format::V2);
            assert_eq!(stopped, None);
            let first = index;
            index += spans.len();
            spans
                .last()
                .cloned()
                .map(|last| (path.clone(), first + spans.len() - 1, last))
        })
        .collect();
    assert_eq!(index, reports.len());
    assert!(with_records.len() >= 3, "{} segments", with_records.len());
    for (path, record, span) in [&with_records[0], with_records.last().unwrap()] {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(8 + (span.start + span.len() / 2) as u64)
            .unwrap();
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

/// The disk under the spool fills while a sink is down: requests that could not be written get
/// 503 (never 204), `/health` names the spool, and once space is freed Kohaku takes reports again
/// without a restart; when the sink is back, every acknowledged object is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_spool_refuses_what_it_cannot_write_and_recovers() {
    let Some(filesystem) = SmallFilesystem::mount(512 * 1024) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = spooled_config(dir.path(), 64 << 20);
    config.spool.as_mut().unwrap().dir = filesystem.path().join("spool");
    let db = dir.path().join("stats.db");
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;
    let exporter = H2::connect(app.exporter_addr()).await;
    let filler = filesystem.fill_leaving(96 * 1024);
    let lock = WriteLock::take(&db);

    let (mut acknowledged, refused, mut seed) = send_until_refused(&client).await;
    assert_eq!(refused.json()["field"], "spool");
    assert_contains(&refused.text(), "cannot write the spool");
    let health = wait_for_health(&exporter, StatusCode::SERVICE_UNAVAILABLE, HEALTH_WAIT).await;
    assert!(
        health["failing"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("spool")),
        "{health}"
    );
    assert!(health["spool"]["write_error"].is_string(), "{health}");

    // Space comes back: reports are taken again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    for _ in 0..5 {
        seed += 1;
        let answer = client
            .post_report(small_report(seed, OBJECTS_PER_REPORT).to_string())
            .await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
        acknowledged.0.insert(sora_id(seed));
    }
    let health = exporter.get("/health").await.json();
    assert_eq!(health["failing"], serde_json::json!(["sqlite"]), "{health}");

    drop(lock);
    let stored = wait_for_sqlite_rows(&db, acknowledged.objects(), Duration::from_secs(20)).await;
    assert_eq!(
        stored,
        acknowledged.objects(),
        "every acknowledged object, once"
    );
    assert_eq!(stored_connections(&db), acknowledged.0);
    wait_for_health(&exporter, StatusCode::OK, HEALTH_WAIT).await;
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

#[cfg(all(feature = "timescaledb", feature = "testkit"))]
mod with_postgresql {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::Method;
    use http_body_util::Full;
    use kohaku::config::TimescaleSinkConfig;
    use kohaku_timescaledb::testkit;

    use super::*;

    async fn postgres_connections(url: &str) -> BTreeSet<String> {
        testkit::stored_rows(url)
            .await
            .into_iter()
            .map(|row| row.connection_id)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_sink_down_does_not_hold_back_the_other_and_catches_up_later() {
        let url = testkit::fresh_database("spool_two_sinks").await;
        let dir = tempfile::tempdir().unwrap();
        let mut config = spooled_config(dir.path(), 64 << 20);
        if let Some(sinks) = config.sinks.as_mut() {
            sinks.timescaledb = Some(TimescaleSinkConfig {
                compress_after_days: 0,
                ..timescaledb_config(&url)
            });
        }
        let db = dir.path().join("stats.db");
        let app = start(&config, build_sinks(&config).await).await;
        let client = H2::connect(app.ingest_addr()).await;
        let exporter = H2::connect(app.exporter_addr()).await;

        let lock = WriteLock::take(&db);
        let mut acknowledged = Acknowledged::default();
        for seed in 0..40 {
            let answer = client
                .post_report(small_report(seed, OBJECTS_PER_REPORT).to_string())
                .await;
            assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
            acknowledged.0.insert(sora_id(seed));
        }
        let in_postgres =
            wait_for_postgres_rows(&url, acknowledged.objects(), Duration::from_secs(20)).await;
        assert_eq!(
            in_postgres,
            acknowledged.objects(),
            "PostgreSQL is not held back"
        );
        let health = wait_for_health(&exporter, StatusCode::SERVICE_UNAVAILABLE, HEALTH_WAIT).await;
        assert_eq!(health["failing"], serde_json::json!(["sqlite"]));
        assert_eq!(
            health["spool"]["oldest_unsent_seconds"]["timescaledb"], 0.0,
            "{health}"
        );
        // Counted while the lock still holds SQLite back (WAL: readers are not blocked by it).
        assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), 0);
        drop(lock);

        let in_sqlite =
            wait_for_sqlite_rows(&db, acknowledged.objects(), Duration::from_secs(20)).await;
        assert_eq!(in_sqlite, acknowledged.objects(), "SQLite catches up");
        assert_eq!(stored_connections(&db), acknowledged.0);
        assert_eq!(postgres_connections(&url).await, acknowledged.0);
        wait_for_health(&exporter, StatusCode::OK, HEALTH_WAIT).await;
        assert_eq!(app.shutdown().await.dropped_rows, 0);
    }

    /// POSTs a report; `None` when the connection is gone (Kohaku was killed).
    async fn try_post(client: &H2, body: String) -> Option<StatusCode> {
        let request = client
            .request(Method::POST, "/collector")
            .header(EXPORTER_TYPE.0, EXPORTER_TYPE.1)
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        client.send(request).await.ok().map(|answer| answer.status)
    }

    /// POSTs a stats webhook over HTTP/1.1; `None` when the connection is gone.
    async fn try_post_webhook(client: &H1, body: String) -> Option<StatusCode> {
        let request = webhook_request(client.request(Method::POST, WEBHOOK_PATH), body);
        client.send(request).await.ok().map(|answer| answer.status)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigkill_under_load_then_restart_stores_every_acknowledged_object_in_both_sinks() {
        let url = testkit::fresh_database("spool_crash").await;
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[server]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 0\n\
             [exporter]\nlisten_port = 0\n\
             [pipeline]\nbatch_max_wait_ms = 20\nbatch_max_rows = 500\n\
             [spool]\ndir = \"spool\"\nmax_bytes = 268435456\n\
             [sinks.sqlite]\npath = \"stats.db\"\n\
             [sinks.timescaledb]\nuri = \"{url}\"\nretention_days = 0\ncompress_after_days = 0\n"
        );
        let mut served = serve(dir.path(), &config);
        let client = H2::connect(served.ingest).await;

        let next_seed = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
        let killed = Arc::new(AtomicBool::new(false));
        let mut senders = tokio::task::JoinSet::new();
        // Half the senders are Sora's webhook workers (HTTP/1.1, one connection each), half its
        // exporter (HTTP/2 streams on one connection).
        for sender in 0..8 {
            let webhook = if sender % 2 == 1 {
                Some(H1::connect(served.ingest).await)
            } else {
                None
            };
            let (client, next_seed, sent, acknowledged, killed) = (
                client.clone(),
                Arc::clone(&next_seed),
                Arc::clone(&sent),
                Arc::clone(&acknowledged),
                Arc::clone(&killed),
            );
            senders.spawn(async move {
                // Bounded: the kill comes long before.
                for _ in 0..20_000 {
                    let seed = next_seed.fetch_add(1, Ordering::SeqCst);
                    sent.fetch_add(1, Ordering::SeqCst);
                    let answer = match &webhook {
                        Some(webhook) => {
                            let body = small_webhook(seed, OBJECTS_PER_REPORT).to_string();
                            try_post_webhook(webhook, body).await
                        }
                        None => {
                            let body = small_report(seed, OBJECTS_PER_REPORT).to_string();
                            try_post(&client, body).await
                        }
                    };
                    match answer {
                        Some(StatusCode::NO_CONTENT) => {
                            acknowledged.lock().unwrap().0.insert(sora_id(seed));
                        }
                        Some(other) => panic!("unexpected {other}"),
                        None if killed.load(Ordering::SeqCst) => return,
                        None => panic!("connection lost before the kill"),
                    }
                }
            });
        }
        // Let the load and the writes run, then kill in the middle of both.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while acknowledged.lock().unwrap().0.len() < 400 {
            assert!(tokio::time::Instant::now() < deadline, "load too slow");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        killed.store(true, Ordering::SeqCst);
        // SAFETY: signalling our own child process.
        assert_eq!(
            unsafe { libc::kill(served.child.0.id() as i32, libc::SIGKILL) },
            0
        );
        let status = wait_exit(&mut served.child.0, Duration::from_secs(10));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        while let Some(joined) = senders.join_next().await {
            joined.expect("sender task");
        }
        let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
        let db = dir.path().join("stats.db");
        let before_restart = (
            sqlite_count(&db, "SELECT count(*) FROM rtc_stats"),
            testkit::count(&url, "SELECT count(*) FROM rtc_stats").await,
        );

        let served = serve(dir.path(), &config);
        wait_for_sqlite_rows(&db, acknowledged.objects(), Duration::from_secs(60)).await;
        wait_for_postgres_rows(&url, acknowledged.objects(), Duration::from_secs(60)).await;
        // Reports that were in flight at the kill may still be arriving: read each store until
        // its row count and its set of connections describe the same moment.
        let settled = tokio::time::Instant::now() + Duration::from_secs(20);
        let (in_sqlite, in_postgres, sqlite_connections, postgres_connections) = loop {
            let sqlite_connections = stored_connections(&db);
            let postgres_connections = postgres_connections(&url).await;
            let in_sqlite = sqlite_count(&db, "SELECT count(*) FROM rtc_stats");
            let in_postgres = testkit::count(&url, "SELECT count(*) FROM rtc_stats").await;
            let whole = |rows: i64, connections: &BTreeSet<String>| {
                rows == (connections.len() * OBJECTS_PER_REPORT) as i64
            };
            let consistent =
                whole(in_sqlite, &sqlite_connections) && whole(in_postgres, &postgres_connections);
            if consistent || tokio::time::Instant::now() > settled {
                break (
                    in_sqlite,
                    in_postgres,
                    sqlite_connections,
                    postgres_connections,
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!(
            "crash: sent {} reports, acknowledged {} ({} objects); stored at the kill: sqlite {}, postgresql {}; after restart: sqlite {in_sqlite}, postgresql {in_postgres}",
            sent.load(Ordering::SeqCst),
            acknowledged.0.len(),
            acknowledged.objects(),
            before_restart.0,
            before_restart.1,
        );
        let missing_sqlite: Vec<_> = acknowledged.0.difference(&sqlite_connections).collect();
        let missing_postgres: Vec<_> = acknowledged.0.difference(&postgres_connections).collect();
        assert!(
            missing_sqlite.is_empty(),
            "missing in SQLite: {missing_sqlite:?}"
        );
        assert!(
            missing_postgres.is_empty(),
            "missing in PostgreSQL: {missing_postgres:?}"
        );
        let webhook_connections = sqlite_count(
            &db,
            "SELECT count(*) FROM sora_connection WHERE group_id IS NOT NULL",
        );
        assert!(
            webhook_connections > 0,
            "the webhook senders were acknowledged too"
        );
        // Reports in flight at the kill may be stored without their 204; nothing is stored twice.
        for (store, rows, connections) in [
            ("sqlite", in_sqlite, &sqlite_connections),
            ("postgresql", in_postgres, &postgres_connections),
        ] {
            assert_eq!(
                rows,
                (connections.len() * OBJECTS_PER_REPORT) as i64,
                "{store}: whole reports, each once"
            );
        }
        drop(served);
    }
}
