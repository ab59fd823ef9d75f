//! TimescaleDB / PostgreSQL storage backend for Kohaku.
//!
//! With the timescaledb extension usable, `rtc_stats` becomes a hypertable, with compression and
//! retention policies under the Timescale License; Apache-only TimescaleDB gives the hypertable
//! and Kohaku drops expired chunks itself; on plain PostgreSQL the same tables are used and
//! Kohaku deletes rows older than the retention itself. Writes stream the batch with `COPY` into a per-session staging table
//! and move it with one `INSERT … SELECT … ON CONFLICT DO NOTHING`, which keeps them idempotent.

pub mod schema;
/// Test support (the throwaway cluster of `scripts/test`), behind the `testkit` feature so that
/// nothing test-only is in a release build.
#[cfg(feature = "testkit")]
pub mod testkit;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kohaku_sink::{
    format_timestamp, redact_uri, Connection, RejectedRow, Report, SinkCounter, SinkError,
    StatsBatch, StatsObject, StatsSink, WriteReport,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Postgres, QueryBuilder, Row};
use tokio::task::JoinHandle;

pub use schema::{ExtensionMode, Flavor, TimescaleSettings};

/// Rows deleted per statement by Kohaku's own retention, so a sweep never holds long locks.
const RETENTION_DELETE_BATCH: i64 = 10_000;
/// Arbitrary constant naming Kohaku's migration lock among the database's advisory locks.
const MIGRATION_LOCK_KEY: i64 = 0x6b6f_6861_6b75;
/// Bytes of COPY data sent per message.
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// Connections upserted per statement: 15 parameters each, below PostgreSQL's 65535 limit.
const CONNECTIONS_PER_UPSERT: usize = 4_000;

/// True when Kohaku's role can write what `write` writes, on a server that accepts writes.
const WRITABLE_QUERY: &str = "SELECT has_table_privilege('rtc_stats', 'INSERT') \
     AND has_table_privilege('sora_connection', 'INSERT, UPDATE') \
     AND current_setting('transaction_read_only') = 'off'";

const CREATE_STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS kohaku_rtc_stats_stage (\
     channel_id text, session_id text, client_id text, connection_id text, bundle_id text, \
     rtc_type text, rtc_id text, rtc_timestamp double precision, rtc_data text, \
     sora_timestamp timestamptz, received_at timestamptz) ON COMMIT DELETE ROWS";

const COPY_STAGE: &str =
    "COPY kohaku_rtc_stats_stage (channel_id, session_id, client_id, connection_id, \
     bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) FROM STDIN";

const INSERT_FROM_STAGE: &str = "INSERT INTO rtc_stats (rtc_time, channel_id, session_id, client_id, \
     connection_id, bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) \
     SELECT to_timestamp(rtc_timestamp / 1000.0), channel_id, session_id, client_id, connection_id, \
     bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data::jsonb, sora_timestamp, received_at \
     FROM kohaku_rtc_stats_stage ON CONFLICT DO NOTHING";

const INSERT_ONE: &str = "INSERT INTO rtc_stats (rtc_time, channel_id, session_id, client_id, \
     connection_id, bundle_id, rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) \
     VALUES (to_timestamp($8 / 1000.0), $1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::timestamptz, \
     $11::timestamptz) ON CONFLICT DO NOTHING";

const CONNECTION_COLUMNS: &str = "INSERT INTO sora_connection (channel_id, session_id, client_id, \
     connection_id, bundle_id, label, version, node_name, role, multistream, simulcast, spotlight, \
     first_seen, last_seen, group_id) ";

/// Metadata follows the newest report; first/last seen only widen.
const CONNECTION_CONFLICT: &str = " ON CONFLICT (connection_id) DO UPDATE SET \
     first_seen = LEAST(sora_connection.first_seen, EXCLUDED.first_seen), \
     last_seen = GREATEST(sora_connection.last_seen, EXCLUDED.last_seen), \
     channel_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.channel_id ELSE sora_connection.channel_id END, \
     session_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.session_id ELSE sora_connection.session_id END, \
     client_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.client_id ELSE sora_connection.client_id END, \
     bundle_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.bundle_id ELSE sora_connection.bundle_id END, \
     group_id = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.group_id ELSE sora_connection.group_id END, \
     label = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.label ELSE sora_connection.label END, \
     version = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.version ELSE sora_connection.version END, \
     node_name = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.node_name ELSE sora_connection.node_name END, \
     role = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.role ELSE sora_connection.role END, \
     multistream = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.multistream ELSE sora_connection.multistream END, \
     simulcast = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.simulcast ELSE sora_connection.simulcast END, \
     spotlight = CASE WHEN EXCLUDED.last_seen >= sora_connection.last_seen THEN EXCLUDED.spotlight ELSE sora_connection.spotlight END";

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
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            ca_cert_file: None,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            settings: TimescaleSettings {
                chunk_interval: "1 day".into(),
                compress_after_days: 7,
                retention_days: 60,
            },
            retention_interval: Duration::from_secs(3600),
            statement_timeout: Duration::from_secs(60),
            extension: ExtensionMode::Auto,
        }
    }
}

impl TimescaleOptions {
    /// Checks what can be checked without contacting the database (for `check-config`).
    pub fn validate(&self) -> Result<(), SinkError> {
        self.connect_options().map(|_| ())
    }

    /// The driver's options, after every check that needs no database.
    fn connect_options(&self) -> Result<PgConnectOptions, SinkError> {
        let invalid = |message: String| SinkError::Permanent {
            message,
            source: None,
        };
        if !(self.uri.starts_with("postgres://") || self.uri.starts_with("postgresql://")) {
            return Err(invalid(format!(
                "uri {} must start with postgres:// or postgresql://",
                redact_uri(&self.uri)
            )));
        }
        let mut connect = PgConnectOptions::from_str(&self.uri).map_err(|err| {
            invalid(format!(
                "invalid uri {}: {}",
                redact_uri(&self.uri),
                redact_uri(&err.to_string())
            ))
        })?;
        if !schema::valid_interval(&self.settings.chunk_interval) {
            return Err(invalid(format!(
                "chunk_interval {:?} is not of the form \"N minutes|hours|days|weeks\"",
                self.settings.chunk_interval
            )));
        }
        if let Some(ca) = &self.ca_cert_file {
            std::fs::metadata(ca)
                .map_err(|err| invalid(format!("ca_cert_file {}: {err}", ca.display())))?;
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

    /// A transaction holding Kohaku's migration lock, so that instances starting together change
    /// the schema one after another.
    async fn begin_schema_change(&self) -> Result<sqlx::Transaction<'static, Postgres>, SinkError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(classify("timescaledb: cannot begin a schema change"))?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .execute(&mut *tx)
            .await
            .map_err(classify("timescaledb: cannot take the migration lock"))?;
        Ok(tx)
    }

    /// Applies the numbered migrations up to `target` (all of them in `migrate`). For upgrade
    /// tests and for operators who stage upgrades.
    pub async fn migrate_to(&self, target: i32) -> Result<i32, SinkError> {
        let mut tx = self.begin_schema_change().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS kohaku_schema_migrations (version integer PRIMARY KEY, \
             name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&mut *tx)
        .await
        .map_err(classify(
            "timescaledb: cannot create kohaku_schema_migrations",
        ))?;
        let applied: i32 =
            sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM kohaku_schema_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(classify("timescaledb: cannot read the schema version"))?;
        let newest = schema::MIGRATIONS
            .last()
            .map_or(0, |(version, _, _)| *version);
        if applied > newest {
            return Err(SinkError::Permanent {
                message: format!(
                    "timescaledb: the database schema is at version {applied}, newer than this Kohaku knows \
                     ({newest}); upgrade Kohaku or use another database"
                ),
                source: None,
            });
        }
        let mut version = applied;
        for (next, name, sql) in schema::MIGRATIONS
            .iter()
            .filter(|(next, _, _)| *next > applied && *next <= target)
        {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&mut *tx)
                .await
                .map_err(classify_owned(format!(
                    "timescaledb: migration {next} ({name}) failed"
                )))?;
            sqlx::query("INSERT INTO kohaku_schema_migrations (version, name) VALUES ($1, $2)")
                .bind(next)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(classify("timescaledb: cannot record the migration"))?;
            tracing::info!(
                version = next,
                name,
                "timescaledb: applied schema migration"
            );
            version = *next;
        }
        tx.commit()
            .await
            .map_err(classify("timescaledb: cannot commit the migration"))?;
        Ok(version)
    }

    async fn detect(&self) -> Result<schema::ExtensionInfo, SinkError> {
        let row = sqlx::query(
            "SELECT (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'), \
                    (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(classify("timescaledb: cannot read the available extensions"))?;
        Ok(schema::ExtensionInfo {
            available: row.try_get(0).map_err(classify(
                "timescaledb: cannot read the available extensions",
            ))?,
            installed: row.try_get(1).map_err(classify(
                "timescaledb: cannot read the installed extensions",
            ))?,
        })
    }

    /// Decides how rtc_stats is kept, creating the extension where the mode and the server allow.
    async fn settle_flavor(&self) -> Result<Flavor, SinkError> {
        if self.options.extension == ExtensionMode::Off {
            return Ok(Flavor::PlainPostgres);
        }
        let mut extension = self.detect().await?;
        if extension.installed.is_none() {
            if extension.available.is_none() {
                // Plain PostgreSQL by the server's make-up, not a fallback: nothing to warn about
                // unless TimescaleDB was required.
                if self.options.extension == ExtensionMode::Required {
                    return self.fall_back(
                        "the server has no timescaledb extension (pg_available_extensions does not list it)",
                        "install TimescaleDB on the database server",
                    );
                }
                return Ok(Flavor::PlainPostgres);
            }
            if let Err(err) = self.create_extension().await {
                let reason = err.detailed();
                let remedy = if reason.contains("preload") {
                    "add timescaledb to shared_preload_libraries in postgresql.conf and restart PostgreSQL"
                } else if reason.contains("permission denied") {
                    "have a superuser run CREATE EXTENSION timescaledb in this database, or grant Kohaku's role the right to (it must own the database, TimescaleDB being a trusted extension)"
                } else {
                    "see the error above"
                };
                return self.fall_back(&reason, remedy);
            }
            extension = self.detect().await?;
        }
        let version = extension.installed.unwrap_or_default();
        let license: String = sqlx::query_scalar("SELECT current_setting('timescaledb.license')")
            .fetch_one(&self.pool)
            .await
            .map_err(classify(
                "timescaledb: the extension is installed in this database but not loaded (add timescaledb to shared_preload_libraries and restart PostgreSQL)",
            ))?;
        Ok(if license == "apache" {
            Flavor::ApacheOnly { version }
        } else {
            Flavor::TimescaleDb { version }
        })
    }

    /// Plain PostgreSQL instead of TimescaleDB: refused with `extension = "required"`, else said
    /// once, with what to do, and counted.
    fn fall_back(&self, reason: &str, remedy: &str) -> Result<Flavor, SinkError> {
        if self.options.extension == ExtensionMode::Required {
            return Err(SinkError::Permanent {
                message: format!(
                    "timescaledb: extension = \"required\", but {reason}; to use it, {remedy} (or set extension = \"auto\" to run on plain PostgreSQL)"
                ),
                source: None,
            });
        }
        tracing::warn!(
            database = %self.redacted_uri,
            reason,
            remedy,
            "timescaledb: cannot use the timescaledb extension; using plain PostgreSQL tables (no hypertable, compression or policies)"
        );
        self.counters
            .extension_fallbacks
            .store(1, Ordering::Relaxed);
        self.set_notice(format!(
            "running on plain PostgreSQL: {reason}; to use TimescaleDB, {remedy}"
        ));
        Ok(Flavor::PlainPostgres)
    }

    fn set_notice(&self, notice: String) {
        if let Ok(mut notices) = self.notices.lock() {
            notices.push(notice);
        }
    }

    async fn create_extension(&self) -> Result<(), SinkError> {
        let mut tx = self.begin_schema_change().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema::statement(
            "extension",
            &self.options.settings,
        )))
        .execute(&mut *tx)
        .await
        .map_err(classify("timescaledb: CREATE EXTENSION timescaledb failed"))?;
        tx.commit()
            .await
            .map_err(classify("timescaledb: cannot commit"))
    }

    /// Makes rtc_stats a hypertable (converting rows already there) and, where licensed, sets
    /// compression and brings the policies in line with the config, touching only what changed.
    async fn apply_hypertable(&self, flavor: &Flavor) -> Result<(), SinkError> {
        let settings = &self.options.settings;
        let version = flavor.version().unwrap_or_default();
        let columnstore = schema::has_columnstore_api(version);
        let run = |name: &str| sqlx::AssertSqlSafe(schema::statement(name, settings));
        let mut tx = self.begin_schema_change().await?;
        // Converting a large table takes as long as it takes; the transaction keeps it whole.
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(classify("timescaledb: cannot lift the statement timeout"))?;
        let (is_hypertable, rows): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT FROM timescaledb_information.hypertables \
                 WHERE hypertable_schema = current_schema() AND hypertable_name = 'rtc_stats'), \
             (SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'rtc_stats'::regclass)",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(classify("timescaledb: cannot read rtc_stats"))?;
        let started = std::time::Instant::now();
        if !is_hypertable && rows > 0 {
            tracing::info!(
                rows_estimated = rows,
                "timescaledb: converting rtc_stats to a hypertable; its rows move into chunks in one transaction (README: minutes per million rows), and writes wait until it is done"
            );
        }
        for name in ["hypertable", "chunk_interval"] {
            sqlx::raw_sql(run(name))
                .execute(&mut *tx)
                .await
                .map_err(classify_owned(format!(
                    "timescaledb: statement `{name}` of timescaledb.sql failed"
                )))?;
        }
        if !is_hypertable && rows > 0 {
            tracing::info!(
                rows_estimated = rows,
                seconds = started.elapsed().as_secs_f64(),
                "timescaledb: rtc_stats converted to a hypertable"
            );
        }
        if let Flavor::TimescaleDb { .. } = flavor {
            if settings.compress_after_days > 0 {
                let name = if columnstore {
                    "columnstore_settings"
                } else {
                    "compression_settings_before_2_18"
                };
                sqlx::raw_sql(run(name))
                    .execute(&mut *tx)
                    .await
                    .map_err(classify("timescaledb: cannot set the columnstore settings"))?;
            }
            self.align_policies(&mut tx, columnstore).await?;
        }
        tx.commit()
            .await
            .map_err(classify("timescaledb: cannot commit"))
    }

    /// Adds, replaces or removes the compression and retention policies only where the config
    /// and the database differ.
    async fn align_policies(
        &self,
        tx: &mut sqlx::Transaction<'static, Postgres>,
        columnstore: bool,
    ) -> Result<(), SinkError> {
        let settings = &self.options.settings;
        let existing: Vec<(i32, String, Option<bool>)> = sqlx::query_as(sqlx::AssertSqlSafe(
            schema::statement("existing_policies", settings),
        ))
        .fetch_all(&mut **tx)
        .await
        .map_err(classify("timescaledb: cannot read the policy jobs"))?;
        let find = |proc_name: &str| {
            existing
                .iter()
                .find(|(_, name, _)| name == proc_name)
                .map(|(_, _, matches)| matches.unwrap_or(false))
        };
        let (add_compression, remove_compression) = if columnstore {
            ("add_columnstore_policy", "remove_columnstore_policy")
        } else {
            (
                "add_compression_policy_before_2_18",
                "remove_compression_policy_before_2_18",
            )
        };
        for (policy, wanted, existing, add, remove) in [
            (
                "compression",
                settings.compress_after_days > 0,
                find("policy_compression"),
                add_compression,
                remove_compression,
            ),
            (
                "retention",
                settings.retention_days > 0,
                find("policy_retention"),
                "add_retention_policy",
                "remove_retention_policy",
            ),
        ] {
            let change = schema::policy_change(wanted, existing);
            let statements: &[&str] = match change {
                schema::PolicyChange::Keep => &[],
                schema::PolicyChange::Add => &[add],
                schema::PolicyChange::Replace => &[remove, add],
                schema::PolicyChange::Remove => &[remove],
            };
            for name in statements {
                sqlx::raw_sql(sqlx::AssertSqlSafe(schema::statement(name, settings)))
                    .execute(&mut **tx)
                    .await
                    .map_err(classify_owned(format!(
                        "timescaledb: statement `{name}` of timescaledb.sql failed"
                    )))?;
            }
            if change != schema::PolicyChange::Keep {
                tracing::info!(policy, change = ?change, "timescaledb: policy updated to the config");
            }
        }
        Ok(())
    }

    /// Deletes what is older than `retention_days`: rows on plain PostgreSQL (in bounded batches),
    /// chunks on Apache-only TimescaleDB (its policy does it on full TimescaleDB), and on every
    /// server the connections left without stats. Returns the rows deleted. Runs hourly; public
    /// for tests.
    pub async fn enforce_retention(&self) -> Result<u64, SinkError> {
        let flavor = self.flavor().unwrap_or(Flavor::PlainPostgres);
        enforce_retention(&self.pool, &flavor, &self.options.settings, &self.counters).await
    }

    fn stop_retention_task(&self) {
        if let Some(task) = self
            .retention_task
            .lock()
            .ok()
            .and_then(|mut task| task.take())
        {
            task.abort();
        }
    }

    fn start_retention_task(&self, flavor: Flavor) {
        let Ok(mut task) = self.retention_task.lock() else {
            return;
        };
        if task.is_some() || self.options.settings.retention_days == 0 {
            return;
        }
        let pool = self.pool.clone();
        let settings = self.options.settings.clone();
        let every = self.options.retention_interval;
        let counters = Arc::clone(&self.counters);
        *task = Some(tokio::spawn(async move {
            // The first sweep an interval after start-up, not during it (when a conversion or a
            // spool replay may be keeping the database busy).
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(err) = enforce_retention(&pool, &flavor, &settings, &counters).await {
                    tracing::warn!(error = %err.detailed(), "timescaledb: retention sweep failed; retrying at the next one");
                }
            }
        }));
    }

    /// Kohaku's policy jobs whose last run failed: for `/health` and the metrics.
    async fn check_jobs(&self) -> Result<(), SinkError> {
        let failed: Vec<(i32, String, Option<i64>, Option<String>)> = sqlx::query_as(
            sqlx::AssertSqlSafe(schema::statement("failed_jobs", &self.options.settings)),
        )
        .fetch_all(&self.pool)
        .await
        .map_err(classify("timescaledb: cannot read the policy jobs' status"))?;
        let failures: i64 = failed.iter().filter_map(|(_, _, total, _)| *total).sum();
        self.counters
            .policy_job_failures
            .store(u64::try_from(failures).unwrap_or(0), Ordering::Relaxed);
        if let Ok(mut notices) = self.notices.lock() {
            notices.retain(|notice| !notice.starts_with("policy job"));
            for (job_id, proc_name, total, last_run) in failed {
                notices.push(format!(
                    "policy job {job_id} ({proc_name}) failed at its last run ({}; {} failures so far); see timescaledb_information.job_errors",
                    last_run.unwrap_or_default(),
                    total.unwrap_or(0)
                ));
            }
        }
        Ok(())
    }

    async fn write_batch(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
        let mut report = WriteReport::default();
        let mut rows: Vec<(&Report, &StatsObject)> = Vec::with_capacity(batch.row_count());
        let mut connections: Vec<&Report> = Vec::with_capacity(batch.reports().len());
        for stats_report in batch.reports() {
            if let Some(reason) = connection_problem(&stats_report.connection) {
                report.rejected.extend(
                    stats_report
                        .stats
                        .iter()
                        .map(|object| rejected(stats_report, object, &reason)),
                );
                continue;
            }
            connections.push(stats_report);
            for object in &stats_report.stats {
                match object_problem(object) {
                    Some(reason) => report
                        .rejected
                        .push(rejected(stats_report, object, &reason)),
                    None => rows.push((stats_report, object)),
                }
            }
        }

        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(classify("timescaledb: cannot begin a transaction"))?;
        sqlx::query(CREATE_STAGE)
            .execute(&mut *tx)
            .await
            .map_err(classify("timescaledb: cannot create the staging table"))?;
        let mut copy = tx
            .copy_in_raw(COPY_STAGE)
            .await
            .map_err(classify("timescaledb: cannot start COPY"))?;
        let mut buffer = Vec::with_capacity(COPY_CHUNK_BYTES + 4096);
        for (stats_report, object) in &rows {
            encode_copy_row(&mut buffer, stats_report, object);
            if buffer.len() >= COPY_CHUNK_BYTES {
                copy.send(std::mem::take(&mut buffer))
                    .await
                    .map_err(classify("timescaledb: COPY failed"))?;
            }
        }
        if !buffer.is_empty() {
            copy.send(buffer)
                .await
                .map_err(classify("timescaledb: COPY failed"))?;
        }
        copy.finish()
            .await
            .map_err(classify("timescaledb: COPY failed"))?;

        let moved = sqlx::query(INSERT_FROM_STAGE).execute(&mut *tx).await;
        let written = match moved {
            Ok(done) => done.rows_affected(),
            Err(err) if is_data_error(&err) => {
                // One value PostgreSQL refuses (e.g. a JSON escape jsonb cannot hold) fails the
                // whole statement: find it row by row so the rest is still stored.
                drop(tx);
                tracing::warn!(error = %err, rows = rows.len(), "timescaledb: batch refused by the database; writing it row by row");
                return self.write_row_by_row(&rows, &connections, report).await;
            }
            Err(err) => return Err(classify("timescaledb: cannot insert rtc_stats")(err)),
        };
        upsert_connections(&mut tx, &connections).await?;
        tx.commit()
            .await
            .map_err(classify("timescaledb: cannot commit"))?;
        report.written = written;
        report.duplicates = rows.len() as u64 - written;
        Ok(report)
    }

    async fn write_row_by_row(
        &self,
        rows: &[(&Report, &StatsObject)],
        connections: &[&Report],
        mut report: WriteReport,
    ) -> Result<WriteReport, SinkError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(classify("timescaledb: cannot begin a transaction"))?;
        for (stats_report, object) in rows {
            sqlx::query("SAVEPOINT kohaku_row")
                .execute(&mut *tx)
                .await
                .map_err(classify("timescaledb: cannot set a savepoint"))?;
            let connection = &stats_report.connection;
            let inserted = sqlx::query(INSERT_ONE)
                .bind(&connection.channel_id)
                .bind(&connection.session_id)
                .bind(&connection.client_id)
                .bind(&connection.connection_id)
                .bind(&connection.bundle_id)
                .bind(&object.rtc_type)
                .bind(&object.rtc_id)
                .bind(object.rtc_timestamp)
                .bind(object.rtc_data.get())
                .bind(format_timestamp(stats_report.sora_timestamp))
                .bind(format_timestamp(stats_report.received_at))
                .execute(&mut *tx)
                .await;
            match inserted {
                Ok(done) => {
                    report.written += done.rows_affected();
                    report.duplicates += 1 - done.rows_affected();
                    sqlx::query("RELEASE SAVEPOINT kohaku_row")
                        .execute(&mut *tx)
                        .await
                        .map_err(classify("timescaledb: cannot release a savepoint"))?;
                }
                Err(err) if is_data_error(&err) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT kohaku_row")
                        .execute(&mut *tx)
                        .await
                        .map_err(classify("timescaledb: cannot roll back to a savepoint"))?;
                    report
                        .rejected
                        .push(rejected(stats_report, object, &err.to_string()));
                }
                Err(err) => return Err(classify("timescaledb: cannot insert rtc_stats")(err)),
            }
        }
        upsert_connections(&mut tx, connections).await?;
        tx.commit()
            .await
            .map_err(classify("timescaledb: cannot commit"))?;
        Ok(report)
    }
}

async fn enforce_retention(
    pool: &PgPool,
    flavor: &Flavor,
    settings: &TimescaleSettings,
    counters: &Counters,
) -> Result<u64, SinkError> {
    if settings.retention_days == 0 {
        return Ok(0);
    }
    let days = i32::try_from(settings.retention_days).unwrap_or(i32::MAX);
    let mut deleted = 0u64;
    let mut dropped_chunks = 0i64;
    match flavor {
        Flavor::PlainPostgres => loop {
            // By the unique key, not by ctid: ctid is unique only within one table, and on a
            // hypertable one ctid names a row in every chunk.
            let done = sqlx::query(
                "DELETE FROM rtc_stats WHERE (connection_id, rtc_time, rtc_timestamp, rtc_id) IN \
                 (SELECT connection_id, rtc_time, rtc_timestamp, rtc_id FROM rtc_stats \
                  WHERE rtc_time < now() - make_interval(days => $1) LIMIT $2)",
            )
            .bind(days)
            .bind(RETENTION_DELETE_BATCH)
            .execute(pool)
            .await
            .map_err(classify("timescaledb: retention delete failed"))?;
            deleted += done.rows_affected();
            if done.rows_affected() < RETENTION_DELETE_BATCH as u64 {
                break;
            }
        },
        Flavor::ApacheOnly { .. } => {
            dropped_chunks = sqlx::query_scalar(sqlx::AssertSqlSafe(schema::statement(
                "drop_expired_chunks",
                settings,
            )))
            .fetch_one(pool)
            .await
            .map_err(classify("timescaledb: dropping expired chunks failed"))?;
        }
        // Its retention policy drops the chunks.
        Flavor::TimescaleDb { .. } => {}
    }
    // A connection whose stats are all gone goes too.
    let connections = sqlx::query(
        "DELETE FROM sora_connection c WHERE last_seen < now() - make_interval(days => $1) \
         AND NOT EXISTS (SELECT FROM rtc_stats s WHERE s.connection_id = c.connection_id)",
    )
    .bind(days)
    .execute(pool)
    .await
    .map_err(classify(
        "timescaledb: retention delete of sora_connection failed",
    ))?
    .rows_affected();
    counters.retention_runs.fetch_add(1, Ordering::Relaxed);
    counters
        .retention_deleted_rows
        .fetch_add(deleted, Ordering::Relaxed);
    counters.retention_dropped_chunks.fetch_add(
        u64::try_from(dropped_chunks).unwrap_or(0),
        Ordering::Relaxed,
    );
    counters
        .retention_deleted_connections
        .fetch_add(connections, Ordering::Relaxed);
    tracing::info!(
        deleted_rows = deleted,
        dropped_chunks,
        deleted_connections = connections,
        retention_days = settings.retention_days,
        "timescaledb: retention sweep done"
    );
    Ok(deleted)
}

async fn upsert_connections(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    reports: &[&Report],
) -> Result<(), SinkError> {
    // One row per connection: PostgreSQL refuses to update the same row twice in one statement.
    let mut merged: HashMap<&str, (&Connection, String, String, String)> = HashMap::new();
    for report in reports {
        let seen = format_timestamp(report.sora_timestamp);
        merged
            .entry(report.connection.connection_id.as_str())
            .and_modify(|(connection, first, last, _)| {
                if seen > *last {
                    *connection = &report.connection;
                    last.clone_from(&seen);
                }
                if seen < *first {
                    first.clone_from(&seen);
                }
            })
            .or_insert_with(|| (&report.connection, seen.clone(), seen.clone(), seen));
    }
    let merged: Vec<_> = merged.into_values().collect();
    for chunk in merged.chunks(CONNECTIONS_PER_UPSERT) {
        let mut query = QueryBuilder::<Postgres>::new(CONNECTION_COLUMNS);
        query.push_values(chunk, |mut row, (connection, first_seen, last_seen, _)| {
            row.push_bind(&connection.channel_id)
                .push_bind(&connection.session_id)
                .push_bind(&connection.client_id)
                .push_bind(&connection.connection_id)
                .push_bind(&connection.bundle_id)
                .push_bind(&connection.label)
                .push_bind(&connection.version)
                .push_bind(&connection.node_name)
                .push_bind(&connection.role)
                .push_bind(connection.multistream)
                .push_bind(connection.simulcast)
                .push_bind(connection.spotlight)
                .push_bind(first_seen.as_str())
                .push_unseparated("::timestamptz")
                .push_bind(last_seen.as_str())
                .push_unseparated("::timestamptz")
                .push_bind(&connection.group_id);
        });
        query.push(CONNECTION_CONFLICT);
        query
            .build()
            .execute(&mut **tx)
            .await
            .map_err(classify("timescaledb: cannot upsert sora_connection"))?;
    }
    Ok(())
}

/// One line of COPY's text format. Public for `benches/encode.rs`.
#[doc(hidden)]
pub fn encode_copy_row(buffer: &mut Vec<u8>, report: &Report, object: &StatsObject) {
    let connection = &report.connection;
    for field in [
        Some(connection.channel_id.as_str()),
        Some(connection.session_id.as_str()),
        Some(connection.client_id.as_str()),
        Some(connection.connection_id.as_str()),
        connection.bundle_id.as_deref(),
        Some(object.rtc_type.as_str()),
        Some(object.rtc_id.as_str()),
    ] {
        push_copy_field(buffer, field);
        buffer.push(b'\t');
    }
    // `{:?}` prints the shortest text that parses back to the same f64.
    buffer.extend_from_slice(format!("{:?}", object.rtc_timestamp).as_bytes());
    buffer.push(b'\t');
    push_copy_field(buffer, Some(object.rtc_data.get()));
    buffer.push(b'\t');
    buffer.extend_from_slice(format_timestamp(report.sora_timestamp).as_bytes());
    buffer.push(b'\t');
    buffer.extend_from_slice(format_timestamp(report.received_at).as_bytes());
    buffer.push(b'\n');
}

fn push_copy_field(buffer: &mut Vec<u8>, value: Option<&str>) {
    let Some(value) = value else {
        buffer.extend_from_slice(b"\\N");
        return;
    };
    for byte in value.bytes() {
        match byte {
            b'\\' => buffer.extend_from_slice(b"\\\\"),
            b'\n' => buffer.extend_from_slice(b"\\n"),
            b'\r' => buffer.extend_from_slice(b"\\r"),
            b'\t' => buffer.extend_from_slice(b"\\t"),
            other => buffer.push(other),
        }
    }
}

/// PostgreSQL text cannot hold NUL.
fn connection_problem(connection: &Connection) -> Option<String> {
    let fields = [
        ("channel_id", connection.channel_id.as_str()),
        ("session_id", &connection.session_id),
        ("client_id", &connection.client_id),
        ("connection_id", &connection.connection_id),
        (
            "bundle_id",
            connection.bundle_id.as_deref().unwrap_or_default(),
        ),
        (
            "group_id",
            connection.group_id.as_deref().unwrap_or_default(),
        ),
        ("label", &connection.label),
        ("version", &connection.version),
        ("node_name", &connection.node_name),
        ("role", &connection.role),
    ];
    fields
        .iter()
        .find(|(_, value)| value.contains('\0'))
        .map(|(name, _)| {
            format!("{name} contains a NUL character, which PostgreSQL text cannot store")
        })
}

/// Values PostgreSQL is known to refuse, caught before they can fail a whole batch.
fn object_problem(object: &StatsObject) -> Option<String> {
    if object.rtc_id.contains('\0') || object.rtc_type.contains('\0') {
        return Some(
            "id or type contains a NUL character, which PostgreSQL text cannot store".into(),
        );
    }
    if has_nul_escape(object.rtc_data.get()) {
        return Some("the object contains \\u0000, which PostgreSQL jsonb cannot store".into());
    }
    None
}

/// Whether the JSON text holds the escape `\u0000` (not merely an escaped backslash before it).
fn has_nul_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' {
            if bytes.get(index + 1) == Some(&b'u')
                && bytes.get(index + 2..index + 6) == Some(b"0000".as_slice())
            {
                return true;
            }
            index += 2;
        } else {
            index += 1;
        }
    }
    false
}

fn rejected(report: &Report, object: &StatsObject, reason: &str) -> RejectedRow {
    RejectedRow {
        connection_id: report.connection.connection_id.clone(),
        rtc_id: object.rtc_id.clone(),
        rtc_timestamp: object.rtc_timestamp,
        reason: reason.to_owned(),
    }
}

fn sqlstate(err: &sqlx::Error) -> Option<Cow<'_, str>> {
    match err {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    }
}

/// Class 22: the data itself is wrong (bad JSON escape, value out of range…).
fn is_data_error(err: &sqlx::Error) -> bool {
    sqlstate(err).is_some_and(|code| code.starts_with("22"))
}

/// Whether a SQLSTATE means "try again later". Everything else from the database is permanent.
/// Whether a retry can help, by SQLSTATE. Only errors tied to a row's content are permanent:
/// class 22 (data exception: a value out of range, bad text), 23 (integrity constraint) and 54
/// (program limit exceeded: an index row too long). Everything else comes from the database's state
/// (outages, locks, a revoked privilege, a dropped table, a read-only standby, a changed password),
/// which an operator can fix while Kohaku retries with backoff, holds the data and reports the
/// error in `/health`; refusing the rows instead would lose acknowledged data for a mistake fixed
/// in minutes.
pub fn is_transient_sqlstate(code: &str) -> bool {
    !(code.starts_with("22") || code.starts_with("23") || code.starts_with("54"))
}

pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        _ => false,
    }
}

fn classify_error(context: &str, err: sqlx::Error) -> SinkError {
    let message = format!("{context}: {}", redact_uri(&err.to_string()));
    SinkError::classified(is_transient(&err), message)
}

fn classify(context: &'static str) -> impl Fn(sqlx::Error) -> SinkError {
    move |err| classify_error(context, err)
}

fn classify_owned(context: String) -> impl Fn(sqlx::Error) -> SinkError {
    move |err| classify_error(&context, err)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for transient in [
            "08000", "08006", "08001", "57P01", "57P03", "40001", "40P01", "53300", "53100",
            "55P03", "57014",
        ] {
            assert!(is_transient_sqlstate(transient), "{transient}");
        }
        // The database's state: an operator's fix makes the same write succeed.
        for state in [
            "42501", "42P01", "42703", "28P01", "3D000", "25006", "0A000", "XX000",
        ] {
            assert!(is_transient_sqlstate(state), "{state}");
        }
        for permanent in [
            "22P02", "22003", "22P05", "22008", "23505", "23502", "54000",
        ] {
            assert!(!is_transient_sqlstate(permanent), "{permanent}");
        }
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }

    #[test]
    fn nul_escapes_are_found_but_escaped_backslashes_are_not() {
        assert!(has_nul_escape(r#"{"a":"x\u0000y"}"#));
        assert!(!has_nul_escape(r#"{"a":"x\\u0000y"}"#));
        assert!(has_nul_escape(r#"{"a":"x\\\u0000y"}"#));
        assert!(!has_nul_escape(r#"{"a":"\u0001"}"#));
    }

    #[test]
    fn copy_fields_are_escaped() {
        let mut buffer = Vec::new();
        push_copy_field(&mut buffer, Some("a\tb\nc\\d\re"));
        assert_eq!(buffer, b"a\\tb\\nc\\\\d\\re");
        buffer.clear();
        push_copy_field(&mut buffer, None);
        assert_eq!(buffer, b"\\N");
    }
}
