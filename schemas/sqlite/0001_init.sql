-- Kohaku SQLite schema, version 1.
--
-- Times: rtc_timestamp is the stats object's own `timestamp` (REAL, milliseconds since the Unix
-- epoch, fractional). sora_timestamp, received_at, first_seen and last_seen are ISO-8601 UTC text
-- with microseconds ('2025-07-25T06:06:51.592776Z'), which sorts and compares as time.

-- One row per stats object; rtc_data is the object's JSON text exactly as the client sent it.
CREATE TABLE rtc_stats (
    channel_id     TEXT NOT NULL,
    session_id     TEXT NOT NULL,
    client_id      TEXT NOT NULL,
    connection_id  TEXT NOT NULL,
    bundle_id      TEXT,
    rtc_type       TEXT NOT NULL,
    rtc_id         TEXT NOT NULL,
    rtc_timestamp  REAL NOT NULL,
    rtc_data       TEXT NOT NULL,
    sora_timestamp TEXT NOT NULL,
    received_at    TEXT NOT NULL
);

-- The idempotency key, ordered so that it also serves "stats of one connection over a time range".
CREATE UNIQUE INDEX rtc_stats_connection_time
    ON rtc_stats (connection_id, rtc_timestamp, rtc_id);

-- "Stats of a channel over a time range" (overview dashboards).
CREATE INDEX rtc_stats_channel_time ON rtc_stats (channel_id, rtc_timestamp);

-- One row per connection, refreshed by every report.
CREATE TABLE sora_connection (
    channel_id    TEXT NOT NULL,
    session_id    TEXT NOT NULL,
    client_id     TEXT NOT NULL,
    connection_id TEXT NOT NULL PRIMARY KEY,
    bundle_id     TEXT,
    label         TEXT NOT NULL,
    version       TEXT NOT NULL,
    node_name     TEXT NOT NULL,
    role          TEXT NOT NULL,
    multistream   INTEGER,
    simulcast     INTEGER NOT NULL,
    spotlight     INTEGER NOT NULL,
    first_seen    TEXT NOT NULL,
    last_seen     TEXT NOT NULL
);

-- "Connections of a channel" in a time range.
CREATE INDEX sora_connection_channel ON sora_connection (channel_id, last_seen);
