//! Kohaku against the physical limits of this machine, every figure next to a baseline measured in
//! the same run. Run through `./scripts/bench`, which builds release, installs h2load and starts a
//! throwaway PostgreSQL; the table it prints is the result.
//!
//! Rows:
//! 1. HTTP/2 ingest into a sink that discards, against a bare hyper h2c server answering 204 after
//!    reading the same body (h2load drives both).
//! 2. End to end into SQLite (the real `kohaku` binary, unique reports over HTTP/2, until every
//!    object is stored), against a minimal rusqlite loop inserting the same rows into the same
//!    table in one transaction.
//! 3. End to end into PostgreSQL, against `psql \copy` of the same rows into the same table.
//! 4. Peak RSS of `kohaku serve` driven at twice its sustainable rate (it must answer 503, not
//!    grow).
//! 5. Rows 2 and 3 with the durable spool on.

// The allocator the kohaku binary uses, so that the in-process ingest row measures it as shipped.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use kohaku_sink::{SinkError, StatsBatch, StatsSink, WriteReport};
use serde_json::Value;

#[path = "../tests/common/support.rs"]
mod support;
use support::Served;

const CONNECTION_USER_AGENT: &str = "connection.user-agent";
const OBJECTS_PER_REPORT: usize = 30;
/// h2load runs per ingest measurement, after a warm-up; the median is reported.
const INGEST_ROUNDS: usize = 5;

type AnyError = Box<dyn std::error::Error + Send + Sync>;

struct Settings {
    kohaku: PathBuf,
    pg_url: Option<String>,
    reports: usize,
    h2load_requests: usize,
    overload_secs: u64,
    work: tempfile::TempDir,
}

/// One generated report: its body, and the report Kohaku's parser makes of it, whose rows the
/// ceilings write with the backends' own encodings.
struct Generated {
    body: Bytes,
    report: kohaku_sink::Report,
}

const SORA_TIMESTAMP: &str = "2025-07-25T06:06:51.592776Z";

/// Reports shaped like the Chromium fixture (its first 30 objects), each with its own connection
/// and its own timestamps, so no row repeats another.
/// Reports of `connections` connections, `per_connection` each a second apart, as a call sends
/// them: the objects of the types that describe a connection (certificate, codec, candidates,
/// peer-connection) repeat unchanged, every other object changes each time.
fn generate_calls(connections: usize, per_connection: usize) -> Vec<Generated> {
    let describing = [
        "certificate",
        "codec",
        "local-candidate",
        "remote-candidate",
        "peer-connection",
    ];
    let mut generated = generate(connections);
    let templates: Vec<Vec<Value>> = generated
        .iter()
        .map(|g| {
            let body: Value = serde_json::from_slice(&g.body).expect("generated body");
            body["stats"].as_array().cloned().unwrap_or_default()
        })
        .collect();
    let received_at = kohaku_sink::OffsetDateTime::now_utc();
    let mut calls = Vec::with_capacity(connections * per_connection);
    for round in 0..per_connection {
        for (connection, generated) in generated.iter_mut().enumerate() {
            let mut body: Value = serde_json::from_slice(&generated.body).expect("generated body");
            let stats: Vec<Value> = templates[connection]
                .iter()
                .map(|object| {
                    let mut object = object.clone();
                    let at = object["timestamp"].as_f64().unwrap_or(0.0) + round as f64 * 1_000.0;
                    object["timestamp"] = Value::from(at);
                    let kind = object["type"].as_str().unwrap_or_default();
                    if !describing.contains(&kind) {
                        object["kohakuBenchCounter"] = Value::from(round);
                    }
                    object
                })
                .collect();
            body["stats"] = Value::from(stats);
            let body = body.to_string();
            let report = kohaku::sora::parse_report(body.as_bytes(), received_at)
                .expect("generated bodies are valid reports");
            calls.push(Generated {
                body: Bytes::from(body),
                report,
            });
        }
    }
    calls
}

fn generate(count: usize) -> Vec<Generated> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chromium/rtc_stats.chromium-av.jsonl");
    let text = std::fs::read_to_string(&fixture).expect("chromium fixture");
    let received_at = kohaku_sink::OffsetDateTime::now_utc();
    let templates: Vec<Value> = text
        .lines()
        .take(OBJECTS_PER_REPORT)
        .map(|line| serde_json::from_str::<Value>(line).expect("fixture line")["rtc_data"].clone())
        .collect();
    (0..count)
        .map(|i| {
            let connection_id = format!("BENCH{i:021}");
            let session_id = format!("SESSION{:019}", i / 4);
            let base = 1_753_423_611_556.525 + (i as f64) * 1_000.0;
            let stats: Vec<String> = templates
                .iter()
                .enumerate()
                .map(|(j, template)| {
                    let mut object = template.clone();
                    let rtc_id = format!("{}-{j}", object["id"].as_str().unwrap_or("X"));
                    object["id"] = Value::from(rtc_id);
                    object["timestamp"] = Value::from(base + j as f64 * 0.001);
                    object.to_string()
                })
                .collect();
            let body = format!(
                r#"{{"type":"{CONNECTION_USER_AGENT}","timestamp":"{SORA_TIMESTAMP}","label":"WebRTC SFU Sora","version":"2025.2.1","node_name":"sora@127.0.0.1","role":"sendrecv","multistream":true,"simulcast":false,"spotlight":false,"channel_id":"bench","session_id":"{session_id}","client_id":"{connection_id}","connection_id":"{connection_id}","bundle_id":"{connection_id}","stats":[{}]}}"#,
                stats.join(",")
            );
            let report = kohaku::sora::parse_report(body.as_bytes(), received_at)
                .expect("generated bodies are valid reports");
            Generated {
                body: Bytes::from(body),
                report,
            }
        })
        .collect()
}

/// The stats webhook Sora 2025.2 and later would send for the same stats as an exporter `body`.
fn webhook_body(body: &[u8]) -> Result<Vec<u8>, AnyError> {
    let text = std::str::from_utf8(body)?;
    let exporter_type = format!(r#""type":"{CONNECTION_USER_AGENT}""#);
    if !text.contains(&exporter_type) {
        return Err("generated body without its exporter type".into());
    }
    Ok(text
        .replacen(
            &exporter_type,
            r#""type":"connection.rtc","id":"NKSZER34ZN5J77HTVNQP1FWJ1W","group_id":"BENCHGROUP""#,
            1,
        )
        .replacen(r#""multistream":true,"#, "", 1)
        .into_bytes())
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 load.

#[derive(Default)]
struct Load {
    sent: AtomicU64,
    accepted: AtomicU64,
    busy: AtomicU64,
    other: AtomicU64,
}

async fn h2_sender(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, AnyError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await?;
    tokio::spawn(connection);
    Ok(sender)
}

fn report_request(body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("/collector")
        .header("x-sora-stats-exporter-type", CONNECTION_USER_AGENT)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request")
}

/// Sends every body once (retrying a 503 after a pause, as Sora does), over `connections` HTTP/2
/// connections with `streams` requests in flight on each.
async fn send_all(
    addr: SocketAddr,
    bodies: Arc<Vec<Bytes>>,
    connections: usize,
    streams: usize,
    load: Arc<Load>,
) -> Result<(), AnyError> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let sender = h2_sender(addr).await?;
        for _ in 0..streams {
            let (mut sender, bodies, next, load) =
                (sender.clone(), bodies.clone(), next.clone(), load.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(index) else { break };
                    loop {
                        load.sent.fetch_add(1, Ordering::Relaxed);
                        let answer = sender.send_request(report_request(body.clone())).await;
                        match answer.map(|response| response.status()) {
                            Ok(StatusCode::NO_CONTENT) => {
                                load.accepted.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Ok(StatusCode::SERVICE_UNAVAILABLE) => {
                                load.busy.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            _ => {
                                load.other.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

/// Open loop: `rate` requests per second for `duration`, at most `max_in_flight` at once; a 503 is
/// counted, not retried.
async fn offer(
    addr: SocketAddr,
    bodies: Arc<Vec<Bytes>>,
    rate: f64,
    duration: Duration,
    load: Arc<Load>,
) -> Result<(), AnyError> {
    let senders: Vec<_> = {
        let mut senders = Vec::new();
        for _ in 0..4 {
            senders.push(h2_sender(addr).await?);
        }
        senders
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                break;
            };
            let body = bodies[sent as usize % bodies.len()].clone();
            let mut sender = senders[sent as usize % senders.len()].clone();
            let load = load.clone();
            sent += 1;
            tokio::spawn(async move {
                load.sent.fetch_add(1, Ordering::Relaxed);
                match sender
                    .send_request(report_request(body))
                    .await
                    .map(|r| r.status())
                {
                    Ok(StatusCode::NO_CONTENT) => load.accepted.fetch_add(1, Ordering::Relaxed),
                    Ok(StatusCode::SERVICE_UNAVAILABLE) => {
                        load.busy.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => load.other.fetch_add(1, Ordering::Relaxed),
                };
                drop(permit);
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let _ = in_flight.acquire_many(512).await;
    Ok(())
}

async fn metric(exporter: SocketAddr, series: &str) -> Result<f64, AnyError> {
    let mut sender = h2_sender(exporter).await?;
    let request = Request::builder()
        .uri("/metrics")
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let text = String::from_utf8(response.into_body().collect().await?.to_bytes().to_vec())?;
    // A series ending in `{` is every labelled series of that name, summed.
    if series.ends_with('{') {
        return Ok(text
            .lines()
            .filter(|line| line.starts_with(series))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum());
    }
    Ok(support::metric(&text, series).unwrap_or(0.0))
}

// ---------------------------------------------------------------------------------------------
// The kohaku binary.

fn serve(settings: &Settings, name: &str, sinks: &str, spool: bool) -> Result<Served, AnyError> {
    let dir = settings.work.path().join(name);
    std::fs::create_dir_all(&dir)?;
    let spool = if spool {
        format!(
            "[spool]\ndir = \"{}\"\nmax_bytes = 4294967296\n",
            dir.join("spool").display()
        )
    } else {
        String::new()
    };
    let config = format!(
        "[server]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 0\n[exporter]\nlisten_port = 0\n\
         {spool}{sinks}"
    );
    Ok(support::serve(
        Command::new(&settings.kohaku),
        &dir,
        &config,
    )?)
}

/// The bytes a SQLite database takes once its write-ahead log is folded in.
fn sqlite_bytes(path: &Path) -> Result<f64, AnyError> {
    let connection = rusqlite::Connection::open(path)?;
    connection.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    let pages: i64 = connection.query_row("PRAGMA page_count", [], |row| row.get(0))?;
    let size: i64 = connection.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    Ok((pages * size) as f64)
}

/// Lets the disk and PostgreSQL finish what an earlier row left behind (dirty pages, a pending
/// checkpoint), so that each end-to-end row starts from the same quiet state rather than paying
/// for the one before it.
fn settle(settings: &Settings) -> Result<(), AnyError> {
    Command::new("sync").status()?;
    if let Some(admin) = &settings.pg_url {
        psql(admin, "CHECKPOINT")?;
    }
    Ok(())
}

/// Sends every report and waits until `sink` has stored every object; objects per second.
async fn end_to_end(served: &Served, reports: &[Generated], sink: &str) -> Result<f64, AnyError> {
    let bodies: Arc<Vec<Bytes>> = Arc::new(reports.iter().map(|r| r.body.clone()).collect());
    let objects = (reports.len() * OBJECTS_PER_REPORT) as f64;
    let series = format!("kohaku_sink_rows_written_total{{sink=\"{sink}\"}}");
    let load = Arc::new(Load::default());
    let start = Instant::now();
    send_all(served.ingest, bodies, 4, 16, load.clone()).await?;
    let deadline = start + Duration::from_secs(300);
    loop {
        // Done once every object is stored or was skipped as unchanged.
        let written = metric(served.exporter, &series).await?
            + metric(served.exporter, "kohaku_stats_objects_unchanged_total{").await?;
        if written >= objects {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("{sink}: {written} of {objects} objects stored after 300 s").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let other = load.other.load(Ordering::Relaxed);
    if other > 0 {
        return Err(format!("{sink}: {other} requests answered neither 204 nor 503").into());
    }
    Ok(objects / elapsed)
}

// ---------------------------------------------------------------------------------------------
// Baselines.

/// A minimal hyper server, h2c or HTTP/1.1 as `sender` speaks: reads the whole body, answers 204.
async fn bare_server(sender: Sender) -> Result<SocketAddr, AnyError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let _ = request.into_body().collect().await;
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(StatusCode::NO_CONTENT)
                                .body(Full::new(Bytes::new()))
                                .expect("response"),
                        )
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = match sender {
                    Sender::ExporterH2 => {
                        hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(io, service)
                        .await
                    }
                    Sender::WebhookH1 => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                    }
                };
            });
        }
    });
    Ok(addr)
}

/// Accepts and forgets: Kohaku's own cost without a store.
struct DiscardSink;

#[async_trait]
impl StatsSink for DiscardSink {
    fn name(&self) -> &str {
        "discard"
    }
    async fn migrate(&self) -> Result<(), SinkError> {
        Ok(())
    }
    async fn write(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
        Ok(WriteReport {
            written: batch.row_count() as u64,
            ..WriteReport::default()
        })
    }
    async fn health(&self) -> Result<(), SinkError> {
        Ok(())
    }
    // Stores nothing, so takes no summaries: the ingest rows measure receiving, the end-to-end
    // rows everything a store costs.
    fn keeps_summaries(&self) -> bool {
        false
    }
}

struct H2load {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
}

/// The run with the median rate (runs are never empty).
fn median_run(mut runs: Vec<H2load>) -> H2load {
    runs.sort_by(|a, b| a.requests_per_sec.total_cmp(&b.requests_per_sec));
    let middle = runs.len() / 2;
    runs.swap_remove(middle)
}

/// How h2load plays Sora.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sender {
    /// The stats exporter: HTTP/2, 16 connections with 10 streams each, `POST /collector`.
    ExporterH2,
    /// The stats webhook: HTTP/1.1 keep-alive, one request at a time on each of 5 connections
    /// (Sora's default `stats_webhook_worker_number`), `POST /sora/webhook/stats`.
    WebhookH1,
}

fn h2load(
    settings: &Settings,
    requests: usize,
    addr: SocketAddr,
    body: &[u8],
    name: &str,
    sender: Sender,
) -> Result<H2load, AnyError> {
    let body_file = settings.work.path().join(format!("{name}.json"));
    let log_file = settings.work.path().join(format!("{name}.log"));
    std::fs::write(&body_file, body)?;
    let mut command = Command::new("h2load");
    command.args(["-n", &requests.to_string(), "-t", "1"]);
    match sender {
        Sender::ExporterH2 => command
            .args(["-c", "16", "-m", "10"])
            .args(["-H", "x-sora-stats-exporter-type: connection.user-agent"]),
        Sender::WebhookH1 => command
            .args(["--h1", "-c", "5", "-m", "1"])
            .args(["-H", "sora-stats-webhook-type: connection.rtc"]),
    };
    let path = match sender {
        Sender::ExporterH2 => "/collector",
        Sender::WebhookH1 => "/sora/webhook/stats",
    };
    let output = command
        .arg("-d")
        .arg(&body_file)
        .args(["-H", "content-type: application/json"])
        .arg(format!("--log-file={}", log_file.display()))
        .arg(format!("http://{addr}{path}"))
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("h2load failed: {text}").into());
    }
    let requests_per_sec = text
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("finished in ")?;
            rest.split(", ")
                .nth(1)?
                .strip_suffix(" req/s")?
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("no rate in h2load's output: {text}"))?;
    let failed = text
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("requests: ")?;
            rest.split(", ")
                .find_map(|part| part.strip_suffix(" failed")?.parse().ok())
        })
        .unwrap_or(0);
    // The log's lines are "start µs, status, duration µs".
    let mut durations: Vec<f64> = std::fs::read_to_string(&log_file)?
        .lines()
        .filter_map(|line| line.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    durations.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        durations
            .get(((durations.len() as f64 * p) as usize).min(durations.len().saturating_sub(1)))
            .map_or(0.0, |us| us / 1000.0)
    };
    Ok(H2load {
        requests_per_sec,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        failed,
    })
}

fn sqlite_ceiling(settings: &Settings, reports: &[Generated]) -> Result<f64, AnyError> {
    let path = settings.work.path().join("ceiling.db");
    kohaku_migrate(
        settings,
        "sqlite-ceiling",
        &format!("[sinks.sqlite]\npath = \"{}\"\n", path.display()),
    )?;
    let mut connection = rusqlite::Connection::open(&path)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    let start = Instant::now();
    let tx = connection.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO rtc_stats (channel_id, session_id, client_id, connection_id, bundle_id, \
             rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for report in reports.iter().map(|r| &r.report) {
            let connection = &report.connection;
            let sora_timestamp = kohaku_sink::format_timestamp(report.sora_timestamp);
            let received_at = kohaku_sink::format_timestamp(report.received_at);
            for object in &report.stats {
                insert.execute(rusqlite::params![
                    connection.channel_id,
                    connection.session_id,
                    connection.client_id,
                    connection.connection_id,
                    connection.bundle_id,
                    object.rtc_type,
                    object.rtc_id,
                    object.rtc_timestamp,
                    object.rtc_data.get(),
                    sora_timestamp,
                    received_at,
                ])?;
            }
        }
    }
    tx.commit()?;
    Ok((reports.len() * OBJECTS_PER_REPORT) as f64 / start.elapsed().as_secs_f64())
}

/// `kohaku migrate` with `sinks` as its config: the schema exactly as Kohaku creates it.
fn kohaku_migrate(settings: &Settings, name: &str, sinks: &str) -> Result<(), AnyError> {
    let config = settings.work.path().join(format!("{name}.toml"));
    std::fs::write(&config, sinks)?;
    let status = Command::new(&settings.kohaku)
        .args(["migrate", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(format!("kohaku migrate ({name}) failed").into());
    }
    Ok(())
}

fn psql(url: &str, command: &str) -> Result<String, AnyError> {
    Ok(support::psql(url, command)?)
}

/// A fresh database on the bench cluster, migrated by `kohaku migrate`; its URL.
fn pg_database(settings: &Settings, admin_url: &str, name: &str) -> Result<String, AnyError> {
    // Dropped first: a cluster reused across runs (KOHAKU_BENCH_ONLY) starts empty too.
    psql(admin_url, &format!("DROP DATABASE IF EXISTS {name}"))?;
    psql(admin_url, &format!("CREATE DATABASE {name}"))?;
    let url = match admin_url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => return Err("PostgreSQL URL without a database".into()),
    };
    kohaku_migrate(
        settings,
        name,
        &format!("[sinks.timescaledb]\nuri = \"{url}\"\nretention_days = 0\n"),
    )?;
    Ok(url)
}

fn postgres_ceiling(
    settings: &Settings,
    admin_url: &str,
    reports: &[Generated],
) -> Result<f64, AnyError> {
    let url = pg_database(settings, admin_url, "bench_ceiling")?;
    let file = settings.work.path().join("rows.copy");
    // Kohaku's own COPY encoding, after the rtc_time column it derives in SQL.
    let mut text = Vec::new();
    for report in reports.iter().map(|r| &r.report) {
        for object in &report.stats {
            let rtc_time = kohaku_sink::OffsetDateTime::from_unix_timestamp_nanos(
                (object.rtc_timestamp * 1e6) as i128,
            )?;
            text.extend_from_slice(kohaku_sink::format_timestamp(rtc_time).as_bytes());
            text.push(b'\t');
            kohaku_timescaledb::encode_copy_row(&mut text, report, object);
        }
    }
    std::fs::write(&file, text)?;
    let start = Instant::now();
    psql(
        &url,
        &format!(
            "\\copy rtc_stats (rtc_time, channel_id, session_id, client_id, connection_id, bundle_id, \
             rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) FROM '{}'",
            file.display()
        ),
    )?;
    let elapsed = start.elapsed().as_secs_f64();
    let stored: f64 = psql(&url, "SELECT count(*) FROM rtc_stats")?.parse()?;
    Ok(stored / elapsed)
}

// ---------------------------------------------------------------------------------------------

struct Line {
    what: String,
    value: String,
    baseline: String,
    ratio: Option<f64>,
    target: String,
}

fn ratio_line(what: &str, value: f64, baseline: f64, unit: &str, target: f64) -> Line {
    Line {
        what: what.to_owned(),
        value: format!("{value:.0} {unit}"),
        baseline: format!("{baseline:.0} {unit}"),
        ratio: Some(value / baseline),
        target: if value / baseline >= target {
            format!("met (≥ {target})")
        } else {
            format!("MISSED (≥ {target})")
        },
    }
}

fn print(lines: &[Line]) {
    println!();
    println!("| measurement | Kohaku | baseline | ratio | target |");
    println!("|---|---|---|---|---|");
    for line in lines {
        println!(
            "| {} | {} | {} | {} | {} |",
            line.what,
            line.value,
            line.baseline,
            line.ratio.map_or("–".to_owned(), |r| format!("{r:.2}")),
            line.target
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), AnyError> {
    let mut args = std::env::args().skip(1);
    let kohaku = std::fs::canonicalize(args.next().ok_or("usage: bench KOHAKU_BINARY [REPORTS]")?)?;
    let reports: usize = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(12_000);
    let settings = Settings {
        kohaku,
        pg_url: std::env::var("KOHAKU_BENCH_PG_URL").ok(),
        reports,
        h2load_requests: 20_000,
        overload_secs: 6,
        work: tempfile::tempdir()?,
    };
    let generated = generate(settings.reports);
    let body_bytes: usize = generated.iter().map(|r| r.body.len()).sum::<usize>() / generated.len();
    eprintln!(
        "bench: {} reports of {OBJECTS_PER_REPORT} objects, {body_bytes} bytes each on average",
        generated.len()
    );
    let mut lines = Vec::new();

    let sqlite_sink = |name: &str| format!("[sinks.sqlite]\npath = \"{name}.db\"\n");
    // KOHAKU_BENCH_ONLY=ingest: row 1 alone (for profiling the ingest path); =spool: rows 5
    // alone with their baselines (for comparing two builds' spool path, `bench KOHAKU_BINARY`).
    let only = std::env::var("KOHAKU_BENCH_ONLY").ok();
    let rows = |wanted: &str| only.as_deref().is_none_or(|only| only == wanted);

    if rows("ingest") {
        // 1. Ingest without a store, against a bare server, same body, same h2load. One h2load run
        // lasts about a second, which the machine's noise (another process waking, a CPU's turbo)
        // swings by a third either way: each pair is warmed up, then run INGEST_ROUNDS times with
        // Kohaku and the baseline alternating, and the median of each is reported.
        eprintln!("bench: 1/6 HTTP/2 exporter and HTTP/1.1 webhook ingest (h2load)");
        let bare_h2_addr = bare_server(Sender::ExporterH2).await?;
        let bare_h1_addr = bare_server(Sender::WebhookH1).await?;
        let webhook_body = webhook_body(&generated[0].body)?;
        let mut config = kohaku::config::Config::default();
        config.server.listen_addr = [127, 0, 0, 1].into();
        config.server.listen_port = 0;
        config.exporter.listen_port = 0;
        let app = kohaku::app::App::start(&config, vec![Arc::new(DiscardSink)]).await?;
        let pairs = [
            (
                bare_h2_addr,
                &generated[0].body[..],
                "bare",
                Sender::ExporterH2,
            ),
            (
                app.ingest_addr(),
                &generated[0].body[..],
                "discard",
                Sender::ExporterH2,
            ),
            (
                bare_h1_addr,
                &webhook_body[..],
                "bare-h1",
                Sender::WebhookH1,
            ),
            (
                app.ingest_addr(),
                &webhook_body[..],
                "webhook",
                Sender::WebhookH1,
            ),
        ];
        for (addr, body, name, sender) in pairs {
            h2load(
                &settings,
                settings.h2load_requests / 10,
                addr,
                body,
                name,
                sender,
            )?;
        }
        let mut runs: [Vec<H2load>; 4] = Default::default();
        for _ in 0..INGEST_ROUNDS {
            for (index, (addr, body, name, sender)) in pairs.into_iter().enumerate() {
                let run = h2load(
                    &settings,
                    settings.h2load_requests,
                    addr,
                    body,
                    name,
                    sender,
                )?;
                runs[index].push(run);
            }
        }
        app.shutdown().await;
        let [bare, discard, bare_h1, webhook] = runs.map(median_run);
        if discard.failed > 0 || bare.failed > 0 {
            eprintln!(
                "bench: h2load failures: kohaku {}, bare {}",
                discard.failed, bare.failed
            );
        }
        lines.push(ratio_line(
            "HTTP/2 ingest, discarding sink (req/s)",
            discard.requests_per_sec,
            bare.requests_per_sec,
            "req/s",
            0.5,
        ));
        lines.push(Line {
            what: "  same, stats objects/s".into(),
            value: format!(
                "{:.0} objects/s",
                discard.requests_per_sec * OBJECTS_PER_REPORT as f64
            ),
            baseline: "–".into(),
            ratio: None,
            target: String::new(),
        });
        lines.push(Line {
            what: "  same, latency p50 / p99".into(),
            value: format!("{:.2} / {:.2} ms", discard.p50_ms, discard.p99_ms),
            baseline: format!("{:.2} / {:.2} ms", bare.p50_ms, bare.p99_ms),
            ratio: None,
            target: String::new(),
        });
        if webhook.failed > 0 || bare_h1.failed > 0 {
            eprintln!(
                "bench: h2load --h1 failures: kohaku {}, bare {}",
                webhook.failed, bare_h1.failed
            );
        }
        lines.push(ratio_line(
            "HTTP/1.1 webhook ingest, 5 keep-alive connections, discarding sink (req/s)",
            webhook.requests_per_sec,
            bare_h1.requests_per_sec,
            "req/s",
            0.5,
        ));
        lines.push(Line {
            what: "  same, latency p50 / p99".into(),
            value: format!("{:.2} / {:.2} ms", webhook.p50_ms, webhook.p99_ms),
            baseline: format!("{:.2} / {:.2} ms", bare_h1.p50_ms, bare_h1.p99_ms),
            ratio: None,
            target: String::new(),
        });

        // For profiling the ingest path alone (`perf record` around this process).
    }
    if only.as_deref() == Some("ingest") {
        print(&lines);
        return Ok(());
    }

    // 2. End to end into SQLite, against rusqlite inserting the same rows.
    eprintln!("bench: 2/6 SQLite");
    let sqlite_ceiling = sqlite_ceiling(&settings, &generated)?;

    let mut sqlite = 0.0;
    if only.is_none() {
        settle(&settings)?;
        let served = serve(&settings, "sqlite", &sqlite_sink("stats"), false)?;
        sqlite = end_to_end(&served, &generated, "sqlite").await?;
        drop(served);
        lines.push(ratio_line(
            "end to end into SQLite (objects/s)",
            sqlite,
            sqlite_ceiling,
            "objects/s",
            0.5,
        ));
    }

    // 3. End to end into PostgreSQL, against psql \copy of the same rows.
    let postgres = match &settings.pg_url {
        Some(admin) => {
            eprintln!("bench: 3/6 PostgreSQL");
            let ceiling = postgres_ceiling(&settings, admin, &generated)?;
            if only.is_none() {
                let url = pg_database(&settings, admin, "bench_kohaku")?;
                let sink = format!("[sinks.timescaledb]\nuri = \"{url}\"\nretention_days = 0\n");
                settle(&settings)?;
                let served = serve(&settings, "postgres", &sink, false)?;
                let measured = end_to_end(&served, &generated, "timescaledb").await?;
                drop(served);
                lines.push(ratio_line(
                    "end to end into PostgreSQL (objects/s)",
                    measured,
                    ceiling,
                    "objects/s",
                    0.5,
                ));
            }
            Some((admin.clone(), ceiling))
        }
        None => {
            eprintln!("bench: 3/6 skipped: KOHAKU_BENCH_PG_URL is not set");
            None
        }
    };

    if only.is_none() {
        // 4. Overload: twice the sustainable SQLite rate. The end-to-end figure includes start-up
        // and the final wait, so it understates what the sink sustains; while no 503 comes back the
        // offered rate doubles (at most three times), so that the queue really fills.
        eprintln!("bench: 4/6 overload");
        let served = serve(&settings, "overload", &sqlite_sink("overload"), false)?;
        let bodies: Arc<Vec<Bytes>> = Arc::new(generated.iter().map(|r| r.body.clone()).collect());
        let mut rate = 2.0 * sqlite / OBJECTS_PER_REPORT as f64;
        let mut load = Arc::new(Load::default());
        for round in 0..4 {
            load = Arc::new(Load::default());
            offer(
                served.ingest,
                bodies.clone(),
                rate,
                Duration::from_secs(settings.overload_secs),
                load.clone(),
            )
            .await?;
            if load.busy.load(Ordering::Relaxed) > 0 || round == 3 {
                break;
            }
            rate *= 2.0;
        }
        let peak = served.peak_rss_mib();
        drop(served);
        let busy = load.busy.load(Ordering::Relaxed);
        lines.push(Line {
            what: format!(
                "peak RSS, overloaded ({rate:.0} req/s offered for {} s: {} × 204, {busy} × 503, {} other)",
                settings.overload_secs,
                load.accepted.load(Ordering::Relaxed),
                load.other.load(Ordering::Relaxed)
            ),
            value: format!("{peak:.1} MiB"),
            baseline: "256 MiB".into(),
            ratio: Some(peak / 256.0),
            target: match (peak <= 256.0, busy > 0) {
                (true, true) => "met (≤ 256 MiB, answers 503)",
                (true, false) => "not overloaded: no 503",
                (false, _) => "MISSED (≤ 256 MiB)",
            }.into(),
        });
    }

    // 5. The same end-to-end runs with the durable spool.
    eprintln!("bench: 5/6 with the spool");
    settle(&settings)?;
    let served = serve(&settings, "spool-sqlite", &sqlite_sink("stats"), true)?;
    let spooled = end_to_end(&served, &generated, "sqlite").await?;
    drop(served);
    lines.push(ratio_line(
        "with spool: end to end into SQLite (objects/s)",
        spooled,
        sqlite_ceiling,
        "objects/s",
        0.5,
    ));
    if let Some((admin, ceiling)) = postgres {
        let url = pg_database(&settings, &admin, "bench_spool")?;
        let sink = format!("[sinks.timescaledb]\nuri = \"{url}\"\nretention_days = 0\n");
        settle(&settings)?;
        let served = serve(&settings, "spool-postgres", &sink, true)?;
        let measured = end_to_end(&served, &generated, "timescaledb").await?;
        drop(served);
        lines.push(ratio_line(
            "with spool: end to end into PostgreSQL (objects/s)",
            measured,
            ceiling,
            "objects/s",
            0.5,
        ));
    }

    // 6. skip_unchanged: the same calls stored with the stage off and with its default.
    if only.is_some() {
        print(&lines);
        return Ok(());
    }
    eprintln!("bench: 6/6 skip_unchanged off and on (default)");
    let calls = generate_calls(100, settings.reports / 100);
    let mut measured = Vec::new();
    for (name, setting) in [
        ("off", "[pipeline]\nskip_unchanged = \"off\"\n"),
        ("on", ""),
    ] {
        settle(&settings)?;
        let sink = format!("{setting}[sinks.sqlite]\npath = \"calls-{name}.db\"\n");
        let served = serve(&settings, &format!("calls-sqlite-{name}"), &sink, false)?;
        let rate = end_to_end(&served, &calls, "sqlite").await?;
        drop(served);
        let db = settings
            .work
            .path()
            .join(format!("calls-sqlite-{name}"))
            .join(format!("calls-{name}.db"));
        let bytes = sqlite_bytes(&db)?;
        let mut postgres = None;
        if let Some(admin) = &settings.pg_url {
            let url = pg_database(&settings, admin, &format!("bench_calls_{name}"))?;
            let sink =
                format!("{setting}[sinks.timescaledb]\nuri = \"{url}\"\nretention_days = 0\n");
            settle(&settings)?;
            let served = serve(&settings, &format!("calls-postgres-{name}"), &sink, false)?;
            let pg_rate = end_to_end(&served, &calls, "timescaledb").await?;
            drop(served);
            let pg_bytes: f64 = psql(
                &url,
                "SELECT pg_total_relation_size('rtc_stats') + pg_total_relation_size('sora_connection')",
            )?
            .trim()
            .parse()?;
            postgres = Some((pg_rate, pg_bytes));
        }
        measured.push((rate, bytes, postgres));
    }
    let reports = calls.len() as f64;
    let (off, on) = (&measured[0], &measured[1]);
    lines.push(ratio_line(
        "skip_unchanged on vs off: SQLite (objects/s received)",
        on.0,
        off.0,
        "objects/s",
        1.0,
    ));
    lines.push(Line {
        what: "  same, SQLite bytes per report stored".into(),
        value: format!("{:.0} B", on.1 / reports),
        baseline: format!("{:.0} B", off.1 / reports),
        ratio: Some(on.1 / off.1),
        target: String::new(),
    });
    if let (Some((on_rate, on_bytes)), Some((off_rate, off_bytes))) = (on.2, off.2) {
        lines.push(ratio_line(
            "skip_unchanged on vs off: PostgreSQL (objects/s received)",
            on_rate,
            off_rate,
            "objects/s",
            1.0,
        ));
        lines.push(Line {
            what: "  same, PostgreSQL bytes per report stored".into(),
            value: format!("{:.0} B", on_bytes / reports),
            baseline: format!("{:.0} B", off_bytes / reports),
            ratio: Some(on_bytes / off_bytes),
            target: String::new(),
        });
    }

    print(&lines);
    Ok(())
}
