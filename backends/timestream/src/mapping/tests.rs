use std::sync::Arc;

use kohaku_sink::testkit::sample;
use kohaku_sink::{RawJson, Report, StatsBatch, StatsObject};

use super::*;

fn object(rtc_type: &str, rtc_id: &str, ts: f64, members: &str) -> StatsObject {
    let text = format!(r#"{{"id":"{rtc_id}","timestamp":{ts},"type":"{rtc_type}",{members}}}"#);
    StatsObject {
        rtc_id: rtc_id.into(),
        rtc_type: rtc_type.into(),
        rtc_timestamp: ts,
        rtc_data: RawJson::from_string(text).expect("valid JSON"),
    }
}

fn report_of(stats: Vec<StatsObject>) -> Report {
    Report::new(
        sample::connection(7),
        sample::time_of(1_753_423_611_000.0),
        sample::time_of(1_753_423_612_000.5),
        stats,
    )
}

fn batch_of(reports: Vec<Report>) -> StatsBatch {
    StatsBatch::new(reports.into_iter().map(Arc::new).collect())
}

fn measure<'a>(record: &'a PlannedRecord, name: &str) -> Option<&'a Measure> {
    record.measures.iter().find(|m| m.name == name)
}

#[test]
fn integer_members_are_sorted_for_binary_search() {
    let mut sorted = INTEGER_MEMBERS.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, INTEGER_MEMBERS);
}

#[test]
fn an_object_becomes_one_multi_measure_record() {
    let ts = 1_753_423_611_556.525;
    let inbound = object(
        "inbound-rtp",
        "IT01V3347189688",
        ts,
        r#""kind":"video","ssrc":3347189688,"bytesReceived":123456,"jitter":0.004,"audioLevel":0,"framesPerSecond":30,"qualityLimitationDurations":{"none":0.5,"cpu":0},"decoderImplementation":"","remoteId":null,"powerEfficientDecoder":true,"list":[1,"x"]"#,
    );
    let plan = plan(&batch_of(vec![report_of(vec![inbound])]));
    assert!(plan.refused.is_empty(), "{:?}", plan.refused);
    assert_eq!(plan.omitted_values, 2, "the empty string and the null");
    let records = &plan.reports[0];
    assert_eq!(records.len(), 2, "connection record + stats record");

    let connection = sample::connection(7);
    let stats = &records[1];
    assert_eq!(stats.measure_name, "inbound-rtp");
    assert_eq!(stats.time_us, 1_753_423_611_556_525);
    let dimensions: Vec<(&str, &str)> = stats
        .dimensions
        .iter()
        .map(|d| (d.name, d.value.as_str()))
        .collect();
    assert_eq!(
        dimensions,
        vec![
            ("channel_id", connection.channel_id.as_str()),
            ("session_id", connection.session_id.as_str()),
            ("client_id", connection.client_id.as_str()),
            ("connection_id", connection.connection_id.as_str()),
            (
                "bundle_id",
                connection.bundle_id.as_deref().unwrap_or_default()
            ),
            ("rtc_type", "inbound-rtp"),
            ("rtc_id", "IT01V3347189688"),
        ]
    );
    let typed = |name: &str| measure(stats, name).map(|m| (m.kind, m.value.as_str()));
    assert_eq!(typed("kind"), Some((MeasureType::Varchar, "video")));
    assert_eq!(typed("ssrc"), Some((MeasureType::Bigint, "3347189688")));
    assert_eq!(
        typed("bytesReceived"),
        Some((MeasureType::Bigint, "123456"))
    );
    assert_eq!(typed("jitter"), Some((MeasureType::Double, "0.004")));
    // Whole-valued doubles stay DOUBLE, so the measure's type never changes between samples.
    assert_eq!(typed("audioLevel"), Some((MeasureType::Double, "0")));
    assert_eq!(typed("framesPerSecond"), Some((MeasureType::Double, "30")));
    assert_eq!(
        typed("qualityLimitationDurations.none"),
        Some((MeasureType::Double, "0.5"))
    );
    assert_eq!(
        typed("qualityLimitationDurations.cpu"),
        Some((MeasureType::Double, "0"))
    );
    assert_eq!(
        typed("powerEfficientDecoder"),
        Some((MeasureType::Boolean, "true"))
    );
    assert_eq!(typed("list"), Some((MeasureType::Varchar, r#"[1,"x"]"#)));
    assert_eq!(
        typed("timestamp"),
        Some((MeasureType::Double, "1753423611556.525"))
    );
    assert_eq!(
        typed(SORA_TIMESTAMP_MEASURE),
        Some((MeasureType::Bigint, "1753423611000000"))
    );
    assert_eq!(
        typed(RECEIVED_AT_MEASURE),
        Some((MeasureType::Bigint, "1753423612000500"))
    );
    for absent in ["id", "type", "decoderImplementation", "remoteId"] {
        assert_eq!(typed(absent), None, "{absent}");
    }
}

#[test]
fn each_report_has_a_connection_record_at_its_sora_time() {
    let mut report = report_of(vec![object("codec", "C1", 1.0e12, r#""payloadType":96"#)]);
    report.connection.multistream = Some(true);
    report.connection.simulcast = true;
    let plan = plan(&batch_of(vec![report.clone()]));
    let record = &plan.reports[0][0];
    assert_eq!(record.measure_name, CONNECTION_MEASURE);
    assert_eq!(record.time_us, micros_of_time(report.sora_timestamp));
    assert_eq!(
        record.origin,
        Origin::Connection {
            connection_id: report.connection.connection_id.clone()
        }
    );
    assert_eq!(record.dimensions.len(), 5, "no rtc_type or rtc_id");
    let values: Vec<(&str, &str)> = record
        .measures
        .iter()
        .map(|m| (m.name.as_str(), m.value.as_str()))
        .collect();
    assert!(values.contains(&("label", "WebRTC SFU Sora")), "{values:?}");
    assert!(values.contains(&("multistream", "true")));
    assert!(values.contains(&("simulcast", "true")));
    assert!(values.contains(&("spotlight", "false")));

    // Newer Sora sends no multistream: the measure is absent, not false.
    report.connection.multistream = None;
    let plan = super::plan(&batch_of(vec![report]));
    assert!(measure(&plan.reports[0][0], "multistream").is_none());
}

#[test]
fn a_report_without_bundle_id_has_no_bundle_dimension() {
    let mut report = report_of(vec![object("codec", "C1", 1.0e12, r#""payloadType":96"#)]);
    report.connection.bundle_id = None;
    let plan = plan(&batch_of(vec![report]));
    assert!(plan.reports[0]
        .iter()
        .all(|r| r.dimensions.iter().all(|d| d.name != "bundle_id")));
}

#[test]
fn limits_refuse_the_object_naming_what_is_wrong() {
    let ts = 1.0e12;
    let cases: Vec<(StatsObject, &str)> = vec![
        (
            object(
                "certificate",
                "big-value",
                ts,
                &format!(r#""base64Certificate":"{}""#, "A".repeat(2049)),
            ),
            r#"member "base64Certificate" is 2049 bytes; Timestream's limit per value is 2048 bytes"#,
        ),
        (
            object("codec", "colon", ts, r#""a:b":1"#),
            r#"member "a:b" contains ':'"#,
        ),
        (
            object("codec", "reserved", ts, r#""ts_internal":1"#),
            r#"member "ts_internal" is reserved by Timestream"#,
        ),
        (
            object("codec", "measure-value", ts, r#""measure_value_x":1"#),
            "is reserved by Timestream",
        ),
        (
            object("codec", "dimension-name", ts, r#""channel_id":"x""#),
            r#"member "channel_id" has the name of a dimension"#,
        ),
        (
            object(
                "codec",
                "long-name",
                ts,
                &format!(r#""{}":1"#, "n".repeat(257)),
            ),
            "is 257 bytes; Timestream's limit is 256",
        ),
        (
            object(
                "codec",
                "many",
                ts,
                &(0..255)
                    .map(|i| format!(r#""m{i}":1"#))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            "258 measures; Timestream's limit per record is 256",
        ),
        (
            object(
                "codec",
                "large-record",
                ts,
                &format!(r#""a":"{}","b":"{}""#, "x".repeat(1000), "y".repeat(1000)),
            ),
            "Timestream's limit is 2048 bytes",
        ),
    ];
    for (object, expected) in cases {
        let id = object.rtc_id.clone();
        let plan = plan(&batch_of(vec![report_of(vec![object])]));
        assert_eq!(plan.refused.len(), 1, "{id} refused");
        let refused = &plan.refused[0];
        assert_eq!(refused.rtc_id, id);
        assert!(
            refused.reason.contains(expected),
            "{id}: {:?} lacks {expected:?}",
            refused.reason
        );
        assert_eq!(
            plan.record_count(),
            1,
            "{id}: only the connection record remains"
        );
    }
}

#[test]
fn empty_connection_ids_refuse_the_objects() {
    let mut report = report_of(vec![object("codec", "C1", 1.0e12, r#""payloadType":96"#)]);
    report.connection.session_id = String::new();
    let plan = plan(&batch_of(vec![report]));
    assert_eq!(plan.record_count(), 0);
    assert_eq!(plan.refused.len(), 1);
    assert!(plan.refused[0]
        .reason
        .contains("dimension session_id is empty"));
}

#[test]
fn an_object_at_the_record_limit_is_kept() {
    // Fill to exactly 2048 bytes by the documented formula, then one more byte.
    let plan_of = |pad: usize| {
        let members = format!(r#""pad":"{}""#, "p".repeat(pad));
        plan(&batch_of(vec![report_of(vec![object(
            "codec", "edge", 1.0e12, &members,
        )])]))
    };
    let probe = plan_of(1);
    let record = &probe.reports[0][1];
    let size: usize = record
        .dimensions
        .iter()
        .map(|d| d.name.len() + d.value.len())
        .sum::<usize>()
        + record.measure_name.len()
        + record
            .measures
            .iter()
            .map(|m| m.name.len() + m.value.len())
            .sum::<usize>()
        + 8;
    let room = limits::RECORD_BYTES - size + 1;
    assert!(plan_of(room).refused.is_empty(), "exactly at the limit");
    assert_eq!(plan_of(room + 1).refused.len(), 1, "one byte over");
}

#[test]
fn a_large_report_is_split_and_shares_its_connection_dimensions() {
    let report = sample::report(sample::connection(9), 1.0e12, 250);
    let requests = split(plan(&batch_of(vec![report])), 100);
    let sizes: Vec<usize> = requests.iter().map(|r| r.records.len()).collect();
    // 250 objects, the connection record and the summary record.
    assert_eq!(sizes, vec![100, 100, 52]);
    for request in &requests {
        let common: Vec<&str> = request.common_dimensions.iter().map(|d| d.name).collect();
        assert_eq!(
            common,
            [
                "channel_id",
                "session_id",
                "client_id",
                "connection_id",
                "bundle_id"
            ]
        );
        for record in &request.records {
            let own: Vec<&str> = record.dimensions.iter().map(|d| d.name).collect();
            if record.origin.is_stats() {
                assert_eq!(own, ["rtc_type", "rtc_id"]);
            } else {
                assert!(own.is_empty());
            }
        }
    }
    // Common and own dimensions together are every dimension again, in order.
    let request = &requests[1];
    let names: Vec<&str> = request
        .common_dimensions
        .iter()
        .chain(&request.records[0].dimensions)
        .map(|d| d.name)
        .collect();
    assert_eq!(names, DIMENSIONS);
}

#[test]
fn small_reports_are_packed_whole_into_requests() {
    let reports: Vec<Report> = (0..30)
        .map(|seed| sample::report(sample::connection(100 + seed), 1.0e12, 3))
        .collect();
    let requests = split(plan(&batch_of(reports)), 100);
    let sizes: Vec<usize> = requests.iter().map(|r| r.records.len()).collect();
    assert_eq!(
        sizes,
        vec![100, 50],
        "20 reports of 5 records (3 objects, the connection and the summary), then 10"
    );
    for request in &requests {
        assert!(
            request.common_dimensions.is_empty(),
            "no dimension is shared by every connection"
        );
        let connections: Vec<&str> = request
            .records
            .iter()
            .map(|r| match &r.origin {
                Origin::Stats { connection_id, .. }
                | Origin::Connection { connection_id }
                | Origin::Summary { connection_id } => connection_id.as_str(),
            })
            .collect();
        for chunk in connections.chunks(5) {
            assert!(
                chunk.iter().all(|id| *id == chunk[0]),
                "a report is never split"
            );
        }
    }
}

#[test]
fn max_records_is_clamped_to_timestreams_limit() {
    let report = sample::report(sample::connection(9), 1.0e12, 300);
    let requests = split(plan(&batch_of(vec![report])), 1000);
    assert!(requests.iter().all(|r| r.records.len() <= 100));
}

#[test]
fn timestamps_convert_to_exact_microseconds() {
    assert_eq!(
        micros_of_ms(1_753_423_611_556.525),
        Some(1_753_423_611_556_525)
    );
    assert_eq!(
        micros_of_ms(1_753_423_631_000.25),
        Some(1_753_423_631_000_250)
    );
    assert_eq!(micros_of_ms(f64::INFINITY), None);
    // Back to the exact f64 the idempotency key holds.
    assert_eq!(1_753_423_611_556_525_f64 / 1_000.0, 1_753_423_611_556.525);
}

#[test]
fn the_same_batch_always_plans_the_same_records() {
    let batch = sample::batch([sample::every_type_report(sample::connection(5), 1.0e12)]);
    assert_eq!(split(plan(&batch), 100), split(plan(&batch), 100));
}

#[test]
fn an_object_repeated_in_the_batch_is_planned_once_and_counted_as_duplicate() {
    let report = sample::report(sample::connection(12), 1.0e12, 5);
    let mut later = report.clone();
    later.sora_timestamp = sample::time_of(1.0e12 + 60_000.0);
    let plan = plan(&batch_of(vec![report.clone(), report, later]));
    assert_eq!(
        plan.duplicates, 10,
        "the second and third copies of 5 objects"
    );
    // One connection record per distinct report time; one summary record per distinct summary
    // time (the copies' objects, hence their summaries, are the same).
    let count = |wanted: fn(&Origin) -> bool| {
        plan.reports
            .iter()
            .flatten()
            .filter(|r| wanted(&r.origin))
            .count()
    };
    assert_eq!(count(|o| matches!(o, Origin::Connection { .. })), 2);
    assert_eq!(count(|o| matches!(o, Origin::Summary { .. })), 1);
    assert_eq!(plan.record_count(), 8);
}
