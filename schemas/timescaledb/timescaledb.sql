-- TimescaleDB-only statements. Kohaku runs them after the numbered migrations when the
-- timescaledb extension can be used (sinks.timescaledb.extension = "auto" or "required"); each
-- follows a `-- kohaku: NAME` line, and Kohaku picks what the server's version and license allow:
--
-- * every TimescaleDB: extension, hypertable, chunk_interval;
-- * under the Timescale License (not Apache-only), with compress_after_days > 0: the columnstore
--   (compression) settings, once; with 2.18 or newer the columnstore API, else the older names;
-- * policies are read from timescaledb_information.jobs first and only added, replaced or removed
--   when the config differs: job ids, schedules and an operator's alter_job tuning survive a
--   restart. On Apache-only TimescaleDB, Kohaku drops expired chunks itself (drop_chunks).
--
-- {chunk_interval}, {compress_after_days} and {retention_days} come from [sinks.timescaledb]
-- (validated before they are substituted). API: TimescaleDB 2.13 or newer (by_range).

-- kohaku: extension
CREATE EXTENSION IF NOT EXISTS timescaledb;

-- kohaku: hypertable
-- Every unique index of rtc_stats already contains rtc_time, as a hypertable requires. Converting
-- a table that already holds rows moves them all, in this transaction: it runs without a statement
-- timeout and leaves either the old table or the hypertable, never half of each.
SELECT create_hypertable('rtc_stats', by_range('rtc_time', INTERVAL '{chunk_interval}'),
                         if_not_exists => TRUE, migrate_data => TRUE);

-- kohaku: chunk_interval
SELECT set_chunk_time_interval('rtc_stats', INTERVAL '{chunk_interval}');

-- kohaku: columnstore_settings
-- Settings cannot change once chunks are compressed, so they are set only the first time.
DO $$
BEGIN
    IF NOT (SELECT compression_enabled FROM timescaledb_information.hypertables
            WHERE hypertable_schema = current_schema() AND hypertable_name = 'rtc_stats') THEN
        ALTER TABLE rtc_stats SET (timescaledb.enable_columnstore = true,
                                   timescaledb.segmentby = 'channel_id, connection_id',
                                   timescaledb.orderby = 'rtc_time DESC');
    END IF;
END
$$;

-- kohaku: compression_settings_before_2_18
DO $$
BEGIN
    IF NOT (SELECT compression_enabled FROM timescaledb_information.hypertables
            WHERE hypertable_schema = current_schema() AND hypertable_name = 'rtc_stats') THEN
        ALTER TABLE rtc_stats SET (timescaledb.compress,
                                   timescaledb.compress_segmentby = 'channel_id, connection_id',
                                   timescaledb.compress_orderby = 'rtc_time DESC');
    END IF;
END
$$;

-- kohaku: existing_policies
-- The policy jobs on rtc_stats, and whether each matches the configured age (0 days: none wanted).
SELECT job_id, proc_name,
       CASE proc_name
           WHEN 'policy_compression' THEN (config->>'compress_after')::interval = INTERVAL '{compress_after_days} days'
           ELSE (config->>'drop_after')::interval = INTERVAL '{retention_days} days'
       END AS matches
FROM timescaledb_information.jobs
WHERE hypertable_schema = current_schema() AND hypertable_name = 'rtc_stats'
  AND proc_name IN ('policy_compression', 'policy_retention');

-- kohaku: add_columnstore_policy
CALL add_columnstore_policy('rtc_stats', after => INTERVAL '{compress_after_days} days');

-- kohaku: remove_columnstore_policy
CALL remove_columnstore_policy('rtc_stats', if_exists => TRUE);

-- kohaku: add_compression_policy_before_2_18
SELECT add_compression_policy('rtc_stats', compress_after => INTERVAL '{compress_after_days} days');

-- kohaku: remove_compression_policy_before_2_18
SELECT remove_compression_policy('rtc_stats', if_exists => TRUE);

-- kohaku: add_retention_policy
SELECT add_retention_policy('rtc_stats', drop_after => INTERVAL '{retention_days} days');

-- kohaku: remove_retention_policy
SELECT remove_retention_policy('rtc_stats', if_exists => TRUE);

-- kohaku: drop_expired_chunks
-- Apache-only TimescaleDB has no policies; Kohaku's own retention task runs this.
SELECT count(*) FROM drop_chunks('rtc_stats', older_than => now() - INTERVAL '{retention_days} days');

-- kohaku: failed_jobs
-- Kohaku's policy jobs whose last run failed, for /health and the metrics.
SELECT j.job_id, j.proc_name, s.total_failures, s.last_run_started_at::text AS last_run
FROM timescaledb_information.jobs j
JOIN timescaledb_information.job_stats s USING (job_id)
WHERE j.hypertable_schema = current_schema() AND j.hypertable_name = 'rtc_stats'
  AND s.last_run_status = 'Failed';
