//! `[sinks.sqlite]`: the settings, their defaults and their checks, in one place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kohaku_sink::{InvalidSetting, SinkError, HOUR_MS};
use serde::{Deserialize, Serialize};

use crate::SqliteSink;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Relative paths are relative to Kohaku's working directory.
    pub path: PathBuf,
    /// How long a statement waits for another process's lock before the write fails (and is
    /// retried by the pipeline).
    pub busy_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            path: PathBuf::from("kohaku.db"),
            busy_timeout_ms: 5_000,
        }
    }
}

impl Config {
    /// A configuration for the database at `path`, every other setting at its default.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }

    /// What `serve` would refuse only after creating files, checked without opening anything.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.path.as_os_str().is_empty() {
            return Err(InvalidSetting::new("path", "must not be empty"));
        }
        // SQLite's busy timeout is an i32 of milliseconds.
        InvalidSetting::check_at_most("busy_timeout_ms", self.busy_timeout_ms, HOUR_MS, "ms")?;
        let parent = self
            .path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            return Err(InvalidSetting::new(
                "path",
                format!(
                    "{}: the directory {} does not exist (Kohaku creates the database file, not its directory)",
                    self.path.display(),
                    parent.display()
                ),
            ));
        }
        if self.path.is_dir() {
            return Err(InvalidSetting::new(
                "path",
                format!(
                    "{} is a directory, not a database file",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    pub fn busy_timeout(&self) -> Duration {
        Duration::from_millis(self.busy_timeout_ms)
    }

    /// Opens (creating if needed) the database file; the schema comes with `migrate`.
    pub fn build(&self) -> Result<SqliteSink, SinkError> {
        let sink = SqliteSink::open(self)?;
        tracing::info!(path = %self.path.display(), "sqlite sink opened");
        Ok(sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_key() {
        assert_eq!(Config::default().validate(), Ok(()));
        for (config, key) in [
            (Config::at(""), "path"),
            (Config::at("/nonexistent-kohaku-dir/k.db"), "path"),
            (Config::at("/"), "path"),
            (
                Config {
                    busy_timeout_ms: 3_000_000_000,
                    ..Config::default()
                },
                "busy_timeout_ms",
            ),
        ] {
            let err = config.validate().expect_err(key);
            assert_eq!(err.key, key, "{err}");
        }
    }
}
