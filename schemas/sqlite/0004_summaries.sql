-- Kohaku SQLite schema, version 4: per-report connection summaries, rates that read only the
-- range asked for, and the index set the dashboards need.
--
-- rtc_report_summary: one row per report, written in the same transaction as the report's
-- objects. Its figures are taken from every object the report carried (also those
-- skip_unchanged did not store), by the rules in docs/summary.md. The overview dashboard reads
-- it instead of rtc_stats: about 30 times fewer rows. Keyed like the objects, so a report sent
-- twice stores one summary.
CREATE TABLE rtc_report_summary (
    channel_id                  TEXT NOT NULL,
    session_id                  TEXT NOT NULL,
    client_id                   TEXT NOT NULL,
    connection_id               TEXT NOT NULL,
    rtc_timestamp               REAL NOT NULL,
    sora_timestamp              TEXT NOT NULL,
    stats_objects               REAL,
    stats_objects_unchanged     REAL,
    inbound_streams             REAL,
    bytes_received              REAL,
    packets_received            REAL,
    packets_lost                REAL,
    jitter                      REAL,
    jitter_buffer_delay         REAL,
    jitter_buffer_emitted_count REAL,
    frames_decoded              REAL,
    frames_dropped              REAL,
    freeze_count                REAL,
    total_freezes_duration      REAL,
    concealed_samples           REAL,
    total_samples_received      REAL,
    nacks_sent                  REAL,
    frame_width_received        REAL,
    frame_height_received       REAL,
    frames_per_second_received  REAL,
    outbound_streams            REAL,
    bytes_sent                  REAL,
    packets_sent                REAL,
    retransmitted_bytes_sent    REAL,
    frames_encoded              REAL,
    nacks_received              REAL,
    frame_width_sent            REAL,
    frame_height_sent           REAL,
    frames_per_second_sent      REAL,
    round_trip_time             REAL,
    fraction_lost               REAL,
    current_round_trip_time     REAL,
    available_outgoing_bitrate  REAL,
    quality_limitation_reason   TEXT,
    encoder_implementation      TEXT,
    decoder_implementation      TEXT,
    local_candidate_type        TEXT,
    remote_candidate_type       TEXT,
    relay_protocol              TEXT,
    audio_codec                 TEXT,
    video_codec                 TEXT
);
CREATE UNIQUE INDEX rtc_report_summary_connection_time
    ON rtc_report_summary (connection_id, rtc_timestamp);
CREATE INDEX rtc_report_summary_channel_time ON rtc_report_summary (channel_id, rtc_timestamp);

-- The dashboards no longer read rtc_stats by channel: the overview reads the summaries, the
-- connection dashboard reads one connection (rtc_stats_connection_time). The channel index cost
-- about a tenth of the database's bytes and every insert.
DROP INDEX rtc_stats_channel_time;

-- Rates. The previous sample of a series is found by one probe of rtc_stats_connection_time
-- (the latest row of the same connection and rtc_id before this one) instead of a window over
-- the series' whole history, so a filter on the time range reaches the table and a query costs
-- what its range holds, plus one earlier sample per series. The rules are unchanged (version 2):
-- a sample whose packet counter went down, or whose time did not advance, starts over; across a
-- gap a rate is the average over the gap.
DROP VIEW rtc_inbound_rtp_rates;
DROP VIEW rtc_outbound_rtp_rates;

CREATE VIEW rtc_inbound_rtp_rates AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id, kind, mid,
       track_identifier, codec_id, decoder_implementation,
       seconds AS interval_seconds,
       CASE WHEN bytes_received >= prev_bytes_received
            THEN (bytes_received - prev_bytes_received) * 8 / seconds END       AS bitrate_bps,
       CASE WHEN packets_received >= prev_packets_received
            THEN (packets_received - prev_packets_received) / seconds END       AS packets_per_second,
       CASE WHEN seconds > 0
                 AND (packets_lost - prev_packets_lost) + (packets_received - prev_packets_received) > 0
            THEN min(max(100.0 * (packets_lost - prev_packets_lost)
                         / ((packets_lost - prev_packets_lost) + (packets_received - prev_packets_received)),
                         0), 100) END                                            AS packet_loss_percent,
       jitter * 1000                                                             AS jitter_ms,
       CASE WHEN seconds > 0
                 AND jitter_buffer_emitted_count > prev_jitter_buffer_emitted_count
                 AND jitter_buffer_delay >= prev_jitter_buffer_delay
            THEN (jitter_buffer_delay - prev_jitter_buffer_delay) * 1000.0
                 / (jitter_buffer_emitted_count - prev_jitter_buffer_emitted_count) END AS jitter_buffer_delay_ms,
       CASE WHEN frames_decoded >= prev_frames_decoded
            THEN (frames_decoded - prev_frames_decoded) / seconds END           AS frames_decoded_per_second,
       CASE WHEN frames_dropped >= prev_frames_dropped
            THEN (frames_dropped - prev_frames_dropped) / seconds END           AS frames_dropped_per_second,
       frames_per_second,
       frame_width,
       frame_height,
       CASE WHEN seconds > 0 AND freeze_count >= prev_freeze_count
            THEN freeze_count - prev_freeze_count END                           AS freezes,
       CASE WHEN seconds > 0 AND total_freezes_duration >= prev_total_freezes_duration
            THEN total_freezes_duration - prev_total_freezes_duration END       AS freeze_seconds,
       CASE WHEN seconds > 0 AND concealed_samples >= prev_concealed_samples
                 AND total_samples_received > prev_total_samples_received
            THEN min(max(100.0 * (concealed_samples - prev_concealed_samples)
                         / (total_samples_received - prev_total_samples_received), 0), 100)
       END                                                                       AS concealment_percent,
       CASE WHEN nack_count >= prev_nack_count
            THEN (nack_count - prev_nack_count) / seconds END                   AS nacks_per_second,
       CASE WHEN pli_count >= prev_pli_count
            THEN (pli_count - prev_pli_count) / seconds END                     AS plis_per_second
FROM (
    SELECT *,
           -- NULL seconds marks a sample that starts over: every rate of it is NULL.
           CASE WHEN packets_received >= prev_packets_received AND rtc_timestamp > prev_timestamp
                THEN (rtc_timestamp - prev_timestamp) / 1000.0 END AS seconds
    FROM (
        SELECT s.rtc_timestamp, s.channel_id, s.session_id, s.client_id, s.connection_id, s.rtc_id,
               json_extract(s.rtc_data, '$.kind')                     AS kind,
               json_extract(s.rtc_data, '$.mid')                      AS mid,
               json_extract(s.rtc_data, '$.trackIdentifier')          AS track_identifier,
               json_extract(s.rtc_data, '$.codecId')                  AS codec_id,
               json_extract(s.rtc_data, '$.decoderImplementation')    AS decoder_implementation,
               json_extract(s.rtc_data, '$.bytesReceived')            AS bytes_received,
               json_extract(s.rtc_data, '$.packetsReceived')          AS packets_received,
               json_extract(s.rtc_data, '$.packetsLost')              AS packets_lost,
               json_extract(s.rtc_data, '$.jitter')                   AS jitter,
               json_extract(s.rtc_data, '$.jitterBufferDelay')        AS jitter_buffer_delay,
               json_extract(s.rtc_data, '$.jitterBufferEmittedCount') AS jitter_buffer_emitted_count,
               json_extract(s.rtc_data, '$.framesDecoded')            AS frames_decoded,
               json_extract(s.rtc_data, '$.framesDropped')            AS frames_dropped,
               json_extract(s.rtc_data, '$.framesPerSecond')          AS frames_per_second,
               json_extract(s.rtc_data, '$.frameWidth')               AS frame_width,
               json_extract(s.rtc_data, '$.frameHeight')              AS frame_height,
               json_extract(s.rtc_data, '$.freezeCount')              AS freeze_count,
               json_extract(s.rtc_data, '$.totalFreezesDuration')     AS total_freezes_duration,
               json_extract(s.rtc_data, '$.concealedSamples')         AS concealed_samples,
               json_extract(s.rtc_data, '$.totalSamplesReceived')     AS total_samples_received,
               json_extract(s.rtc_data, '$.nackCount')                AS nack_count,
               json_extract(s.rtc_data, '$.pliCount')                 AS pli_count,
               p.rtc_timestamp                                        AS prev_timestamp,
               json_extract(p.rtc_data, '$.bytesReceived')            AS prev_bytes_received,
               json_extract(p.rtc_data, '$.packetsReceived')          AS prev_packets_received,
               json_extract(p.rtc_data, '$.packetsLost')              AS prev_packets_lost,
               json_extract(p.rtc_data, '$.jitterBufferDelay')        AS prev_jitter_buffer_delay,
               json_extract(p.rtc_data, '$.jitterBufferEmittedCount') AS prev_jitter_buffer_emitted_count,
               json_extract(p.rtc_data, '$.framesDecoded')            AS prev_frames_decoded,
               json_extract(p.rtc_data, '$.framesDropped')            AS prev_frames_dropped,
               json_extract(p.rtc_data, '$.freezeCount')              AS prev_freeze_count,
               json_extract(p.rtc_data, '$.totalFreezesDuration')     AS prev_total_freezes_duration,
               json_extract(p.rtc_data, '$.concealedSamples')         AS prev_concealed_samples,
               json_extract(p.rtc_data, '$.totalSamplesReceived')     AS prev_total_samples_received,
               json_extract(p.rtc_data, '$.nackCount')                AS prev_nack_count,
               json_extract(p.rtc_data, '$.pliCount')                 AS prev_pli_count
        FROM rtc_stats s
        LEFT JOIN rtc_stats p ON p.rowid = (
            SELECT q.rowid FROM rtc_stats q
            WHERE q.connection_id = s.connection_id AND q.rtc_id = s.rtc_id
              AND q.rtc_timestamp < s.rtc_timestamp
            ORDER BY q.rtc_timestamp DESC LIMIT 1)
        WHERE s.rtc_type = 'inbound-rtp'
    )
);

CREATE VIEW rtc_outbound_rtp_rates AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id, kind, mid, rid,
       codec_id, encoder_implementation, quality_limitation_reason,
       seconds AS interval_seconds,
       CASE WHEN bytes_sent >= prev_bytes_sent
            THEN (bytes_sent - prev_bytes_sent) * 8 / seconds END               AS bitrate_bps,
       CASE WHEN packets_sent >= prev_packets_sent
            THEN (packets_sent - prev_packets_sent) / seconds END               AS packets_per_second,
       CASE WHEN retransmitted_bytes_sent >= prev_retransmitted_bytes_sent
            THEN (retransmitted_bytes_sent - prev_retransmitted_bytes_sent) * 8 / seconds END
                                                                                 AS retransmitted_bitrate_bps,
       CASE WHEN retransmitted_packets_sent >= prev_retransmitted_packets_sent
            THEN (retransmitted_packets_sent - prev_retransmitted_packets_sent) / seconds END
                                                                                 AS retransmitted_packets_per_second,
       CASE WHEN frames_encoded >= prev_frames_encoded
            THEN (frames_encoded - prev_frames_encoded) / seconds END           AS frames_encoded_per_second,
       frames_per_second,
       frame_width,
       frame_height,
       target_bitrate                                                            AS target_bitrate_bps,
       CASE WHEN nack_count >= prev_nack_count
            THEN (nack_count - prev_nack_count) / seconds END                   AS nacks_per_second,
       CASE WHEN pli_count >= prev_pli_count
            THEN (pli_count - prev_pli_count) / seconds END                     AS plis_per_second
FROM (
    SELECT *,
           CASE WHEN packets_sent >= prev_packets_sent AND rtc_timestamp > prev_timestamp
                THEN (rtc_timestamp - prev_timestamp) / 1000.0 END AS seconds
    FROM (
        SELECT s.rtc_timestamp, s.channel_id, s.session_id, s.client_id, s.connection_id, s.rtc_id,
               json_extract(s.rtc_data, '$.kind')                     AS kind,
               json_extract(s.rtc_data, '$.mid')                      AS mid,
               json_extract(s.rtc_data, '$.rid')                      AS rid,
               json_extract(s.rtc_data, '$.codecId')                  AS codec_id,
               json_extract(s.rtc_data, '$.encoderImplementation')    AS encoder_implementation,
               json_extract(s.rtc_data, '$.qualityLimitationReason')  AS quality_limitation_reason,
               json_extract(s.rtc_data, '$.bytesSent')                AS bytes_sent,
               json_extract(s.rtc_data, '$.packetsSent')              AS packets_sent,
               json_extract(s.rtc_data, '$.retransmittedBytesSent')   AS retransmitted_bytes_sent,
               json_extract(s.rtc_data, '$.retransmittedPacketsSent') AS retransmitted_packets_sent,
               json_extract(s.rtc_data, '$.framesEncoded')            AS frames_encoded,
               json_extract(s.rtc_data, '$.framesPerSecond')          AS frames_per_second,
               json_extract(s.rtc_data, '$.frameWidth')               AS frame_width,
               json_extract(s.rtc_data, '$.frameHeight')              AS frame_height,
               json_extract(s.rtc_data, '$.targetBitrate')            AS target_bitrate,
               json_extract(s.rtc_data, '$.nackCount')                AS nack_count,
               json_extract(s.rtc_data, '$.pliCount')                 AS pli_count,
               p.rtc_timestamp                                        AS prev_timestamp,
               json_extract(p.rtc_data, '$.bytesSent')                AS prev_bytes_sent,
               json_extract(p.rtc_data, '$.packetsSent')              AS prev_packets_sent,
               json_extract(p.rtc_data, '$.retransmittedBytesSent')   AS prev_retransmitted_bytes_sent,
               json_extract(p.rtc_data, '$.retransmittedPacketsSent') AS prev_retransmitted_packets_sent,
               json_extract(p.rtc_data, '$.framesEncoded')            AS prev_frames_encoded,
               json_extract(p.rtc_data, '$.nackCount')                AS prev_nack_count,
               json_extract(p.rtc_data, '$.pliCount')                 AS prev_pli_count
        FROM rtc_stats s
        LEFT JOIN rtc_stats p ON p.rowid = (
            SELECT q.rowid FROM rtc_stats q
            WHERE q.connection_id = s.connection_id AND q.rtc_id = s.rtc_id
              AND q.rtc_timestamp < s.rtc_timestamp
            ORDER BY q.rtc_timestamp DESC LIMIT 1)
        WHERE s.rtc_type = 'outbound-rtp'
    )
);

-- The summaries' rates, per connection: each rate from its own counter (a counter that went down,
-- e.g. a stream that ended, makes that rate NULL for one sample), the other figures as stored.
CREATE VIEW rtc_report_summary_rates AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id,
       stats_objects, stats_objects_unchanged, inbound_streams, outbound_streams,
       seconds AS interval_seconds,
       CASE WHEN bytes_received >= prev_bytes_received
            THEN (bytes_received - prev_bytes_received) * 8 / seconds END       AS received_bitrate_bps,
       CASE WHEN bytes_sent >= prev_bytes_sent
            THEN (bytes_sent - prev_bytes_sent) * 8 / seconds END               AS sent_bitrate_bps,
       CASE WHEN retransmitted_bytes_sent >= prev_retransmitted_bytes_sent
            THEN (retransmitted_bytes_sent - prev_retransmitted_bytes_sent) * 8 / seconds END
                                                                                 AS retransmitted_bitrate_bps,
       CASE WHEN seconds > 0 AND packets_received >= prev_packets_received
                 AND (packets_lost - prev_packets_lost) + (packets_received - prev_packets_received) > 0
            THEN min(max(100.0 * (packets_lost - prev_packets_lost)
                         / ((packets_lost - prev_packets_lost) + (packets_received - prev_packets_received)),
                         0), 100) END                                            AS packet_loss_percent,
       jitter * 1000                                                             AS jitter_ms,
       CASE WHEN seconds > 0
                 AND jitter_buffer_emitted_count > prev_jitter_buffer_emitted_count
                 AND jitter_buffer_delay >= prev_jitter_buffer_delay
            THEN (jitter_buffer_delay - prev_jitter_buffer_delay) * 1000.0
                 / (jitter_buffer_emitted_count - prev_jitter_buffer_emitted_count) END AS jitter_buffer_delay_ms,
       CASE WHEN frames_decoded >= prev_frames_decoded
            THEN (frames_decoded - prev_frames_decoded) / seconds END           AS frames_decoded_per_second,
       CASE WHEN frames_dropped >= prev_frames_dropped
            THEN (frames_dropped - prev_frames_dropped) / seconds END           AS frames_dropped_per_second,
       CASE WHEN frames_encoded >= prev_frames_encoded
            THEN (frames_encoded - prev_frames_encoded) / seconds END           AS frames_encoded_per_second,
       CASE WHEN seconds > 0 AND freeze_count >= prev_freeze_count
            THEN freeze_count - prev_freeze_count END                           AS freezes,
       CASE WHEN seconds > 0 AND total_freezes_duration >= prev_total_freezes_duration
            THEN total_freezes_duration - prev_total_freezes_duration END       AS freeze_seconds,
       CASE WHEN seconds > 0 AND concealed_samples >= prev_concealed_samples
                 AND total_samples_received > prev_total_samples_received
            THEN min(max(100.0 * (concealed_samples - prev_concealed_samples)
                         / (total_samples_received - prev_total_samples_received), 0), 100)
       END                                                                       AS concealment_percent,
       frame_width_received, frame_height_received, frames_per_second_received,
       frame_width_sent, frame_height_sent, frames_per_second_sent,
       round_trip_time, fraction_lost, current_round_trip_time, available_outgoing_bitrate,
       quality_limitation_reason, encoder_implementation, decoder_implementation,
       local_candidate_type, remote_candidate_type, relay_protocol, audio_codec, video_codec
FROM (
    SELECT s.*,
           CASE WHEN s.rtc_timestamp > p.rtc_timestamp
                THEN (s.rtc_timestamp - p.rtc_timestamp) / 1000.0 END AS seconds,
           p.bytes_received              AS prev_bytes_received,
           p.bytes_sent                  AS prev_bytes_sent,
           p.retransmitted_bytes_sent    AS prev_retransmitted_bytes_sent,
           p.packets_received            AS prev_packets_received,
           p.packets_lost                AS prev_packets_lost,
           p.jitter_buffer_delay         AS prev_jitter_buffer_delay,
           p.jitter_buffer_emitted_count AS prev_jitter_buffer_emitted_count,
           p.frames_decoded              AS prev_frames_decoded,
           p.frames_dropped              AS prev_frames_dropped,
           p.frames_encoded              AS prev_frames_encoded,
           p.freeze_count                AS prev_freeze_count,
           p.total_freezes_duration      AS prev_total_freezes_duration,
           p.concealed_samples           AS prev_concealed_samples,
           p.total_samples_received      AS prev_total_samples_received
    FROM rtc_report_summary s
    LEFT JOIN rtc_report_summary p ON p.rowid = (
        SELECT q.rowid FROM rtc_report_summary q
        WHERE q.connection_id = s.connection_id AND q.rtc_timestamp < s.rtc_timestamp
        ORDER BY q.rtc_timestamp DESC LIMIT 1)
);
