//! Sora's stats webhook (Sora 2025.2 and later) end to end: real HTTP/1.1 and HTTP/2 clients, the
//! webhook bodies rebuilt from Sora's and Chromium's logs, a real SQLite read back, and `kohaku
//! import` of the same logs afterwards.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use kohaku::config::{SinksConfig, SqliteSinkConfig};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);
const SORA_LOG: &str = "sora-logs/rtc_stats.sample.jsonl";
const CHROMIUM_LOG: &str = "chromium/rtc_stats.chromium-av.jsonl";

type Key = (String, String, u64);

fn sqlite_config(db: &std::path::Path) -> kohaku::config::Config {
    let mut config = test_config();
    config.sinks = Some(SinksConfig {
        sqlite: Some(SqliteSinkConfig {
            path: db.to_path_buf(),
            ..SqliteSinkConfig::default()
        }),
        ..SinksConfig::default()
    });
    config
}

fn keyed(reports: &[FixtureReport]) -> HashMap<Key, String> {
    let mut objects = HashMap::new();
    for report in reports {
        for object in &report.objects {
            objects.insert(
                (
                    report.connection_id.clone(),
                    object.rtc_id.clone(),
                    object.rtc_timestamp.to_bits(),
                ),
                object.text.clone(),
            );
        }
    }
    objects
}

fn group_id_of(db: &std::path::Path, connection_id: &str) -> Option<String> {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT group_id FROM sora_connection WHERE connection_id = ?1",
            [connection_id],
            |row| row.get(0),
        )
        .expect("connection stored")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_over_http1_and_http2_store_what_sora_sent_and_a_later_import_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kohaku.db");
    let config = sqlite_config(&db);
    let app = start(&config, build_sinks(&config).await).await;
    // Like Sora's webhook workers: keep-alive HTTP/1.1 connections; and an HTTP/2 client, which
    // the same path serves too.
    let h1 = H1::connect(app.ingest_addr()).await;
    let h2 = H2::connect(app.ingest_addr()).await;

    let sora = fixture_webhooks(SORA_LOG);
    let chromium = fixture_webhooks(CHROMIUM_LOG);
    assert!(sora.len() >= 6 && chromium.len() >= 6, "fixtures shrank");
    assert!(sora.iter().all(|report| report.group_id.is_some()));
    let mut webhooks = 0;
    for (index, report) in sora.iter().chain(&chromium).enumerate() {
        let answer = if index % 2 == 0 {
            h1.post_webhook(WEBHOOK_PATH, report.body.clone()).await
        } else {
            h2.post_webhook(WEBHOOK_PATH, report.body.clone()).await
        };
        assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
        assert!(answer.body.is_empty());
        webhooks += 1;
    }
    // An older Sora's exporter beside them, on the same listener.
    let exporter_report = small_report(900, 5);
    assert_eq!(
        h2.post_report(exporter_report.to_string()).await.status,
        StatusCode::NO_CONTENT
    );

    let mut expected = keyed(&sora);
    expected.extend(keyed(&chromium));
    let exporter_connection = exporter_report["connection_id"].as_str().unwrap();
    for object in exporter_report["stats"].as_array().unwrap() {
        expected.insert(
            (
                exporter_connection.to_owned(),
                object["id"].as_str().unwrap().to_owned(),
                object["timestamp"].as_f64().unwrap().to_bits(),
            ),
            object.to_string(),
        );
    }
    let total = expected.len() as i64;
    assert_eq!(wait_for_sqlite_rows(&db, total, WAIT).await, total);
    for row in sqlite_rows(&db) {
        let key = row.key();
        let sent = expected
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected row {key:?}"));
        assert_eq!(&row.rtc_data, sent, "stored byte for byte: {key:?}");
    }
    for report in sora.iter().chain(&chromium) {
        assert_eq!(
            group_id_of(&db, &report.connection_id),
            report.group_id,
            "group_id of {}",
            report.connection_id
        );
    }
    assert_eq!(group_id_of(&db, exporter_connection), None);

    let exporter = H2::connect(app.exporter_addr()).await;
    let metrics = exporter.get("/metrics").await.text();
    let series = |name: &str, labels: &str| metric(&metrics, &format!("{name}{{{labels}}}"));
    assert_eq!(
        series("kohaku_reports_received_total", "protocol=\"webhook\""),
        Some(webhooks as f64)
    );
    assert_eq!(
        series("kohaku_reports_received_total", "protocol=\"exporter\""),
        Some(1.0)
    );
    assert_eq!(
        series("kohaku_reports_received_total", "protocol=\"import\""),
        Some(0.0)
    );
    assert_eq!(
        series(
            "kohaku_http_requests_total",
            &format!("path=\"{WEBHOOK_PATH}\",status=\"204\"")
        ),
        Some(webhooks as f64)
    );
    app.shutdown().await;

    // The same stats later imported from Sora's rtc_stats.jsonl: every object is already stored.
    let stdout = import_files(
        dir.path(),
        &format!(
            "{STORE_EVERY_OBJECT}[sinks.sqlite]\npath = {:?}\n",
            db.display().to_string()
        ),
        &[fixture_path(SORA_LOG), fixture_path(CHROMIUM_LOG)],
    );
    assert_contains(&stdout, "sink sqlite: written 0,");
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), total);
}

/// Sends `body` over HTTP/1.1 to the webhook path with the given type header (none when `None`).
async fn post(client: &H1, header_type: Option<&str>, body: impl Into<Bytes>) -> Answer {
    let mut request = client
        .request(Method::POST, WEBHOOK_PATH)
        .header("content-type", "application/json");
    if let Some(value) = header_type {
        request = request.header(WEBHOOK_TYPE.0, value);
    }
    client
        .send(request.body(Full::new(body.into())).unwrap())
        .await
        .expect("answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_webhooks_get_400s_naming_the_field_and_unknown_types_are_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kohaku.db");
    let config = sqlite_config(&db);
    let app = start(&config, build_sinks(&config).await).await;
    let client = H1::connect(app.ingest_addr()).await;
    let valid: Value = serde_json::from_str(&fixture_webhooks(SORA_LOG)[0].body).unwrap();

    let mutate = |change: &dyn Fn(&mut Value)| {
        let mut body = valid.clone();
        change(&mut body);
        body.to_string()
    };
    let cases: Vec<(&str, Option<&str>, String, &str)> = vec![
        (
            "connection_id missing",
            Some("connection.rtc"),
            mutate(&|b| {
                b.as_object_mut().unwrap().remove("connection_id");
            }),
            "connection_id",
        ),
        (
            "session_id not a Sora id",
            Some("connection.rtc"),
            mutate(&|b| b["session_id"] = json!("short")),
            "session_id",
        ),
        (
            "simulcast a string",
            Some("connection.rtc"),
            mutate(&|b| b["simulcast"] = json!("no")),
            "simulcast",
        ),
        (
            "timestamp not RFC 3339",
            Some("connection.rtc"),
            mutate(&|b| b["timestamp"] = json!("yesterday")),
            "timestamp",
        ),
        (
            "group_id a number",
            Some("connection.rtc"),
            mutate(&|b| b["group_id"] = json!(5)),
            "group_id",
        ),
        (
            "stats missing",
            Some("connection.rtc"),
            mutate(&|b| {
                b.as_object_mut().unwrap().remove("stats");
            }),
            "stats",
        ),
        (
            "a stats object without id",
            Some("connection.rtc"),
            mutate(&|b| {
                b["stats"][1].as_object_mut().unwrap().remove("id");
            }),
            "stats[1].id",
        ),
        (
            "a stats object without timestamp",
            None,
            mutate(&|b| {
                b["stats"][2].as_object_mut().unwrap().remove("timestamp");
            }),
            "stats[2].timestamp",
        ),
        (
            "header and body disagree",
            Some("connection.rtc"),
            mutate(&|b| b["type"] = json!("connection.user-agent")),
            "type",
        ),
        (
            "no type anywhere",
            None,
            mutate(&|b| {
                b.as_object_mut().unwrap().remove("type");
            }),
            "type",
        ),
        (
            "not JSON",
            Some("connection.rtc"),
            "{\"type\": \"connection.rtc\",".to_owned(),
            "body",
        ),
    ];
    for (case, header, body, field) in &cases {
        let answer = post(&client, *header, body.clone()).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{case}");
        let error = answer.json();
        assert_eq!(error["field"], *field, "{case}: {error}");
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{case}: {error}"
        );
    }
    let request = client
        .request(Method::POST, WEBHOOK_PATH)
        .header(WEBHOOK_TYPE.0, WEBHOOK_TYPE.1)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(valid.to_string())))
        .unwrap();
    let answer = client.send(request).await.unwrap();
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(answer.json()["field"], "content-type");
    let request = client
        .request(Method::GET, WEBHOOK_PATH)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = client.send(request).await.unwrap();
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.headers["allow"], "POST");

    // Webhook types Kohaku does not store are acknowledged, so Sora logs no failure; their
    // bodies need not look like stats.
    for _ in 0..2 {
        let answer = post(&client, Some("connection.future"), "{\"anything\": [1, 2]}").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(
            answer.json(),
            json!({"status": "ignored", "type": "connection.future"})
        );
    }
    let answer = post(
        &client,
        None,
        json!({"type": "session.created"}).to_string(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["type"], "session.created");

    // Nothing refused or ignored was stored, and the same connection still works.
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), 0);
    let objects = valid["stats"].as_array().unwrap().len() as i64;
    let answer = post(&client, None, valid.to_string()).await;
    assert_eq!(
        answer.status,
        StatusCode::NO_CONTENT,
        "typed by its body alone"
    );
    assert_eq!(wait_for_sqlite_rows(&db, objects, WAIT).await, objects);

    // Told apart by their headers: an exporter body on the webhook path over HTTP/1.1, and a
    // webhook whose URL names /collector.
    let exporter_body = small_report(31, 3).to_string();
    let request = client
        .request(Method::POST, WEBHOOK_PATH)
        .header(EXPORTER_TYPE.0, EXPORTER_TYPE.1)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(exporter_body)))
        .unwrap();
    assert_eq!(
        client.send(request).await.unwrap().status,
        StatusCode::NO_CONTENT
    );
    let mut on_collector = valid.clone();
    on_collector["connection_id"] = json!(sora_id(32));
    let answer = client
        .post_webhook("/collector", on_collector.to_string())
        .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    let all = objects * 2 + 3;
    assert_eq!(wait_for_sqlite_rows(&db, all, WAIT).await, all);

    let exporter = H2::connect(app.exporter_addr()).await;
    let metrics = exporter.get("/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "kohaku_reports_ignored_total{type=\"connection.future\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "kohaku_reports_ignored_total{type=\"session.created\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("kohaku_http_requests_total{{path=\"{WEBHOOK_PATH}\",status=\"400\"}}")
        ),
        Some(cases.len() as f64)
    );
    assert_eq!(
        metric(
            &metrics,
            "kohaku_reports_received_total{protocol=\"webhook\"}"
        ),
        Some(2.0)
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_path_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kohaku.db");
    let mut config = sqlite_config(&db);
    config.server.webhook_path = "/kohaku/stats".into();
    let app = start(&config, build_sinks(&config).await).await;
    let client = H1::connect(app.ingest_addr()).await;
    let report = &fixture_webhooks(SORA_LOG)[0];
    let answer = client
        .post_webhook("/kohaku/stats", report.body.clone())
        .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    let answer = client.post_webhook(WEBHOOK_PATH, report.body.clone()).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["field"], "path");
    let objects = report.objects.len() as i64;
    assert_eq!(wait_for_sqlite_rows(&db, objects, WAIT).await, objects);
    app.shutdown().await;
}
