//! `[pipeline] skip_unchanged` end to end: the real Chromium and Sora captures sent as Sora's
//! webhooks, and what SQLite stored compared with an independent computation of which objects
//! changed.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::*;
use http::StatusCode;
use kohaku::config::{SinksConfig, SkipMode, SkipUnchanged, SqliteSinkConfig};
use serde_json::Value;

type Key = (String, String, u64);

fn config(db: &std::path::Path, skip: SkipUnchanged) -> kohaku::config::Config {
    let mut config = test_config();
    config.pipeline.skip_unchanged = skip;
    config.sinks = Some(SinksConfig {
        sqlite: Some(SqliteSinkConfig {
            path: db.to_path_buf(),
            ..SqliteSinkConfig::default()
        }),
        ..SinksConfig::default()
    });
    config
}

/// The objects a user would expect stored: per `(connection, id)`, the first, and every one whose
/// members other than `timestamp` differ from the previous one stored. Computed on parsed JSON,
/// not on text, so it does not share Kohaku's method. Also how many were later repeats (a
/// capture can hold the very same object twice, which the store deduplicates instead).
fn expected_changes(reports: &[FixtureReport], types: Option<&[&str]>) -> (BTreeSet<Key>, usize) {
    let mut last: HashMap<(String, String), (Value, f64)> = HashMap::new();
    let mut kept = BTreeSet::new();
    let mut repeats = 0;
    for report in reports {
        for object in &report.objects {
            let mut content: Value = serde_json::from_str(&object.text).unwrap();
            content.as_object_mut().unwrap().remove("timestamp");
            let key = (report.connection_id.clone(), object.rtc_id.clone());
            let covered = types.is_none_or(|types| types.contains(&object.rtc_type.as_str()));
            match last.get(&key) {
                Some((previous, at)) if covered && *previous == content => {
                    if object.rtc_timestamp > *at {
                        repeats += 1;
                    }
                }
                _ => {
                    kept.insert((
                        report.connection_id.clone(),
                        object.rtc_id.clone(),
                        object.rtc_timestamp.to_bits(),
                    ));
                    last.insert(key, (content, object.rtc_timestamp));
                }
            }
        }
    }
    (kept, repeats)
}

async fn send_all(reports: &[FixtureReport], skip: SkipUnchanged) -> (BTreeSet<Key>, f64) {
    send_all_with(reports, skip, false).await
}

async fn send_all_with(
    reports: &[FixtureReport],
    skip: SkipUnchanged,
    spooled: bool,
) -> (BTreeSet<Key>, f64) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("stats.db");
    let mut config = config(&db, skip);
    if spooled {
        config.spool = Some(kohaku::config::SpoolConfig {
            dir: dir.path().join("spool"),
            ..kohaku::config::SpoolConfig::default()
        });
    }
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;
    for report in reports {
        let answer = client.post_webhook(WEBHOOK_PATH, report.body.clone()).await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    }
    let exporter = H2::connect(app.exporter_addr()).await;
    let received: usize = reports.iter().map(|r| r.objects.len()).sum();
    let metrics = exporter.get("/metrics").await.text();
    let unchanged: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("kohaku_stats_objects_unchanged_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // Every object accepted is handled once the sink's written and duplicate rows add up to it.
    let accepted = received as f64 - unchanged;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = exporter.get("/metrics").await.text();
        let handled = ["written", "duplicate"]
            .iter()
            .filter_map(|what| {
                metric(
                    &text,
                    &format!("kohaku_sink_rows_{what}_total{{sink=\"sqlite\"}}"),
                )
            })
            .sum::<f64>();
        if handled >= accepted || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.shutdown().await;
    let stored = sqlite_rows(&db).iter().map(StoredRow::key).collect();
    (stored, unchanged)
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

fn fixtures() -> Vec<FixtureReport> {
    let mut reports = fixture_webhooks("chromium/rtc_stats.chromium-av.jsonl");
    reports.extend(fixture_webhooks("sora-logs/rtc_stats.sample.jsonl"));
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_types_store_exactly_the_objects_that_changed() {
    let reports = fixtures();
    let (expected, repeats) = expected_changes(&reports, None);
    let received: usize = reports.iter().map(|r| r.objects.len()).sum();
    assert!(
        repeats > received / 5,
        "the captures repeat objects: {repeats} of {received}"
    );
    let (stored, unchanged) = send_all(&reports, SkipUnchanged::Mode(SkipMode::All)).await;
    assert_eq!(stored, expected);
    assert_eq!(unchanged as usize, repeats);
}

/// With the spool the decision is the same: it is taken before the report is spooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_stores_exactly_the_objects_that_changed() {
    let reports = fixtures();
    let (expected, repeats) = expected_changes(&reports, None);
    let (stored, unchanged) =
        send_all_with(&reports, SkipUnchanged::Mode(SkipMode::All), true).await;
    assert_eq!(stored, expected);
    assert_eq!(unchanged as usize, repeats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_types_checks_only_those() {
    let reports = fixtures();
    let types = ["certificate", "codec"];
    let (expected, _) = expected_changes(&reports, Some(&types));
    let (stored, _) = send_all(
        &reports,
        SkipUnchanged::Types(types.iter().map(|t| t.to_string()).collect()),
    )
    .await;
    assert_eq!(stored, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_stores_every_object() {
    let reports = fixtures();
    let every: BTreeSet<Key> = reports
        .iter()
        .flat_map(|report| {
            report.objects.iter().map(|object| {
                (
                    report.connection_id.clone(),
                    object.rtc_id.clone(),
                    object.rtc_timestamp.to_bits(),
                )
            })
        })
        .collect();
    let (stored, unchanged) = send_all(&reports, SkipUnchanged::Mode(SkipMode::Off)).await;
    assert_eq!(stored, every);
    assert_eq!(unchanged, 0.0);
}

/// `kohaku import` of the same captures stores the same objects, and importing the file again
/// after a live run stores nothing new: the first object of each key after the restart is a
/// stored repeat at worst, and here it is the very row already stored.
#[test]
fn import_stores_exactly_the_objects_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let files = [
        fixture_path("chromium/rtc_stats.chromium-av.jsonl"),
        fixture_path("sora-logs/rtc_stats.sample.jsonl"),
    ];
    let config = "[pipeline]\nskip_unchanged = \"all\"\n[sinks.sqlite]\npath = \"stats.db\"\n";
    import_files(dir.path(), config, &files);
    let stored: BTreeSet<Key> = sqlite_rows(&dir.path().join("stats.db"))
        .iter()
        .map(StoredRow::key)
        .collect();
    let (expected, _) = expected_changes(&fixtures(), None);
    assert_eq!(stored, expected);

    let again = import_files(dir.path(), config, &files);
    assert_contains(&again, "sink sqlite: written 0,");
}

/// The cases a user would check by hand: a repeat is skipped; a member going to `null` is a
/// change; a value that flips back to an earlier state is stored (legacy Kohaku lost those);
/// a report older than what was accepted is stored and does not make a later repeat of the newer
/// state look changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nulls_flip_backs_and_late_reports_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("stats.db");
    let config = config(&db, SkipUnchanged::Mode(SkipMode::All));
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;
    let body = |objects: Vec<Value>| {
        let mut body = small_webhook(1, 0);
        body["stats"] = Value::from(objects);
        body.to_string()
    };
    let x = |at: f64, a: Value| serde_json::json!({"id": "X", "type": "codec", "timestamp": at, "a": a});
    let y = |at: f64, v: Value| serde_json::json!({"id": "Y", "type": "transport", "timestamp": at, "v": v});
    let sends = [
        vec![x(1000.0, 1.into()), y(1000.0, 1.into())],
        vec![x(2000.0, 1.into()), y(2000.0, Value::Null)],
        vec![x(3000.0, 2.into())],
        vec![x(4000.0, 1.into())],
        vec![x(6000.0, 3.into())],
        vec![x(5000.0, 3.into())],
        vec![x(7000.0, 3.into())],
    ];
    for objects in sends {
        let answer = client.post_webhook(WEBHOOK_PATH, body(objects)).await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    }
    wait_for_sqlite_rows(&db, 7, WAIT).await;
    app.shutdown().await;
    let stored: BTreeSet<(String, u64)> = sqlite_rows(&db)
        .iter()
        .map(|row| (row.rtc_id.clone(), row.rtc_timestamp as u64))
        .collect();
    let expected: BTreeSet<(String, u64)> = [
        ("X", 1000),
        ("X", 3000),
        ("X", 4000),
        ("X", 5000),
        ("X", 6000),
        ("Y", 1000),
        ("Y", 2000),
    ]
    .into_iter()
    .map(|(id, at)| (id.to_owned(), at))
    .collect();
    assert_eq!(stored, expected);
}

/// A report answered 503 is not remembered: its change, sent again later, is stored, not taken
/// for a repeat. The queue is really full: one slot, held by a report its sink cannot write yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_answered_503_does_not_count_as_stored() {
    let sink = kohaku_sink::testkit::ControlledSink::new("controlled");
    let mut config = test_config();
    config.pipeline.skip_unchanged = SkipUnchanged::Mode(SkipMode::All);
    config.pipeline.queue_max_rows = 1;
    config.pipeline.batch_max_rows = 1;
    let app = start(&config, vec![sink.clone()]).await;
    let client = H2::connect(app.ingest_addr()).await;
    let body = |at: f64, a: i64| {
        let mut body = small_webhook(1, 0);
        body["stats"] = serde_json::json!([{"id": "X", "type": "codec", "timestamp": at, "a": a}]);
        body.to_string()
    };
    sink.block();
    let first = client.post_webhook(WEBHOOK_PATH, body(1000.0, 1)).await;
    assert_eq!(first.status, StatusCode::NO_CONTENT, "{}", first.text());
    let refused = client.post_webhook(WEBHOOK_PATH, body(2000.0, 2)).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text()
    );
    assert_eq!(refused.json()["field"], "queue");
    sink.unblock();
    assert!(sink.wait_for_rows(1, WAIT).await);
    // The change refused above, resent with a later time: stored, not skipped.
    let resent = client.post_webhook(WEBHOOK_PATH, body(3000.0, 2)).await;
    assert_eq!(resent.status, StatusCode::NO_CONTENT, "{}", resent.text());
    assert!(
        sink.wait_for_rows(2, WAIT).await,
        "the change was taken for a repeat"
    );
    let connection = sora_id(1);
    assert!(sink.stored_object(&connection, "X", 3000.0).is_some());
    app.shutdown().await;
}
