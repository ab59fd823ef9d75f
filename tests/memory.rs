//! Memory attacks on the real binary, measured by its peak resident set (`VmHWM`): many bodies
//! that never finish, a blocked sink under large reports, and the replay of a large spool. Each
//! must stay within `pipeline.memory_max_bytes` plus Kohaku's own footprint, answering 503 (never
//! losing what it answered 204 for) where the budget is spent.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::channel::Channel;
use hyper_util::rt::{TokioExecutor, TokioIo};

const BUDGET_MIB: u64 = 32;
/// What the process holds besides report data: code, runtime, connections' buffers, SQLite's
/// cache. Measured around 20 MiB for a debug build at rest; the rest is margin.
const OWN_FOOTPRINT_MIB: u64 = 64;
const WAIT: Duration = Duration::from_secs(60);

fn config(extra: &str) -> String {
    format!(
        "[server]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 0\nmax_body_bytes = {}\n\
         [exporter]\nlisten_port = 0\n\
         [pipeline]\nmemory_max_bytes = {}\nbatch_max_wait_ms = 20\n\
         [sinks.sqlite]\npath = \"stats.db\"\nbusy_timeout_ms = 20\n{extra}",
        4 << 20,
        BUDGET_MIB << 20
    )
}

fn assert_within_budget(served: &Served, what: &str) {
    let peak = peak_rss_kib(served.child.0.id()) / 1024;
    eprintln!(
        "{what}: peak RSS {peak} MiB (budget {BUDGET_MIB} MiB + {OWN_FOOTPRINT_MIB} MiB own)"
    );
    assert!(peak > 0, "VmHWM readable");
    assert!(
        peak <= BUDGET_MIB + OWN_FOOTPRINT_MIB,
        "{what}: peak RSS {peak} MiB over {BUDGET_MIB} + {OWN_FOOTPRINT_MIB} MiB"
    );
}

/// One report of one stats object about `bytes` long (a long string member), as a large client
/// report would be.
fn large_report(seed: u64, bytes: usize) -> String {
    let mut report = small_report(seed, 1);
    report["stats"][0]["padding"] = serde_json::Value::from("x".repeat(bytes));
    report.to_string()
}

/// Holds SQLite's write lock so that the sink cannot write (its writes fail as busy).
fn lock_sqlite(db: &Path) -> rusqlite::Connection {
    let connection = rusqlite::Connection::open(db).expect("open sqlite");
    connection
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    connection
}

async fn post_all(addr: SocketAddr, bodies: impl Iterator<Item = String>) -> (u64, u64) {
    let client = H2::connect(addr).await;
    let (mut accepted, mut refused) = (0, 0);
    for body in bodies {
        let answer = client.post_report(body).await;
        match answer.status {
            StatusCode::NO_CONTENT => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(answer.json()["field"], "memory", "{}", answer.text());
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    (accepted, refused)
}

/// 100 streams on one connection each sending up to 4 MiB without ever finishing: 400 MiB offered
/// at once. Bodies beyond the budget are refused while they arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_bodies_cannot_take_more_than_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), &config(""));
    let tcp = tokio::net::TcpStream::connect(served.ingest).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_reset_streams(1000)
        .handshake::<_, Channel<Bytes, Infallible>>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let mut sender = sender.clone();
        let authority = served.ingest;
        streams.spawn(async move {
            let (mut body, channel) = Channel::<Bytes, Infallible>::new(4);
            let request = Request::builder()
                .method(Method::POST)
                .uri(format!("http://{authority}/collector"))
                .header(EXPORTER_TYPE.0, EXPORTER_TYPE.1)
                .body(channel)
                .unwrap();
            let answer = tokio::spawn(async move { sender.send_request(request).await });
            let chunk = Bytes::from(vec![b' '; 64 * 1024]);
            for _ in 0..64 {
                let sent =
                    tokio::time::timeout(Duration::from_secs(5), body.send_data(chunk.clone()));
                if !matches!(sent.await, Ok(Ok(()))) {
                    break;
                }
            }
            // The body is never finished: the answer comes only for refused streams.
            match tokio::time::timeout(Duration::from_secs(5), answer).await {
                Ok(Ok(Ok(response))) => Some(response.status()),
                _ => None,
            }
        });
    }
    let mut refused = 0;
    while let Some(joined) = streams.join_next().await {
        if joined.unwrap() == Some(StatusCode::SERVICE_UNAVAILABLE) {
            refused += 1;
        }
    }
    assert!(refused > 0, "no stream was refused");
    assert_within_budget(&served, "100 unfinished 4 MiB bodies");
}

/// A sink that cannot write, and reports of one 1 MiB object each: the queue fills by bytes, not
/// by rows (1 % of queue_max_rows used to hold gigabytes). What was answered 204 is stored once
/// the sink is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_sink_with_large_reports_fills_the_budget_not_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), &config(""));
    let db = dir.path().join("stats.db");
    let lock = lock_sqlite(&db);
    let (accepted, refused) = post_all(
        served.ingest,
        (0..150).map(|seed| large_report(seed, 1 << 20)),
    )
    .await;
    assert!(refused > 0, "the budget never ran out");
    assert_within_budget(&served, "150 reports of 1 MiB, sink blocked");
    drop(lock);
    assert_eq!(
        wait_for_sqlite_rows(&db, accepted as i64, WAIT).await,
        accepted as i64,
        "every acknowledged report stored"
    );
}

/// 150 MiB of large reports spooled while the sink is down, then replayed: batches are cut by
/// bytes, so the replay stays within the budget too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_large_spool_stays_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(
        dir.path(),
        &config("[spool]\ndir = \"spool\"\nmax_bytes = 1073741824\nfsync = \"interval\"\n"),
    );
    let db = dir.path().join("stats.db");
    let lock = lock_sqlite(&db);
    let (accepted, _) = post_all(
        served.ingest,
        (0..150).map(|seed| large_report(seed, 1 << 20)),
    )
    .await;
    assert!(
        accepted >= 140,
        "the spool takes what memory alone could not: {accepted}"
    );
    drop(lock);
    assert_eq!(
        wait_for_sqlite_rows(&db, accepted as i64, WAIT).await,
        accepted as i64
    );
    assert_within_budget(&served, "replay of 150 MiB of spooled reports");
}
