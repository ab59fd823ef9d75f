//! Kohaku's TOML configuration: defaults, parsing and validation.
//!
//! Every error names the file and the key, because an operator reading a start-up failure should
//! not have to guess which of several files or tables is wrong. `config.example.toml` documents
//! every key; keep the two in step (a test compares them).

use std::fmt;
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

/// The backends' own configuration types, from their crates (see [`crate::sinks`]).
pub use crate::sinks::{
    SinksConfig, SqliteConfig as SqliteSinkConfig, TimescaleConfig as TimescaleSinkConfig,
    TimestreamConfig as TimestreamSinkConfig,
};
#[cfg(feature = "timescaledb")]
pub use kohaku_timescaledb::{ExtensionMode, SecretUri};

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
}

mod sections;
mod validate;
pub use sections::*;

#[cfg(test)]
mod tests;
