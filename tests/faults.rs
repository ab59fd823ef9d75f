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

/// Rows in `rtc_stats`, or `None` while the file or its schema is still being made (read-only:
/// the test must not create the file itself).
fn count_if_ready(db: &Path) -> Option<i64> {
    let connection =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    connection
        .query_row("SELECT count(*) FROM rtc_stats", [], |row| row.get(0))
        .ok()
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
    while count_if_ready(&db).is_none_or(|count| count < expected) {
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

/// Reads what the server sends until it closes the connection; false if it is still open after
/// `within`.
async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Clients that open connections and then neither send nor answer (not even HTTP/2's PING after
/// GOAWAY) used to hold them forever, and with them the process's file descriptors, until a
/// valid sender was locked out. Now they are cut off after the idle timeout and a grace period,
/// and connections beyond `server.max_connections` are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_cut_off_and_their_number_is_bounded() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = sqlite_config(dir.path(), false);
    config.server.http2_idle_timeout = 1;
    config.server.max_connections = 3;
    let app = start(&config, build_sinks(&config).await).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(app.ingest_addr())
            .await
            .unwrap();
        // The HTTP/2 preface and an empty SETTINGS frame, then nothing: no ACK, no PING reply.
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        silent.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over_the_limit = tokio::net::TcpStream::connect(app.ingest_addr())
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut over_the_limit, Duration::from_secs(2)).await,
        "a connection beyond server.max_connections is closed at once"
    );
    for stream in &mut silent {
        assert!(
            closed_by_server(stream, Duration::from_secs(6)).await,
            "a silent connection is cut off after the idle timeout and its grace"
        );
    }
    // The slots are free again for a real sender.
    let client = H2::connect(app.ingest_addr()).await;
    let answer = client
        .post_report(small_report(1, OBJECTS).to_string())
        .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    app.shutdown().await;
}
