//! Kohaku's own retention: what the server's policies do not (plain PostgreSQL, Apache-only
//! TimescaleDB) and the connections left without stats, hourly.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kohaku_sink::SinkError;
use sqlx::postgres::PgPool;

use crate::error::classify;
use crate::schema::{self, Flavor, TimescaleSettings};
use crate::{Counters, TimescaleSink};

/// Rows deleted per statement by Kohaku's own retention, so a sweep never holds long locks.
const RETENTION_DELETE_BATCH: i64 = 10_000;

impl TimescaleSink {
    /// Deletes what is older than `retention_days`: rows on plain PostgreSQL (in bounded batches),
    /// chunks on Apache-only TimescaleDB (its policy does it on full TimescaleDB), and on every
    /// server the connections left without stats. Returns the rows deleted. Runs hourly; public
    /// for tests.
    pub async fn enforce_retention(&self) -> Result<u64, SinkError> {
        let flavor = self.flavor().unwrap_or(Flavor::PlainPostgres);
        enforce_retention(&self.pool, &flavor, &self.options.settings, &self.counters).await
    }

    pub(crate) fn stop_retention_task(&self) {
        if let Some(task) = self
            .retention_task
            .lock()
            .ok()
            .and_then(|mut task| task.take())
        {
            task.abort();
        }
    }

    pub(crate) fn start_retention_task(&self, flavor: Flavor) {
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
}

pub(crate) async fn enforce_retention(
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
    // The summaries are a plain table on every server: deleted by key, in batches.
    let mut deleted_summaries = 0u64;
    loop {
        let done = sqlx::query(
            "DELETE FROM rtc_report_summary WHERE (connection_id, rtc_time, rtc_timestamp) IN \
             (SELECT connection_id, rtc_time, rtc_timestamp FROM rtc_report_summary \
              WHERE rtc_time < now() - make_interval(days => $1) LIMIT $2)",
        )
        .bind(days)
        .bind(RETENTION_DELETE_BATCH)
        .execute(pool)
        .await
        .map_err(classify(
            "timescaledb: retention delete of rtc_report_summary failed",
        ))?;
        deleted_summaries += done.rows_affected();
        if done.rows_affected() < RETENTION_DELETE_BATCH as u64 {
            break;
        }
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
        deleted_summaries,
        dropped_chunks,
        deleted_connections = connections,
        retention_days = settings.retention_days,
        "timescaledb: retention sweep done"
    );
    Ok(deleted)
}
