//! PostgreSQL stopped for seconds under a steady stream of reports, then started again, with the
//! durable spool on. This binary stops the shared test cluster, so it holds this one test only
//! (cargo runs test binaries one after another).
#![cfg(feature = "timescaledb")]

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
    let exporter = H2::connect(app.exporter_addr()).await;

    let objects_per_report = 8;
    let mut acknowledged = 0i64;
    let mut seed = 0u64;
    let mut send = |count: usize| {
        let client = client.clone();
        let first = seed;
        seed += count as u64;
        async move {
            let mut accepted = 0i64;
            for s in first..first + count as u64 {
                let answer = client
                    .post_report(small_report(s, objects_per_report).to_string())
                    .await;
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
    wait_for_health(&exporter, StatusCode::OK, Duration::from_secs(10)).await;
    eprintln!(
        "outage of {:.1} s: sent {sent} objects, acknowledged {acknowledged}, stored {stored}",
        outage.as_secs_f64()
    );
    let summary = app.shutdown().await;
    assert_eq!(summary.dropped_rows, 0);
}
