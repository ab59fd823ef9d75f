-- Kohaku PostgreSQL / TimescaleDB schema, version 3: what the Grafana dashboards read.
--
-- Rates come from counter deltas between consecutive samples of the same stats object
-- (channel_id, connection_id, rtc_id), ordered by the object's own time, so reports that arrived
-- out of order are still paired correctly. A sample whose packet counter went down (the sender or
-- receiver restarted, e.g. on a reconnect) or whose time did not advance starts over: its rates
-- are NULL rather than a negative or absurd spike. Across a gap the rate is the average over the
-- gap's real length. channel_id is in the window's partition so that a dashboard's channel or
-- connection filter is pushed below the window and only that data is read.

-- (current - previous) / seconds, or NULL when the counter went down or no time passed.
CREATE FUNCTION kohaku_counter_rate(current double precision, previous double precision,
                                    seconds double precision)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN seconds > 0 AND current >= previous THEN (current - previous) / seconds END $$;

-- part / whole as a percentage clamped to 0..100, or NULL when whole is not positive.
CREATE FUNCTION kohaku_percent(part double precision, whole double precision)
RETURNS double precision LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN whole > 0 THEN least(greatest(part / whole * 100, 0), 100) END $$;

-- Adds the decoder implementation (a hint at the client's platform) to the typed view.
CREATE OR REPLACE VIEW rtc_inbound_rtp AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       rtc_data ->> 'kind'                                         AS kind,
       (rtc_data ->> 'ssrc')::double precision                     AS ssrc,
       rtc_data ->> 'mid'                                          AS mid,
       rtc_data ->> 'codecId'                                      AS codec_id,
       rtc_data ->> 'trackIdentifier'                              AS track_identifier,
       (rtc_data ->> 'packetsReceived')::double precision          AS packets_received,
       (rtc_data ->> 'packetsLost')::double precision              AS packets_lost,
       (rtc_data ->> 'bytesReceived')::double precision            AS bytes_received,
       (rtc_data ->> 'headerBytesReceived')::double precision      AS header_bytes_received,
       (rtc_data ->> 'jitter')::double precision                   AS jitter,
       (rtc_data ->> 'jitterBufferDelay')::double precision        AS jitter_buffer_delay,
       (rtc_data ->> 'jitterBufferEmittedCount')::double precision AS jitter_buffer_emitted_count,
       (rtc_data ->> 'framesDecoded')::double precision            AS frames_decoded,
       (rtc_data ->> 'framesDropped')::double precision            AS frames_dropped,
       (rtc_data ->> 'framesReceived')::double precision           AS frames_received,
       (rtc_data ->> 'framesPerSecond')::double precision          AS frames_per_second,
       (rtc_data ->> 'frameWidth')::double precision               AS frame_width,
       (rtc_data ->> 'frameHeight')::double precision              AS frame_height,
       (rtc_data ->> 'freezeCount')::double precision              AS freeze_count,
       (rtc_data ->> 'totalFreezesDuration')::double precision     AS total_freezes_duration,
       (rtc_data ->> 'concealedSamples')::double precision         AS concealed_samples,
       (rtc_data ->> 'totalSamplesReceived')::double precision     AS total_samples_received,
       (rtc_data ->> 'nackCount')::double precision                AS nack_count,
       (rtc_data ->> 'pliCount')::double precision                 AS pli_count,
       (rtc_data ->> 'firCount')::double precision                 AS fir_count,
       rtc_data ->> 'decoderImplementation'                        AS decoder_implementation
FROM rtc_stats
WHERE rtc_type = 'inbound-rtp';

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
    FROM (
        SELECT s.*,
               lag(rtc_time) OVER w                    AS prev_time,
               lag(bytes_received) OVER w              AS prev_bytes_received,
               lag(packets_received) OVER w            AS prev_packets_received,
               lag(packets_lost) OVER w                AS prev_packets_lost,
               lag(jitter_buffer_delay) OVER w         AS prev_jitter_buffer_delay,
               lag(jitter_buffer_emitted_count) OVER w AS prev_jitter_buffer_emitted_count,
               lag(frames_decoded) OVER w              AS prev_frames_decoded,
               lag(frames_dropped) OVER w              AS prev_frames_dropped,
               lag(freeze_count) OVER w                AS prev_freeze_count,
               lag(total_freezes_duration) OVER w      AS prev_total_freezes_duration,
               lag(concealed_samples) OVER w           AS prev_concealed_samples,
               lag(total_samples_received) OVER w      AS prev_total_samples_received,
               lag(nack_count) OVER w                  AS prev_nack_count,
               lag(pli_count) OVER w                   AS prev_pli_count
        FROM rtc_inbound_rtp s
        WINDOW w AS (PARTITION BY channel_id, connection_id, rtc_id ORDER BY rtc_time)
    ) AS paired
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
    FROM (
        SELECT s.*,
               lag(rtc_time) OVER w                   AS prev_time,
               lag(bytes_sent) OVER w                 AS prev_bytes_sent,
               lag(packets_sent) OVER w               AS prev_packets_sent,
               lag(retransmitted_bytes_sent) OVER w   AS prev_retransmitted_bytes_sent,
               lag(retransmitted_packets_sent) OVER w AS prev_retransmitted_packets_sent,
               lag(frames_encoded) OVER w             AS prev_frames_encoded,
               lag(nack_count) OVER w                 AS prev_nack_count,
               lag(pli_count) OVER w                  AS prev_pli_count
        FROM rtc_outbound_rtp s
        WINDOW w AS (PARTITION BY channel_id, connection_id, rtc_id ORDER BY rtc_time)
    ) AS paired
) AS samples;

CREATE VIEW rtc_codec AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       rtc_data ->> 'mimeType'                         AS mime_type,
       (rtc_data ->> 'payloadType')::double precision  AS payload_type,
       (rtc_data ->> 'clockRate')::double precision    AS clock_rate,
       (rtc_data ->> 'channels')::double precision     AS channels,
       rtc_data ->> 'sdpFmtpLine'                      AS sdp_fmtp_line
FROM rtc_stats
WHERE rtc_type = 'codec';

CREATE VIEW rtc_transport AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       rtc_data ->> 'iceState'                         AS ice_state,
       rtc_data ->> 'dtlsState'                        AS dtls_state,
       rtc_data ->> 'dtlsRole'                         AS dtls_role,
       rtc_data ->> 'tlsVersion'                       AS tls_version,
       rtc_data ->> 'dtlsCipher'                       AS dtls_cipher,
       rtc_data ->> 'srtpCipher'                       AS srtp_cipher,
       rtc_data ->> 'selectedCandidatePairId'          AS selected_candidate_pair_id,
       (rtc_data ->> 'selectedCandidatePairChanges')::double precision AS selected_candidate_pair_changes
FROM rtc_stats
WHERE rtc_type = 'transport';

CREATE VIEW rtc_ice_candidate AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       CASE rtc_type WHEN 'local-candidate' THEN 'local' ELSE 'remote' END AS side,
       rtc_data ->> 'candidateType'                    AS candidate_type,
       rtc_data ->> 'protocol'                         AS protocol,
       rtc_data ->> 'relayProtocol'                    AS relay_protocol,
       rtc_data ->> 'networkType'                      AS network_type,
       rtc_data ->> 'address'                          AS address,
       (rtc_data ->> 'port')::double precision         AS port
FROM rtc_stats
WHERE rtc_type IN ('local-candidate', 'remote-candidate');
