-- TimescaleDB-only statements, applied by Kohaku at every start-up when the timescaledb extension
-- is available on the server (after the numbered migrations). Without the extension Kohaku keeps
-- plain tables and deletes rows older than retention_days itself.
--
-- Each statement follows a `-- kohaku: NAME` line; Kohaku runs them in this order, skipping
-- compression_settings and add_compression_policy when compress_after_days = 0, and
-- add_retention_policy when retention_days = 0 (the remove_* ones always run, so turning a policy
-- off in the config takes it off the database).
-- {chunk_interval}, {compress_after_days} and {retention_days} come from [sinks.timescaledb]
-- (validated before they are substituted). API: TimescaleDB 2.13 or newer (by_range).

-- kohaku: extension
CREATE EXTENSION IF NOT EXISTS timescaledb;

-- kohaku: hypertable
-- Every unique index of rtc_stats already contains rtc_time, as a hypertable requires.
SELECT create_hypertable('rtc_stats', by_range('rtc_time', INTERVAL '{chunk_interval}'),
                         if_not_exists => TRUE, migrate_data => TRUE);

-- kohaku: chunk_interval
SELECT set_chunk_time_interval('rtc_stats', INTERVAL '{chunk_interval}');

-- kohaku: compression_settings
-- Changing settings is refused once chunks are compressed, so they are set only the first time.
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

-- kohaku: remove_compression_policy
SELECT remove_compression_policy('rtc_stats', if_exists => TRUE);

-- kohaku: add_compression_policy
SELECT add_compression_policy('rtc_stats', compress_after => INTERVAL '{compress_after_days} days');

-- kohaku: remove_retention_policy
SELECT remove_retention_policy('rtc_stats', if_exists => TRUE);

-- kohaku: add_retention_policy
SELECT add_retention_policy('rtc_stats', drop_after => INTERVAL '{retention_days} days');
