//! End to end over real HTTP/2: Sora's requests in, rows in a real SQLite file out.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use kohaku_sink::testkit::ControlledSink;
use kohaku_sink::StatsSink;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_reports_are_stored_whole_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, db) = sqlite_sink(dir.path()).await;
    let app = start(&test_config(), vec![sink]).await;
    let client = H2::connect(app.ingest_addr()).await;

    let mut expected = Vec::new();
    for file in [
        "chromium/rtc_stats.chromium-av.jsonl",
        "sora-logs/rtc_stats.sample.jsonl",
    ] {
        for report in fixture_reports(file) {
            let answer = client.post_report(report.body.clone()).await;
            assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
            assert!(answer.body.is_empty());
            expected.push(report);
        }
    }
    let objects: usize = expected.iter().map(|r| r.objects.len()).sum();
    assert_eq!(objects, 392 + 378, "every fixture line is one object");
    // Chromium repeats remote-inbound/outbound-rtp objects unchanged (same id, same timestamp)
    // until the next RTCP report: the idempotency key stores each once.
    let distinct: std::collections::HashSet<(String, String, u64)> = expected
        .iter()
        .flat_map(|r| {
            r.objects.iter().map(|o| {
                (
                    r.connection_id.clone(),
                    o.rtc_id.clone(),
                    o.rtc_timestamp.to_bits(),
                )
            })
        })
        .collect();
    assert_eq!(distinct.len(), 374 + 378);
    let distinct = distinct.len() as i64;
    assert_eq!(wait_for_sqlite_rows(&db, distinct, WAIT).await, distinct);

    let rows = sqlite_rows(&db);
    let stored: std::collections::HashMap<(String, String, u64), &StoredRow> =
        rows.iter().map(|row| (row.key(), row)).collect();
    for report in &expected {
        for object in &report.objects {
            let key = (
                report.connection_id.clone(),
                object.rtc_id.clone(),
                object.rtc_timestamp.to_bits(),
            );
            let row = stored
                .get(&key)
                .unwrap_or_else(|| panic!("object {key:?} missing from rtc_stats"));
            let sent: Value = serde_json::from_str(&object.text).unwrap();
            let kept: Value = serde_json::from_str(&row.rtc_data).unwrap();
            assert_eq!(kept, sent, "rtc_data of {key:?} differs");
            assert_eq!(
                row.rtc_data, object.text,
                "rtc_data of {key:?} is not the text sent"
            );
            assert_eq!(row.rtc_type, object.rtc_type);
            assert_eq!(row.channel_id, report.channel_id);
        }
    }
    // Nested values and integers beyond 2^53 survive.
    let pair = rows
        .iter()
        .find(|row| row.rtc_type == "candidate-pair" && row.rtc_data.contains("\"priority\""))
        .expect("a candidate pair with priority");
    let priority = serde_json::from_str::<Value>(&pair.rtc_data).unwrap()["priority"].clone();
    assert!(priority.as_u64().is_some_and(|p| p > 1 << 53), "{priority}");
    assert!(rows
        .iter()
        .any(|row| row.rtc_data.contains("\"qualityLimitationDurations\":{")));
    // Times are ISO-8601 UTC with microseconds.
    assert!(rows
        .iter()
        .all(|row| row.sora_timestamp.len() == 27 && row.sora_timestamp.ends_with('Z')));
    assert!(rows.iter().all(|row| row.received_at.ends_with('Z')));

    let connections = sqlite_count(&db, "SELECT count(*) FROM sora_connection");
    let distinct: std::collections::HashSet<_> =
        expected.iter().map(|r| &r.connection_id).collect();
    assert_eq!(connections, distinct.len() as i64);
    let roles = sqlite_count(
        &db,
        "SELECT count(*) FROM sora_connection WHERE role IN ('sendrecv','sendonly','recvonly') AND label = 'WebRTC SFU Sora' AND first_seen <= last_seen",
    );
    assert_eq!(roles, connections);
    // The Sora log has no `multistream`: stored as NULL.
    assert!(
        sqlite_count(
            &db,
            "SELECT count(*) FROM sora_connection WHERE multistream IS NULL"
        ) > 0
    );

    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_report_twice_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, db) = sqlite_sink(dir.path()).await;
    let app = start(&test_config(), vec![sink]).await;
    let client = H2::connect(app.ingest_addr()).await;
    let exporter = H2::connect(app.exporter_addr()).await;

    let body = small_report(1, 5).to_string();
    assert_eq!(
        client.post_report(body.clone()).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(wait_for_sqlite_rows(&db, 5, WAIT).await, 5);
    assert_eq!(
        client.post_report(body).await.status,
        StatusCode::NO_CONTENT
    );
    let duplicates = wait_for_metric(
        &exporter,
        "kohaku_sink_rows_duplicate_total{sink=\"sqlite\"}",
        5.0,
        WAIT,
    )
    .await;
    assert_eq!(duplicates, 5.0);
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), 5);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams_are_all_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, db) = sqlite_sink(dir.path()).await;
    let app = start(&test_config(), vec![sink]).await;
    // Like Sora's exporter: a few long-lived connections, many streams each.
    let connections = 4;
    let per_connection = 50;
    let objects = 7;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let client = H2::connect(app.ingest_addr()).await;
        for r in 0..per_connection {
            let client = client.clone();
            let body = small_report(c * 1000 + r, objects).to_string();
            tasks.push(tokio::spawn(async move {
                client.post_report(body).await.status
            }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::NO_CONTENT);
    }
    let total = (connections * per_connection) as i64 * objects as i64;
    assert_eq!(wait_for_sqlite_rows(&db, total, WAIT).await, total);
    assert_eq!(
        sqlite_count(&db, "SELECT count(*) FROM sora_connection"),
        (connections * per_connection) as i64
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_json_error_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, db) = sqlite_sink(dir.path()).await;
    let mut config = test_config();
    config.server.max_body_bytes = 64 * 1024;
    let app = start(&config, vec![sink]).await;
    let client = H2::connect(app.ingest_addr()).await;

    let cases: Vec<(&str, String, &str)> = {
        let mut cases = vec![
            ("truncated JSON", "{\"type\": ".to_owned(), "type"),
            ("malformed JSON", "{\"type\" \"x\"}".to_owned(), "body"),
            ("not an object", "[1,2]".to_owned(), "body"),
        ];
        for field in [
            "type",
            "timestamp",
            "label",
            "version",
            "node_name",
            "simulcast",
            "spotlight",
            "role",
            "channel_id",
            "session_id",
            "client_id",
            "connection_id",
            "stats",
        ] {
            let mut body = small_report(1, 2);
            body.as_object_mut().unwrap().remove(field);
            cases.push(("missing field", body.to_string(), field));
        }
        for (field, bad) in [
            ("simulcast", Value::from("false")),
            ("role", Value::from("viewer")),
            ("session_id", Value::from("too-short")),
            ("channel_id", Value::from("")),
            ("timestamp", Value::from(1753423611)),
            ("stats", Value::from("none")),
            // Valid RFC 3339, out of range in UTC: used to panic and reset the stream.
            ("timestamp", Value::from("9999-12-31T23:59:59-01:00")),
            // Valid for Kohaku's parser, refused by PostgreSQL: used to be acknowledged and
            // then slow every batch it was in.
            ("timestamp", Value::from("0000-01-01T00:00:00Z")),
            ("channel_id", Value::from("with\u{0}nul")),
            ("connection_id", Value::from("🎥".repeat(26))),
        ] {
            let mut body = small_report(1, 2);
            body[field] = bad;
            cases.push(("invalid field", body.to_string(), field));
        }
        for (object, field) in [
            (
                serde_json::json!({"type": "codec", "timestamp": 1.0}),
                "stats[1].id",
            ),
            (
                serde_json::json!({"id": "C1", "timestamp": 1.0}),
                "stats[1].type",
            ),
            (
                serde_json::json!({"id": "C1", "type": "codec"}),
                "stats[1].timestamp",
            ),
            (
                serde_json::json!({"id": "C1", "type": "codec", "timestamp": 1.0, "deep": deep_value(100)}),
                "stats[1]",
            ),
            (
                serde_json::json!({"id": "C1", "type": "codec", "timestamp": 1e300}),
                "stats[1].timestamp",
            ),
            (
                serde_json::json!({"id": "C1", "type": "codec", "timestamp": 1.0, "x": "a\u{0}b"}),
                "stats[1]",
            ),
        ] {
            let mut body = small_report(1, 2);
            body["stats"][1] = object;
            cases.push(("bad stats object", body.to_string(), field));
        }
        cases
    };
    for (case, body, field) in &cases {
        let answer = client.post_report(body.clone()).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{case} {field}: {}",
            answer.text()
        );
        assert_eq!(answer.headers["content-type"], "application/json");
        let error = answer.json();
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{case}: {error}"
        );
        assert_eq!(error["field"], *field, "{case}: {error}");
    }

    // Wrong and missing exporter type.
    for exporter_type in [Some("node.erlang-vm"), None] {
        let mut request = client
            .request(Method::POST, "/collector")
            .header("content-type", "application/json");
        if let Some(value) = exporter_type {
            request = request.header("x-sora-stats-exporter-type", value);
        }
        let request = request
            .body(Full::new(Bytes::from(small_report(1, 2).to_string())))
            .unwrap();
        let answer = client.send(request).await.unwrap();
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        let error = answer.json();
        assert_eq!(error["field"], "x-sora-stats-exporter-type");
        if let Some(value) = exporter_type {
            assert!(error["error"].as_str().unwrap().contains(value), "{error}");
        }
    }

    // Wrong content type.
    let request = client
        .request(Method::POST, "/collector")
        .header(EXPORTER_TYPE.0, EXPORTER_TYPE.1)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(small_report(1, 2).to_string())))
        .unwrap();
    let answer = client.send(request).await.unwrap();
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(answer.json()["field"], "content-type");

    // Too large: declared and streamed.
    let huge = small_report(1, 2000).to_string();
    assert!(huge.len() > 64 * 1024);
    let answer = client.post_report(huge).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.json()["field"], "body");
    assert!(answer.json()["error"]
        .as_str()
        .unwrap()
        .contains("max_body_bytes"));

    // Unknown path and wrong method.
    let answer = client.get("/nope").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["field"], "path");
    let answer = client.get("/collector").await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.headers["allow"], "POST");

    // HTTP/1.1 on /collector.
    let answer = http1_post(app.ingest_addr(), small_report(1, 2).to_string()).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["field"], "version");

    // Nothing refused was stored, and the same connection still works.
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), 0);
    assert_eq!(
        client
            .post_report(small_report(2, 3).to_string())
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(wait_for_sqlite_rows(&db, 3, WAIT).await, 3);

    let exporter = H2::connect(app.exporter_addr()).await;
    let metrics = exporter.get("/metrics").await.text();
    let refused = metric(
        &metrics,
        "kohaku_http_requests_total{path=\"/collector\",status=\"400\"}",
    )
    .unwrap();
    assert_eq!(refused, (cases.len() + 2 + 1) as f64);
    app.shutdown().await;
}

fn deep_value(depth: usize) -> Value {
    (0..depth).fold(Value::from(0), |inner, _| Value::Array(vec![inner]))
}

/// Clients that stall, or send oversized headers, are cut off with an answer; the server and
/// other clients carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_and_oversized_headers_are_refused_and_others_carry_on() {
    use http_body_util::channel::Channel;

    let dir = tempfile::tempdir().unwrap();
    let (sink, db) = sqlite_sink(dir.path()).await;
    let mut config = test_config();
    config.server.body_read_timeout_secs = 1;
    let app = start(&config, vec![sink]).await;

    // A body that starts and never finishes.
    let tcp = tokio::net::TcpStream::connect(app.ingest_addr())
        .await
        .unwrap();
    tcp.set_nodelay(true).unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let (mut body_sender, body) = Channel::<Bytes>::new(1);
    let request = http::Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/collector", app.ingest_addr()))
        .header(EXPORTER_TYPE.0, EXPORTER_TYPE.1)
        .body(body)
        .unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::spawn(async move { sender.send_request(request).await });
    body_sender
        .send_data(Bytes::from_static(b"{\"type\":\"connection.user-agent\","))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered before the test gives up")
        .unwrap()
        .expect("an answer, not a reset");
    assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(900));
    let error: Value = serde_json::from_slice(
        &http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    assert_eq!(error["field"], "body");
    assert_contains(error["error"].as_str().unwrap(), "body_read_timeout_secs");
    drop(body_sender);

    // Headers beyond the limit: refused, never a crash.
    let client = H2::connect(app.ingest_addr()).await;
    let request = client
        .request(Method::POST, "/collector")
        .header(EXPORTER_TYPE.0, EXPORTER_TYPE.1)
        .header("x-padding", "p".repeat(100 * 1024))
        .body(Full::new(Bytes::from(small_report(1, 2).to_string())))
        .unwrap();
    match client.send(request).await {
        Ok(answer) => assert!(answer.status.is_client_error(), "{}", answer.status),
        Err(err) => eprintln!("oversized headers: stream refused ({err})"),
    }

    // Meanwhile others are served as usual.
    let other = H2::connect(app.ingest_addr()).await;
    let answer = other.post_report(small_report(2, 3).to_string()).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    assert_eq!(wait_for_sqlite_rows(&db, 3, WAIT).await, 3);
    let exporter = H2::connect(app.exporter_addr()).await;
    let metrics = exporter.get("/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "kohaku_http_requests_total{path=\"/collector\",status=\"408\"}"
        ),
        Some(1.0)
    );
    app.shutdown().await;
}

async fn http1_post(addr: std::net::SocketAddr, body: String) -> Answer {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{addr}/collector"))
        .header(EXPORTER_TYPE.0, EXPORTER_TYPE.1)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_with_retry_after_and_recovers() {
    let sink = ControlledSink::new("controlled");
    sink.block();
    let mut config = test_config();
    config.pipeline.queue_max_rows = 50;
    config.pipeline.batch_max_rows = 10;
    let app = start(&config, vec![sink.clone() as Arc<dyn StatsSink>]).await;
    let client = H2::connect(app.ingest_addr()).await;

    let mut accepted = 0;
    let mut refused = None;
    for seed in 0..20 {
        let answer = client.post_report(small_report(seed, 10).to_string()).await;
        match answer.status {
            StatusCode::NO_CONTENT => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                refused = Some(answer);
                break;
            }
            other => panic!("unexpected {other}: {}", answer.text()),
        }
    }
    assert_eq!(accepted, 5, "50 rows of queue hold five 10-row reports");
    let refused = refused.expect("the sixth report is refused");
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(refused.json()["error"].as_str().unwrap().contains("queue"));

    // A report larger than the whole queue can never fit: 413, not an endless 503.
    let answer = client.post_report(small_report(99, 51).to_string()).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.json()["field"], "stats");

    sink.unblock();
    assert!(
        sink.wait_for_rows(50, WAIT).await,
        "accepted rows reach the sink"
    );
    let answer = client.post_report(small_report(100, 10).to_string()).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    assert!(sink.wait_for_rows(60, WAIT).await);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_health_names_a_failing_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (sqlite, _db) = sqlite_sink(dir.path()).await;
    let flaky = ControlledSink::new("flaky");
    let app = start(
        &test_config(),
        vec![sqlite, flaky.clone() as Arc<dyn StatsSink>],
    )
    .await;
    let client = H2::connect(app.ingest_addr()).await;
    let exporter = H2::connect(app.exporter_addr()).await;

    let before = exporter.get("/metrics").await;
    assert_eq!(before.status, StatusCode::OK);
    assert!(before.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let before = before.text();
    assert_eq!(
        metric(
            &before,
            "kohaku_stats_objects_received_total{protocol=\"exporter\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&before, "kohaku_sink_rows_written_total{sink=\"sqlite\"}"),
        Some(0.0)
    );

    let health = exporter.get("/health").await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text());
    assert_eq!(client.get("/.ok").await.status, StatusCode::OK);
    assert_eq!(exporter.get("/ready").await.status, StatusCode::OK);

    for seed in 0..3 {
        assert_eq!(
            client
                .post_report(small_report(seed, 4).to_string())
                .await
                .status,
            StatusCode::NO_CONTENT
        );
    }
    for sink in ["sqlite", "flaky"] {
        let series = format!("kohaku_sink_rows_written_total{{sink=\"{sink}\"}}");
        assert_eq!(
            wait_for_metric(&exporter, &series, 12.0, WAIT).await,
            12.0,
            "{sink}"
        );
    }
    let after = exporter.get("/metrics").await.text();
    assert_eq!(
        metric(
            &after,
            "kohaku_stats_objects_received_total{protocol=\"exporter\"}"
        ),
        Some(12.0)
    );
    assert_eq!(
        metric(
            &after,
            "kohaku_reports_received_total{protocol=\"exporter\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &after,
            "kohaku_http_requests_total{path=\"/collector\",status=\"204\"}"
        ),
        Some(3.0)
    );
    assert!(
        metric(
            &after,
            "kohaku_sink_batch_write_seconds_count{sink=\"sqlite\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(metric(&after, "kohaku_queue_rows"), Some(0.0));

    // The flaky sink fails: health says which; the other sink keeps receiving; retries count.
    flaky.set_failing(true);
    let health = exporter.get("/health").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = health.json();
    assert_eq!(body["failing"], serde_json::json!(["flaky"]), "{body}");
    assert!(
        body["sinks"][1]["error"]
            .as_str()
            .unwrap()
            .contains("failing"),
        "{body}"
    );
    assert_eq!(
        client.get("/.ok").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        client
            .post_report(small_report(10, 4).to_string())
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        wait_for_metric(
            &exporter,
            "kohaku_sink_rows_written_total{sink=\"sqlite\"}",
            16.0,
            WAIT
        )
        .await,
        16.0
    );
    assert!(
        wait_for_metric(
            &exporter,
            "kohaku_sink_retries_total{sink=\"flaky\"}",
            2.0,
            WAIT
        )
        .await
            >= 2.0
    );
    let metrics = exporter.get("/metrics").await.text();
    assert!(
        metric(
            &metrics,
            "kohaku_sink_errors_total{sink=\"flaky\",kind=\"transient\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        metric(&metrics, "kohaku_sink_up{sink=\"flaky\"}"),
        Some(0.0)
    );

    // It recovers: the retried batch lands, health is green again.
    flaky.set_failing(false);
    assert!(flaky.wait_for_rows(16, WAIT).await);
    wait_for_health(&exporter, StatusCode::OK, WAIT).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_a_sink_refuses_does_not_cost_the_rest_of_its_batch() {
    let sink = ControlledSink::new("picky");
    let mut config = test_config();
    config.pipeline.batch_max_wait_ms = 300;
    let app = start(&config, vec![sink.clone() as Arc<dyn StatsSink>]).await;
    let client = H2::connect(app.ingest_addr()).await;
    let exporter = H2::connect(app.exporter_addr()).await;
    sink.refuse_connection(Some(&sora_id(2)));
    for seed in 0..4 {
        assert_eq!(
            client
                .post_report(small_report(seed, 3).to_string())
                .await
                .status,
            StatusCode::NO_CONTENT
        );
    }
    assert!(sink.wait_for_rows(9, WAIT).await);
    let dropped = wait_for_metric(
        &exporter,
        "kohaku_sink_rows_dropped_total{sink=\"picky\"}",
        3.0,
        WAIT,
    )
    .await;
    assert_eq!(dropped, 3.0);
    assert_eq!(sink.stored_rows(), 9);
    assert!(sink
        .stored_object(&sora_id(2), "OT0", 1_753_423_611_556.5 + 2.0)
        .is_none());
    assert!(sink
        .stored_object(&sora_id(3), "OT0", 1_753_423_611_556.5 + 3.0)
        .is_some());
    // Nothing was pending at shutdown: the refusal earlier does not make the exit fail.
    assert_eq!(app.shutdown().await.dropped_rows, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_reports_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (sink, db) = sqlite_sink(dir.path()).await;
    let mut config = test_config();
    // Nothing is written before shutdown: it all waits in the batcher.
    config.pipeline.batch_max_wait_ms = 60_000;
    config.pipeline.batch_max_rows = 100_000;
    let app = start(&config, vec![sink]).await;
    let client = H2::connect(app.ingest_addr()).await;
    for seed in 0..30 {
        assert_eq!(
            client
                .post_report(small_report(seed, 5).to_string())
                .await
                .status,
            StatusCode::NO_CONTENT
        );
    }
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), 0);
    let summary = app.shutdown().await;
    assert_eq!(summary.dropped_rows, 0);
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_gives_up_on_a_stuck_sink_and_counts_the_loss() {
    let sink = ControlledSink::new("stuck");
    sink.block();
    let mut config = test_config();
    config.pipeline.shutdown_timeout_secs = 1;
    let app = start(&config, vec![sink.clone() as Arc<dyn StatsSink>]).await;
    let client = H2::connect(app.ingest_addr()).await;
    assert_eq!(
        client
            .post_report(small_report(1, 5).to_string())
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let started = std::time::Instant::now();
    let summary = app.shutdown().await;
    assert_eq!(summary.dropped_rows, 5);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown respects its deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let sink = ControlledSink::new("memory");
    let mut config = test_config();
    config.server.http2_idle_timeout = 1;
    let app = start(&config, vec![sink as Arc<dyn StatsSink>]).await;
    let client = H2::connect(app.ingest_addr()).await;
    assert_eq!(client.get("/.ok").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let request = client
        .request(Method::GET, "/.ok")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(
        client.send(request).await.is_err(),
        "the idle connection was closed"
    );
    app.shutdown().await;
}

/// `GET /.ok` polled hard (here 200 requests at once) costs one probe of the store, not one per
/// request: a probe of a locked SQLite holds a thread for its busy timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_health_checks_share_one_probe() {
    let sink = ControlledSink::new("probed");
    let app = start(&test_config(), vec![sink.clone() as Arc<dyn StatsSink>]).await;
    let client = H2::connect(app.ingest_addr()).await;
    let mut checks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let client = client.clone();
        checks.spawn(async move { client.get("/.ok").await.status });
    }
    while let Some(status) = checks.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert!(
        sink.health_calls() <= 3,
        "{} probes for 200 checks",
        sink.health_calls()
    );
    // Every answer comes from a probe started after the request: a failure shows at once.
    sink.set_failing(true);
    let answer = client.get("/.ok").await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.text()
    );
    app.shutdown().await;
}
