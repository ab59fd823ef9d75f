//! Faults an operator causes by hand while Kohaku runs, tried for real: the SQLite file deleted
//! under it. Each checks what the README promises: what was answered 204 is stored, once.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use http::StatusCode;
use kohaku::config::{Config, SinksConfig, SpoolConfig, SqliteSinkConfig};

const WAIT: Duration = Duration::from_secs(15);
const OBJECTS: usize = 4;

fn sqlite_config(dir: &Path, spool: bool) -> Config {
    let mut config = test_config();
    config.sinks = Some(SinksConfig {
        sqlite: Some(SqliteSinkConfig {
            path: dir.join("kohaku.db"),
            ..SqliteSinkConfig::default()
        }),
        ..SinksConfig::default()
    });
    if spool {
        config.spool = Some(SpoolConfig {
            dir: dir.join("spool"),
            ..SpoolConfig::default()
        });
    }
    config
}

fn connections(db: &Path) -> BTreeSet<String> {
    sqlite_rows(db)
        .into_iter()
        .map(|row| row.connection_id)
        .collect()
}

/// `rm kohaku.db*` while Kohaku runs: it notices, says so in `/health`, and writes everything
/// acknowledged afterwards into a new file at the same path (SQLite alone would go on writing
/// into the deleted file, where nobody can read it).
async fn deleted_database_file(spool: bool) {
    let dir = tempfile::tempdir().unwrap();
    let config = sqlite_config(dir.path(), spool);
    let db = dir.path().join("kohaku.db");
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;
    let exporter = H2::connect(app.exporter_addr()).await;
    for seed in 0..10 {
        let answer = client
            .post_report(small_report(seed, OBJECTS).to_string())
            .await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT);
    }
    assert_eq!(wait_for_sqlite_rows(&db, 40, WAIT).await, 40);

    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let health = wait_for_health(&exporter, StatusCode::SERVICE_UNAVAILABLE, WAIT).await;
    assert_contains(&health.to_string(), "deleted or replaced");

    let mut acknowledged = BTreeSet::new();
    for seed in 100..130 {
        let answer = client
            .post_report(small_report(seed, OBJECTS).to_string())
            .await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT);
        acknowledged.insert(sora_id(seed));
    }
    let expected = (acknowledged.len() * OBJECTS) as i64;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(db.exists() && sqlite_count(&db, "SELECT count(*) FROM rtc_stats") >= expected) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new file never got the rows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sqlite_count(&db, "SELECT count(*) FROM rtc_stats"),
        expected,
        "every object acknowledged after the rm, once"
    );
    assert_eq!(connections(&db), acknowledged);
    wait_for_health(&exporter, StatusCode::OK, WAIT).await;
    assert_eq!(app.shutdown().await.dropped_rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_file_is_noticed_and_replaced() {
    deleted_database_file(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_file_is_noticed_and_replaced_with_the_spool() {
    deleted_database_file(true).await;
}

/// SIGBUS (what SQLite's memory-mapped `-shm` raises on a full disk) used to end Kohaku without a
/// word: now a last JSON line says what happened, and the process still ends by the signal.
#[test]
fn sigbus_leaves_a_log_line_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = serve(
        dir.path(),
        "[server]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 0\n[exporter]\nlisten_port = 0\n",
    );
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(served.child.0.id() as i32, libc::SIGBUS) },
        0
    );
    let status = wait_exit(&mut served.child.0, WAIT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGBUS)
    );
    // The child is gone: the reader sees the end of its stdout and the iteration ends.
    let lines: Vec<String> = served.stdout_lines.iter().collect();
    let last: serde_json::Value = lines
        .iter()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .expect("a JSON line");
    assert_eq!(last["level"], "ERROR");
    assert_contains(last["message"].as_str().unwrap(), "SIGBUS");
}
