//! End to end into a real PostgreSQL (the throwaway cluster of scripts/test).
#![cfg(all(feature = "timescaledb", feature = "testkit"))]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use http::StatusCode;
use kohaku::config::{SinksConfig, SqliteSinkConfig};
use kohaku_timescaledb::testkit;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// The test config with one sink: PostgreSQL at `url`.
fn postgres_only(url: &str) -> kohaku::config::Config {
    let mut config = test_config();
    config.sinks = Some(SinksConfig {
        sqlite: None,
        timescaledb: Some(timescaledb_config(url)),
        ..SinksConfig::default()
    });
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reach_postgres_and_sqlite_with_equal_json() {
    let url = testkit::fresh_database("e2e").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.sinks = Some(SinksConfig {
        sqlite: Some(SqliteSinkConfig {
            path: dir.path().join("fanout.db"),
            ..SqliteSinkConfig::default()
        }),
        timescaledb: Some(timescaledb_config(&url)),
        ..SinksConfig::default()
    });
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;

    let mut sent: HashMap<(String, String, u64), (String, Value)> = HashMap::new();
    for file in [
        "chromium/rtc_stats.chromium-av.jsonl",
        "sora-logs/rtc_stats.sample.jsonl",
    ] {
        for report in fixture_reports(file) {
            assert_eq!(
                client.post_report(report.body.clone()).await.status,
                StatusCode::NO_CONTENT
            );
            for object in &report.objects {
                let key = (
                    report.connection_id.clone(),
                    object.rtc_id.clone(),
                    object.rtc_timestamp.to_bits(),
                );
                sent.insert(
                    key,
                    (
                        object.rtc_type.clone(),
                        serde_json::from_str(&object.text).unwrap(),
                    ),
                );
            }
        }
    }
    let distinct = sent.len() as i64;
    assert_eq!(wait_for_postgres_rows(&url, distinct, WAIT).await, distinct);
    assert_eq!(
        wait_for_sqlite_rows(&dir.path().join("fanout.db"), distinct, WAIT).await,
        distinct
    );

    for row in testkit::stored_rows(&url).await {
        let key = row.key();
        let (rtc_type, json) = sent
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected row {key:?}"));
        assert_eq!(&row.rtc_type, rtc_type);
        let stored: Value = serde_json::from_str(&row.rtc_data).unwrap();
        assert_eq!(&stored, json, "jsonb of {key:?} differs from what was sent");
    }
    let connections = testkit::count(&url, "SELECT count(*) FROM sora_connection").await;
    assert_eq!(connections, 5, "2 Chromium + 3 Sora connections");
    // The typed views read the stored rows.
    let inbound = testkit::count(
        &url,
        "SELECT count(*) FROM rtc_inbound_rtp WHERE bytes_received >= 0",
    )
    .await;
    assert_eq!(inbound, 24 + 66);

    let exporter = H2::connect(app.exporter_addr()).await;
    let metrics = exporter.get("/metrics").await.text();
    for sink in ["sqlite", "timescaledb"] {
        let written = metric(
            &metrics,
            &format!("kohaku_sink_rows_written_total{{sink=\"{sink}\"}}"),
        );
        assert_eq!(written, Some(distinct as f64), "{sink}");
    }
    assert!(
        metric(
            &metrics,
            "kohaku_sink_retention_runs_total{sink=\"timescaledb\"}"
        )
        .is_some(),
        "{metrics}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reports_twice_are_stored_once() {
    let url = testkit::fresh_database("dedupe").await;
    let config = postgres_only(&url);
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;
    let reports: Vec<String> = (0..10)
        .map(|seed| small_report(seed, 6).to_string())
        .collect();
    for _ in 0..2 {
        for body in &reports {
            assert_eq!(
                client.post_report(body.clone()).await.status,
                StatusCode::NO_CONTENT
            );
        }
    }
    let exporter = H2::connect(app.exporter_addr()).await;
    let duplicates = wait_for_metric(
        &exporter,
        "kohaku_sink_rows_duplicate_total{sink=\"timescaledb\"}",
        60.0,
        WAIT,
    )
    .await;
    assert_eq!(duplicates, 60.0);
    assert_eq!(
        testkit::count(&url, "SELECT count(*) FROM rtc_stats").await,
        60
    );
    app.shutdown().await;
}

/// Current Sora's stats webhook into PostgreSQL: what Sora's and Chromium's logs hold, posted as
/// webhooks over HTTP/1.1, is stored with the JSON that was sent and the connection's group; then
/// `kohaku import` of the same logs stores nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_reach_postgres_with_their_group_and_a_later_import_adds_nothing() {
    let url = testkit::fresh_database("webhook").await;
    let config = postgres_only(&url);
    let app = start(&config, build_sinks(&config).await).await;
    let client = H1::connect(app.ingest_addr()).await;
    let files = [
        "chromium/rtc_stats.chromium-av.jsonl",
        "sora-logs/rtc_stats.sample.jsonl",
    ];
    let mut sent: HashMap<(String, String, u64), Value> = HashMap::new();
    let mut groups: HashMap<String, Option<String>> = HashMap::new();
    for file in files {
        for report in fixture_webhooks(file) {
            let answer = client.post_webhook(WEBHOOK_PATH, report.body.clone()).await;
            assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
            groups.insert(report.connection_id.clone(), report.group_id.clone());
            for object in &report.objects {
                sent.insert(
                    (
                        report.connection_id.clone(),
                        object.rtc_id.clone(),
                        object.rtc_timestamp.to_bits(),
                    ),
                    serde_json::from_str(&object.text).unwrap(),
                );
            }
        }
    }
    let distinct = sent.len() as i64;
    assert_eq!(wait_for_postgres_rows(&url, distinct, WAIT).await, distinct);
    for row in testkit::stored_rows(&url).await {
        let key = row.key();
        let json = sent
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected row {key:?}"));
        let stored: Value = serde_json::from_str(&row.rtc_data).unwrap();
        assert_eq!(&stored, json, "jsonb of {key:?} differs from what was sent");
    }
    let stored_groups = testkit::query_json(
        &url,
        "SELECT connection_id, group_id FROM sora_connection ORDER BY connection_id",
    )
    .await
    .unwrap();
    assert_eq!(stored_groups.len(), groups.len());
    for connection in stored_groups {
        let id = connection["connection_id"].as_str().unwrap();
        assert_eq!(
            connection["group_id"].as_str(),
            groups[id].as_deref(),
            "group_id of {id}"
        );
    }
    assert!(
        groups.values().any(Option::is_some),
        "Sora's log has groups"
    );
    app.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let stdout = import_files(
        dir.path(),
        &format!("{STORE_EVERY_OBJECT}[sinks.timescaledb]\nuri = \"{url}\"\nretention_days = 0\n"),
        &files.map(fixture_path),
    );
    assert_contains(&stdout, "sink timescaledb: written 0,");
    assert_eq!(
        testkit::count(&url, "SELECT count(*) FROM rtc_stats").await,
        distinct
    );
}

/// An operator's mistake fixed within minutes costs nothing: with INSERT revoked from Kohaku's
/// role, writes fail with SQLSTATE 42501, are retried rather than dropped, and `/health` names the
/// problem; once INSERT is granted again every acknowledged object is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_privilege_is_retried_until_granted_and_loses_nothing() {
    revoked_privilege("kohaku_revoke", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_privilege_is_retried_until_granted_and_loses_nothing_with_the_spool() {
    let spool = tempfile::tempdir().unwrap();
    revoked_privilege("kohaku_revoke_spool", Some(spool.path())).await;
}

async fn revoked_privilege(role: &str, spool: Option<&std::path::Path>) {
    let (admin, url) = testkit::fresh_database_owned_by(role, role).await;
    let mut config = postgres_only(&url);
    config.pipeline.retry_max_backoff_ms = 200;
    config.spool = spool.map(|dir| kohaku::config::SpoolConfig {
        dir: dir.to_path_buf(),
        ..kohaku::config::SpoolConfig::default()
    });
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;
    let exporter = H2::connect(app.exporter_addr()).await;
    let objects_per_report = 5;
    let mut acknowledged = 0i64;
    let send = |range: std::ops::Range<u64>| {
        let client = client.clone();
        async move {
            let mut accepted = 0i64;
            for seed in range {
                let answer = client
                    .post_report(small_report(seed, objects_per_report).to_string())
                    .await;
                assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
                accepted += objects_per_report as i64;
            }
            accepted
        }
    };
    acknowledged += send(0..10).await;
    assert_eq!(
        wait_for_postgres_rows(&url, acknowledged, WAIT).await,
        acknowledged
    );

    testkit::execute(&admin, &format!("REVOKE INSERT ON rtc_stats FROM {role}"))
        .await
        .unwrap();
    acknowledged += send(10..40).await;
    let health = wait_for_health(&exporter, StatusCode::SERVICE_UNAVAILABLE, WAIT).await;
    assert_eq!(health["failing"], serde_json::json!(["timescaledb"]));
    assert_contains(&health.to_string(), "may not write rtc_stats");
    assert!(
        wait_for_metric(
            &exporter,
            "kohaku_sink_retries_total{sink=\"timescaledb\"}",
            2.0,
            WAIT
        )
        .await
            >= 2.0
    );
    let dropped = metric(
        &exporter.get("/metrics").await.text(),
        "kohaku_sink_rows_dropped_total{sink=\"timescaledb\"}",
    );
    assert_eq!(
        dropped,
        Some(0.0),
        "nothing given up while the privilege is missing"
    );

    testkit::execute(&admin, &format!("GRANT INSERT ON rtc_stats TO {role}"))
        .await
        .unwrap();
    assert_eq!(
        wait_for_postgres_rows(&url, acknowledged, WAIT).await,
        acknowledged
    );
    wait_for_health(&exporter, StatusCode::OK, WAIT).await;
    assert_eq!(
        testkit::count(&url, "SELECT count(*) FROM (SELECT DISTINCT connection_id, rtc_id, rtc_timestamp FROM rtc_stats) d").await,
        acknowledged,
        "each acknowledged object once"
    );
    assert_eq!(app.shutdown().await.dropped_rows, 0);
}

/// With the privilege missing and no write going on, `/health` still says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_red_while_the_role_may_not_write() {
    let (admin, url) = testkit::fresh_database_owned_by("revoke_idle", "kohaku_revoke_idle").await;
    let config = postgres_only(&url);
    let app = start(&config, build_sinks(&config).await).await;
    let exporter = H2::connect(app.exporter_addr()).await;
    wait_for_health(&exporter, StatusCode::OK, WAIT).await;
    testkit::execute(&admin, "REVOKE INSERT ON rtc_stats FROM kohaku_revoke_idle")
        .await
        .unwrap();
    let health = wait_for_health(&exporter, StatusCode::SERVICE_UNAVAILABLE, WAIT).await;
    assert_contains(&health.to_string(), "may not write rtc_stats");
    testkit::execute(&admin, "GRANT INSERT ON rtc_stats TO kohaku_revoke_idle")
        .await
        .unwrap();
    wait_for_health(&exporter, StatusCode::OK, WAIT).await;
    app.shutdown().await;
}

/// `kohaku migrate` as an operator runs it before a rollout: on TimescaleDB the server's own
/// advice (NOTICE/WARNING about segmenting columns) is not repeated as Kohaku's warnings, and a
/// second run changes nothing.
#[test]
fn migrate_logs_kohakus_lines_only_and_is_repeatable() {
    let url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(testkit::fresh_database("migrate_cli"));
    let dir = tempfile::tempdir().unwrap();
    // Apache-only TimescaleDB has no compression: asking for it is worth its warning.
    let compression = if testkit::server_flavor() == "apache" {
        "compress_after_days = 0\n"
    } else {
        ""
    };
    std::fs::write(
        dir.path().join("k.toml"),
        format!("[sinks.timescaledb]\nuri = \"{url}\"\n{compression}"),
    )
    .unwrap();
    for run in 0..2 {
        let output = kohaku_command()
            .current_dir(dir.path())
            .args(["migrate", "--config", "k.toml"])
            .output()
            .expect("kohaku migrate runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "run {run}: {text}");
        assert!(!text.contains("segmenting"), "run {run}: {text}");
        assert!(
            !text.contains("\"level\":\"WARN\""),
            "run {run}: no warnings on a healthy server: {text}"
        );
        if run == 1 {
            assert!(
                !text.contains("policy updated"),
                "nothing to change: {text}"
            );
        }
    }
}
