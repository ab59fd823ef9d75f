//! End to end into Timestream: the real `kohaku` binary, a real HTTP/2 client, the real AWS SDK,
//! and the moto emulator `scripts/test` starts.
#![cfg(all(feature = "timestream", feature = "testkit"))]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use http::StatusCode;
use kohaku_timestream::mapping::{self, CONNECTION_MEASURE};
use kohaku_timestream::testkit::{self, StoredRecord};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const TABLE: &str = "rtc_stats";

fn config_text(endpoint: &str, database: &str, extra: &str) -> String {
    testkit::assert_loopback(endpoint);
    format!(
        "[server]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 0\n\
         [exporter]\nlisten_port = 0\n\
         [pipeline]\nbatch_max_wait_ms = 20\nretry_initial_backoff_ms = 10\nretry_max_backoff_ms = 200\n\
         skip_unchanged = \"off\"\n\
         [sinks.timestream]\nregion = \"{region}\"\ndatabase = \"{database}\"\nendpoint_url = \"{endpoint}\"\n\
         create_if_missing = true\nrequest_timeout_secs = 2\n{extra}",
        region = testkit::REGION,
    )
}

/// The value a JSON member must be stored as, by `schemas/timestream.md`; `None` when the
/// member is stored as something else (nested, list) or not at all.
fn expected_measure(name: &str, value: &Value) -> Option<(&'static str, String)> {
    match value {
        Value::String(text) if !text.is_empty() => Some(("VARCHAR", text.clone())),
        Value::Bool(flag) => Some(("BOOLEAN", flag.to_string())),
        Value::Number(number) => match number.as_i64() {
            Some(whole) if mapping::is_integer_member(name) => Some(("BIGINT", whole.to_string())),
            _ => Some(("DOUBLE", number.as_f64()?.to_string())),
        },
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_reports_reach_timestream_with_dimensions_time_and_measures() {
    let database = testkit::fresh_database("e2e");
    let dir = tempfile::tempdir().unwrap();
    let served = serve(
        dir.path(),
        &config_text(&testkit::moto_url(), &database, ""),
    );
    let client = H2::connect(served.ingest).await;

    let mut sent = HashMap::new();
    let mut connections = HashSet::new();
    for file in [
        "chromium/rtc_stats.chromium-av.jsonl",
        "sora-logs/rtc_stats.sample.jsonl",
    ] {
        for report in fixture_reports(file) {
            assert_eq!(
                client.post_report(report.body.clone()).await.status,
                StatusCode::NO_CONTENT
            );
            connections.insert(report.connection_id.clone());
            for object in &report.objects {
                sent.insert(
                    (
                        report.connection_id.clone(),
                        object.rtc_id.clone(),
                        mapping::micros_of_ms(object.rtc_timestamp).unwrap(),
                    ),
                    (report.clone(), object.clone()),
                );
            }
        }
    }

    let records = testkit::wait_for_stats_records(&database, TABLE, sent.len(), WAIT).await;
    let stats: Vec<&StoredRecord> = records
        .iter()
        .filter(|r| mapping::is_stats_measure(&r.measure_name))
        .collect();
    let key_of = |record: &StoredRecord| {
        (
            record.dimension("connection_id").unwrap().to_owned(),
            record.dimension("rtc_id").unwrap().to_owned(),
            record.time_us(),
        )
    };
    // Some objects repeat unchanged in a later report. moto keeps every copy; Timestream keeps the
    // first (the later copy has another sora_timestamp_us, so it is a version conflict, which
    // Kohaku counts as a duplicate).
    let distinct: HashSet<_> = stats.iter().map(|r| key_of(r)).collect();
    assert_eq!(distinct.len(), sent.len(), "every stats object is stored");
    for record in &stats {
        let key = key_of(record);
        let (report, object) = sent
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected record {key:?}"));
        assert_eq!(record.measure_name, object.rtc_type);
        assert_eq!(record.dimension("rtc_type"), Some(object.rtc_type.as_str()));
        assert_eq!(
            record.dimension("channel_id"),
            Some(report.channel_id.as_str())
        );
        for name in ["session_id", "client_id"] {
            assert!(
                record.dimension(name).is_some_and(|v| !v.is_empty()),
                "{name}"
            );
        }
        let data: serde_json::Map<String, Value> = serde_json::from_str(&object.text).unwrap();
        for (name, value) in &data {
            if name == "id" || name == "type" {
                continue;
            }
            if let Some((kind, text)) = expected_measure(name, value) {
                assert_eq!(
                    record.measures.get(name),
                    Some(&(kind.to_owned(), text)),
                    "{} {name} of {key:?}",
                    object.rtc_type
                );
            }
            if let Value::Object(members) = value {
                for (member, nested) in members {
                    let flat = format!("{name}{}{member}", mapping::FLATTEN_SEPARATOR);
                    if let Some((_, text)) = expected_measure("", nested) {
                        assert_eq!(record.measure(&flat), Some(text.as_str()), "{flat}");
                    }
                }
            }
        }
    }
    // One summary record per report, at the time of its newest object.
    let summaries: HashSet<(&str, i64)> = records
        .iter()
        .filter(|r| r.measure_name == mapping::SUMMARY_MEASURE)
        .filter(|r| r.measure("stats_objects").is_some())
        .filter_map(|r| Some((r.dimension("connection_id")?, r.time_us())))
        .collect();
    let mut reports: HashSet<(String, i64)> = HashSet::new();
    for file in [
        "chromium/rtc_stats.chromium-av.jsonl",
        "sora-logs/rtc_stats.sample.jsonl",
    ] {
        for report in fixture_reports(file) {
            let newest = report
                .objects
                .iter()
                .map(|object| object.rtc_timestamp)
                .reduce(f64::max)
                .unwrap();
            reports.insert((report.connection_id, mapping::micros_of_ms(newest).unwrap()));
        }
    }
    let summarized: HashSet<(String, i64)> = summaries
        .iter()
        .map(|(connection, time)| ((*connection).to_owned(), *time))
        .collect();
    assert_eq!(summarized, reports, "a summary record per report");
    let with_metadata: HashSet<&str> = records
        .iter()
        .filter(|r| r.measure_name == CONNECTION_MEASURE)
        .filter(|r| r.measure("label") == Some("WebRTC SFU Sora"))
        .filter_map(|r| r.dimension("connection_id"))
        .collect();
    assert_eq!(
        with_metadata,
        connections.iter().map(String::as_str).collect(),
        "each connection's metadata is stored"
    );

    let exporter = H2::connect(served.exporter).await;
    let metrics = exporter.get("/metrics").await.text();
    let requests = metric(
        &metrics,
        "kohaku_sink_write_requests_total{sink=\"timestream\"}",
    )
    .expect("timestream request counter");
    assert!(requests >= 1.0, "{requests}");
    let health = exporter.get("/health").await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_holds_reports_back_until_timestream_answers_again() {
    let proxy = testkit::OutageProxy::start(&testkit::moto_url()).await;
    let database = testkit::fresh_database("outage");
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), &config_text(&proxy.url(), &database, ""));
    let client = H2::connect(served.ingest).await;
    let exporter = H2::connect(served.exporter).await;

    proxy.set_up(false);
    let reports: Vec<Value> = (0..5).map(|seed| small_report(9_000 + seed, 4)).collect();
    for report in &reports {
        assert_eq!(
            client.post_report(report.to_string()).await.status,
            StatusCode::NO_CONTENT
        );
    }
    let health = wait_for_health(&exporter, StatusCode::SERVICE_UNAVAILABLE, WAIT).await;
    assert_eq!(
        health["failing"],
        serde_json::json!(["timestream"]),
        "{health}"
    );
    wait_for_metric(
        &exporter,
        "kohaku_sink_retries_total{sink=\"timestream\"}",
        1.0,
        WAIT,
    )
    .await;
    assert!(testkit::stored_records(&database, TABLE).await.is_empty());

    proxy.set_up(true);
    let records = testkit::wait_for_stats_records(&database, TABLE, 20, WAIT).await;
    let keys: HashSet<(String, String)> = records
        .iter()
        .filter(|r| mapping::is_stats_measure(&r.measure_name))
        .map(|r| {
            (
                r.dimension("connection_id").unwrap().to_owned(),
                r.dimension("rtc_id").unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(keys.len(), 20, "every object of the five reports arrives");
    wait_for_health(&exporter, StatusCode::OK, WAIT).await;
}

#[test]
fn check_config_prints_the_timestream_sink_and_refuses_bad_values_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("k.toml"),
        "[sinks.timestream]\nregion = \"eu-west-1\"\n",
    )
    .unwrap();
    let output = kohaku_command()
        .args(["check-config", "--config", "k.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    for line in [
        "[sinks.timestream]",
        "region = \"eu-west-1\"",
        "database = \"kohaku\"",
        "table = \"rtc_stats\"",
        "create_if_missing = false",
        "max_records_per_write = 100",
    ] {
        assert_contains(&printed, line);
    }

    for (setting, expected) in [
        (
            "max_records_per_write = 101",
            "max_records_per_write is 101; Timestream takes 1 to 100 records per WriteRecords",
        ),
        ("table = \"x\"", "table \"x\""),
        (
            "memory_store_retention_hours = 0",
            "memory_store_retention_hours is 0",
        ),
        ("access_key_id = \"AKIA\"", "unknown field `access_key_id`"),
    ] {
        std::fs::write(
            dir.path().join("bad.toml"),
            format!("[sinks.timestream]\n{setting}\n"),
        )
        .unwrap();
        let output = kohaku_command()
            .args(["check-config", "--config", "bad.toml"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{setting} must be refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_contains(&stderr, "bad.toml");
        assert_contains(&stderr, expected);
    }
}
