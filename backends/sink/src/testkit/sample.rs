//! Reports shaped like real ones: every stats type the spec has or had, the fields browsers send,
//! nested objects, integers above 2^53, and ids full of punctuation.

use std::sync::Arc;

use time::OffsetDateTime;

use crate::{
    Connection, RawJson, Report, ReportSummary, StatsBatch, StatsObject, SummaryNumber, SummaryText,
};

/// Every type of the current spec plus the removed ones old clients still send.
pub const STATS_TYPES: &[&str] = &[
    "codec",
    "inbound-rtp",
    "outbound-rtp",
    "remote-inbound-rtp",
    "remote-outbound-rtp",
    "media-source",
    "media-playout",
    "peer-connection",
    "data-channel",
    "transport",
    "candidate-pair",
    "local-candidate",
    "remote-candidate",
    "certificate",
    // Removed from the spec, still sent by some SDKs; Kohaku stores them like any other.
    "track",
    "stream",
    "sender",
    "receiver",
    "transceiver",
    "csrc",
    "sctp-transport",
    "ice-server",
];

/// A connection whose ids are valid Sora ids derived from `seed`.
pub fn connection(seed: u64) -> Connection {
    let id = sora_id(seed);
    Connection {
        channel_id: format!("channel-{}", seed % 7),
        session_id: sora_id(seed.wrapping_mul(31).wrapping_add(7)),
        client_id: id.clone(),
        connection_id: id.clone(),
        bundle_id: Some(id.clone()),
        group_id: seed
            .is_multiple_of(2)
            .then(|| format!("group-{}", seed % 5)),
        label: "WebRTC SFU Sora".into(),
        version: "2025.2.1".into(),
        node_name: "sora@127.0.0.1".into(),
        role: "sendrecv".into(),
        multistream: None,
        simulcast: false,
        spotlight: false,
    }
}

/// A 26-character Crockford base32 id, as Sora generates them.
pub fn sora_id(seed: u64) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..26)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ALPHABET[(state >> 59) as usize] as char
        })
        .collect()
}

/// One stats object of `rtc_type` with the fields a browser would give it.
pub fn object_json(rtc_type: &str, rtc_id: &str, rtc_timestamp: f64, counter: u64) -> String {
    let id = serde_json::Value::String(rtc_id.to_owned());
    let body = match rtc_type {
        "inbound-rtp" => format!(
            r#""kind":"video","ssrc":{ssrc},"bytesReceived":{bytes},"packetsReceived":{p},"packetsLost":3,"jitter":0.004,"framesDecoded":{p},"framesDropped":0,"framesPerSecond":30,"frameWidth":640,"frameHeight":480,"jitterBufferDelay":1.25,"jitterBufferEmittedCount":{p},"freezeCount":0,"codecId":"CIT01_96","mid":"1""#,
            ssrc = 1_000 + counter,
            bytes = counter * 1_200,
            p = counter
        ),
        "outbound-rtp" => format!(
            r#""kind":"video","ssrc":{ssrc},"bytesSent":{bytes},"packetsSent":{counter},"framesEncoded":{counter},"framesPerSecond":30,"frameWidth":1280,"frameHeight":720,"qualityLimitationReason":"bandwidth","qualityLimitationDurations":{{"none":0.128,"cpu":0,"other":0,"bandwidth":1.5}},"retransmittedPacketsSent":1,"nackCount":2,"pliCount":0,"scalabilityMode":"L1T1""#,
            ssrc = 2_000 + counter,
            bytes = counter * 1_500
        ),
        "remote-inbound-rtp" => {
            r#""kind":"audio","ssrc":3,"roundTripTime":0.012,"totalRoundTripTime":0.5,"roundTripTimeMeasurements":40,"fractionLost":0,"packetsLost":0,"jitter":0.001"#.to_owned()
        }
        "candidate-pair" => {
            // Chrome's priority exceeds 2^53: it must survive storage digit for digit.
            r#""state":"succeeded","nominated":true,"priority":9115005270282354942,"currentRoundTripTime":0.001,"availableOutgoingBitrate":2500000,"bytesSent":1313,"bytesReceived":1490,"transportId":"T01","localCandidateId":"I+abc/1","remoteCandidateId":"I;def=2""#.to_owned()
        }
        "codec" => r#""mimeType":"video/VP8","payloadType":96,"clockRate":90000,"sdpFmtpLine":"x-google-start-bitrate=800;max-fs=12288""#.to_owned(),
        "certificate" => r#""fingerprint":"1A:A5:A8","fingerprintAlgorithm":"sha-256","base64Certificate":"MIIBFjCBvKADAgECAgg8""#.to_owned(),
        "data-channel" => r#""label":"signaling","protocol":"","dataChannelIdentifier":0,"state":"open","messagesSent":4,"bytesSent":120"#.to_owned(),
        "track" => r#""trackIdentifier":"日本語トラック","remoteSource":false,"ended":false,"kind":"audio","audioLevel":0.5"#.to_owned(),
        _ => format!(r#""note":"generic {rtc_type} object","counter":{counter},"nested":{{"list":[1,2.5,null,true,"x"],"deeper":{{"ok":true}}}}"#),
    };
    format!(r#"{{"id":{id},"timestamp":{rtc_timestamp},"type":"{rtc_type}",{body}}}"#)
}

pub fn object(rtc_type: &str, rtc_id: &str, rtc_timestamp: f64, counter: u64) -> StatsObject {
    let json = object_json(rtc_type, rtc_id, rtc_timestamp, counter);
    StatsObject {
        rtc_id: rtc_id.to_owned(),
        rtc_type: rtc_type.to_owned(),
        rtc_timestamp,
        rtc_data: RawJson::from_string(json).expect("sample objects are valid JSON"),
    }
}

/// The report time matching a stats timestamp in ms, to the microsecond.
pub fn time_of(rtc_timestamp: f64) -> OffsetDateTime {
    let nanos = (rtc_timestamp * 1_000.0).round() as i128 * 1_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos).expect("sample timestamps are in range")
}

/// A report with one object of every type in [`STATS_TYPES`], all at `rtc_timestamp`.
pub fn every_type_report(connection: Connection, rtc_timestamp: f64) -> Report {
    let stats = STATS_TYPES
        .iter()
        .enumerate()
        .map(|(i, rtc_type)| {
            object(
                rtc_type,
                &format!("{rtc_type}-{i}"),
                rtc_timestamp,
                i as u64,
            )
        })
        .collect();
    let mut report = Report::new(
        connection,
        time_of(rtc_timestamp + 30.0),
        time_of(rtc_timestamp + 45.0),
        stats,
    );
    report.set_summary(Some(summary(rtc_timestamp)));
    report
}

/// A report of `objects` objects cycling through the main types, with unique ids.
pub fn report(connection: Connection, rtc_timestamp: f64, objects: usize) -> Report {
    let stats = (0..objects)
        .map(|i| {
            let rtc_type = STATS_TYPES[i % STATS_TYPES.len()];
            object(
                rtc_type,
                &format!("{rtc_type}-{i}"),
                rtc_timestamp,
                i as u64,
            )
        })
        .collect();
    let mut report = Report::new(
        connection,
        time_of(rtc_timestamp + 30.0),
        time_of(rtc_timestamp + 45.0),
        stats,
    );
    report.set_summary(Some(summary(rtc_timestamp)));
    report
}

/// A summary with a figure in every column, derived from `rtc_timestamp` so that two reports'
/// summaries differ.
pub fn summary(rtc_timestamp: f64) -> ReportSummary {
    let mut summary = ReportSummary::new(rtc_timestamp);
    for (index, which) in SummaryNumber::ALL.iter().enumerate() {
        summary.set_number(*which, Some(index as f64 + rtc_timestamp % 1000.0));
    }
    for which in SummaryText::ALL {
        summary.set_text(
            *which,
            Some(format!("{}-{}", which.column(), rtc_timestamp)),
        );
    }
    summary
}

pub fn batch(reports: impl IntoIterator<Item = Report>) -> StatsBatch {
    StatsBatch::new(reports.into_iter().map(Arc::new).collect())
}
