//! Kohaku's own sections of the configuration, with their defaults; the backends' sections are
//! theirs (`kohaku_<backend>::Config`).

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The path of `stats_webhook_url` in Sora's documentation.
pub const DEFAULT_WEBHOOK_PATH: &str = "/sora/webhook/stats";
/// Paths the ingest listener serves on its own, which the webhook path must not take.
pub const RESERVED_INGEST_PATHS: [&str; 2] = ["/collector", "/.ok"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen_addr: IpAddr,
    /// 0 picks a free port (the bound address is logged); useful for tests.
    pub listen_port: u16,
    pub https: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_fullchain_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_privkey_file: Option<PathBuf>,
    /// A PEM file or a directory of PEM files: when set, clients must present a certificate
    /// signed by one of these CAs (mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_verify_cacert_path: Option<PathBuf>,
    pub http2_max_concurrent_streams: u32,
    pub http2_max_read_frame_size: u32,
    /// Seconds without an open stream after which a connection is closed; 0 never closes it.
    pub http2_idle_timeout: u64,
    pub max_body_bytes: u64,
    /// A request body must arrive completely within this time after its headers, so that slow or
    /// stalled senders cannot hold connections and memory.
    pub body_read_timeout_secs: u64,
    /// Where Sora's stats webhook posts (`stats_webhook_url` in sora.conf), over HTTP/1.1 or
    /// HTTP/2. The default is the path of Sora's documented example URL.
    pub webhook_path: String,
    /// Connections open at once on the ingest listener; beyond it new ones are closed at once.
    pub max_connections: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen_addr: IpAddr::from([0, 0, 0, 0]),
            listen_port: 5890,
            https: false,
            tls_fullchain_file: None,
            tls_privkey_file: None,
            tls_verify_cacert_path: None,
            http2_max_concurrent_streams: 250,
            http2_max_read_frame_size: 1024 * 1024,
            http2_idle_timeout: 60,
            max_body_bytes: 8 * 1024 * 1024,
            body_read_timeout_secs: 30,
            webhook_path: DEFAULT_WEBHOOK_PATH.to_owned(),
            max_connections: 512,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExporterConfig {
    pub listen_addr: IpAddr,
    pub listen_port: u16,
    /// Serve /metrics and /health over TLS with the `[server]` certificate.
    pub https: bool,
}

impl Default for ExporterConfig {
    fn default() -> Self {
        Self {
            listen_addr: IpAddr::from([127, 0, 0, 1]),
            listen_port: 5891,
            https: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Directory of the rotated JSON log file; unset → no log file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    pub name: String,
    pub stdout: bool,
    /// Megabytes.
    pub rotate_max_size: u64,
    pub rotate_max_backups: u64,
    /// Days; rotated files older than this are deleted. 0 keeps them regardless of age.
    pub rotate_max_age: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            dir: None,
            name: "kohaku.jsonl".to_owned(),
            stdout: true,
            rotate_max_size: 200,
            rotate_max_backups: 7,
            rotate_max_age: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Stats objects accepted but not yet written to every sink; beyond it requests get 503.
    pub queue_max_rows: u64,
    /// Bytes of report data held in memory at most: bodies arriving, reports parsed and queued
    /// (or, with the spool, replay batches); beyond it requests get 503.
    pub memory_max_bytes: u64,
    pub batch_max_rows: u64,
    pub batch_max_wait_ms: u64,
    /// On SIGINT/SIGTERM, how long queued stats may take to reach the sinks before Kohaku exits
    /// anyway (and logs how many rows it gave up).
    pub shutdown_timeout_secs: u64,
    /// First delay before retrying a sink's transient failure; doubles up to the maximum, with
    /// jitter.
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    /// Store a stats object only when something but its `timestamp` changed since the same
    /// connection's previous one with the same `id`: `"off"`, `"all"`, or a list of stats types.
    pub skip_unchanged: SkipUnchanged,
    /// Objects the skip_unchanged check remembers at most (24 bytes each, allocated at start-up);
    /// one that is forgotten costs at most one stored repeat.
    pub skip_unchanged_cache_entries: u64,
}

/// What `pipeline.skip_unchanged` checks unless configured: the types that describe a connection
/// rather than measure it. Their repeats carry nothing (in this project's Chromium and Sora
/// captures they are three quarters of all repeated objects), while every sample of the counter
/// types stays, as operators' own queries over `rtc_stats` may expect one per report.
pub const DEFAULT_SKIP_UNCHANGED_TYPES: [&str; 5] = [
    "certificate",
    "codec",
    "local-candidate",
    "remote-candidate",
    "peer-connection",
];

/// `pipeline.skip_unchanged`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SkipUnchanged {
    Mode(SkipMode),
    Types(Vec<String>),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SkipMode {
    Off,
    All,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_max_rows: 200_000,
            memory_max_bytes: 128 * 1024 * 1024,
            batch_max_rows: 5_000,
            batch_max_wait_ms: 200,
            shutdown_timeout_secs: 30,
            retry_initial_backoff_ms: 100,
            retry_max_backoff_ms: 30_000,
            skip_unchanged: SkipUnchanged::Types(
                DEFAULT_SKIP_UNCHANGED_TYPES
                    .iter()
                    .map(|t| (*t).to_owned())
                    .collect(),
            ),
            skip_unchanged_cache_entries: 262_144,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsyncMode {
    Always,
    Interval,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Bytes of spooled reports kept on disk at most; beyond it requests get 503.
    pub max_bytes: u64,
    pub fsync: FsyncMode,
    /// With `fsync = "interval"`: the longest time an acknowledged report may sit unsynced.
    pub fsync_interval_ms: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("kohaku-spool"),
            max_bytes: 1 << 30,
            fsync: FsyncMode::Always,
            fsync_interval_ms: 200,
        }
    }
}

impl SpoolConfig {
    pub fn options(&self) -> crate::spool::SpoolOptions {
        crate::spool::SpoolOptions {
            dir: self.dir.clone(),
            max_bytes: self.max_bytes,
            fsync: match self.fsync {
                FsyncMode::Always => crate::spool::FsyncPolicy::Always,
                FsyncMode::Interval => crate::spool::FsyncPolicy::Interval(
                    std::time::Duration::from_millis(self.fsync_interval_ms),
                ),
            },
        }
    }
}
