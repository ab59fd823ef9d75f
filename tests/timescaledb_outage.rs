//! PostgreSQL stopped for seconds under a steady stream of reports, then started again, with the
//! durable spool on. Every other report is a stats webhook over HTTP/1.1, the rest exporter
//! reports over HTTP/2. This binary stops the shared test cluster, so it holds this one test only
//! (cargo runs test binaries one after another).
#![cfg(all(feature = "timescaledb", feature = "testkit"))]

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use kohaku::config::{SinksConfig, SpoolConfig, TimescaleSinkConfig};
use kohaku_timescaledb::testkit;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_nothing_acknowledged() {
    let url = testkit::fresh_database("outage").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.pipeline.retry_max_backoff_ms = 200;
    config.spool = Some(SpoolConfig {
        dir: dir.path().join("spool"),
        ..SpoolConfig::default()
    });
    config.sinks = Some(SinksConfig {
        sqlite: None,
        timescaledb: Some(TimescaleSinkConfig {
            compress_after_days: 0,
            statement_timeout_secs: 5,
            ..timescaledb_config(&url)
        }),
        ..SinksConfig::default()
    });
    let app = start(&config, build_sinks(&config).await).await;
    let client = H2::connect(app.ingest_addr()).await;
    let webhook_client = std::sync::Arc::new(H1::connect(app.ingest_addr()).await);
    let exporter = H2::connect(app.exporter_addr()).await;

    let objects_per_report = 8;
    let mut acknowledged = 0i64;
    let mut seed = 0u64;
    let mut send = |count: usize| {
        let client = client.clone();
        let webhook_client = std::sync::Arc::clone(&webhook_client);
        let first = seed;
        seed += count as u64;
        async move {
            let mut accepted = 0i64;
            for s in first..first + count as u64 {
                let answer = if s % 2 == 0 {
                    client
                        .post_report(small_report(s, objects_per_report).to_string())
                        .await
                } else {
                    webhook_client
                        .post_webhook(
                            WEBHOOK_PATH,
                            small_webhook(s, objects_per_report).to_string(),
                        )
                        .await
                };
                // The spool holds the outage: nothing is refused.
                assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
                accepted += objects_per_report as i64;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            accepted
        }
    };

    acknowledged += send(50).await;
    testkit::stop_server();
    let outage = std::time::Instant::now();
    // A steady stream for several seconds while the database is down.
    acknowledged += send(300).await;

    // While it is down, health names the sink and retries are counted.
    let health = exporter.get("/health").await;
    assert_eq!(
        health.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        health.text()
    );
    assert_eq!(health.json()["failing"], serde_json::json!(["timescaledb"]));
    assert!(
        wait_for_metric(
            &exporter,
            "kohaku_sink_retries_total{sink=\"timescaledb\"}",
            1.0,
            Duration::from_secs(10)
        )
        .await
            >= 1.0
    );

    testkit::start_server();
    let outage = outage.elapsed();
    acknowledged += send(50).await;
    let sent = seed as i64 * objects_per_report as i64;

    let stored = wait_for_postgres_rows(&url, acknowledged, Duration::from_secs(30)).await;
    assert_eq!(
        stored, acknowledged,
        "every acknowledged object is stored exactly once"
    );
    assert_eq!(
        testkit::count(&url, "SELECT count(*) FROM (SELECT DISTINCT connection_id, rtc_id, rtc_timestamp FROM rtc_stats) d").await,
        acknowledged
    );
    // The webhook reports sent during the outage kept their group.
    let groups = testkit::count(
        &url,
        "SELECT count(*) FROM sora_connection WHERE group_id = 'G' || split_part(connection_id, 'C', 2)",
    )
    .await;
    assert_eq!(groups, seed as i64 / 2, "one webhook connection in two");
    wait_for_health(&exporter, StatusCode::OK, Duration::from_secs(10)).await;
    eprintln!(
        "outage of {:.1} s: sent {sent} objects, acknowledged {acknowledged}, stored {stored}",
        outage.as_secs_f64()
    );
    let summary = app.shutdown().await;
    assert_eq!(summary.dropped_rows, 0);
}
