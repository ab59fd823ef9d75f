//! The kohaku-sink conformance suite and the backend's own behaviour, through the real AWS SDK
//! against the moto emulator (`scripts/test` starts it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use kohaku_sink::testkit::conformance::{
    self, Capabilities, ConformanceTarget, StoredConnection, StoredStats,
};
use kohaku_sink::testkit::sample;
use kohaku_sink::{
    Connection, OffsetDateTime, RawJson, SinkError, StatsBatch, StatsObject, StatsSink, WriteReport,
};
use kohaku_timestream::mapping::{self, CONNECTION_MEASURE};
use kohaku_timestream::testkit::{self, OutageProxy, StoredRecord};
use kohaku_timestream::TimestreamSink;
use serde_json::{Map, Value};

struct MotoTarget {
    sink: Arc<TimestreamSink>,
    database: String,
    proxy: OutageProxy,
    /// What the table held at the last read, and the write count it was read after: the suite
    /// reads once per connection, and rebuilding 10,000 records each time is slow.
    writes: Arc<AtomicU64>,
    cache: tokio::sync::Mutex<Option<(u64, Vec<StoredRecord>)>>,
}

/// The sink under test, counting writes so that the target knows when the table changed.
struct CountingSink {
    inner: Arc<TimestreamSink>,
    writes: Arc<AtomicU64>,
}

#[async_trait]
impl StatsSink for CountingSink {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn migrate(&self) -> Result<(), SinkError> {
        self.inner.migrate().await
    }
    async fn write(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
        let result = self.inner.write(batch).await;
        self.writes.fetch_add(1, Ordering::SeqCst);
        result
    }
    async fn health(&self) -> Result<(), SinkError> {
        self.inner.health().await
    }
}

const TABLE: &str = "rtc_stats";

impl MotoTarget {
    async fn new(prefix: &str) -> Self {
        testkit::reset_once().await;
        let proxy = OutageProxy::start(&testkit::moto_url()).await;
        let database = testkit::fresh_database(prefix);
        let sink = testkit::sink(&proxy.url(), testkit::options(&proxy.url(), &database)).await;
        sink.migrate().await.expect("migrate");
        Self {
            sink: Arc::new(sink),
            database,
            proxy,
            writes: Arc::default(),
            cache: tokio::sync::Mutex::new(None),
        }
    }

    async fn records(&self) -> Vec<StoredRecord> {
        let writes = self.writes.load(Ordering::SeqCst);
        let mut cache = self.cache.lock().await;
        match &*cache {
            Some((at, records)) if *at == writes => records.clone(),
            _ => {
                let records = testkit::stored_records(&self.database, TABLE).await;
                *cache = Some((writes, records.clone()));
                records
            }
        }
    }
}

fn time_of_us(us: &str) -> OffsetDateTime {
    let us: i128 = us.parse().expect("microseconds");
    OffsetDateTime::from_unix_timestamp_nanos(us * 1_000).expect("time in range")
}

/// A measure read back as the JSON value it stands for.
fn json_of(kind: &str, value: &str) -> Value {
    match kind {
        "BIGINT" => Value::from(value.parse::<i64>().expect("BIGINT")),
        "DOUBLE" => Value::from(value.parse::<f64>().expect("DOUBLE")),
        "BOOLEAN" => Value::Bool(value == "true"),
        _ => Value::String(value.to_owned()),
    }
}

/// schemas/timestream.md's rules applied to a sent object: nested members flattened with `.`,
/// lists as their JSON text, `null` and "" absent, numbers DOUBLE unless an integer member.
fn flattened(sent: &Map<String, Value>, prefix: &str, out: &mut Map<String, Value>) {
    for (key, value) in sent {
        let name = format!("{prefix}{key}");
        let top_level = prefix.is_empty();
        match value {
            Value::Null => {}
            Value::String(text) if text.is_empty() => {}
            Value::Object(members) => flattened(
                members,
                &format!("{name}{}", mapping::FLATTEN_SEPARATOR),
                out,
            ),
            Value::Array(_) => {
                out.insert(name, Value::String(value.to_string()));
            }
            Value::Number(number) => {
                let value = match number.as_i64() {
                    Some(whole) if top_level && mapping::is_integer_member(key) => {
                        Value::from(whole)
                    }
                    _ => Value::from(number.as_f64().expect("finite")),
                };
                out.insert(name, value);
            }
            other => {
                out.insert(name, other.clone());
            }
        }
    }
}

#[async_trait]
impl ConformanceTarget for MotoTarget {
    fn sink(&self) -> Arc<dyn StatsSink> {
        Arc::new(CountingSink {
            inner: self.sink.clone(),
            writes: self.writes.clone(),
        })
    }

    async fn stored_stats(&self, connection_id: &str) -> Vec<StoredStats> {
        self.records()
            .await
            .into_iter()
            .filter(|r| mapping::is_stats_measure(&r.measure_name))
            .filter(|r| r.dimension("connection_id") == Some(connection_id))
            .map(|record| {
                let dim = |name: &str| record.dimension(name).unwrap_or_default().to_owned();
                let mut data = Map::new();
                data.insert("id".into(), Value::String(dim("rtc_id")));
                data.insert("type".into(), Value::String(dim("rtc_type")));
                for (name, (kind, value)) in &record.measures {
                    if name != mapping::SORA_TIMESTAMP_MEASURE
                        && name != mapping::RECEIVED_AT_MEASURE
                    {
                        data.insert(name.clone(), json_of(kind, value));
                    }
                }
                let rtc_timestamp: f64 = record
                    .measure("timestamp")
                    .expect("timestamp measure")
                    .parse()
                    .expect("DOUBLE");
                assert_eq!(
                    record.measure_name,
                    dim("rtc_type"),
                    "measure name is the type"
                );
                assert_eq!(
                    Some(record.time_us()),
                    mapping::micros_of_ms(rtc_timestamp),
                    "record time is the object's timestamp"
                );
                StoredStats {
                    channel_id: dim("channel_id"),
                    session_id: dim("session_id"),
                    client_id: dim("client_id"),
                    connection_id: dim("connection_id"),
                    bundle_id: record.dimension("bundle_id").map(str::to_owned),
                    rtc_type: dim("rtc_type"),
                    rtc_id: dim("rtc_id"),
                    rtc_timestamp,
                    rtc_data: Value::Object(data),
                    sora_timestamp: time_of_us(
                        record
                            .measure(mapping::SORA_TIMESTAMP_MEASURE)
                            .expect("sora_timestamp_us"),
                    ),
                    received_at: time_of_us(
                        record
                            .measure(mapping::RECEIVED_AT_MEASURE)
                            .expect("received_at_us"),
                    ),
                }
            })
            .collect()
    }

    async fn stored_connection(&self, connection_id: &str) -> Option<StoredConnection> {
        let records: Vec<StoredRecord> = self
            .records()
            .await
            .into_iter()
            .filter(|r| r.measure_name == CONNECTION_MEASURE)
            .filter(|r| r.dimension("connection_id") == Some(connection_id))
            .collect();
        let latest = records.iter().max_by_key(|r| r.time_us())?;
        let dim = |name: &str| latest.dimension(name).unwrap_or_default().to_owned();
        let measure = |name: &str| latest.measure(name).unwrap_or_default().to_owned();
        let flag = |name: &str| latest.measure(name).map(|value| value == "true");
        let first = records.iter().map(StoredRecord::time_us).min()?;
        Some(StoredConnection {
            connection: Connection {
                channel_id: dim("channel_id"),
                session_id: dim("session_id"),
                client_id: dim("client_id"),
                connection_id: dim("connection_id"),
                bundle_id: latest.dimension("bundle_id").map(str::to_owned),
                group_id: latest.measure("group_id").map(str::to_owned),
                label: measure("label"),
                version: measure("version"),
                node_name: measure("node_name"),
                role: measure("role"),
                multistream: flag("multistream"),
                simulcast: flag("simulcast").unwrap_or_default(),
                spotlight: flag("spotlight").unwrap_or_default(),
            },
            first_seen: time_of_us(&first.to_string()),
            last_seen: time_of_us(&latest.time_us().to_string()),
        })
    }

    async fn make_unavailable(&self) {
        self.proxy.set_up(false);
    }

    async fn make_available(&self) {
        self.proxy.set_up(true);
    }

    fn expected_rtc_data(&self, sent: Value) -> Value {
        let Value::Object(members) = sent else {
            return sent;
        };
        let mut out = Map::new();
        flattened(&members, "", &mut out);
        Value::Object(out)
    }

    /// moto appends every record it is sent, where Timestream keeps one of identical records;
    /// `rewrite_sends_identical_records` below checks the half Kohaku is responsible for.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            dedups_on_read: false,
        }
    }
}

/// Every case moto can judge (see `capabilities`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_moto() {
    let target = MotoTarget::new("conformance").await;
    conformance::run_all(&target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_sends_identical_records() {
    let target = MotoTarget::new("rewrite").await;
    let batch = sample::batch([sample::report(
        sample::connection(3001),
        1_753_423_612_000.0,
        40,
    )]);
    let first = target.sink.write(&batch).await.expect("first write");
    let second = target.sink.write(&batch).await.expect("second write");
    assert_eq!(first, second, "a re-write reports the same as the write");
    assert_eq!(first.written, 40);
    let requests = testkit::write_requests(&target.database, TABLE).await;
    assert_eq!(requests.len(), 2, "one request per write of 41 records");
    assert_eq!(
        requests[0], requests[1],
        "a retried batch must be byte-for-byte the same records, which Timestream stores once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hold_at_most_max_records_and_share_connection_dimensions() {
    testkit::reset_once().await;
    let proxy = OutageProxy::start(&testkit::moto_url()).await;
    let database = testkit::fresh_database("split");
    let mut options = testkit::options(&proxy.url(), &database);
    options.max_records_per_write = 25;
    // One at a time, so that moto records the requests in the order they were planned.
    options.max_concurrent_writes = 1;
    let sink = testkit::sink(&proxy.url(), options).await;
    sink.migrate().await.expect("migrate");
    // Two reports of 10 objects (12 records each, with the connection and summary records) fit
    // one request together; one of 60 is split.
    let batch = sample::batch([
        sample::report(sample::connection(3101), 1_753_423_700_000.0, 10),
        sample::report(sample::connection(3102), 1_753_423_700_000.0, 10),
        sample::report(sample::connection(3103), 1_753_423_700_000.0, 60),
    ]);
    let written = sink.write(&batch).await.expect("write");
    assert_eq!(written.written, 80);
    let requests = testkit::write_requests(&database, TABLE).await;
    let sizes: Vec<usize> = requests
        .iter()
        .map(|r| r["Records"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, vec![24, 25, 25, 12]);
    // The split report's requests carry its connection's ids once, as CommonAttributes.
    let common: Vec<&str> = requests[1]["CommonAttributes"]["Dimensions"]
        .as_array()
        .expect("common dimensions")
        .iter()
        .filter_map(|d| d["Name"].as_str())
        .collect();
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
    // Its first records are the connection and summary records (all their dimensions shared);
    // the objects keep their own.
    assert!(requests[1]["Records"][2]["Dimensions"]
        .as_array()
        .expect("own dimensions")
        .iter()
        .all(|d| d["Name"] == "rtc_type" || d["Name"] == "rtc_id"));
    // The shared request's records keep their own connection ids.
    assert!(requests[0]["CommonAttributes"]["Dimensions"].is_null());
    let stored = testkit::stored_records(&database, TABLE).await;
    assert_eq!(
        stored.len(),
        86,
        "80 objects, 3 connection and 3 summary records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_with_retention_or_names_what_is_missing() {
    testkit::reset_once().await;
    let url = testkit::moto_url();
    let database = testkit::fresh_database("migrate");
    let mut options = testkit::options(&url, &database);
    options.create_if_missing = false;
    let sink = testkit::sink(&url, options.clone()).await;
    let err = sink.migrate().await.expect_err("no database yet");
    assert!(!err.is_transient(), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("{database:?} does not exist"))
            && err.to_string().contains("create_if_missing = true"),
        "{err}"
    );

    options.create_if_missing = true;
    options.memory_store_retention_hours = 12;
    options.magnetic_store_retention_days = 30;
    let sink = testkit::sink(&url, options.clone()).await;
    sink.migrate().await.expect("create");
    sink.health().await.expect("healthy once the table exists");
    let table = testkit::moto_table(&database, TABLE)
        .await
        .expect("table created");
    assert_eq!(
        table["retention_properties"],
        serde_json::json!({"MemoryStoreRetentionPeriodInHours": 12, "MagneticStoreRetentionPeriodInDays": 30})
    );
    assert_eq!(
        table["magnetic_store_write_properties"]["EnableMagneticStoreWrites"],
        true
    );

    // A changed retention is applied on the next start; the records stay.
    sink.write(&sample::batch([sample::report(
        sample::connection(3201),
        1_753_423_800_000.0,
        3,
    )]))
    .await
    .expect("write");
    options.memory_store_retention_hours = 48;
    let sink = testkit::sink(&url, options).await;
    sink.migrate().await.expect("migrate again");
    let table = testkit::moto_table(&database, TABLE).await.expect("table");
    assert_eq!(
        table["retention_properties"]["MemoryStoreRetentionPeriodInHours"],
        48
    );
    // 3 objects, the connection record and the summary record.
    assert_eq!(testkit::stored_records(&database, TABLE).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_over_the_limits_are_reported_and_the_rest_written() {
    let target = MotoTarget::new("limits").await;
    let connection = sample::connection(3301);
    let ts = 1_753_423_900_000.0;
    let mut report = sample::report(connection.clone(), ts, 5);
    let huge = format!(
        r#"{{"id":"CF-huge","timestamp":{ts},"type":"certificate","base64Certificate":"{}"}}"#,
        "A".repeat(3000)
    );
    let wide_members: Vec<String> = (0..300).map(|i| format!(r#""m{i}":{i}"#)).collect();
    let wide = format!(
        r#"{{"id":"wide","timestamp":{ts},"type":"codec",{}}}"#,
        wide_members.join(",")
    );
    for (id, rtc_type, text) in [("CF-huge", "certificate", huge), ("wide", "codec", wide)] {
        report.stats.push(StatsObject {
            rtc_id: id.into(),
            rtc_type: rtc_type.into(),
            rtc_timestamp: ts,
            rtc_data: RawJson::from_string(text).expect("json"),
        });
    }
    let written = target
        .sink
        .write(&sample::batch([report]))
        .await
        .expect("write");
    assert_eq!(written.written, 5);
    let reasons: BTreeMap<&str, &str> = written
        .rejected
        .iter()
        .map(|row| (row.rtc_id.as_str(), row.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons["CF-huge"].contains("\"base64Certificate\" is 3000 bytes"),
        "{reasons:?}"
    );
    assert!(reasons["wide"].contains("303 measures"), "{reasons:?}");
    let stored = target.stored_stats(&connection.connection_id).await;
    assert_eq!(stored.len(), 5, "the other objects are stored");
    let counters = target.sink.counters();
    let refused = counters
        .iter()
        .find(|c| c.name == "records_refused_before_send")
        .expect("counter");
    assert_eq!(refused.value, 2);
}
