//! TimescaleDB / PostgreSQL storage backend for Kohaku.
//!
//! With the timescaledb extension usable, `rtc_stats` becomes a hypertable, with compression and
//! retention policies under the Timescale License; Apache-only TimescaleDB gives the hypertable
//! and Kohaku drops expired chunks itself; on plain PostgreSQL the same tables are used and
//! Kohaku deletes rows older than the retention itself. Writes stream the batch with `COPY` into a per-session staging table
//! and move it with one `INSERT … SELECT … ON CONFLICT DO NOTHING`, which keeps them idempotent.

mod config;
mod error;
mod migrate;
mod read_back;
mod retention;
pub mod schema;
/// Test support (the throwaway cluster of `scripts/test`), behind the `testkit` feature so that
/// nothing test-only is in a release build.
#[cfg(feature = "testkit")]
pub mod testkit;
mod write;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kohaku_sink::{redact_uri, Report, SinkCounter, SinkError, StatsBatch, StatsSink, WriteReport};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::task::JoinHandle;

pub use config::{Config, SecretUri, TimescaleOptions};
use error::classify;
pub use error::{is_transient, is_transient_sqlstate};
pub use schema::{ExtensionMode, Flavor, TimescaleSettings};
pub use write::encode_copy_row;

/// Arbitrary constant naming Kohaku's migration lock among the database's advisory locks.
const MIGRATION_LOCK_KEY: i64 = 0x6b6f_6861_6b75;
/// True when Kohaku's role can write what `write` writes, on a server that accepts writes.
const WRITABLE_QUERY: &str = "SELECT has_table_privilege('rtc_stats', 'INSERT') \
     AND has_table_privilege('sora_connection', 'INSERT, UPDATE') \
     AND current_setting('transaction_read_only') = 'off'";

#[derive(Default)]
struct Counters {
    retention_runs: AtomicU64,
    retention_deleted_rows: AtomicU64,
    retention_dropped_chunks: AtomicU64,
    retention_deleted_connections: AtomicU64,
    /// 1 when `extension = "auto"` fell back to plain PostgreSQL.
    extension_fallbacks: AtomicU64,
    /// Failures of Kohaku's TimescaleDB policy jobs, as `job_stats` counts them.
    policy_job_failures: AtomicU64,
}

pub struct TimescaleSink {
    pool: PgPool,
    redacted_uri: String,
    options: TimescaleOptions,
    flavor: Mutex<Option<Flavor>>,
    retention_task: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
    /// What `/health` should say beyond up or down: failed policy jobs, a fallback.
    notices: Mutex<Vec<String>>,
}

impl TimescaleSink {
    /// Prepares a connection pool. Nothing is contacted until the first use, so a database that
    /// is down at this moment is reported by `migrate` or `health`, not here.
    pub fn connect(options: TimescaleOptions) -> Result<Self, SinkError> {
        let connect = options.connect_options()?;
        let redacted_uri = redact_uri(&options.uri);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self {
            pool,
            redacted_uri,
            options,
            flavor: Mutex::new(None),
            retention_task: Mutex::new(None),
            counters: Arc::default(),
            notices: Mutex::new(Vec::new()),
        })
    }

    /// What `migrate` found on the server; `None` before it ran.
    pub fn flavor(&self) -> Option<Flavor> {
        self.flavor.lock().ok().and_then(|flavor| flavor.clone())
    }

    /// The database, for logs: the uri with its password hidden.
    pub fn redacted_uri(&self) -> &str {
        &self.redacted_uri
    }
}

#[async_trait]
impl StatsSink for TimescaleSink {
    fn name(&self) -> &str {
        "timescaledb"
    }

    async fn migrate(&self) -> Result<(), SinkError> {
        let newest = schema::MIGRATIONS
            .last()
            .map_or(0, |(version, _, _)| *version);
        self.migrate_to(newest).await?;
        let flavor = self.settle_flavor().await?;
        let settings = &self.options.settings;
        match &flavor {
            Flavor::TimescaleDb { version } => {
                self.apply_hypertable(&flavor).await?;
                tracing::info!(
                    database = %self.redacted_uri,
                    timescaledb = %version,
                    chunk_interval = %settings.chunk_interval,
                    compress_after_days = settings.compress_after_days,
                    retention_days = settings.retention_days,
                    "timescaledb: rtc_stats is a hypertable with compression and retention policies"
                );
            }
            Flavor::ApacheOnly { version } => {
                self.apply_hypertable(&flavor).await?;
                if settings.compress_after_days > 0 {
                    tracing::warn!(
                        database = %self.redacted_uri,
                        timescaledb = %version,
                        compress_after_days = settings.compress_after_days,
                        "timescaledb: the server's TimescaleDB is Apache-only (timescaledb.license = apache), which has no compression: chunks stay uncompressed; Kohaku drops expired chunks itself"
                    );
                    self.set_notice(
                        "Apache-only TimescaleDB: no compression (compress_after_days is ignored); Kohaku drops expired chunks itself".into(),
                    );
                } else {
                    tracing::info!(
                        database = %self.redacted_uri,
                        timescaledb = %version,
                        "timescaledb: rtc_stats is a hypertable (Apache-only TimescaleDB); Kohaku drops expired chunks itself"
                    );
                }
            }
            Flavor::PlainPostgres => {
                tracing::info!(
                    database = %self.redacted_uri,
                    retention_days = settings.retention_days,
                    "timescaledb: using plain PostgreSQL tables, retention enforced by Kohaku"
                );
            }
        }
        if let Ok(mut slot) = self.flavor.lock() {
            *slot = Some(flavor.clone());
        }
        self.start_retention_task(flavor);
        Ok(())
    }

    async fn write(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
        if batch.is_empty() {
            return Ok(WriteReport::default());
        }
        self.write_batch(batch).await
    }

    async fn stored_reports_after(
        &self,
        after: Option<&str>,
    ) -> Result<Option<(String, Vec<Report>)>, SinkError> {
        self.read_stored_reports_after(after).await
    }

    async fn health(&self) -> Result<(), SinkError> {
        // Touching rtc_stats proves the schema is there and the table is not locked away; a
        // SELECT alone would pass while INSERT is revoked or the server is a read-only standby.
        sqlx::query("SELECT 1 FROM rtc_stats LIMIT 0")
            .execute(&self.pool)
            .await
            .map_err(classify("timescaledb: health check failed"))?;
        let writable: bool = sqlx::query_scalar(WRITABLE_QUERY)
            .fetch_one(&self.pool)
            .await
            .map_err(classify("timescaledb: health check failed"))?;
        if writable {
            if let Some(Flavor::TimescaleDb { .. }) = self.flavor() {
                self.check_jobs().await?;
            }
            Ok(())
        } else {
            Err(SinkError::classified(
                true,
                "timescaledb: health check failed: this role may not write rtc_stats and \
                 sora_connection (INSERT, and UPDATE on sora_connection), or the server is read-only",
            ))
        }
    }

    async fn close(&self) -> Result<(), SinkError> {
        self.stop_retention_task();
        self.pool.close().await;
        Ok(())
    }

    fn counters(&self) -> Vec<SinkCounter> {
        let value = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        vec![
            SinkCounter {
                name: "retention_runs",
                help: "Retention sweeps Kohaku ran itself",
                value: value(&self.counters.retention_runs),
            },
            SinkCounter {
                name: "retention_deleted_rows",
                help: "rtc_stats rows Kohaku deleted as older than retention_days (plain PostgreSQL)",
                value: value(&self.counters.retention_deleted_rows),
            },
            SinkCounter {
                name: "retention_dropped_chunks",
                help: "rtc_stats chunks Kohaku dropped as older than retention_days (Apache-only TimescaleDB)",
                value: value(&self.counters.retention_dropped_chunks),
            },
            SinkCounter {
                name: "retention_deleted_connections",
                help: "sora_connection rows deleted because all their stats had expired",
                value: value(&self.counters.retention_deleted_connections),
            },
            SinkCounter {
                name: "extension_fallbacks",
                help: "1 when extension = \"auto\" could not use TimescaleDB and runs on plain PostgreSQL (/health says why)",
                value: value(&self.counters.extension_fallbacks),
            },
            SinkCounter {
                name: "policy_job_failures",
                help: "Failures of Kohaku's TimescaleDB policy jobs whose last run failed (timescaledb_information.job_stats; /health names them)",
                value: value(&self.counters.policy_job_failures),
            },
        ]
    }

    fn notices(&self) -> Vec<String> {
        self.notices
            .lock()
            .map(|notices| notices.clone())
            .unwrap_or_default()
    }
}

impl Drop for TimescaleSink {
    fn drop(&mut self) {
        self.stop_retention_task();
    }
}
