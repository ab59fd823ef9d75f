//! Kohaku's TOML configuration: defaults, parsing and validation.
//!
//! Every error names the file and the key, because an operator reading a start-up failure should
//! not have to guess which of several files or tables is wrong. `config.example.toml` documents
//! every key; keep the two in step (a test compares them).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use kohaku_sink::redact_uri;
use serde::{Deserialize, Serialize};

/// Where a configuration came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    Defaults,
    File(PathBuf),
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Defaults => f.write_str("built-in defaults"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Line, column and key of the problem; never the offending line itself, which may hold a
    /// password.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config ({source_name}): `{key}`: {message}")]
    Invalid {
        source_name: ConfigSource,
        key: String,
        message: String,
    },
}

/// toml's own rendering of an error quotes the offending line, and that line can be
/// `uri = "postgres://kohaku:password@…` with a missing quote. This names the line, the column
/// and the key (the text before `=`, or the table header) instead; the message is redacted too,
/// as serde's messages may quote a value.
fn parse_error_message(text: &str, err: &toml::de::Error) -> String {
    let message = redact_uri(err.message().trim_end());
    let Some(span) = err.span() else {
        return message;
    };
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let line_start = text[..start].rfind('\n').map_or(0, |newline| newline + 1);
    let line_number = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or_default();
    let place = match line.split_once('=') {
        Some((key, _)) => format!(", key `{}`", key.trim()),
        None if line.trim_start().starts_with('[') => format!(", in {}", line.trim()),
        None => String::new(),
    };
    format!("line {line_number}, column {column}{place}: {message}")
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Log at debug level.
    pub debug: bool,
    pub server: ServerConfig,
    pub exporter: ExporterConfig,
    pub log: LogConfig,
    pub pipeline: PipelineConfig,
    /// Absent → accepted reports wait in memory only (see the README's "Delivery guarantees").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolConfig>,
    /// Absent → one SQLite sink at `./kohaku.db`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sinks: Option<SinksConfig>,
}

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

/// The backends' own configuration types, from their crates (see [`crate::sinks`]).
pub use crate::sinks::{
    SinksConfig, SqliteConfig as SqliteSinkConfig, TimescaleConfig as TimescaleSinkConfig,
    TimestreamConfig as TimestreamSinkConfig,
};
#[cfg(feature = "timescaledb")]
pub use kohaku_timescaledb::{ExtensionMode, SecretUri};

/// Bounds of HTTP/2's SETTINGS_MAX_FRAME_SIZE (RFC 9113 §6.5.2).
const H2_FRAME_SIZE_RANGE: std::ops::RangeInclusive<u32> = 16_384..=16_777_215;

impl Config {
    /// Reads `path`, or the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<(Self, ConfigSource), ConfigError> {
        let Some(path) = path else {
            let config = Self::default();
            config.validate(&ConfigSource::Defaults)?;
            return Ok((config, ConfigSource::Defaults));
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::parse(&text, path)?;
        let source = ConfigSource::File(path.to_owned());
        config.validate(&source)?;
        Ok((config, source))
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|err: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_error_message(text, &err),
        })
    }

    /// The sinks to write to: what `[sinks]` says, or SQLite at `./kohaku.db` without it.
    pub fn effective_sinks(&self) -> SinksConfig {
        self.sinks.clone().unwrap_or_else(|| SinksConfig {
            sqlite: Some(SqliteSinkConfig::default()),
            ..SinksConfig::default()
        })
    }

    /// The configuration as `check-config` prints it: every key with its effective value.
    pub fn to_effective_toml(&self) -> String {
        let mut effective = self.clone();
        effective.sinks = Some(self.effective_sinks());
        toml::to_string_pretty(&effective)
            .unwrap_or_else(|err| format!("# cannot print config: {err}\n"))
    }

    pub fn validate(&self, source: &ConfigSource) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            source_name: source.clone(),
            key: key.to_owned(),
            message,
        };
        let server = &self.server;
        let path = &server.webhook_path;
        if !path.starts_with('/')
            || path.contains(['?', '#'])
            || path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "server.webhook_path",
                format!(
                    "`{path}` is not a URL path: it must start with `/` and hold no query, fragment or spaces (e.g. {DEFAULT_WEBHOOK_PATH})"
                ),
            ));
        }
        if RESERVED_INGEST_PATHS.contains(&path.as_str()) {
            return Err(invalid(
                "server.webhook_path",
                format!("`{path}` is already served by Kohaku; choose another path"),
            ));
        }
        if server.https {
            if server.tls_fullchain_file.is_none() {
                return Err(invalid(
                    "server.tls_fullchain_file",
                    "required when server.https = true".into(),
                ));
            }
            if server.tls_privkey_file.is_none() {
                return Err(invalid(
                    "server.tls_privkey_file",
                    "required when server.https = true".into(),
                ));
            }
        } else if server.tls_verify_cacert_path.is_some() {
            return Err(invalid(
                "server.tls_verify_cacert_path",
                "client certificates need TLS: set server.https = true".into(),
            ));
        }
        if server.http2_max_concurrent_streams == 0 {
            return Err(invalid(
                "server.http2_max_concurrent_streams",
                "must be at least 1".into(),
            ));
        }
        if !H2_FRAME_SIZE_RANGE.contains(&server.http2_max_read_frame_size) {
            return Err(invalid(
                "server.http2_max_read_frame_size",
                format!(
                    "{} is outside HTTP/2's allowed range {}..={}",
                    server.http2_max_read_frame_size,
                    H2_FRAME_SIZE_RANGE.start(),
                    H2_FRAME_SIZE_RANGE.end()
                ),
            ));
        }
        if server.max_connections == 0 {
            return Err(invalid(
                "server.max_connections",
                "must be at least 1".into(),
            ));
        }
        if server.max_body_bytes == 0 {
            return Err(invalid(
                "server.max_body_bytes",
                "must be at least 1".into(),
            ));
        }
        if self.exporter.https && !server.https {
            return Err(invalid(
                "exporter.https",
                "the exporter uses the [server] certificate: set server.https = true and its TLS files".into(),
            ));
        }
        if self.exporter.listen_port != 0
            && self.exporter.listen_port == server.listen_port
            && (self.exporter.listen_addr == server.listen_addr
                || self.exporter.listen_addr.is_unspecified()
                || server.listen_addr.is_unspecified())
        {
            return Err(invalid(
                "exporter.listen_port",
                format!("{} is also server.listen_port", self.exporter.listen_port),
            ));
        }

        let log = &self.log;
        if log.dir.is_none() && !log.stdout {
            return Err(invalid(
                "log",
                "set `dir` or `stdout = true`: as configured Kohaku would log nowhere".into(),
            ));
        }
        if log.name.is_empty() || log.name.contains(['/', '\\']) {
            return Err(invalid(
                "log.name",
                format!("{:?} must be a plain file name", log.name),
            ));
        }
        if log.rotate_max_size == 0 {
            return Err(invalid(
                "log.rotate_max_size",
                "must be at least 1 (megabyte)".into(),
            ));
        }

        let pipeline = &self.pipeline;
        for (key, value) in [
            ("pipeline.queue_max_rows", pipeline.queue_max_rows),
            ("pipeline.batch_max_rows", pipeline.batch_max_rows),
            ("pipeline.batch_max_wait_ms", pipeline.batch_max_wait_ms),
            (
                "pipeline.retry_initial_backoff_ms",
                pipeline.retry_initial_backoff_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        // The queue is a semaphore of rows; tokio caps its permits.
        let max_queue = tokio::sync::Semaphore::MAX_PERMITS as u64;
        if pipeline.queue_max_rows > max_queue {
            return Err(invalid(
                "pipeline.queue_max_rows",
                format!("must be at most {max_queue}"),
            ));
        }
        if pipeline.batch_max_rows > pipeline.queue_max_rows {
            return Err(invalid(
                "pipeline.batch_max_rows",
                format!(
                    "{} is larger than pipeline.queue_max_rows ({}): a batch could never fill",
                    pipeline.batch_max_rows, pipeline.queue_max_rows
                ),
            ));
        }
        // The largest body, and the report parsed from it, must fit with room for others.
        let smallest_budget = server.max_body_bytes.saturating_mul(4);
        if pipeline.memory_max_bytes < smallest_budget {
            return Err(invalid(
                "pipeline.memory_max_bytes",
                format!(
                    "{} is less than four times server.max_body_bytes ({}): the largest report could not be read and parsed",
                    pipeline.memory_max_bytes, server.max_body_bytes
                ),
            ));
        }
        if pipeline.retry_max_backoff_ms < pipeline.retry_initial_backoff_ms {
            return Err(invalid(
                "pipeline.retry_max_backoff_ms",
                "must not be smaller than pipeline.retry_initial_backoff_ms".into(),
            ));
        }

        if server.max_body_bytes > crate::spool::record::MAX_PAYLOAD_LEN as u64 / 2 {
            return Err(invalid(
                "server.max_body_bytes",
                format!(
                    "must be at most {} (512 MiB)",
                    crate::spool::record::MAX_PAYLOAD_LEN / 2
                ),
            ));
        }
        if server.body_read_timeout_secs == 0 {
            return Err(invalid(
                "server.body_read_timeout_secs",
                "must be at least 1".into(),
            ));
        }

        if let Some(spool) = &self.spool {
            if spool.dir.as_os_str().is_empty() {
                return Err(invalid("spool.dir", "must not be empty".into()));
            }
            if spool.max_bytes < server.max_body_bytes.saturating_mul(2) {
                return Err(invalid(
                    "spool.max_bytes",
                    format!(
                        "{} is less than twice server.max_body_bytes ({}): the spool must hold the largest report with room to spare",
                        spool.max_bytes, server.max_body_bytes
                    ),
                ));
            }
            if spool.fsync == FsyncMode::Interval && spool.fsync_interval_ms == 0 {
                return Err(invalid(
                    "spool.fsync_interval_ms",
                    "must be at least 1".into(),
                ));
            }
        }

        // Time settings far past any sensible value are typos; some would also overflow a timer
        // and fail only at start-up. The backends bound their own in their `validate`.
        use kohaku_sink::{DAY_SECS, HOUR_MS};
        for (key, value, max, unit) in [
            (
                "pipeline.batch_max_wait_ms",
                Some(pipeline.batch_max_wait_ms),
                HOUR_MS,
                "ms",
            ),
            (
                "pipeline.retry_initial_backoff_ms",
                Some(pipeline.retry_initial_backoff_ms),
                HOUR_MS,
                "ms",
            ),
            (
                "pipeline.retry_max_backoff_ms",
                Some(pipeline.retry_max_backoff_ms),
                HOUR_MS,
                "ms",
            ),
            (
                "pipeline.shutdown_timeout_secs",
                Some(pipeline.shutdown_timeout_secs),
                DAY_SECS,
                "s",
            ),
            (
                "server.body_read_timeout_secs",
                Some(server.body_read_timeout_secs),
                DAY_SECS,
                "s",
            ),
            (
                "server.http2_idle_timeout",
                Some(server.http2_idle_timeout),
                7 * DAY_SECS,
                "s",
            ),
            (
                "spool.fsync_interval_ms",
                self.spool.as_ref().map(|s| s.fsync_interval_ms),
                HOUR_MS,
                "ms",
            ),
        ] {
            if let Some(value) = value {
                kohaku_sink::InvalidSetting::check_at_most(key, value, max, unit)
                    .map_err(|too_large| invalid(key, too_large.message))?;
            }
        }
        // What `serve` would refuse only after creating files: paths that cannot be used.
        let not_a_directory = |key: &str, dir: &Path| -> Result<(), ConfigError> {
            if dir.exists() && !dir.is_dir() {
                return Err(invalid(
                    key,
                    format!("{} exists and is not a directory", dir.display()),
                ));
            }
            Ok(())
        };
        if let Some(dir) = &log.dir {
            not_a_directory("log.dir", dir)?;
        }
        if let Some(spool) = &self.spool {
            not_a_directory("spool.dir", &spool.dir)?;
        }
        if let Some(sinks) = &self.sinks {
            if *sinks == SinksConfig::default() {
                return Err(invalid(
                    "sinks",
                    "the table names no sink: add e.g. [sinks.sqlite], or remove [sinks] to use SQLite at ./kohaku.db".into(),
                ));
            }
            crate::sinks::validate(sinks).map_err(|(sink, setting)| {
                invalid(&format!("sinks.{sink}.{}", setting.key), setting.message)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let path = Path::new("kohaku.toml");
        let config = Config::parse(text, path)?;
        config.validate(&ConfigSource::File(path.to_owned()))?;
        Ok(config)
    }

    #[test]
    #[cfg(feature = "sqlite")]
    fn empty_file_gives_defaults_with_sqlite() {
        let config = parse("").expect("empty config is valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.server.listen_port, 5890);
        assert_eq!(config.exporter.listen_port, 5891);
        assert_eq!(
            config.effective_sinks().sqlite.map(|s| s.path),
            Some(PathBuf::from("kohaku.db"))
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("debug = true\n[server]\nlisten_prot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kohaku.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("unknown field `listen_prot`"), "{err}");
    }

    #[test]
    fn parse_errors_never_show_the_password() {
        for text in [
            "[sinks.timescaledb]\nuri = \"postgres://kohaku:hunter2@db/stats\n",
            "[sinks.timescaledb]\nuri = [\"postgres://kohaku:hunter2@db/stats\"]\n",
            "[sinks]\ntimescaledb = { uri = \"postgres://kohaku:hunter2@db/stats\", typo = 1 }\n",
            "[sinks.timescaledb]\nuri = 'postgres://kohaku:hunter2@db/stats'\nmax_connections = \"postgres://kohaku:hunter2@db\"\n",
            "[sinks.timescaledb]\nuri = \"postgres://kohaku:hunter2@db/stats\" x\n",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("line "), "{err}");
        }
    }

    #[test]
    fn unknown_sink_is_rejected() {
        let err = parse("[sinks.mysql]\nuri = 'x'\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `mysql`"), "{err}");
    }

    #[test]
    fn wrong_type_names_key() {
        let err = parse("[server]\nlisten_port = 70000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_port"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    #[cfg(all(feature = "sqlite", feature = "timescaledb"))]
    fn validation_errors_name_the_key_and_file() {
        for (text, key) in [
            ("[server]\nhttps = true\n", "server.tls_fullchain_file"),
            (
                "[server]\ntls_verify_cacert_path = 'ca.pem'\n",
                "server.tls_verify_cacert_path",
            ),
            (
                "[server]\nhttp2_max_read_frame_size = 1024\n",
                "server.http2_max_read_frame_size",
            ),
            (
                "[server]\nhttp2_max_concurrent_streams = 0\n",
                "server.http2_max_concurrent_streams",
            ),
            ("[server]\nwebhook_path = 'stats'\n", "server.webhook_path"),
            (
                "[server]\nwebhook_path = '/stats?x=1'\n",
                "server.webhook_path",
            ),
            ("[server]\nwebhook_path = '/.ok'\n", "server.webhook_path"),
            (
                "[sinks.sqlite]\npath = 'k.db'\nbusy_timeout_ms = 3000000000\n",
                "sinks.sqlite.busy_timeout_ms",
            ),
            (
                "[pipeline]\nbatch_max_wait_ms = 100000000000000000\n",
                "pipeline.batch_max_wait_ms",
            ),
            (
                "[sinks.timescaledb]\nuri = 'postgres://k@h/d'\nstatement_timeout_secs = 9999999999\n",
                "sinks.timescaledb.statement_timeout_secs",
            ),
            (
                "[sinks.sqlite]\npath = '/nonexistent-kohaku-dir/k.db'\n",
                "sinks.sqlite.path",
            ),
            ("[sinks.sqlite]\npath = '/'\n", "sinks.sqlite.path"),
            ("[log]\ndir = '/etc/passwd'\n", "log.dir"),
            ("[spool]\ndir = '/etc/passwd'\n", "spool.dir"),
            (
                "[pipeline]\nbatch_max_rows = 10\nqueue_max_rows = 5\n",
                "pipeline.batch_max_rows",
            ),
            (
                "[pipeline]\nqueue_max_rows = 0\n",
                "pipeline.queue_max_rows",
            ),
            ("[log]\nstdout = false\n", "`log`"),
            ("[sinks]\n", "`sinks`"),
            ("[exporter]\nlisten_port = 5890\n", "exporter.listen_port"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
            assert!(err.contains("kohaku.toml"), "{text:?}: {err}");
        }
    }

    #[test]
    #[cfg(feature = "timescaledb")]
    fn timescaledb_sink_defaults_and_validation() {
        let config = parse("[sinks.timescaledb]\nuri = 'postgres://k:pw@db/stats'\n").unwrap();
        let sink = config.effective_sinks().timescaledb.unwrap();
        assert_eq!(
            (
                sink.max_connections,
                sink.retention_days,
                sink.compress_after_days,
                sink.chunk_interval.as_str()
            ),
            (10, 60, 7, "1 day")
        );
        assert!(
            config.effective_sinks().sqlite.is_none(),
            "an explicit [sinks] replaces the default"
        );
        for (text, key) in [
            ("[sinks.timescaledb]\n", "missing field `uri`"),
            (
                "[sinks.timescaledb]\nuri = 'mysql://db'\n",
                "sinks.timescaledb.uri",
            ),
            (
                "[sinks.timescaledb]\nuri = 'postgres://db'\nretention = 3\n",
                "unknown field `retention`",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    #[cfg(feature = "timescaledb")]
    fn passwords_never_print() {
        let config = parse(
            "[sinks.timescaledb]\nuri = 'postgres://kohaku:hunter2@db/stats?password=hunter2'\n",
        )
        .unwrap();
        let printed = config.to_effective_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("postgres://kohaku:***@db/stats?password=***"),
            "{printed}"
        );
        assert!(!format!("{config:?}").contains("hunter2"));
        let err = parse("[sinks.timescaledb]\nuri = 'mysql://u:hunter2@db'\n")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    #[cfg(feature = "sqlite")]
    fn effective_toml_round_trips() {
        let config = parse("debug = true\n[sinks.sqlite]\npath = 'x.db'\n").unwrap();
        let printed = config.to_effective_toml();
        let reparsed = parse(&printed).unwrap();
        assert_eq!(reparsed, config);
    }

    /// Every key Kohaku accepts is documented in config.example.toml, and the file parses to the
    /// defaults it claims.
    #[test]
    #[cfg(all(feature = "sqlite", feature = "timescaledb", feature = "timestream"))]
    fn example_config_documents_every_key_with_its_default() {
        let example = include_str!("../config.example.toml");
        let uncommented: String = example
            .lines()
            .map(|line| {
                line.strip_prefix("# ")
                    .filter(|l| looks_like_key_or_table(l))
                    .unwrap_or(line)
            })
            .collect::<Vec<_>>()
            .join("\n");
        // Not validated: the sample TLS paths are shown with `https = false`, its default.
        let config = Config::parse(&uncommented, Path::new("config.example.toml"))
            .expect("config.example.toml with every key uncommented parses");
        let mut expected = Config::default();
        expected.sinks = Some(expected.effective_sinks());
        // Optional keys have no default; the example shows a sample value for them.
        let mut documented = config.clone();
        documented.server.tls_fullchain_file = None;
        documented.server.tls_privkey_file = None;
        documented.server.tls_verify_cacert_path = None;
        documented.server.https = false;
        documented.exporter.https = false;
        documented.log.dir = None;
        // [spool] is off by default; the example shows it commented out with its defaults.
        assert_eq!(
            documented.spool.take(),
            Some(SpoolConfig::default()),
            "config.example.toml shows a [spool] value that is not the default"
        );
        // The example shows a commented-out [sinks.timescaledb] beside the default SQLite sink.
        let timescaledb = documented
            .sinks
            .as_mut()
            .and_then(|sinks| sinks.timescaledb.take());
        let timescaledb = timescaledb.expect("config.example.toml documents [sinks.timescaledb]");
        assert_eq!(
            (
                timescaledb.max_connections,
                timescaledb.retention_days,
                timescaledb.compress_after_days,
                timescaledb.chunk_interval.as_str(),
                timescaledb.statement_timeout_secs
            ),
            (10, 60, 7, "1 day", 60),
            "config.example.toml shows a [sinks.timescaledb] value that is not the default"
        );
        // And a commented-out [sinks.timestream], whose optional keys show sample values.
        let mut timestream = documented
            .sinks
            .as_mut()
            .and_then(|sinks| sinks.timestream.take())
            .expect("config.example.toml documents [sinks.timestream]");
        assert!(timestream.region.take().is_some() && timestream.endpoint_url.take().is_some());
        assert_eq!(
            timestream,
            TimestreamSinkConfig::default(),
            "config.example.toml shows a [sinks.timestream] value that is not the default"
        );
        assert_eq!(
            documented, expected,
            "config.example.toml shows a value that is not the default"
        );

        let printed = toml::to_string(&config).unwrap();
        let printed: toml::Table = toml::from_str(&printed).unwrap();
        for (table, value) in &printed {
            match value {
                toml::Value::Table(keys) => {
                    for (key, nested) in keys {
                        if let toml::Value::Table(inner) = nested {
                            for inner_key in inner.keys() {
                                assert!(
                                    example.contains(&format!("{inner_key} =")),
                                    "{table}.{key}.{inner_key} undocumented"
                                );
                            }
                        } else {
                            assert!(
                                example.contains(&format!("{key} =")),
                                "{table}.{key} undocumented"
                            );
                        }
                    }
                }
                _ => assert!(
                    example.contains(&format!("{table} =")),
                    "{table} undocumented"
                ),
            }
        }
    }

    #[cfg(all(feature = "sqlite", feature = "timescaledb", feature = "timestream"))]
    fn looks_like_key_or_table(line: &str) -> bool {
        line.starts_with('[')
            || line
                .split_once(" = ")
                .is_some_and(|(key, _)| !key.contains(' '))
    }
}
