//! Creating and upgrading the schema: the numbered migrations under Kohaku's advisory lock, the
//! choice between TimescaleDB, Apache-only TimescaleDB and plain PostgreSQL, the hypertable
//! conversion and the policies.

use std::sync::atomic::Ordering;

use kohaku_sink::SinkError;
use sqlx::{Postgres, Row};

use crate::error::{classify, classify_owned};
use crate::schema::{self, ExtensionMode, Flavor};
use crate::{TimescaleSink, MIGRATION_LOCK_KEY};

impl TimescaleSink {
    /// A transaction holding Kohaku's migration lock, so that instances starting together change
    /// the schema one after another.
    pub(crate) async fn begin_schema_change(
        &self,
    ) -> Result<sqlx::Transaction<'static, Postgres>, SinkError> {
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

    pub(crate) async fn detect(&self) -> Result<schema::ExtensionInfo, SinkError> {
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
    pub(crate) async fn settle_flavor(&self) -> Result<Flavor, SinkError> {
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
    pub(crate) fn fall_back(&self, reason: &str, remedy: &str) -> Result<Flavor, SinkError> {
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

    pub(crate) fn set_notice(&self, notice: String) {
        if let Ok(mut notices) = self.notices.lock() {
            notices.push(notice);
        }
    }

    pub(crate) async fn create_extension(&self) -> Result<(), SinkError> {
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
    pub(crate) async fn apply_hypertable(&self, flavor: &Flavor) -> Result<(), SinkError> {
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
    pub(crate) async fn align_policies(
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

    /// Kohaku's policy jobs whose last run failed: for `/health` and the metrics.
    pub(crate) async fn check_jobs(&self) -> Result<(), SinkError> {
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
}
