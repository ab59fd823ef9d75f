//! Builds the configured sinks. The only module that knows which backends were compiled in.

use std::sync::Arc;

use kohaku_sink::{SinkError, StatsSink};

use crate::config::SinksConfig;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("[sinks.{sink}] is configured but this Kohaku was built without the `{feature}` feature; rebuild with `cargo build --release --features {feature}`")]
    NotCompiled {
        sink: &'static str,
        feature: &'static str,
    },
    #[error("cannot open sink `{sink}`: {}", source.detailed())]
    Open {
        sink: &'static str,
        #[source]
        source: SinkError,
    },
    #[error("cannot migrate sink `{sink}`: {}", source.detailed())]
    Migrate {
        sink: String,
        #[source]
        source: SinkError,
    },
}

/// Opens every configured sink; connections are made here, never during config validation.
pub fn build(config: &SinksConfig) -> Result<Vec<Arc<dyn StatsSink>>, BuildError> {
    let mut sinks: Vec<Arc<dyn StatsSink>> = Vec::new();
    if let Some(sqlite) = &config.sqlite {
        sinks.push(build_sqlite(sqlite)?);
    }
    Ok(sinks)
}

#[cfg(feature = "sqlite")]
fn build_sqlite(
    config: &crate::config::SqliteSinkConfig,
) -> Result<Arc<dyn StatsSink>, BuildError> {
    let mut options = kohaku_sqlite::SqliteOptions::new(&config.path);
    options.busy_timeout = std::time::Duration::from_millis(config.busy_timeout_ms);
    let sink = kohaku_sqlite::SqliteSink::open(&options).map_err(|source| BuildError::Open {
        sink: "sqlite",
        source,
    })?;
    tracing::info!(path = %config.path.display(), "sqlite sink opened");
    Ok(Arc::new(sink))
}

#[cfg(not(feature = "sqlite"))]
fn build_sqlite(
    _config: &crate::config::SqliteSinkConfig,
) -> Result<Arc<dyn StatsSink>, BuildError> {
    Err(BuildError::NotCompiled {
        sink: "sqlite",
        feature: "sqlite",
    })
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
