-- Kohaku PostgreSQL / TimescaleDB schema, version 1: the tables. Plain PostgreSQL; what only
-- TimescaleDB can do lives in timescaledb.sql and is applied when the extension is available.
--
-- Same table and column names as the SQLite backend, with PostgreSQL types. rtc_time is the stats
-- object's own time as timestamptz (the hypertable's time column); rtc_timestamp keeps the
-- original epoch-milliseconds double it came from.

CREATE TABLE rtc_stats (
    rtc_time       timestamptz      NOT NULL,
    channel_id     text             NOT NULL,
    session_id     text             NOT NULL,
    client_id      text             NOT NULL,
    connection_id  text             NOT NULL,
    bundle_id      text,
    rtc_type       text             NOT NULL,
    rtc_id         text             NOT NULL,
    rtc_timestamp  double precision NOT NULL,
    rtc_data       jsonb            NOT NULL,
    sora_timestamp timestamptz      NOT NULL,
    received_at    timestamptz      NOT NULL
);

-- The idempotency key (connection_id, rtc_id, rtc_timestamp). rtc_time is derived from
-- rtc_timestamp, so adding it changes nothing about uniqueness, but TimescaleDB requires every
-- unique index of a hypertable to contain the time column. Ordered to also serve "stats of one
-- connection over a time range".
CREATE UNIQUE INDEX rtc_stats_connection_time
    ON rtc_stats (connection_id, rtc_time, rtc_timestamp, rtc_id);

-- "Stats of a channel over a time range", and the retention sweep.
CREATE INDEX rtc_stats_channel_time ON rtc_stats (channel_id, rtc_time);
CREATE INDEX rtc_stats_time ON rtc_stats (rtc_time);

CREATE TABLE sora_connection (
    channel_id    text        NOT NULL,
    session_id    text        NOT NULL,
    client_id     text        NOT NULL,
    connection_id text        NOT NULL PRIMARY KEY,
    bundle_id     text,
    label         text        NOT NULL,
    version       text        NOT NULL,
    node_name     text        NOT NULL,
    role          text        NOT NULL,
    multistream   boolean,
    simulcast     boolean     NOT NULL,
    spotlight     boolean     NOT NULL,
    first_seen    timestamptz NOT NULL,
    last_seen     timestamptz NOT NULL
);

-- "Connections of a channel" in a time range.
CREATE INDEX sora_connection_channel ON sora_connection (channel_id, last_seen);
