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

/// Checks every configured sink's settings without opening or contacting anything. A sink whose
/// backend was not compiled in is refused here, in one place, naming the feature to build with.
pub fn check(config: &SinksConfig) -> Result<(), BuildError> {
    if let Some(_sqlite) = &config.sqlite {
        compiled("sqlite", cfg!(feature = "sqlite"))?;
    }
    if let Some(_timescaledb) = &config.timescaledb {
        compiled("timescaledb", cfg!(feature = "timescaledb"))?;
        #[cfg(feature = "timescaledb")]
        check_timescaledb(_timescaledb)?;
    }
    if let Some(_timestream) = &config.timestream {
        compiled("timestream", cfg!(feature = "timestream"))?;
        #[cfg(feature = "timestream")]
        check_timestream(_timestream)?;
    }
    Ok(())
}

/// Each backend's Cargo feature has the backend's name.
fn compiled(sink: &'static str, enabled: bool) -> Result<(), BuildError> {
    if enabled {
        Ok(())
    } else {
        Err(BuildError::NotCompiled {
            sink,
            feature: sink,
        })
    }
}

/// Opens every configured sink. Network connections are made lazily, on first use.
pub fn build(config: &SinksConfig) -> Result<Vec<Arc<dyn StatsSink>>, BuildError> {
    check(config)?;
    let mut sinks: Vec<Arc<dyn StatsSink>> = Vec::new();
    #[cfg(feature = "sqlite")]
    if let Some(sqlite) = &config.sqlite {
        sinks.push(build_sqlite(sqlite)?);
    }
    #[cfg(feature = "timescaledb")]
    if let Some(timescaledb) = &config.timescaledb {
        sinks.push(build_timescaledb(timescaledb)?);
    }
    #[cfg(feature = "timestream")]
    if let Some(timestream) = &config.timestream {
        sinks.push(build_timestream(timestream)?);
    }
    Ok(sinks)
}

#[cfg(feature = "sqlite")]
fn build_sqlite(
    config: &crate::config::SqliteSinkConfig,
) -> Result<Arc<dyn StatsSink>, BuildError> {
    let mut options = kohaku_sqlite::SqliteOptions::new(&config.path);
    options.busy_timeout = std::time::Duration::from_millis(config.busy_timeout_ms);
    let sink = kohaku_sqlite::SqliteSink::open(&options).map_err(|source| BuildError::Invalid {
        sink: "sqlite",
        source,
    })?;
    tracing::info!(path = %config.path.display(), "sqlite sink opened");
    Ok(Arc::new(sink))
}

#[cfg(feature = "timescaledb")]
fn timescaledb_options(
    config: &crate::config::TimescaleSinkConfig,
) -> kohaku_timescaledb::TimescaleOptions {
    let mut options = kohaku_timescaledb::TimescaleOptions::new(config.uri.expose());
    options.ca_cert_file.clone_from(&config.ca_cert_file);
    options.max_connections = config.max_connections;
    options.statement_timeout = std::time::Duration::from_secs(config.statement_timeout_secs);
    options.settings = kohaku_timescaledb::TimescaleSettings {
        chunk_interval: config.chunk_interval.clone(),
        compress_after_days: config.compress_after_days,
        retention_days: config.retention_days,
    };
    options.extension = match config.extension {
        crate::config::ExtensionMode::Auto => kohaku_timescaledb::ExtensionMode::Auto,
        crate::config::ExtensionMode::Required => kohaku_timescaledb::ExtensionMode::Required,
        crate::config::ExtensionMode::Off => kohaku_timescaledb::ExtensionMode::Off,
    };
    options
}

#[cfg(feature = "timescaledb")]
fn check_timescaledb(config: &crate::config::TimescaleSinkConfig) -> Result<(), BuildError> {
    timescaledb_options(config)
        .validate()
        .map_err(|source| BuildError::Invalid {
            sink: "timescaledb",
            source,
        })
}

#[cfg(feature = "timescaledb")]
fn build_timescaledb(
    config: &crate::config::TimescaleSinkConfig,
) -> Result<Arc<dyn StatsSink>, BuildError> {
    let sink = kohaku_timescaledb::TimescaleSink::connect(timescaledb_options(config)).map_err(
        |source| BuildError::Invalid {
            sink: "timescaledb",
            source,
        },
    )?;
    tracing::info!(database = sink.redacted_uri(), "timescaledb sink prepared");
    Ok(Arc::new(sink))
}

#[cfg(feature = "timestream")]
fn timestream_options(
    config: &crate::config::TimestreamSinkConfig,
) -> kohaku_timestream::TimestreamOptions {
    let mut options = kohaku_timestream::TimestreamOptions::new(&config.database, &config.table);
    options.region.clone_from(&config.region);
    options.endpoint_url.clone_from(&config.endpoint_url);
    options.create_if_missing = config.create_if_missing;
    options.memory_store_retention_hours = config.memory_store_retention_hours;
    options.magnetic_store_retention_days = config.magnetic_store_retention_days;
    options.max_records_per_write = config.max_records_per_write;
    options.max_concurrent_writes = config.max_concurrent_writes;
    options.request_timeout = std::time::Duration::from_secs(config.request_timeout_secs);
    options
}

#[cfg(feature = "timestream")]
fn check_timestream(config: &crate::config::TimestreamSinkConfig) -> Result<(), BuildError> {
    timestream_options(config)
        .validate()
        .map_err(|source| BuildError::Invalid {
            sink: "timestream",
            source,
        })
}

#[cfg(feature = "timestream")]
fn build_timestream(
    config: &crate::config::TimestreamSinkConfig,
) -> Result<Arc<dyn StatsSink>, BuildError> {
    let options = timestream_options(config);
    let sink = kohaku_timestream::TimestreamSink::connect(options).map_err(|source| {
        BuildError::Invalid {
            sink: "timestream",
            source,
        }
    })?;
    let options = sink.options();
    tracing::info!(
        database = %options.database,
        table = %options.table,
        region = options.region.as_deref().unwrap_or("(from the AWS chain)"),
        endpoint = options.endpoint_url.as_deref().unwrap_or("(endpoint discovery)"),
        "timestream sink prepared"
    );
    Ok(Arc::new(sink))
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
        assert!(compiled("sqlite", true).is_ok());
        let message = compiled("timestream", false).unwrap_err().to_string();
        assert!(
            message.contains("[sinks.timestream]") && message.contains("--features timestream"),
            "{message}"
        );
    }
}
