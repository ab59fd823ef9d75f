-- Kohaku PostgreSQL / TimescaleDB schema, version 5: per-report connection summaries, rates that
-- read only the range asked for, and the index set the dashboards need.
--
-- rtc_report_summary: one row per report, written in the same transaction as the report's
-- objects. Its figures are taken from every object the report carried (also those
-- skip_unchanged did not store), by the rules in docs/summary.md. The overview dashboard reads
-- it instead of rtc_stats: about 30 times fewer rows. Keyed like the objects, so a report sent
-- twice stores one summary. A plain table on every server: it is small, and Kohaku's retention
-- sweep deletes its expired rows.
CREATE TABLE rtc_report_summary (
    rtc_time                    timestamptz      NOT NULL,
    channel_id                  text             NOT NULL,
    session_id                  text             NOT NULL,
    client_id                   text             NOT NULL,
    connection_id               text             NOT NULL,
    rtc_timestamp               double precision NOT NULL,
    sora_timestamp              timestamptz      NOT NULL,
    stats_objects               double precision,
    stats_objects_unchanged     double precision,
    inbound_streams             double precision,
    bytes_received              double precision,
    packets_received            double precision,
    packets_lost                double precision,
    jitter                      double precision,
    jitter_buffer_delay         double precision,
    jitter_buffer_emitted_count double precision,
    frames_decoded              double precision,
    frames_dropped              double precision,
    freeze_count                double precision,
    total_freezes_duration      double precision,
    concealed_samples           double precision,
    total_samples_received      double precision,
    nacks_sent                  double precision,
    frame_width_received        double precision,
    frame_height_received       double precision,
    frames_per_second_received  double precision,
    outbound_streams            double precision,
    bytes_sent                  double precision,
    packets_sent                double precision,
    retransmitted_bytes_sent    double precision,
    frames_encoded              double precision,
    nacks_received              double precision,
    frame_width_sent            double precision,
    frame_height_sent           double precision,
    frames_per_second_sent      double precision,
    round_trip_time             double precision,
    fraction_lost               double precision,
    current_round_trip_time     double precision,
    available_outgoing_bitrate  double precision,
    quality_limitation_reason   text,
    encoder_implementation      text,
    decoder_implementation      text,
    local_candidate_type        text,
    remote_candidate_type       text,
    relay_protocol              text,
    audio_codec                 text,
    video_codec                 text
);
CREATE UNIQUE INDEX rtc_report_summary_connection_time
    ON rtc_report_summary (connection_id, rtc_time, rtc_timestamp);
CREATE INDEX rtc_report_summary_channel_time ON rtc_report_summary (channel_id, rtc_time);
CREATE INDEX rtc_report_summary_time ON rtc_report_summary (rtc_time);

-- The dashboards no longer read rtc_stats by channel: the overview reads the summaries, the
-- connection dashboard reads one connection (rtc_stats_connection_time). The channel index was a
-- fifth of the indexes' bytes and cost every insert.
DROP INDEX rtc_stats_channel_time;

-- Rates. The previous sample of a series is found by one probe of rtc_stats_connection_time
-- (the latest row of the same connection and rtc_id before this one, a LATERAL ... LIMIT 1)
-- instead of a window over the series' whole history, so a filter on the time range reaches the
-- table (and TimescaleDB's chunk exclusion) and a query costs what its range holds, plus one
-- earlier sample per series. The rules are unchanged (version 3): a sample whose packet counter
-- went down, or whose time did not advance, starts over; across a gap a rate is the average over
-- the gap.
DROP VIEW rtc_inbound_rtp_rates;
DROP VIEW rtc_outbound_rtp_rates;

CREATE VIEW rtc_inbound_rtp_rates AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id, kind, mid,
       track_identifier, codec_id, decoder_implementation,
       seconds                                                              AS interval_seconds,
       kohaku_counter_rate(bytes_received, prev_bytes_received, seconds) * 8 AS bitrate_bps,
       kohaku_counter_rate(packets_received, prev_packets_received, seconds) AS packets_per_second,
       CASE WHEN seconds > 0 THEN kohaku_percent(
           packets_lost - prev_packets_lost,
           (packets_lost - prev_packets_lost) + (packets_received - prev_packets_received))
       END                                                                  AS packet_loss_percent,
       jitter * 1000                                                        AS jitter_ms,
       CASE WHEN seconds > 0
                 AND jitter_buffer_emitted_count > prev_jitter_buffer_emitted_count
                 AND jitter_buffer_delay >= prev_jitter_buffer_delay
            THEN (jitter_buffer_delay - prev_jitter_buffer_delay)
                 / (jitter_buffer_emitted_count - prev_jitter_buffer_emitted_count) * 1000
       END                                                                  AS jitter_buffer_delay_ms,
       kohaku_counter_rate(frames_decoded, prev_frames_decoded, seconds)    AS frames_decoded_per_second,
       kohaku_counter_rate(frames_dropped, prev_frames_dropped, seconds)    AS frames_dropped_per_second,
       frames_per_second,
       frame_width,
       frame_height,
       CASE WHEN seconds > 0 AND freeze_count >= prev_freeze_count
            THEN freeze_count - prev_freeze_count END                       AS freezes,
       CASE WHEN seconds > 0 AND total_freezes_duration >= prev_total_freezes_duration
            THEN total_freezes_duration - prev_total_freezes_duration END   AS freeze_seconds,
       CASE WHEN seconds > 0 AND concealed_samples >= prev_concealed_samples THEN kohaku_percent(
           concealed_samples - prev_concealed_samples,
           total_samples_received - prev_total_samples_received)
       END                                                                  AS concealment_percent,
       kohaku_counter_rate(nack_count, prev_nack_count, seconds)            AS nacks_per_second,
       kohaku_counter_rate(pli_count, prev_pli_count, seconds)              AS plis_per_second
FROM (
    SELECT *,
           -- NULL seconds marks a sample that starts over: every rate of it is NULL.
           CASE WHEN packets_received >= prev_packets_received
                THEN extract(epoch FROM rtc_time - prev_time)::double precision END AS seconds
    FROM rtc_inbound_rtp s
    LEFT JOIN LATERAL (
        SELECT p.rtc_time                                                AS prev_time,
               (p.rtc_data ->> 'bytesReceived')::double precision        AS prev_bytes_received,
               (p.rtc_data ->> 'packetsReceived')::double precision      AS prev_packets_received,
               (p.rtc_data ->> 'packetsLost')::double precision          AS prev_packets_lost,
               (p.rtc_data ->> 'jitterBufferDelay')::double precision    AS prev_jitter_buffer_delay,
               (p.rtc_data ->> 'jitterBufferEmittedCount')::double precision AS prev_jitter_buffer_emitted_count,
               (p.rtc_data ->> 'framesDecoded')::double precision        AS prev_frames_decoded,
               (p.rtc_data ->> 'framesDropped')::double precision        AS prev_frames_dropped,
               (p.rtc_data ->> 'freezeCount')::double precision          AS prev_freeze_count,
               (p.rtc_data ->> 'totalFreezesDuration')::double precision AS prev_total_freezes_duration,
               (p.rtc_data ->> 'concealedSamples')::double precision     AS prev_concealed_samples,
               (p.rtc_data ->> 'totalSamplesReceived')::double precision AS prev_total_samples_received,
               (p.rtc_data ->> 'nackCount')::double precision            AS prev_nack_count,
               (p.rtc_data ->> 'pliCount')::double precision             AS prev_pli_count
        FROM rtc_stats p
        WHERE p.connection_id = s.connection_id AND p.rtc_id = s.rtc_id AND p.rtc_time < s.rtc_time
        ORDER BY p.rtc_time DESC
        LIMIT 1
    ) AS previous ON true
) AS samples;

CREATE VIEW rtc_outbound_rtp_rates AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id, kind, mid, rid,
       codec_id, encoder_implementation, quality_limitation_reason,
       seconds                                                              AS interval_seconds,
       kohaku_counter_rate(bytes_sent, prev_bytes_sent, seconds) * 8        AS bitrate_bps,
       kohaku_counter_rate(packets_sent, prev_packets_sent, seconds)        AS packets_per_second,
       kohaku_counter_rate(retransmitted_bytes_sent, prev_retransmitted_bytes_sent, seconds) * 8
                                                                            AS retransmitted_bitrate_bps,
       kohaku_counter_rate(retransmitted_packets_sent, prev_retransmitted_packets_sent, seconds)
                                                                            AS retransmitted_packets_per_second,
       kohaku_counter_rate(frames_encoded, prev_frames_encoded, seconds)    AS frames_encoded_per_second,
       frames_per_second,
       frame_width,
       frame_height,
       target_bitrate                                                       AS target_bitrate_bps,
       kohaku_counter_rate(nack_count, prev_nack_count, seconds)            AS nacks_per_second,
       kohaku_counter_rate(pli_count, prev_pli_count, seconds)              AS plis_per_second
FROM (
    SELECT *,
           CASE WHEN packets_sent >= prev_packets_sent
                THEN extract(epoch FROM rtc_time - prev_time)::double precision END AS seconds
    FROM rtc_outbound_rtp s
    LEFT JOIN LATERAL (
        SELECT p.rtc_time                                                    AS prev_time,
               (p.rtc_data ->> 'bytesSent')::double precision                AS prev_bytes_sent,
               (p.rtc_data ->> 'packetsSent')::double precision              AS prev_packets_sent,
               (p.rtc_data ->> 'retransmittedBytesSent')::double precision   AS prev_retransmitted_bytes_sent,
               (p.rtc_data ->> 'retransmittedPacketsSent')::double precision AS prev_retransmitted_packets_sent,
               (p.rtc_data ->> 'framesEncoded')::double precision            AS prev_frames_encoded,
               (p.rtc_data ->> 'nackCount')::double precision                AS prev_nack_count,
               (p.rtc_data ->> 'pliCount')::double precision                 AS prev_pli_count
        FROM rtc_stats p
        WHERE p.connection_id = s.connection_id AND p.rtc_id = s.rtc_id AND p.rtc_time < s.rtc_time
        ORDER BY p.rtc_time DESC
        LIMIT 1
    ) AS previous ON true
) AS samples;

-- The summaries' rates, per connection: each rate from its own counter (a counter that went down,
-- e.g. a stream that ended, makes that rate NULL for one sample), the other figures as stored.
CREATE VIEW rtc_report_summary_rates AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id,
       stats_objects, stats_objects_unchanged, inbound_streams, outbound_streams,
       seconds                                                              AS interval_seconds,
       kohaku_counter_rate(bytes_received, prev_bytes_received, seconds) * 8 AS received_bitrate_bps,
       kohaku_counter_rate(bytes_sent, prev_bytes_sent, seconds) * 8        AS sent_bitrate_bps,
       kohaku_counter_rate(retransmitted_bytes_sent, prev_retransmitted_bytes_sent, seconds) * 8
                                                                            AS retransmitted_bitrate_bps,
       CASE WHEN seconds > 0 AND packets_received >= prev_packets_received THEN kohaku_percent(
           packets_lost - prev_packets_lost,
           (packets_lost - prev_packets_lost) + (packets_received - prev_packets_received))
       END                                                                  AS packet_loss_percent,
       jitter * 1000                                                        AS jitter_ms,
       CASE WHEN seconds > 0
                 AND jitter_buffer_emitted_count > prev_jitter_buffer_emitted_count
                 AND jitter_buffer_delay >= prev_jitter_buffer_delay
            THEN (jitter_buffer_delay - prev_jitter_buffer_delay)
                 / (jitter_buffer_emitted_count - prev_jitter_buffer_emitted_count) * 1000
       END                                                                  AS jitter_buffer_delay_ms,
       kohaku_counter_rate(frames_decoded, prev_frames_decoded, seconds)    AS frames_decoded_per_second,
       kohaku_counter_rate(frames_dropped, prev_frames_dropped, seconds)    AS frames_dropped_per_second,
       kohaku_counter_rate(frames_encoded, prev_frames_encoded, seconds)    AS frames_encoded_per_second,
       CASE WHEN seconds > 0 AND freeze_count >= prev_freeze_count
            THEN freeze_count - prev_freeze_count END                       AS freezes,
       CASE WHEN seconds > 0 AND total_freezes_duration >= prev_total_freezes_duration
            THEN total_freezes_duration - prev_total_freezes_duration END   AS freeze_seconds,
       CASE WHEN seconds > 0 AND concealed_samples >= prev_concealed_samples THEN kohaku_percent(
           concealed_samples - prev_concealed_samples,
           total_samples_received - prev_total_samples_received)
       END                                                                  AS concealment_percent,
       frame_width_received, frame_height_received, frames_per_second_received,
       frame_width_sent, frame_height_sent, frames_per_second_sent,
       round_trip_time, fraction_lost, current_round_trip_time, available_outgoing_bitrate,
       quality_limitation_reason, encoder_implementation, decoder_implementation,
       local_candidate_type, remote_candidate_type, relay_protocol, audio_codec, video_codec
FROM (
    SELECT s.*,
           extract(epoch FROM s.rtc_time - previous.rtc_time)::double precision AS seconds,
           previous.bytes_received              AS prev_bytes_received,
           previous.bytes_sent                  AS prev_bytes_sent,
           previous.retransmitted_bytes_sent    AS prev_retransmitted_bytes_sent,
           previous.packets_received            AS prev_packets_received,
           previous.packets_lost                AS prev_packets_lost,
           previous.jitter_buffer_delay         AS prev_jitter_buffer_delay,
           previous.jitter_buffer_emitted_count AS prev_jitter_buffer_emitted_count,
           previous.frames_decoded              AS prev_frames_decoded,
           previous.frames_dropped              AS prev_frames_dropped,
           previous.frames_encoded              AS prev_frames_encoded,
           previous.freeze_count                AS prev_freeze_count,
           previous.total_freezes_duration      AS prev_total_freezes_duration,
           previous.concealed_samples           AS prev_concealed_samples,
           previous.total_samples_received      AS prev_total_samples_received
    FROM rtc_report_summary s
    LEFT JOIN LATERAL (
        SELECT * FROM rtc_report_summary p
        WHERE p.connection_id = s.connection_id AND p.rtc_time < s.rtc_time
        ORDER BY p.rtc_time DESC
        LIMIT 1
    ) AS previous ON true
) AS samples;
