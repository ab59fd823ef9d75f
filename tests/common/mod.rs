//! Shared by the end-to-end tests: fixture reports, a running Kohaku, real HTTP/1.1 and HTTP/2
//! clients, and reading back what SQLite stored.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kohaku::app::App;
use kohaku::config::Config;
use kohaku_sink::{RawValue, StatsSink};
use serde::Deserialize;
use serde_json::Value;

mod support;
#[allow(unused_imports)] // each test binary uses a different subset
pub use support::{metric, peak_rss_kib, ChildGuard, Served, SmallFilesystem};

/// The `kohaku` binary under test, unaffected by the caller's KOHAKU_CONFIG and RUST_LOG, and
/// with dummy AWS credentials and no instance-metadata lookups: a test must never reach AWS.
pub fn kohaku_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kohaku"));
    command
        .env_remove("KOHAKU_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_ACCESS_KEY_ID", "kohaku-test")
        .env("AWS_SECRET_ACCESS_KEY", "kohaku-test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/kohaku-test")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/kohaku-test");
    command
}

pub const EXPORTER_TYPE: (&str, &str) = ("x-sora-stats-exporter-type", "connection.user-agent");
pub const WEBHOOK_TYPE: (&str, &str) = ("sora-stats-webhook-type", "connection.rtc");
/// `server.webhook_path`'s default: where Sora's documented example posts.
pub const WEBHOOK_PATH: &str = "/sora/webhook/stats";

pub fn fixture_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

/// One stats object as the fixture holds it.
#[derive(Debug, Clone)]
pub struct FixtureObject {
    pub rtc_id: String,
    pub rtc_type: String,
    pub rtc_timestamp: f64,
    pub text: String,
}

/// One request rebuilt from a Sora log: the lines Sora wrote for one connection at one send, as
/// Sora's stats exporter ([`fixture_reports`]) or its stats webhook ([`fixture_webhooks`]) would
/// have sent them.
#[derive(Debug, Clone)]
pub struct FixtureReport {
    pub channel_id: String,
    pub connection_id: String,
    pub role: String,
    pub group_id: Option<String>,
    pub objects: Vec<FixtureObject>,
    pub body: String,
}

/// Which of Sora's requests a fixture report is rebuilt as.
#[derive(Clone, Copy)]
enum Shape {
    /// `connection.user-agent`: the log lines' envelope without `id`, `group_id` or `log_written`.
    Exporter,
    /// `connection.rtc`: the log lines' envelope (with `id`, `group_id` and, to check that unknown
    /// members are ignored, `log_written`) and a `stats` array (docs/protocol.md §1).
    Webhook,
}

#[derive(Deserialize)]
struct LogLine {
    #[serde(rename = "type")]
    line_type: String,
    /// One per webhook request, shared by its lines.
    id: String,
    timestamp: String,
    label: String,
    version: String,
    node_name: String,
    role: String,
    channel_id: String,
    session_id: String,
    client_id: String,
    connection_id: String,
    bundle_id: Option<String>,
    group_id: Option<String>,
    multistream: Option<bool>,
    simulcast: bool,
    spotlight: bool,
    log_written: Option<bool>,
    rtc_data: Box<RawValue>,
}

#[derive(Deserialize)]
struct ObjectHead {
    id: String,
    #[serde(rename = "type")]
    rtc_type: String,
    timestamp: f64,
}

/// Exporter requests rebuilt from an `rtc_stats.jsonl` fixture, in file order: its lines grouped
/// by connection and send time.
pub fn fixture_reports(relative: &str) -> Vec<FixtureReport> {
    rebuild(relative, Shape::Exporter)
}

/// Stats-webhook requests rebuilt from an `rtc_stats.jsonl` fixture, in file order: its lines
/// grouped by `(connection_id, id)`, as Sora wrote one webhook's stats "individually instead of as
/// a list".
pub fn fixture_webhooks(relative: &str) -> Vec<FixtureReport> {
    rebuild(relative, Shape::Webhook)
}

fn rebuild(relative: &str, shape: Shape) -> Vec<FixtureReport> {
    let text = std::fs::read_to_string(fixture_path(relative)).expect("fixture readable");
    let mut order: Vec<(String, String)> = Vec::new();
    let mut groups: HashMap<(String, String), Vec<LogLine>> = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let line: LogLine = serde_json::from_str(line).expect("fixture line parses");
        assert_eq!(line.line_type, "connection.rtc");
        let request = match shape {
            Shape::Exporter => line.timestamp.clone(),
            Shape::Webhook => line.id.clone(),
        };
        let key = (line.connection_id.clone(), request);
        if !groups.contains_key(&key) {
            order.push(key.clone());
        }
        groups.entry(key).or_default().push(line);
    }
    order
        .into_iter()
        .map(|key| {
            let lines = groups.remove(&key).expect("grouped");
            build_report(&lines, shape)
        })
        .collect()
}

fn build_report(lines: &[LogLine], shape: Shape) -> FixtureReport {
    let first = &lines[0];
    let event_type = match shape {
        Shape::Exporter => "connection.user-agent",
        Shape::Webhook => "connection.rtc",
    };
    let mut metadata = serde_json::json!({
        "type": event_type,
        "timestamp": first.timestamp,
        "label": first.label,
        "version": first.version,
        "node_name": first.node_name,
        "role": first.role,
        "channel_id": first.channel_id,
        "session_id": first.session_id,
        "client_id": first.client_id,
        "connection_id": first.connection_id,
        "simulcast": first.simulcast,
        "spotlight": first.spotlight,
    });
    if let Some(bundle_id) = &first.bundle_id {
        metadata["bundle_id"] = Value::from(bundle_id.as_str());
    }
    if let Some(multistream) = first.multistream {
        metadata["multistream"] = Value::from(multistream);
    }
    if let Shape::Webhook = shape {
        metadata["id"] = Value::from(first.id.as_str());
        if let Some(group_id) = &first.group_id {
            metadata["group_id"] = Value::from(group_id.as_str());
        }
        if let Some(log_written) = first.log_written {
            metadata["log_written"] = Value::from(log_written);
        }
    }
    let metadata = metadata.to_string();
    let objects: Vec<FixtureObject> = lines
        .iter()
        .map(|line| {
            let head: ObjectHead = serde_json::from_str(line.rtc_data.get()).expect("object head");
            FixtureObject {
                rtc_id: head.id,
                rtc_type: head.rtc_type,
                rtc_timestamp: head.timestamp,
                text: line.rtc_data.get().to_owned(),
            }
        })
        .collect();
    // The objects' text goes into the body verbatim, so the stored text can be compared exactly.
    let stats: Vec<&str> = objects.iter().map(|o| o.text.as_str()).collect();
    let body = format!(
        "{},\"stats\":[{}]}}",
        metadata.strip_suffix('}').expect("object"),
        stats.join(",")
    );
    FixtureReport {
        channel_id: first.channel_id.clone(),
        connection_id: first.connection_id.clone(),
        role: first.role.clone(),
        group_id: match shape {
            Shape::Exporter => None,
            Shape::Webhook => first.group_id.clone(),
        },
        objects,
        body,
    }
}

/// A small valid report; `seed` varies the connection and the objects' time.
pub fn small_report(seed: u64, objects: usize) -> Value {
    let connection_id = sora_id(seed);
    let stats: Vec<Value> = (0..objects)
        .map(|i| {
            serde_json::json!({
                "id": format!("OT{i}"),
                "type": "outbound-rtp",
                "timestamp": 1_753_423_611_556.5 + seed as f64,
                "bytesSent": i * 100 + seed as usize,
                "qualityLimitationDurations": {"none": 0.128, "cpu": 0}
            })
        })
        .collect();
    serde_json::json!({
        "type": "connection.user-agent",
        "timestamp": "2025-07-25T06:06:51.592776Z",
        "label": "WebRTC SFU Sora", "version": "2025.2.1", "node_name": "sora@127.0.0.1",
        "multistream": true, "simulcast": false, "spotlight": false, "role": "sendrecv",
        "channel_id": "sora", "session_id": "7N8FP3M0ZH2ASBCDPHRGS2HYB8",
        "client_id": connection_id, "connection_id": connection_id,
        "stats": stats
    })
}

/// [`small_report`] as Sora's stats webhook sends it: `connection.rtc`, the webhook's `id` and a
/// `group_id` (`G<seed>`), no `multistream`.
pub fn small_webhook(seed: u64, objects: usize) -> Value {
    let mut body = small_report(seed, objects);
    let fields = body.as_object_mut().expect("an object");
    fields.remove("multistream");
    fields.insert("type".into(), Value::from("connection.rtc"));
    fields.insert("id".into(), Value::from(sora_id(seed + 1_000_000)));
    fields.insert("group_id".into(), Value::from(format!("G{seed}")));
    body
}

/// A 26-character Sora-style id.
pub fn sora_id(seed: u64) -> String {
    format!("{:0>26}", format!("C{seed}"))
}

/// Defaults, but on loopback with free ports and short batching, as tests want.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.listen_addr = [127, 0, 0, 1].into();
    config.server.listen_port = 0;
    config.exporter.listen_port = 0;
    config.pipeline.batch_max_wait_ms = 20;
    config.pipeline.shutdown_timeout_secs = 10;
    config.pipeline.retry_initial_backoff_ms = 10;
    config.pipeline.retry_max_backoff_ms = 100;
    // These tests check that every object sent is stored; tests/skip_unchanged.rs covers the
    // stage that skips repeats.
    config.pipeline.skip_unchanged =
        kohaku::config::SkipUnchanged::Mode(kohaku::config::SkipMode::Off);
    config
}

/// The same for a `kohaku.toml` of a test that runs the binary: a `[pipeline]` table that stores
/// every object, to start a config with.
pub const STORE_EVERY_OBJECT: &str = "[pipeline]\nskip_unchanged = \"off\"\n";

pub async fn start(config: &Config, sinks: Vec<Arc<dyn StatsSink>>) -> App {
    App::start(config, sinks).await.expect("kohaku starts")
}

/// A migrated SQLite sink in `dir`.
pub async fn sqlite_sink(dir: &Path) -> (Arc<dyn StatsSink>, PathBuf) {
    let path = dir.join("kohaku.db");
    let sink =
        kohaku_sqlite::SqliteSink::open(&kohaku_sqlite::Config::at(&path)).expect("sqlite opens");
    sink.migrate().await.expect("sqlite migrates");
    (Arc::new(sink), path)
}

/// An answer from Kohaku.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "answer {} is not JSON ({err}): {:?}",
                self.status, self.body
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A real HTTP/2 client connection (h2c with prior knowledge, or h2 over TLS).
#[derive(Clone)]
pub struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    scheme: &'static str,
    authority: String,
}

impl H2 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // As Sora's client does; without it Nagle and delayed ACKs add 40 ms to each request.
        tcp.set_nodelay(true).expect("nodelay");
        Self::handshake(tcp, "http", addr)
            .await
            .expect("h2c handshake")
    }

    pub async fn connect_tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, String> {
        let tls = tls_connect(addr, config).await?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(b"h2") {
            return Err(format!(
                "ALPN negotiated {:?}, not h2",
                session.alpn_protocol()
            ));
        }
        Self::handshake(tls, "https", addr).await
    }

    async fn handshake<I>(io: I, scheme: &'static str, addr: SocketAddr) -> Result<Self, String>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            scheme,
            authority: addr.to_string(),
        })
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, hyper::Error> {
        let mut sender = self.sender.clone();
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}://{}{}", self.scheme, self.authority, path))
    }

    /// POST /collector with Sora's headers.
    pub async fn post_report(&self, body: impl Into<Bytes>) -> Answer {
        let request = self
            .request(Method::POST, "/collector")
            .header(EXPORTER_TYPE.0, EXPORTER_TYPE.1)
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .expect("request");
        self.send(request).await.expect("request answered")
    }

    /// POST a stats webhook to `path` with Sora's headers.
    pub async fn post_webhook(&self, path: &str, body: impl Into<Bytes>) -> Answer {
        let request = webhook_request(self.request(Method::POST, path), body);
        self.send(request).await.expect("request answered")
    }

    pub async fn get(&self, path: &str) -> Answer {
        let request = self
            .request(Method::GET, path)
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.send(request).await.expect("request answered")
    }
}

/// A stats webhook as Sora sends it: its type header, JSON, `body`.
pub fn webhook_request(
    builder: http::request::Builder,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    builder
        .header(WEBHOOK_TYPE.0, WEBHOOK_TYPE.1)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("request")
}

/// A TLS connection to Kohaku's test certificate (`localhost`) with `config`.
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// A real HTTP/1.1 client on one keep-alive connection, as each of Sora's webhook workers is.
pub struct H1 {
    sender: tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    authority: String,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        Self::handshake(tcp, addr)
            .await
            .expect("HTTP/1.1 handshake")
    }

    /// HTTP/1.1 over TLS; `config` decides which ALPN protocols are offered (none, like many
    /// HTTP/1.1 clients, or `http/1.1`).
    pub async fn connect_tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, String> {
        Self::handshake(tls_connect(addr, config).await?, addr).await
    }

    async fn handshake<I>(io: I, addr: SocketAddr) -> Result<Self, String>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Self {
            sender: tokio::sync::Mutex::new(sender),
            authority: addr.to_string(),
        })
    }

    /// A request in origin form (`POST /path` with a `host` header), as HTTP/1.1 clients send.
    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.authority.as_str())
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, hyper::Error> {
        let mut sender = self.sender.lock().await;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        assert_eq!(
            parts.version,
            http::Version::HTTP_11,
            "answered over HTTP/1.1"
        );
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// POST a stats webhook to `path` with Sora's headers.
    pub async fn post_webhook(&self, path: &str, body: impl Into<Bytes>) -> Answer {
        let request = webhook_request(self.request(Method::POST, path), body);
        self.send(request).await.expect("request answered")
    }
}

pub use kohaku_sqlite::testkit::StoredRow;

/// Fails with the whole text when `part` is not in it.
#[track_caller]
pub fn assert_contains(text: &str, part: &str) {
    assert!(text.contains(part), "`{part}` not found in:\n{text}");
}

pub fn sqlite_rows(path: &Path) -> Vec<StoredRow> {
    kohaku_sqlite::testkit::stored_rows(path, None)
}

pub fn sqlite_count(path: &Path, sql: &str) -> i64 {
    kohaku_sqlite::testkit::query_i64(path, sql)
}

/// Polls until `rtc_stats` holds `rows` rows; returns the last count seen.
pub async fn wait_for_sqlite_rows(path: &Path, rows: i64, timeout: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let count = sqlite_count(path, "SELECT count(*) FROM rtc_stats");
        if count >= rows || tokio::time::Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/metrics` until `series` reaches `at_least`; returns the last value.
pub async fn wait_for_metric(exporter: &H2, series: &str, at_least: f64, timeout: Duration) -> f64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let value = metric(&exporter.get("/metrics").await.text(), series).unwrap_or(0.0);
        if value >= at_least || tokio::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/health` until it answers `status`; fails the test with the last answer otherwise.
/// Returns the answer's JSON.
pub async fn wait_for_health(exporter: &H2, status: StatusCode, timeout: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
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

/// Polls until PostgreSQL's `rtc_stats` holds `rows` rows; returns the last count seen.
#[cfg(all(feature = "timescaledb", feature = "testkit"))]
pub async fn wait_for_postgres_rows(url: &str, rows: i64, timeout: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let count = kohaku_timescaledb::testkit::count(url, "SELECT count(*) FROM rtc_stats").await;
        if count >= rows || tokio::time::Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Builds and migrates the sinks a config names, as `kohaku serve` does.
pub async fn build_sinks(config: &Config) -> Vec<Arc<dyn StatsSink>> {
    let sinks = kohaku::sinks::build(&config.effective_sinks()).expect("sinks build");
    kohaku::sinks::migrate(&sinks).await.expect("sinks migrate");
    sinks
}

/// A `[sinks.timescaledb]` for a test database. The fixtures are dated 2025: retention is off so
/// that no sweep deletes them.
#[cfg(all(feature = "timescaledb", feature = "testkit"))]
pub fn timescaledb_config(url: &str) -> kohaku::config::TimescaleSinkConfig {
    kohaku::config::TimescaleSinkConfig {
        uri: kohaku::config::SecretUri::new(url),
        ca_cert_file: None,
        max_connections: 4,
        retention_days: 0,
        compress_after_days: 7,
        chunk_interval: "1 day".into(),
        statement_timeout_secs: 30,
        extension: kohaku::config::ExtensionMode::Auto,
    }
}

/// Runs `kohaku import` of `files` in `dir` with `config` as its `kohaku.toml`; its stdout, once it
/// has succeeded.
pub fn import_files(dir: &Path, config: &str, files: &[PathBuf]) -> String {
    std::fs::write(dir.join("kohaku.toml"), config).unwrap();
    let output = kohaku_command()
        .current_dir(dir)
        .args(["import", "--config", "kohaku.toml"])
        .args(files)
        .output()
        .expect("kohaku import runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Starts `kohaku serve` in `dir` with `config` as `k.toml`, once it logs its addresses.
pub fn serve(dir: &Path, config: &str) -> Served {
    support::serve(kohaku_command(), dir, config).expect("kohaku serve listens")
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kohaku did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
