//! `[sinks.timescaledb]`: the settings, their defaults and their checks, in one place; and the
//! options the sink runs with, derived from them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use kohaku_sink::{redact_uri, InvalidSetting, SinkError, DAY_SECS};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::ConnectOptions;

use crate::schema::{self, ExtensionMode, TimescaleSettings};
use crate::TimescaleSink;

const DEFAULT_MAX_CONNECTIONS: u32 = 10;
const DEFAULT_RETENTION_DAYS: u32 = 60;
const DEFAULT_COMPRESS_AFTER_DAYS: u32 = 7;
const DEFAULT_CHUNK_INTERVAL: &str = "1 day";
const DEFAULT_STATEMENT_TIMEOUT_SECS: u64 = 60;
/// How long a write waits for a free connection before failing transiently.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often Kohaku deletes expired rows itself.
const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `postgres://user:password@host:5432/database`; TimescaleDB or plain PostgreSQL.
    pub uri: SecretUri,
    /// Verify the database's TLS certificate against this CA (verify-full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_file: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Rows older than this are deleted (TimescaleDB: retention policy; PostgreSQL: by Kohaku
    /// hourly). 0 keeps everything.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// TimescaleDB only: compress chunks older than this; 0 turns compression off.
    #[serde(default = "default_compress_after_days")]
    pub compress_after_days: u32,
    /// TimescaleDB only: the time span of one chunk, e.g. "1 day" or "6 hours".
    #[serde(default = "default_chunk_interval")]
    pub chunk_interval: String,
    /// Seconds any statement may run before the server cancels it (and Kohaku retries).
    #[serde(default = "default_statement_timeout_secs")]
    pub statement_timeout_secs: u64,
    /// Whether to use the timescaledb extension: `auto`, `required` or `off`.
    #[serde(default)]
    pub extension: ExtensionMode,
}

fn default_max_connections() -> u32 {
    DEFAULT_MAX_CONNECTIONS
}
fn default_retention_days() -> u32 {
    DEFAULT_RETENTION_DAYS
}
fn default_compress_after_days() -> u32 {
    DEFAULT_COMPRESS_AFTER_DAYS
}
fn default_chunk_interval() -> String {
    DEFAULT_CHUNK_INTERVAL.to_owned()
}
fn default_statement_timeout_secs() -> u64 {
    DEFAULT_STATEMENT_TIMEOUT_SECS
}

impl Config {
    /// The database at `uri`, every other setting at its default.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: SecretUri::new(uri),
            ca_cert_file: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            retention_days: DEFAULT_RETENTION_DAYS,
            compress_after_days: DEFAULT_COMPRESS_AFTER_DAYS,
            chunk_interval: default_chunk_interval(),
            statement_timeout_secs: DEFAULT_STATEMENT_TIMEOUT_SECS,
            extension: ExtensionMode::default(),
        }
    }

    /// Everything that can be checked without contacting the database (for `check-config`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_connections == 0 {
            return Err(InvalidSetting::new("max_connections", "must be at least 1"));
        }
        if self.statement_timeout_secs == 0 {
            return Err(InvalidSetting::new(
                "statement_timeout_secs",
                "must be at least 1",
            ));
        }
        // PostgreSQL's statement_timeout is an i32 of milliseconds.
        InvalidSetting::check_at_most(
            "statement_timeout_secs",
            self.statement_timeout_secs,
            DAY_SECS,
            "s",
        )?;
        self.options().checked_connect_options().map(|_| ())
    }

    /// The options the sink runs with.
    pub fn options(&self) -> TimescaleOptions {
        TimescaleOptions {
            uri: self.uri.expose().to_owned(),
            ca_cert_file: self.ca_cert_file.clone(),
            max_connections: self.max_connections,
            acquire_timeout: ACQUIRE_TIMEOUT,
            settings: TimescaleSettings {
                chunk_interval: self.chunk_interval.clone(),
                compress_after_days: self.compress_after_days,
                retention_days: self.retention_days,
            },
            retention_interval: RETENTION_INTERVAL,
            statement_timeout: Duration::from_secs(self.statement_timeout_secs),
            extension: self.extension,
        }
    }

    /// Prepares the sink; nothing is contacted until `migrate`.
    pub fn build(&self) -> Result<TimescaleSink, SinkError> {
        let sink = TimescaleSink::connect(self.options())?;
        tracing::info!(database = sink.redacted_uri(), "timescaledb sink prepared");
        Ok(sink)
    }
}

/// A database URI whose password never appears in printed config, logs or errors.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUri(String);

impl SecretUri {
    pub fn new(uri: impl Into<String>) -> Self {
        Self(uri.into())
    }

    /// The real URI, for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn redacted(&self) -> String {
        redact_uri(&self.0)
    }
}

impl fmt::Debug for SecretUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for SecretUri {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// What the sink runs with: [`Config`]'s settings plus the timings tests shorten.
#[derive(Debug, Clone)]
pub struct TimescaleOptions {
    /// `postgres://…`; never logged or shown unredacted.
    pub uri: String,
    /// Verify the server's certificate against this CA (TLS, `verify-full`).
    pub ca_cert_file: Option<PathBuf>,
    pub max_connections: u32,
    /// How long a write waits for a free connection before failing transiently.
    pub acquire_timeout: Duration,
    pub settings: TimescaleSettings,
    /// How often Kohaku deletes expired rows on plain PostgreSQL.
    pub retention_interval: Duration,
    /// The server cancels any statement running longer (a write then fails transiently and is
    /// retried) instead of letting a stuck lock hold the pipeline forever.
    pub statement_timeout: Duration,
    pub extension: ExtensionMode,
}

impl TimescaleOptions {
    /// [`Config::new`]'s options.
    pub fn new(uri: impl Into<String>) -> Self {
        Config::new(uri).options()
    }

    /// The driver's options, after every check that needs no database.
    pub(crate) fn connect_options(&self) -> Result<PgConnectOptions, SinkError> {
        self.checked_connect_options()
            .map_err(|invalid| SinkError::classified(false, invalid.to_string()))
    }

    fn checked_connect_options(&self) -> Result<PgConnectOptions, InvalidSetting> {
        if !(self.uri.starts_with("postgres://") || self.uri.starts_with("postgresql://")) {
            return Err(InvalidSetting::new(
                "uri",
                format!(
                    "{} must start with postgres:// or postgresql://",
                    redact_uri(&self.uri)
                ),
            ));
        }
        let mut connect = PgConnectOptions::from_str(&self.uri).map_err(|err| {
            InvalidSetting::new(
                "uri",
                format!(
                    "invalid uri {}: {}",
                    redact_uri(&self.uri),
                    redact_uri(&err.to_string())
                ),
            )
        })?;
        if !schema::valid_interval(&self.settings.chunk_interval) {
            return Err(InvalidSetting::new(
                "chunk_interval",
                format!(
                    "{:?} is not of the form \"N minutes|hours|days|weeks\"",
                    self.settings.chunk_interval
                ),
            ));
        }
        if let Some(ca) = &self.ca_cert_file {
            std::fs::metadata(ca).map_err(|err| {
                InvalidSetting::new("ca_cert_file", format!("{}: {err}", ca.display()))
            })?;
            connect = connect.ssl_mode(PgSslMode::VerifyFull).ssl_root_cert(ca);
        }
        Ok(connect
            .application_name("kohaku")
            // Quiet the "relation already exists" notice of the staging table, once per batch.
            .options([
                ("client_min_messages", "warning".to_owned()),
                (
                    "statement_timeout",
                    format!("{}ms", self.statement_timeout.as_millis()),
                ),
            ])
            .disable_statement_logging())
    }
}
