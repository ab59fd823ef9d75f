//! The registry of storage backends: each one's configuration type, checks and constructor, as
//! its crate defines them (`kohaku_<backend>::Config`). The only module that knows which backends
//! were compiled in: one `backend!` line per backend below; a backend left out of the build keeps
//! its `[sinks.<backend>]` table as written and is refused in one place, naming the feature to
//! build with.

use std::sync::Arc;

use kohaku_sink::{InvalidSetting, SinkError, StatsSink};
use serde::{Deserialize, Serialize};

/// One backend: its crate's `Config` and constructor when its feature is built, a stand-in that
/// keeps its table as written when not.
macro_rules! backend {
    ($feature:literal, $module:ident, $config:path) => {
        #[cfg(feature = $feature)]
        mod $module {
            pub use $config as Config;
            pub const COMPILED: bool = true;
            pub fn build(config: &Config) -> Result<super::Built, super::SinkError> {
                Ok(std::sync::Arc::new(config.build()?))
            }
        }
        #[cfg(not(feature = $feature))]
        use not_compiled as $module;
    };
}

backend!("sqlite", sqlite, kohaku_sqlite::Config);
backend!("timescaledb", timescaledb, kohaku_timescaledb::Config);
backend!("timestream", timestream, kohaku_timestream::Config);

type Built = Arc<dyn StatsSink>;

/// What stands in for a backend this build lacks.
#[allow(dead_code)]
mod not_compiled {
    pub type Config = super::NotCompiled;
    pub const COMPILED: bool = false;
    pub fn build(_: &Config) -> Result<super::Built, super::SinkError> {
        Err(super::SinkError::classified(
            false,
            "this Kohaku was built without this backend",
        ))
    }
}

/// A `[sinks.<backend>]` table for a backend this build lacks, kept as written so that start-up
/// can say which feature is missing rather than "unknown field". Printed with every URI's
/// password hidden, as the backend's own type would.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct NotCompiled(toml::Table);

impl Serialize for NotCompiled {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let redacted: toml::Table = self
            .0
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    toml::Value::String(text) => toml::Value::String(kohaku_sink::redact_uri(text)),
                    other => other.clone(),
                };
                (key.clone(), value)
            })
            .collect();
        redacted.serialize(serializer)
    }
}

#[allow(dead_code)]
impl NotCompiled {
    fn validate(&self) -> Result<(), InvalidSetting> {
        Ok(())
    }
}

pub type SqliteConfig = sqlite::Config;
pub type TimescaleConfig = timescaledb::Config;
pub type TimestreamConfig = timestream::Config;

/// One table per storage backend; more than one means every report goes to all of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlite: Option<SqliteConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timescaledb: Option<TimescaleConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestream: Option<TimestreamConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("[sinks.{sink}] is configured but this Kohaku was built without the `{feature}` feature; rebuild with `cargo build --release --features {feature}`")]
    NotCompiled {
        sink: &'static str,
        feature: &'static str,
    },
    // The cause comes from `source`: printed with `{:#}` (as `main` does), it follows once.
    #[error("[sinks.{sink}]")]
    Invalid {
        sink: &'static str,
        #[source]
        source: SinkError,
    },
    #[error("cannot migrate sink `{sink}`")]
    Migrate {
        sink: String,
        #[source]
        source: SinkError,
    },
}

/// Every configured backend's own checks, without opening or contacting anything. The error
/// names the backend and its key; the configuration adds the file.
pub fn validate(config: &SinksConfig) -> Result<(), (&'static str, InvalidSetting)> {
    let named = |sink| move |invalid| (sink, invalid);
    if let Some(sqlite) = &config.sqlite {
        sqlite.validate().map_err(named("sqlite"))?;
    }
    if let Some(timescaledb) = &config.timescaledb {
        timescaledb.validate().map_err(named("timescaledb"))?;
    }
    if let Some(timestream) = &config.timestream {
        timestream.validate().map_err(named("timestream"))?;
    }
    Ok(())
}

/// Refuses a configured backend this build lacks, naming the feature to build with.
pub fn check(config: &SinksConfig) -> Result<(), BuildError> {
    compiled("sqlite", config.sqlite.is_some(), sqlite::COMPILED)?;
    compiled(
        "timescaledb",
        config.timescaledb.is_some(),
        timescaledb::COMPILED,
    )?;
    compiled(
        "timestream",
        config.timestream.is_some(),
        timestream::COMPILED,
    )
}

/// Each backend's Cargo feature has the backend's name.
fn compiled(sink: &'static str, configured: bool, compiled: bool) -> Result<(), BuildError> {
    if configured && !compiled {
        return Err(BuildError::NotCompiled {
            sink,
            feature: sink,
        });
    }
    Ok(())
}

/// Opens every configured sink. Network connections are made lazily, on first use.
pub fn build(config: &SinksConfig) -> Result<Vec<Arc<dyn StatsSink>>, BuildError> {
    check(config)?;
    let invalid = |sink| move |source| BuildError::Invalid { sink, source };
    let mut sinks: Vec<Arc<dyn StatsSink>> = Vec::new();
    if let Some(sqlite) = &config.sqlite {
        sinks.push(sqlite::build(sqlite).map_err(invalid("sqlite"))?);
    }
    if let Some(timescaledb) = &config.timescaledb {
        sinks.push(timescaledb::build(timescaledb).map_err(invalid("timescaledb"))?);
    }
    if let Some(timestream) = &config.timestream {
        sinks.push(timestream::build(timestream).map_err(invalid("timestream"))?);
    }
    Ok(sinks)
}

/// Creates or upgrades every sink's schema.
pub async fn migrate(sinks: &[Arc<dyn StatsSink>]) -> Result<(), BuildError> {
    for sink in sinks {
        sink.migrate().await.map_err(|source| BuildError::Migrate {
            sink: sink.name().to_owned(),
            source,
        })?;
        tracing::info!(sink = sink.name(), "schema up to date");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_not_compiled_in_names_the_feature_to_build_with() {
        assert!(compiled("sqlite", true, true).is_ok());
        assert!(compiled("timestream", false, false).is_ok());
        let message = compiled("timestream", true, false).unwrap_err().to_string();
        assert!(
            message.contains("[sinks.timestream]") && message.contains("--features timestream"),
            "{message}"
        );
    }
}
