-- Kohaku SQLite schema, version 2: typed views per stats type and the rate views the Grafana
-- dashboards read. Same view and column names as the PostgreSQL backend, except that time is
-- rtc_timestamp (milliseconds since the epoch) instead of a timestamptz rtc_time.
--
-- Rates come from counter deltas between consecutive samples of the same stats object
-- (channel_id, connection_id, rtc_id), ordered by the object's own time, so reports that arrived
-- out of order are still paired correctly. A sample whose packet counter went down (the sender or
-- receiver restarted, e.g. on a reconnect) or whose time did not advance starts over: its rates
-- are NULL rather than a negative or absurd spike. Across a gap the rate is the average over the
-- gap's real length. channel_id is in the window's partition so that a dashboard's channel or
-- connection filter is applied before the window.

CREATE VIEW rtc_inbound_rtp AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       json_extract(rtc_data, '$.kind')                     AS kind,
       json_extract(rtc_data, '$.ssrc')                     AS ssrc,
       json_extract(rtc_data, '$.mid')                      AS mid,
       json_extract(rtc_data, '$.codecId')                  AS codec_id,
       json_extract(rtc_data, '$.trackIdentifier')          AS track_identifier,
       json_extract(rtc_data, '$.packetsReceived')          AS packets_received,
       json_extract(rtc_data, '$.packetsLost')              AS packets_lost,
       json_extract(rtc_data, '$.bytesReceived')            AS bytes_received,
       json_extract(rtc_data, '$.headerBytesReceived')      AS header_bytes_received,
       json_extract(rtc_data, '$.jitter')                   AS jitter,
       json_extract(rtc_data, '$.jitterBufferDelay')        AS jitter_buffer_delay,
       json_extract(rtc_data, '$.jitterBufferEmittedCount') AS jitter_buffer_emitted_count,
       json_extract(rtc_data, '$.framesDecoded')            AS frames_decoded,
       json_extract(rtc_data, '$.framesDropped')            AS frames_dropped,
       json_extract(rtc_data, '$.framesReceived')           AS frames_received,
       json_extract(rtc_data, '$.framesPerSecond')          AS frames_per_second,
       json_extract(rtc_data, '$.frameWidth')               AS frame_width,
       json_extract(rtc_data, '$.frameHeight')              AS frame_height,
       json_extract(rtc_data, '$.freezeCount')              AS freeze_count,
       json_extract(rtc_data, '$.totalFreezesDuration')     AS total_freezes_duration,
       json_extract(rtc_data, '$.concealedSamples')         AS concealed_samples,
       json_extract(rtc_data, '$.totalSamplesReceived')     AS total_samples_received,
       json_extract(rtc_data, '$.nackCount')                AS nack_count,
       json_extract(rtc_data, '$.pliCount')                 AS pli_count,
       json_extract(rtc_data, '$.firCount')                 AS fir_count,
       json_extract(rtc_data, '$.decoderImplementation')    AS decoder_implementation
FROM rtc_stats
WHERE rtc_type = 'inbound-rtp';

CREATE VIEW rtc_outbound_rtp AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       json_extract(rtc_data, '$.kind')                       AS kind,
       json_extract(rtc_data, '$.ssrc')                       AS ssrc,
       json_extract(rtc_data, '$.mid')                        AS mid,
       json_extract(rtc_data, '$.rid')                        AS rid,
       json_extract(rtc_data, '$.codecId')                    AS codec_id,
       json_extract(rtc_data, '$.packetsSent')                AS packets_sent,
       json_extract(rtc_data, '$.bytesSent')                  AS bytes_sent,
       json_extract(rtc_data, '$.headerBytesSent')            AS header_bytes_sent,
       json_extract(rtc_data, '$.retransmittedPacketsSent')   AS retransmitted_packets_sent,
       json_extract(rtc_data, '$.retransmittedBytesSent')     AS retransmitted_bytes_sent,
       json_extract(rtc_data, '$.targetBitrate')              AS target_bitrate,
       json_extract(rtc_data, '$.framesEncoded')              AS frames_encoded,
       json_extract(rtc_data, '$.framesSent')                 AS frames_sent,
       json_extract(rtc_data, '$.framesPerSecond')            AS frames_per_second,
       json_extract(rtc_data, '$.frameWidth')                 AS frame_width,
       json_extract(rtc_data, '$.frameHeight')                AS frame_height,
       json_extract(rtc_data, '$.totalEncodeTime')            AS total_encode_time,
       json_extract(rtc_data, '$.qualityLimitationReason')    AS quality_limitation_reason,
       json_extract(rtc_data, '$.qualityLimitationDurations') AS quality_limitation_durations,
       json_extract(rtc_data, '$.nackCount')                  AS nack_count,
       json_extract(rtc_data, '$.pliCount')                   AS pli_count,
       json_extract(rtc_data, '$.firCount')                   AS fir_count,
       json_extract(rtc_data, '$.encoderImplementation')      AS encoder_implementation
FROM rtc_stats
WHERE rtc_type = 'outbound-rtp';

CREATE VIEW rtc_remote_inbound_rtp AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       json_extract(rtc_data, '$.kind')                      AS kind,
       json_extract(rtc_data, '$.ssrc')                      AS ssrc,
       json_extract(rtc_data, '$.localId')                   AS local_id,
       json_extract(rtc_data, '$.packetsLost')               AS packets_lost,
       json_extract(rtc_data, '$.fractionLost')              AS fraction_lost,
       json_extract(rtc_data, '$.jitter')                    AS jitter,
       json_extract(rtc_data, '$.roundTripTime')             AS round_trip_time,
       json_extract(rtc_data, '$.totalRoundTripTime')        AS total_round_trip_time,
       json_extract(rtc_data, '$.roundTripTimeMeasurements') AS round_trip_time_measurements
FROM rtc_stats
WHERE rtc_type = 'remote-inbound-rtp';

CREATE VIEW rtc_candidate_pair AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       json_extract(rtc_data, '$.state')                    AS state,
       json_extract(rtc_data, '$.nominated')                AS nominated,
       json_extract(rtc_data, '$.localCandidateId')         AS local_candidate_id,
       json_extract(rtc_data, '$.remoteCandidateId')        AS remote_candidate_id,
       json_extract(rtc_data, '$.bytesSent')                AS bytes_sent,
       json_extract(rtc_data, '$.bytesReceived')            AS bytes_received,
       json_extract(rtc_data, '$.currentRoundTripTime')     AS current_round_trip_time,
       json_extract(rtc_data, '$.totalRoundTripTime')       AS total_round_trip_time,
       json_extract(rtc_data, '$.availableOutgoingBitrate') AS available_outgoing_bitrate,
       json_extract(rtc_data, '$.availableIncomingBitrate') AS available_incoming_bitrate
FROM rtc_stats
WHERE rtc_type = 'candidate-pair';

CREATE VIEW rtc_media_source AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       json_extract(rtc_data, '$.kind')             AS kind,
       json_extract(rtc_data, '$.trackIdentifier')  AS track_identifier,
       json_extract(rtc_data, '$.audioLevel')       AS audio_level,
       json_extract(rtc_data, '$.totalAudioEnergy') AS total_audio_energy,
       json_extract(rtc_data, '$.width')            AS width,
       json_extract(rtc_data, '$.height')           AS height,
       json_extract(rtc_data, '$.frames')           AS frames,
       json_extract(rtc_data, '$.framesPerSecond')  AS frames_per_second
FROM rtc_stats
WHERE rtc_type = 'media-source';

CREATE VIEW rtc_media_playout AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       json_extract(rtc_data, '$.kind')                       AS kind,
       json_extract(rtc_data, '$.synthesizedSamplesDuration') AS synthesized_samples_duration,
       json_extract(rtc_data, '$.synthesizedSamplesEvents')   AS synthesized_samples_events,
       json_extract(rtc_data, '$.totalSamplesDuration')       AS total_samples_duration,
       json_extract(rtc_data, '$.totalPlayoutDelay')          AS total_playout_delay,
       json_extract(rtc_data, '$.totalSamplesCount')          AS total_samples_count
FROM rtc_stats
WHERE rtc_type = 'media-playout';

CREATE VIEW rtc_codec AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       json_extract(rtc_data, '$.mimeType')    AS mime_type,
       json_extract(rtc_data, '$.payloadType') AS payload_type,
       json_extract(rtc_data, '$.clockRate')   AS clock_rate,
       json_extract(rtc_data, '$.channels')    AS channels,
       json_extract(rtc_data, '$.sdpFmtpLine') AS sdp_fmtp_line
FROM rtc_stats
WHERE rtc_type = 'codec';

CREATE VIEW rtc_transport AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       json_extract(rtc_data, '$.iceState')                     AS ice_state,
       json_extract(rtc_data, '$.dtlsState')                    AS dtls_state,
       json_extract(rtc_data, '$.dtlsRole')                     AS dtls_role,
       json_extract(rtc_data, '$.tlsVersion')                   AS tls_version,
       json_extract(rtc_data, '$.dtlsCipher')                   AS dtls_cipher,
       json_extract(rtc_data, '$.srtpCipher')                   AS srtp_cipher,
       json_extract(rtc_data, '$.selectedCandidatePairId')      AS selected_candidate_pair_id,
       json_extract(rtc_data, '$.selectedCandidatePairChanges') AS selected_candidate_pair_changes
FROM rtc_stats
WHERE rtc_type = 'transport';

CREATE VIEW rtc_ice_candidate AS
SELECT rtc_timestamp, channel_id, session_id, client_id, connection_id, rtc_id,
       CASE rtc_type WHEN 'local-candidate' THEN 'local' ELSE 'remote' END AS side,
       json_extract(rtc_data, '$.candidateType') AS candidate_type,
       json_extract(rtc_data, '$.protocol')      AS protocol,
       json_extract(rtc_data, '$.relayProtocol') AS relay_protocol,
       json_extract(rtc_data, '$.networkType')   AS network_type,
       json_extract(rtc_data, '$.address')       AS address,
       json_extract(rtc_data, '$.port')          AS port
FROM rtc_stats
WHERE rtc_type IN ('local-candidate', 'remote-candidate');

-- In the rate views: rate(x) = CASE WHEN x >= prev_x THEN (x - prev_x) / seconds END, where
-- seconds is NULL for a sample that starts over; percentages are clamped to 0..100.
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
        SELECT s.*,
               lag(rtc_timestamp) OVER w               AS prev_timestamp,
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
        WINDOW w AS (PARTITION BY channel_id, connection_id, rtc_id ORDER BY rtc_timestamp)
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
        SELECT s.*,
               lag(rtc_timestamp) OVER w              AS prev_timestamp,
               lag(bytes_sent) OVER w                 AS prev_bytes_sent,
               lag(packets_sent) OVER w               AS prev_packets_sent,
               lag(retransmitted_bytes_sent) OVER w   AS prev_retransmitted_bytes_sent,
               lag(retransmitted_packets_sent) OVER w AS prev_retransmitted_packets_sent,
               lag(frames_encoded) OVER w             AS prev_frames_encoded,
               lag(nack_count) OVER w                 AS prev_nack_count,
               lag(pli_count) OVER w                  AS prev_pli_count
        FROM rtc_outbound_rtp s
        WINDOW w AS (PARTITION BY channel_id, connection_id, rtc_id ORDER BY rtc_timestamp)
    )
);
