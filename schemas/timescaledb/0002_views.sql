-- Kohaku PostgreSQL / TimescaleDB schema, version 2: one view per main stats type, exposing the
-- fields dashboards chart as typed columns. Fields a client did not send are NULL. Counters are
-- cumulative as the browser reports them; numbers are double precision so that any JSON number
-- spelling a client uses (1, 1.0, 1e3) casts cleanly.

CREATE VIEW rtc_inbound_rtp AS
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
       (rtc_data ->> 'firCount')::double precision                 AS fir_count
FROM rtc_stats
WHERE rtc_type = 'inbound-rtp';

CREATE VIEW rtc_outbound_rtp AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       rtc_data ->> 'kind'                                          AS kind,
       (rtc_data ->> 'ssrc')::double precision                      AS ssrc,
       rtc_data ->> 'mid'                                           AS mid,
       rtc_data ->> 'rid'                                           AS rid,
       rtc_data ->> 'codecId'                                       AS codec_id,
       (rtc_data ->> 'packetsSent')::double precision               AS packets_sent,
       (rtc_data ->> 'bytesSent')::double precision                 AS bytes_sent,
       (rtc_data ->> 'headerBytesSent')::double precision           AS header_bytes_sent,
       (rtc_data ->> 'retransmittedPacketsSent')::double precision  AS retransmitted_packets_sent,
       (rtc_data ->> 'retransmittedBytesSent')::double precision    AS retransmitted_bytes_sent,
       (rtc_data ->> 'targetBitrate')::double precision             AS target_bitrate,
       (rtc_data ->> 'framesEncoded')::double precision             AS frames_encoded,
       (rtc_data ->> 'framesSent')::double precision                AS frames_sent,
       (rtc_data ->> 'framesPerSecond')::double precision           AS frames_per_second,
       (rtc_data ->> 'frameWidth')::double precision                AS frame_width,
       (rtc_data ->> 'frameHeight')::double precision               AS frame_height,
       (rtc_data ->> 'totalEncodeTime')::double precision           AS total_encode_time,
       rtc_data ->> 'qualityLimitationReason'                       AS quality_limitation_reason,
       rtc_data -> 'qualityLimitationDurations'                     AS quality_limitation_durations,
       (rtc_data ->> 'nackCount')::double precision                 AS nack_count,
       (rtc_data ->> 'pliCount')::double precision                  AS pli_count,
       (rtc_data ->> 'firCount')::double precision                  AS fir_count,
       rtc_data ->> 'encoderImplementation'                         AS encoder_implementation
FROM rtc_stats
WHERE rtc_type = 'outbound-rtp';

CREATE VIEW rtc_remote_inbound_rtp AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       rtc_data ->> 'kind'                                          AS kind,
       (rtc_data ->> 'ssrc')::double precision                      AS ssrc,
       rtc_data ->> 'localId'                                       AS local_id,
       (rtc_data ->> 'packetsLost')::double precision               AS packets_lost,
       (rtc_data ->> 'fractionLost')::double precision              AS fraction_lost,
       (rtc_data ->> 'jitter')::double precision                    AS jitter,
       (rtc_data ->> 'roundTripTime')::double precision             AS round_trip_time,
       (rtc_data ->> 'totalRoundTripTime')::double precision        AS total_round_trip_time,
       (rtc_data ->> 'roundTripTimeMeasurements')::double precision AS round_trip_time_measurements
FROM rtc_stats
WHERE rtc_type = 'remote-inbound-rtp';

CREATE VIEW rtc_candidate_pair AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       rtc_data ->> 'state'                                         AS state,
       (rtc_data ->> 'nominated')::boolean                          AS nominated,
       rtc_data ->> 'localCandidateId'                              AS local_candidate_id,
       rtc_data ->> 'remoteCandidateId'                             AS remote_candidate_id,
       (rtc_data ->> 'bytesSent')::double precision                 AS bytes_sent,
       (rtc_data ->> 'bytesReceived')::double precision             AS bytes_received,
       (rtc_data ->> 'currentRoundTripTime')::double precision      AS current_round_trip_time,
       (rtc_data ->> 'totalRoundTripTime')::double precision        AS total_round_trip_time,
       (rtc_data ->> 'availableOutgoingBitrate')::double precision  AS available_outgoing_bitrate,
       (rtc_data ->> 'availableIncomingBitrate')::double precision  AS available_incoming_bitrate
FROM rtc_stats
WHERE rtc_type = 'candidate-pair';

CREATE VIEW rtc_media_source AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       rtc_data ->> 'kind'                                          AS kind,
       rtc_data ->> 'trackIdentifier'                               AS track_identifier,
       (rtc_data ->> 'audioLevel')::double precision                AS audio_level,
       (rtc_data ->> 'totalAudioEnergy')::double precision          AS total_audio_energy,
       (rtc_data ->> 'width')::double precision                     AS width,
       (rtc_data ->> 'height')::double precision                    AS height,
       (rtc_data ->> 'frames')::double precision                    AS frames,
       (rtc_data ->> 'framesPerSecond')::double precision           AS frames_per_second
FROM rtc_stats
WHERE rtc_type = 'media-source';

CREATE VIEW rtc_media_playout AS
SELECT rtc_time, channel_id, session_id, client_id, connection_id, rtc_id,
       rtc_data ->> 'kind'                                          AS kind,
       (rtc_data ->> 'synthesizedSamplesDuration')::double precision AS synthesized_samples_duration,
       (rtc_data ->> 'synthesizedSamplesEvents')::double precision  AS synthesized_samples_events,
       (rtc_data ->> 'totalSamplesDuration')::double precision      AS total_samples_duration,
       (rtc_data ->> 'totalPlayoutDelay')::double precision         AS total_playout_delay,
       (rtc_data ->> 'totalSamplesCount')::double precision         AS total_samples_count
FROM rtc_stats
WHERE rtc_type = 'media-playout';
