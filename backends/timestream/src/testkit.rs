//! The Timestream the tests use: the moto emulator started by `scripts/test` (through
//! `scripts/moto`), whose URL is in `KOHAKU_TEST_MOTO_URL`.
//!
//! moto keeps records without their request's CommonAttributes, so what Timestream would store is
//! rebuilt from moto's request recording (every WriteRecords body as sent), merged the way
//! Timestream merges, and checked against the record count of `GET /moto-api/data.json`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_timestreamwrite::config::{BehaviorVersion, Credentials, Region};
use base64::Engine;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{Config, TimestreamSink};

pub const URL_VAR: &str = "KOHAKU_TEST_MOTO_URL";
pub const REGION: &str = "us-east-1";

/// moto's URL; panics unless it is on loopback, so no test can reach AWS itself.
pub fn moto_url() -> String {
    let url = std::env::var(URL_VAR).unwrap_or_else(|_| {
        panic!("{URL_VAR} is not set: run the Timestream tests through ./scripts/test, which starts moto")
    });
    assert_loopback(&url);
    url
}

/// The endpoint guard: every URL a test hands the SDK goes through it.
pub fn assert_loopback(url: &str) {
    let host = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split(['/', ':']).next())
        .unwrap_or_default();
    assert!(
        matches!(host, "127.0.0.1" | "localhost" | "[::1]"),
        "tests may only talk to loopback, not {url:?}"
    );
}

fn address_of(url: &str) -> SocketAddr {
    let authority = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    authority
        .replace("localhost", "127.0.0.1")
        .parse()
        .unwrap_or_else(|err| panic!("moto URL {url:?}: {err}"))
}

/// SDK settings for the emulator: fixed region, dummy static credentials, the given endpoint.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    assert_loopback(endpoint);
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            "kohaku-test",
            "kohaku-test",
            None,
            None,
            "kohaku-testkit",
        ))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// A database name no other test uses.
pub fn fresh_database(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Options for a fresh database on `endpoint`, created by `migrate`, with short timeouts.
pub fn options(endpoint: &str, database: &str) -> Config {
    let mut options = Config::new(database, "rtc_stats");
    options.endpoint_url = Some(endpoint.to_owned());
    options.create_if_missing = true;
    options.request_timeout_secs = 2;
    options.connect_timeout = Duration::from_secs(1);
    options
}

pub async fn sink(endpoint: &str, options: Config) -> TimestreamSink {
    TimestreamSink::with_sdk_config(options, sdk_config(endpoint).await).expect("timestream sink")
}

/// A plain HTTP/1.1 exchange with moto; returns status and body.
pub async fn moto_http(method: &str, path: &str) -> (u16, Vec<u8>) {
    let url = moto_url();
    let mut stream = TcpStream::connect(address_of(&url))
        .await
        .expect("connect to moto");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        address_of(&url)
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write to moto");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .expect("read from moto");
    let split = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("moto answered with headers");
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("moto's status line");
    let body = answer[split + 4..].to_vec();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&body[..end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
    out
}

async fn moto_json(method: &str, path: &str) -> Value {
    let (status, body) = moto_http(method, path).await;
    assert_eq!(status, 200, "moto {method} {path}");
    serde_json::from_slice(&body).unwrap_or_else(|err| panic!("moto {path}: {err}"))
}

/// `POST /moto-api/reset` and an empty request recording: a clean emulator.
pub async fn reset() {
    let (status, _) = moto_http("POST", "/moto-api/reset").await;
    assert_eq!(status, 200, "moto reset");
    let (status, _) = moto_http("POST", "/moto-api/recorder/reset-recording").await;
    assert_eq!(status, 200, "moto recorder reset");
}

/// [`reset`], once per test process, before the first test of the process uses moto. Only for a
/// test binary that has moto to itself while it runs, as `cargo test` runs binaries one after
/// another; it keeps moto's state (which `data.json` serialises whole on every read) small.
pub async fn reset_once() {
    static RESET: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    RESET.get_or_init(reset).await;
}

/// Records of one table as moto keeps them (`GET /moto-api/data.json`), CommonAttributes lost.
pub async fn moto_records(database: &str, table: &str) -> Vec<Value> {
    moto_table(database, table)
        .await
        .and_then(|table| table["records"].as_array().cloned())
        .unwrap_or_default()
}

/// A table as moto describes it (`data.json`), if it exists.
pub async fn moto_table(database: &str, table: &str) -> Option<Value> {
    let data = moto_json("GET", "/moto-api/data.json").await;
    data["timestreamwrite"]["TimestreamTable"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["db_name"] == database && t["name"] == table)
        .cloned()
}

/// Every WriteRecords body sent to this table, in the order moto received them.
pub async fn write_requests(database: &str, table: &str) -> Vec<Value> {
    let (status, body) = moto_http("GET", "/moto-api/recorder/download-recording").await;
    assert_eq!(status, 200, "moto recording");
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| {
            entry["headers"]
                .as_object()
                .and_then(|headers| {
                    headers
                        .iter()
                        .find(|(name, _)| name.eq_ignore_ascii_case("x-amz-target"))
                })
                .and_then(|(_, target)| target.as_str())
                .is_some_and(|target| target.ends_with(".WriteRecords"))
        })
        .filter_map(|entry| {
            let text = entry["body"].as_str()?.to_owned();
            let bytes = if entry["body_encoded"] == true {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .ok()?
            } else {
                text.into_bytes()
            };
            serde_json::from_slice::<Value>(&bytes).ok()
        })
        .filter(|request| request["DatabaseName"] == database && request["TableName"] == table)
        .collect()
}

/// A record as Timestream stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub dimensions: BTreeMap<String, String>,
    pub measure_name: String,
    pub time_unit: String,
    pub time: i64,
    /// name → (type, value as sent)
    pub measures: BTreeMap<String, (String, String)>,
}

impl StoredRecord {
    pub fn dimension(&self, name: &str) -> Option<&str> {
        self.dimensions.get(name).map(String::as_str)
    }

    pub fn measure(&self, name: &str) -> Option<&str> {
        self.measures.get(name).map(|(_, value)| value.as_str())
    }

    /// The record's time in microseconds since the epoch, whatever unit it was sent in.
    pub fn time_us(&self) -> i64 {
        match self.time_unit.as_str() {
            "SECONDS" => self.time * 1_000_000,
            "MICROSECONDS" => self.time,
            "NANOSECONDS" => self.time / 1_000,
            _ => self.time * 1_000,
        }
    }
}

/// Merges a request's CommonAttributes into each record: record fields win, dimensions of both
/// are kept (a record's own dimension overrides a common one of the same name).
pub fn merge_request(request: &Value) -> Vec<StoredRecord> {
    let common = &request["CommonAttributes"];
    request["Records"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|record| {
            let mut dimensions = BTreeMap::new();
            for source in [common, record] {
                for dimension in source["Dimensions"].as_array().into_iter().flatten() {
                    dimensions.insert(text(&dimension["Name"]), text(&dimension["Value"]));
                }
            }
            let field = |name: &str| {
                let own = &record[name];
                if own.is_null() {
                    text(&common[name])
                } else {
                    text(own)
                }
            };
            let measures = record["MeasureValues"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| (text(&m["Name"]), (text(&m["Type"]), text(&m["Value"]))))
                .collect();
            StoredRecord {
                dimensions,
                measure_name: field("MeasureName"),
                time_unit: match field("TimeUnit") {
                    unit if unit.is_empty() => "MILLISECONDS".to_owned(),
                    unit => unit,
                },
                time: field("Time").parse().unwrap_or(i64::MIN),
                measures,
            }
        })
        .collect()
}

fn text(value: &Value) -> String {
    value.as_str().map(str::to_owned).unwrap_or_default()
}

/// What the table holds, rebuilt from the requests, after checking that moto stored exactly as
/// many records as were sent to it. A request still in flight makes the two differ for a moment
/// (moto records a request before it stores it), so the check is repeated until they agree.
pub async fn stored_records(database: &str, table: &str) -> Vec<StoredRecord> {
    let mut attempts = 0;
    loop {
        let records: Vec<StoredRecord> = write_requests(database, table)
            .await
            .iter()
            .flat_map(merge_request)
            .collect();
        let kept = moto_records(database, table).await.len();
        if kept == records.len() {
            return records;
        }
        attempts += 1;
        assert!(
            attempts < 100,
            "moto holds {kept} records of {database}.{table} but {} were sent",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the table holds at least `count` records of measure names other than
/// `sora_connection`; returns what it holds then.
pub async fn wait_for_stats_records(
    database: &str,
    table: &str,
    count: usize,
    timeout: Duration,
) -> Vec<StoredRecord> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let records = stored_records(database, table).await;
        let stats = records
            .iter()
            .filter(|r| crate::mapping::is_stats_measure(&r.measure_name))
            .count();
        if stats >= count || tokio::time::Instant::now() >= deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP forwarder in front of moto that can play an outage: while down it refuses service
/// (accepts and closes at once) and cuts the connections it was carrying.
pub struct OutageProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    carried: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl OutageProxy {
    pub async fn start(target: &str) -> Self {
        assert_loopback(target);
        let target = address_of(target);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind outage proxy");
        let addr = listener.local_addr().expect("proxy address");
        let up = Arc::new(AtomicBool::new(true));
        let carried: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept_task = tokio::spawn({
            let up = up.clone();
            let carried = carried.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    if let Ok(mut carried) = carried.lock() {
                        carried.retain(|handle| !handle.is_finished());
                        carried.push(task.abort_handle());
                    }
                }
            }
        });
        Self {
            addr,
            up,
            carried,
            accept_task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            if let Ok(mut carried) = self.carried.lock() {
                for handle in carried.drain(..) {
                    handle.abort();
                }
            }
        }
    }
}

impl Drop for OutageProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}
