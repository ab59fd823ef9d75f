//! The behaviour suite every backend must pass against its real store.
//!
//! A backend's test implements [`ConformanceTarget`] (how to build the sink, how to read back what
//! it stored, how to make the store unavailable) and calls [`run_all`], or one case at a time.
//! Failures panic with a message naming the case, as test assertions do.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::sample;
use crate::{Connection, RawJson, Report, StatsBatch, StatsObject, StatsSink};

/// A stats row as the backend stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredStats {
    pub channel_id: String,
    pub session_id: String,
    pub client_id: String,
    pub connection_id: String,
    pub bundle_id: Option<String>,
    pub rtc_type: String,
    pub rtc_id: String,
    pub rtc_timestamp: f64,
    pub rtc_data: serde_json::Value,
    pub sora_timestamp: OffsetDateTime,
    pub received_at: OffsetDateTime,
}

/// A connection row as the backend stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredConnection {
    pub connection: Connection,
    pub first_seen: OffsetDateTime,
    pub last_seen: OffsetDateTime,
}

#[async_trait]
pub trait ConformanceTarget: Send + Sync {
    /// A migrated sink writing to a store that holds no rows of the connections the suite uses.
    fn sink(&self) -> Arc<dyn StatsSink>;

    /// Every stored stats row of one connection.
    async fn stored_stats(&self, connection_id: &str) -> Vec<StoredStats>;

    async fn stored_connection(&self, connection_id: &str) -> Option<StoredConnection>;

    /// Make the store refuse service the way an outage would (server stopped, database locked…).
    async fn make_unavailable(&self);

    /// Undo [`make_unavailable`](Self::make_unavailable).
    async fn make_available(&self);

    /// The `rtc_data` a stored row must read back as, for an object sent as `sent`. The SQL
    /// backends keep the JSON whole; a backend whose documented mapping reshapes it (Timestream
    /// flattens objects into measures) says how, so the suite checks the values, not the shape.
    fn expected_rtc_data(&self, sent: serde_json::Value) -> serde_json::Value {
        sent
    }

    /// What the store under test can show; a case it cannot judge is skipped, by name.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// What a conformance target's store lets the suite check. Every field defaults to true: a
/// target opts out of a case by saying why, instead of running a hand-picked list that a new case
/// would silently miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Reading back shows a rewrite as stored once (an emulator that appends every record
    /// cannot: moto).
    pub dedups_on_read: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            dedups_on_read: true,
        }
    }
}

/// Runs every case the target's store can judge. Each case uses its own connection ids, so they
/// can share one store.
pub async fn run_all(target: &dyn ConformanceTarget) {
    let capabilities = target.capabilities();
    migrate_is_repeatable(target).await;
    empty_batch(target).await;
    round_trip_every_type(target).await;
    if capabilities.dedups_on_read {
        idempotent_rewrite(target).await;
    } else {
        eprintln!("conformance: idempotent_rewrite skipped: the store cannot show deduplication");
    }
    odd_ids_and_unicode(target).await;
    same_id_at_other_times_and_connections(target).await;
    connection_first_and_last_seen(target).await;
    large_batch(target).await;
    unavailable_store_is_transient(target).await;
}

pub async fn migrate_is_repeatable(target: &dyn ConformanceTarget) {
    let sink = target.sink();
    sink.migrate()
        .await
        .expect("migrate_is_repeatable: first re-run");
    sink.migrate()
        .await
        .expect("migrate_is_repeatable: second re-run");
}

pub async fn empty_batch(target: &dyn ConformanceTarget) {
    let report = target
        .sink()
        .write(&StatsBatch::default())
        .await
        .expect("empty_batch: write");
    assert_eq!(
        report.written + report.duplicates,
        0,
        "empty_batch: nothing to write"
    );
}

pub async fn round_trip_every_type(target: &dyn ConformanceTarget) {
    let report = sample::every_type_report(sample::connection(1001), 1_753_423_611_556.525);
    write_and_compare("round_trip_every_type", target, vec![report]).await;
}

pub async fn idempotent_rewrite(target: &dyn ConformanceTarget) {
    let case = "idempotent_rewrite";
    let sink = target.sink();
    let first = sample::report(sample::connection(1002), 1_753_423_612_000.0, 40);
    let batch = sample::batch([first.clone()]);
    let written = sink
        .write(&batch)
        .await
        .expect("idempotent_rewrite: first write");
    assert_eq!(
        (written.written, written.duplicates),
        (40, 0),
        "{case}: first write"
    );

    let again = sink
        .write(&batch)
        .await
        .expect("idempotent_rewrite: second write");
    assert_eq!(
        (again.written, again.duplicates),
        (0, 40),
        "{case}: second write"
    );

    // A batch mixing stored and new rows stores only the new ones.
    let second = sample::report(sample::connection(1002), 1_753_423_613_000.0, 10);
    let mixed = sink
        .write(&sample::batch([first.clone(), second.clone()]))
        .await
        .expect("idempotent_rewrite: mixed write");
    assert_eq!(
        (mixed.written, mixed.duplicates),
        (10, 40),
        "{case}: mixed write"
    );
    assert_stored(case, target, &[first, second]).await;
}

pub async fn odd_ids_and_unicode(target: &dyn ConformanceTarget) {
    let mut connection = sample::connection(1003);
    connection.channel_id = format!("チャンネル/🎥 \"quoted\" \\ {}", "x".repeat(200));
    connection.client_id = "client with spaces; and=:+/ punctuation".into();
    connection.bundle_id = None;
    connection.group_id = Some("グループ \"g\" \\ 🎥".into());
    connection.multistream = Some(true);
    connection.simulcast = true;
    connection.spotlight = true;
    connection.role = "recvonly".into();
    let ts = 1_753_423_620_123.456;
    let ids = [
        "CF1A:A5:A8:A4:30:FA:3D:F5:64:12:88",
        "IT01V3347189688+abc/def;g=h",
        "ID \"quoted\" \\ back\\slash",
        "日本語-🎥-ÆØÅ",
        "tab\there\nnewline",
    ];
    let stats = ids
        .iter()
        .enumerate()
        .map(|(i, id)| sample::object("inbound-rtp", id, ts, i as u64))
        .chain(std::iter::once(StatsObject {
            rtc_id: "escapes".into(),
            rtc_type: "codec".into(),
            rtc_timestamp: ts,
            rtc_data: RawJson::from_string(format!(
                r#"{{"id":"escapes","timestamp":{ts},"type":"codec","sdpFmtpLine":"a=\"b\"\\c\u00e9\ud83c\udfa5","emptyObject":{{}},"emptyList":[],"big":18446744073709551615,"neg":-9007199254740993,"exp":1.5e-7}}"#
            ))
            .expect("escapes object is valid JSON"),
        }))
        .collect();
    let mut report = Report::new(
        connection,
        sample::time_of(ts),
        sample::time_of(ts + 1.0),
        stats,
    );
    report.set_summary(Some(sample::summary(ts)));
    write_and_compare("odd_ids_and_unicode", target, vec![report]).await;
}

pub async fn same_id_at_other_times_and_connections(target: &dyn ConformanceTarget) {
    let a = sample::connection(1004);
    let b = sample::connection(1005);
    let reports = vec![
        sample::report(a.clone(), 1_753_423_630_000.0, 5),
        sample::report(a, 1_753_423_631_000.25, 5),
        sample::report(b, 1_753_423_630_000.0, 5),
    ];
    write_and_compare("same_id_at_other_times_and_connections", target, reports).await;
}

pub async fn connection_first_and_last_seen(target: &dyn ConformanceTarget) {
    let case = "connection_first_and_last_seen";
    let sink = target.sink();
    let connection = sample::connection(1006);
    let early = sample::report(connection.clone(), 1_753_423_640_000.0, 3);
    let late = sample::report(connection.clone(), 1_753_423_650_000.0, 3);
    // Written late first: a delayed older report must not move last_seen backwards.
    sink.write(&sample::batch([late.clone()]))
        .await
        .expect("write late");
    sink.write(&sample::batch([early.clone()]))
        .await
        .expect("write early");
    let stored = target
        .stored_connection(&connection.connection_id)
        .await
        .unwrap_or_else(|| panic!("{case}: connection row missing"));
    assert_eq!(stored.connection, connection, "{case}: connection fields");
    assert_eq!(
        stored.first_seen, early.sora_timestamp,
        "{case}: first_seen"
    );
    assert_eq!(stored.last_seen, late.sora_timestamp, "{case}: last_seen");
}

pub async fn large_batch(target: &dyn ConformanceTarget) {
    let reports: Vec<Report> = (0..20)
        .map(|i| {
            sample::report(
                sample::connection(2000 + i),
                1_753_423_700_000.0 + i as f64,
                500,
            )
        })
        .collect();
    write_and_compare("large_batch", target, reports).await;
}

pub async fn unavailable_store_is_transient(target: &dyn ConformanceTarget) {
    let case = "unavailable_store_is_transient";
    let sink = target.sink();
    let report = sample::report(sample::connection(1007), 1_753_423_660_000.0, 30);
    let batch = sample::batch([report.clone()]);
    target.make_unavailable().await;
    let outcome = sink.write(&batch).await;
    let health = sink.health().await;
    target.make_available().await;
    match outcome {
        Err(err) => assert!(
            err.is_transient(),
            "{case}: expected Transient, got {err:?}"
        ),
        Ok(written) => {
            panic!("{case}: write succeeded while the store was unavailable: {written:?}")
        }
    }
    assert!(
        health.is_err(),
        "{case}: health must fail while the store is unavailable"
    );

    let written = sink.write(&batch).await.expect("write after recovery");
    assert_eq!(written.written, 30, "{case}: rows written after recovery");
    sink.health().await.expect("health after recovery");
    assert_stored(case, target, &[report]).await;
}

async fn write_and_compare(case: &str, target: &dyn ConformanceTarget, reports: Vec<Report>) {
    let rows: usize = reports.iter().map(Report::row_count).sum();
    let written = target
        .sink()
        .write(&sample::batch(reports.clone()))
        .await
        .unwrap_or_else(|err| panic!("{case}: write failed: {}", err.detailed()));
    assert_eq!(written.written as usize, rows, "{case}: rows written");
    assert_eq!(written.duplicates, 0, "{case}: duplicates");
    assert!(
        written.rejected.is_empty(),
        "{case}: rejected {:?}",
        written.rejected
    );
    assert_stored(case, target, &reports).await;
}

/// Every object of `reports` is stored once, field for field, and nothing else is stored for
/// their connections.
async fn assert_stored(case: &str, target: &dyn ConformanceTarget, reports: &[Report]) {
    /// Objects of one connection by `(rtc_id, rtc_timestamp bits)`.
    type ByKey<'a> = HashMap<(String, u64), (&'a Report, &'a StatsObject)>;
    let mut expected: HashMap<&str, ByKey<'_>> = HashMap::new();
    for report in reports {
        for object in &report.stats {
            expected
                .entry(report.connection.connection_id.as_str())
                .or_default()
                .insert(
                    (object.rtc_id.clone(), object.rtc_timestamp.to_bits()),
                    (report, object),
                );
        }
    }
    for (connection_id, objects) in expected {
        let stored = target.stored_stats(connection_id).await;
        assert_eq!(
            stored.len(),
            objects.len(),
            "{case}: row count of connection {connection_id}"
        );
        for row in stored {
            let key = (row.rtc_id.clone(), row.rtc_timestamp.to_bits());
            let (report, object) = objects
                .get(&key)
                .unwrap_or_else(|| panic!("{case}: unexpected stored row {key:?}"));
            let sent = target.expected_rtc_data(
                serde_json::from_str(object.rtc_data.get()).expect("sample objects are valid JSON"),
            );
            let connection = &report.connection;
            assert_eq!(row.rtc_data, sent, "{case}: rtc_data of {key:?}");
            assert_eq!(row.rtc_type, object.rtc_type, "{case}: rtc_type of {key:?}");
            assert_eq!(
                (
                    &row.channel_id,
                    &row.session_id,
                    &row.client_id,
                    &row.bundle_id
                ),
                (
                    &connection.channel_id,
                    &connection.session_id,
                    &connection.client_id,
                    &connection.bundle_id
                ),
                "{case}: ids of {key:?}"
            );
            assert_eq!(
                row.sora_timestamp, report.sora_timestamp,
                "{case}: sora_timestamp of {key:?}"
            );
            assert_eq!(
                row.received_at, report.received_at,
                "{case}: received_at of {key:?}"
            );
        }
        let connection = &objects
            .values()
            .next()
            .expect("at least one object")
            .0
            .connection;
        let stored = target
            .stored_connection(connection_id)
            .await
            .unwrap_or_else(|| panic!("{case}: connection {connection_id} missing"));
        assert_eq!(&stored.connection, connection, "{case}: connection fields");
    }
}
