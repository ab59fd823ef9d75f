//! The Grafana dashboards in grafana/: their structure, and every query they hold run the way
//! Grafana would run it (variables interpolated, macros expanded) against databases Kohaku filled
//! from the real Sora and Chromium logs. No Grafana server is involved: these are the statements
//! Grafana would send.

mod common;
#[path = "common/grafana.rs"]
mod grafana;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::*;
use grafana::{dashboards, grafana_dir, Dashboard, Render};
use serde_json::Value;

const LOGS: [&str; 2] = [
    "sora-logs/rtc_stats.sample.jsonl",
    "chromium/rtc_stats.chromium-av.jsonl",
];

fn read_yaml(path: &Path) -> Value {
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The PostgreSQL datasource's `timescaledb` flag as provisioned.
fn provisioned_timescaledb_flag() -> bool {
    let file = grafana_dir().join("provisioning/datasources/kohaku.yaml");
    read_yaml(&file)["datasources"]
        .as_array()
        .expect("datasources list")
        .iter()
        .find(|ds| ds["type"] == "grafana-postgresql-datasource")
        .and_then(|ds| ds["jsonData"]["timescaledb"].as_bool())
        .expect("the PostgreSQL datasource says whether it is TimescaleDB")
}

/// Provisioned datasources: uid → type.
fn provisioned_datasources() -> HashMap<String, String> {
    let file = grafana_dir().join("provisioning/datasources/kohaku.yaml");
    read_yaml(&file)["datasources"]
        .as_array()
        .expect("datasources list")
        .iter()
        .map(|ds| {
            (
                ds["uid"].as_str().expect("uid").to_owned(),
                ds["type"].as_str().expect("type").to_owned(),
            )
        })
        .collect()
}

/// `$name`, `${name}` and `${name:format}` references, without Grafana's built-ins (`$__…`).
fn variable_references(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' {
            let (start, braced) = if bytes.get(i + 1) == Some(&b'{') {
                (i + 2, true)
            } else {
                (i + 1, false)
            };
            let end = bytes[start..]
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.'))
                .map_or(bytes.len(), |n| start + n);
            let name = &text[start..end];
            if !name.is_empty() && !name.starts_with("__") && (braced || !name.contains('.')) {
                names.insert(name.to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn dashboards_are_well_formed() {
    let datasources = provisioned_datasources();
    let dashboards = dashboards();
    let backends: BTreeSet<&str> = dashboards.iter().map(|d| d.backend.as_str()).collect();
    assert_eq!(backends, BTreeSet::from(["sqlite", "timescaledb"]));
    let expected_type = |backend: &str| match backend {
        "timescaledb" => "grafana-postgresql-datasource",
        _ => "frser-sqlite-datasource",
    };
    let uids: Vec<&str> = dashboards.iter().map(Dashboard::uid).collect();
    assert_eq!(
        uids.iter().collect::<BTreeSet<_>>().len(),
        uids.len(),
        "dashboard uids are unique: {uids:?}"
    );

    for dashboard in &dashboards {
        let name = dashboard.file.display().to_string();
        let variables: BTreeSet<String> = dashboard
            .variables()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect();
        let mut panel_ids = BTreeSet::new();
        let mut datasource_refs: Vec<&Value> = dashboard
            .variables()
            .iter()
            .map(|v| &v["datasource"])
            .collect();
        for panel in dashboard.panels() {
            assert!(
                panel_ids.insert(panel["id"].as_i64().expect("panel id")),
                "{name}: duplicate panel id {}",
                panel["id"]
            );
            assert!(panel["gridPos"]["w"].as_i64().is_some(), "{name}: gridPos");
            if panel["type"] == "row" {
                continue;
            }
            datasource_refs.push(&panel["datasource"]);
            let targets = panel["targets"].as_array().expect("targets");
            assert!(
                !targets.is_empty(),
                "{name}: {} has no query",
                panel["title"]
            );
            datasource_refs.extend(targets.iter().map(|t| &t["datasource"]));
        }
        for reference in datasource_refs {
            let uid = reference["uid"].as_str().expect("datasource uid");
            assert_eq!(
                datasources.get(uid).map(String::as_str),
                Some(expected_type(&dashboard.backend)),
                "{name}: datasource {uid} is not provisioned with the {} type",
                dashboard.backend
            );
            assert_eq!(reference["type"], expected_type(&dashboard.backend));
        }
        // Every variable used anywhere (queries, titles, links) is defined.
        let text = dashboard.json.to_string();
        for used in variable_references(&text) {
            assert!(
                variables.contains(&used),
                "{name}: ${used} is used but not defined ({variables:?})"
            );
        }
        // Links point at dashboards of the same backend.
        let same_backend: BTreeSet<&str> = dashboards
            .iter()
            .filter(|d| d.backend == dashboard.backend)
            .map(Dashboard::uid)
            .collect();
        let mut links = 0;
        for part in text.split("/d/").skip(1) {
            let target = part.split(['/', '?', '"']).next().unwrap();
            assert!(
                same_backend.contains(target),
                "{name}: link to unknown dashboard {target}"
            );
            links += 1;
        }
        assert!(links > 0, "{name}: links to the other dashboard");
    }

    // The provider loads the folder the compose file mounts grafana/dashboards at.
    let provider = read_yaml(&grafana_dir().join("provisioning/dashboards/kohaku.yaml"));
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path");
    let compose = read_yaml(&grafana_dir().join("compose.yaml"));
    let volumes: Vec<&str> = compose["services"]["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        volumes
            .iter()
            .any(|v| v.starts_with(&format!("./dashboards:{path}"))),
        "{volumes:?} mounts dashboards at {path}"
    );
    assert!(volumes
        .iter()
        .any(|v| v.starts_with("./provisioning:/etc/grafana/provisioning")));
}

/// The databases under test, filled by `kohaku import` from the real logs.
struct Databases {
    _dir: tempfile::TempDir,
    sqlite: PathBuf,
    #[cfg(all(feature = "timescaledb", feature = "testkit"))]
    postgres: String,
}

impl Databases {
    /// The fixtures (or `extra_lines`) imported into every backend of this build, with
    /// `[pipeline] skip_unchanged` set to `skip_unchanged` (TOML) when given, else its default.
    async fn filled(extra_lines: Option<&str>, skip_unchanged: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = dir.path().join("kohaku.db");
        #[allow(unused_mut)]
        let mut config = format!("[sinks.sqlite]\npath = \"{}\"\n", sqlite.display());
        if let Some(skip) = skip_unchanged {
            config.push_str(&format!("[pipeline]\nskip_unchanged = {skip}\n"));
        }
        #[cfg(all(feature = "timescaledb", feature = "testkit"))]
        let postgres = {
            let url = kohaku_timescaledb::testkit::fresh_database("dashboards").await;
            config.push_str(&format!(
                "\n[sinks.timescaledb]\nuri = \"{url}\"\nretention_days = 0\n"
            ));
            url
        };
        std::fs::write(dir.path().join("kohaku.toml"), config).unwrap();
        let mut files: Vec<String> = Vec::new();
        match extra_lines {
            Some(lines) => {
                let path = dir.path().join("extra.jsonl");
                std::fs::write(&path, lines).unwrap();
                files.push(path.display().to_string());
            }
            None => files.extend(
                LOGS.iter()
                    .map(|log| fixture_path(log).display().to_string()),
            ),
        }
        let output = tokio::task::block_in_place(|| {
            kohaku_command()
                .args(["import", "--config"])
                .arg(dir.path().join("kohaku.toml"))
                .args(&files)
                .output()
                .expect("kohaku import runs")
        });
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The dashboards must read compressed chunks as well as fresh ones.
        #[cfg(all(feature = "timescaledb", feature = "testkit"))]
        if kohaku_timescaledb::testkit::server_flavor() == "timescaledb" {
            kohaku_timescaledb::testkit::compress_all_chunks(&postgres)
                .await
                .expect("compress the chunks");
        }
        Self {
            _dir: dir,
            sqlite,
            #[cfg(all(feature = "timescaledb", feature = "testkit"))]
            postgres,
        }
    }

    fn backends(&self) -> Vec<&'static str> {
        let mut backends = vec!["sqlite"];
        if cfg!(all(feature = "timescaledb", feature = "testkit")) {
            backends.push("timescaledb");
        }
        backends
    }

    async fn execute(&self, backend: &str, sql: &str) {
        match backend {
            "sqlite" => {
                rusqlite::Connection::open(&self.sqlite)
                    .and_then(|connection| connection.execute_batch(sql))
                    .unwrap_or_else(|err| panic!("sqlite: {sql}: {err}"));
            }
            #[cfg(all(feature = "timescaledb", feature = "testkit"))]
            "timescaledb" => kohaku_timescaledb::testkit::execute(&self.postgres, sql)
                .await
                .unwrap_or_else(|err| panic!("timescaledb: {sql}: {err}")),
            other => panic!("backend {other} not in this build"),
        }
    }

    async fn query(&self, backend: &str, sql: &str) -> Result<Vec<Value>, String> {
        match backend {
            "sqlite" => sqlite_query(&self.sqlite, sql),
            #[cfg(all(feature = "timescaledb", feature = "testkit"))]
            "timescaledb" => kohaku_timescaledb::testkit::query_json(&self.postgres, sql).await,
            other => panic!("backend {other} not in this build"),
        }
    }
}

fn sqlite_query(path: &Path, sql: &str) -> Result<Vec<Value>, String> {
    use rusqlite::types::ValueRef;
    let connection = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
    let mut statement = connection.prepare(sql).map_err(|e| e.to_string())?;
    let names: Vec<String> = statement
        .column_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let mut rows = statement.query([]).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        let mut object = serde_json::Map::new();
        for (index, name) in names.iter().enumerate() {
            let value = match row.get_ref(index).map_err(|e| e.to_string())? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(i) => Value::from(i),
                ValueRef::Real(f) => Value::from(f),
                ValueRef::Text(t) => Value::from(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(_) => Value::from("<blob>"),
            };
            object.insert(name.clone(), value);
        }
        out.push(Value::Object(object));
    }
    Ok(out)
}

/// Values a user would find absurd, by column name. Returns the complaint.
fn implausible(column: &str, value: &Value) -> Option<String> {
    let number = value.as_f64()?;
    let within = |low: f64, high: f64| {
        (!(low..=high).contains(&number))
            .then(|| format!("{column} = {number} not in {low}..{high}"))
    };
    if !number.is_finite() {
        return Some(format!("{column} = {number}"));
    }
    match column {
        c if c.ends_with("_percent") => within(0.0, 100.0),
        "fraction_lost" => within(0.0, 1.0),
        "frames_per_second"
        | "frames_decoded_per_second"
        | "frames_encoded_per_second"
        | "frames_dropped_per_second" => within(0.0, 240.0),
        "frame_width" | "frame_height" => within(0.0, 8192.0),
        c if c.ends_with("_bps") || c == "available_outgoing_bitrate" => within(0.0, 1e10),
        c if c.ends_with("_ms") => within(0.0, 60_000.0),
        c if c.contains("round_trip_time") || c == "rtt" || c == "max_rtt" => within(0.0, 60.0),
        c if c.ends_with("_per_second") => within(0.0, 1e6),
        "freezes" | "freeze_seconds" | "samples" | "objects" | "connections" | "channels"
        | "nodes" => within(0.0, 1e12),
        _ => None,
    }
}

/// Runs every query of every dashboard of `backend`; returns, per (dashboard, panel), whether
/// some run returned a row with a non-NULL value.
async fn run_all(
    databases: &Databases,
    backend: &str,
    renders: &[(String, Render)],
) -> HashMap<(String, String), bool> {
    let mut had_data: HashMap<(String, String), bool> = HashMap::new();
    for dashboard in dashboards().iter().filter(|d| d.backend == backend) {
        for (scope, render) in renders {
            if !dashboard.uid().contains(scope.as_str()) {
                continue;
            }
            let mut queries = dashboard.queries();
            for variable in dashboard.variables() {
                queries.push((
                    format!("variable {}", variable["name"].as_str().unwrap()),
                    variable["query"]
                        .as_str()
                        .expect("variable query")
                        .to_owned(),
                ));
            }
            for (title, sql) in queries {
                let rendered = render.render(backend, &sql);
                let rows = databases
                    .query(backend, &rendered)
                    .await
                    .unwrap_or_else(|err| {
                        panic!("{backend} {}: {title}: {err}\n{rendered}", dashboard.uid())
                    });
                let mut non_null = false;
                for row in &rows {
                    for (column, value) in row.as_object().unwrap() {
                        if let Some(complaint) = implausible(column, value) {
                            panic!(
                                "{backend} {}: {title}: {complaint}\n{rendered}",
                                dashboard.uid()
                            );
                        }
                        non_null |= !value.is_null() && column != "time" && column != "metric";
                    }
                }
                *had_data
                    .entry((dashboard.uid().to_owned(), title))
                    .or_default() |= non_null;
            }
        }
    }
    had_data
}

/// The ranges an operator would pick: all the data (overview), then each connection's own
/// lifetime with that connection selected (connection dashboard).
async fn standard_renders(databases: &Databases) -> Vec<(String, Render)> {
    let bounds = databases
        .query(
            "sqlite",
            "SELECT min(rtc_timestamp) AS low, max(rtc_timestamp) AS high FROM rtc_stats",
        )
        .await
        .unwrap();
    let low = bounds[0]["low"].as_f64().unwrap();
    let high = bounds[0]["high"].as_f64().unwrap();
    let channels: Vec<String> = databases
        .query("sqlite", "SELECT DISTINCT channel_id FROM sora_connection")
        .await
        .unwrap()
        .iter()
        .map(|row| row["channel_id"].as_str().unwrap().to_owned())
        .collect();
    let mut overview = Render::new(low - 60_000.0, high + 60_000.0);
    overview
        .variables
        .insert("channel_id".into(), channels.clone());
    let mut renders = vec![("overview".to_owned(), overview)];
    let connections = databases
        .query(
            "sqlite",
            "SELECT channel_id, connection_id, min(rtc_timestamp) AS low, max(rtc_timestamp) AS high \
             FROM rtc_stats GROUP BY channel_id, connection_id",
        )
        .await
        .unwrap();
    assert_eq!(connections.len(), 5, "3 Sora + 2 Chromium connections");
    for connection in &connections {
        let mut render = Render::new(
            connection["low"].as_f64().unwrap() - 60_000.0,
            connection["high"].as_f64().unwrap() + 60_000.0,
        );
        for name in ["channel_id", "connection_id"] {
            render.variables.insert(
                name.into(),
                vec![connection[name].as_str().unwrap().to_owned()],
            );
        }
        renders.push(("connection".to_owned(), render));
    }
    renders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_runs_and_returns_plausible_data() {
    let databases = Databases::filled(None, None).await;
    for backend in databases.backends() {
        let renders = standard_renders(&databases).await;

        assert!(
            !provisioned_timescaledb_flag(),
            "the provisioned flag must work on plain PostgreSQL too"
        );
        // With the flag set, as an operator may on TimescaleDB: time_bucket.
        #[cfg(all(feature = "timescaledb", feature = "testkit"))]
        if backend == "timescaledb" && kohaku_timescaledb::testkit::server_flavor() != "plain" {
            let with_time_bucket: Vec<(String, Render)> = renders
                .iter()
                .map(|(scope, render)| {
                    let mut render = render.clone();
                    render.time_bucket = true;
                    (scope.clone(), render)
                })
                .collect();
            run_all(&databases, backend, &with_time_bucket).await;
        }
        let had_data = run_all(&databases, backend, &renders).await;
        let empty: Vec<&(String, String)> = had_data
            .iter()
            .filter(|(_, data)| !**data)
            .map(|(panel, _)| panel)
            .collect();
        assert!(
            empty.is_empty(),
            "{backend}: panels without data for any connection of the fixtures: {empty:?}"
        );
        assert!(had_data.len() > 30, "{backend}: {} queries", had_data.len());
    }
}

/// One inbound-rtp sample and the rates the view must derive from it and its predecessor.
struct Sample {
    offset_ms: f64,
    bytes: u64,
    packets: u64,
    lost: i64,
    bitrate_bps: Option<f64>,
    loss_percent: Option<f64>,
}

const fn sample(
    offset_ms: f64,
    bytes: u64,
    packets: u64,
    lost: i64,
    bitrate_bps: Option<f64>,
    loss_percent: Option<f64>,
) -> Sample {
    Sample {
        offset_ms,
        bytes,
        packets,
        lost,
        bitrate_bps,
        loss_percent,
    }
}

/// One inbound-rtp sample of one stream, as a Sora log line.
fn inbound_line(timestamp_ms: f64, bytes: u64, packets: u64, lost: i64) -> String {
    let connection = sora_id(7);
    serde_json::json!({
        "type": "connection.rtc", "timestamp": "2026-01-01T00:00:00.000000Z",
        "label": "WebRTC SFU Sora", "version": "2025.2.1", "node_name": "sora@127.0.0.1",
        "role": "recvonly", "channel_id": "rates", "session_id": sora_id(8),
        "client_id": "client", "connection_id": connection,
        "simulcast": false, "spotlight": false,
        "rtc_data": {
            "id": "IT01V1", "type": "inbound-rtp", "kind": "video", "timestamp": timestamp_ms,
            "bytesReceived": bytes, "packetsReceived": packets, "packetsLost": lost,
            "jitterBufferDelay": packets as f64 * 0.05, "jitterBufferEmittedCount": packets
        }
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_follow_counter_deltas_across_gaps_resets_and_disorder() {
    let start = 1_767_225_600_000.0; // 2026-01-01T00:00:00Z
    let samples = [
        sample(0.0, 0, 0, 0, None, None),
        sample(1000.0, 1000, 10, 0, Some(8000.0), Some(0.0)),
        sample(2000.0, 3000, 20, 10, Some(16000.0), Some(50.0)),
        // A 10 s gap: the average over the gap.
        sample(12000.0, 13000, 120, 10, Some(8000.0), Some(0.0)),
        // The counters restarted (reconnect): no rate for this sample, not a negative one.
        sample(13000.0, 500, 5, 0, None, None),
        sample(14000.0, 1500, 15, 0, Some(8000.0), Some(0.0)),
    ];
    // Written out of order, as reports delayed by retries arrive.
    let order = [2, 0, 5, 1, 4, 3];
    let lines: String = order
        .iter()
        .map(|&i| {
            let s = &samples[i];
            inbound_line(start + s.offset_ms, s.bytes, s.packets, s.lost) + "\n"
        })
        .collect();
    let databases = Databases::filled(Some(&lines), None).await;
    for backend in databases.backends() {
        let time = if backend == "sqlite" {
            "rtc_timestamp"
        } else {
            "extract(epoch from rtc_time) * 1000"
        };
        let rows = databases
            .query(
                backend,
                &format!(
                    "SELECT {time} AS at, bitrate_bps, packet_loss_percent, jitter_buffer_delay_ms \
                     FROM rtc_inbound_rtp_rates ORDER BY 1"
                ),
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), samples.len(), "{backend}");
        for (row, sample) in rows.iter().zip(&samples) {
            let offset = sample.offset_ms;
            let close = |column: &str, expected: Option<f64>| {
                let got = row[column].as_f64();
                match (got, expected) {
                    (None, None) => {}
                    (Some(got), Some(expected)) => assert!(
                        (got - expected).abs() < 1e-6,
                        "{backend} at +{offset} ms: {column} = {got}, expected {expected}"
                    ),
                    _ => panic!(
                        "{backend} at +{offset} ms: {column} = {got:?}, expected {expected:?}"
                    ),
                }
            };
            assert!((row["at"].as_f64().unwrap() - (start + offset)).abs() < 1.0);
            close("bitrate_bps", sample.bitrate_bps);
            close("packet_loss_percent", sample.loss_percent);
            // 0.05 s of buffer delay per emitted packet → 50 ms whenever packets flowed.
            close("jitter_buffer_delay_ms", sample.bitrate_bps.map(|_| 50.0));
        }
    }
}

/// With `skip_unchanged = "all"` the same fixtures store fewer rows, and the panels stay right:
/// the codec, transport and candidate tables show the same values (their objects never change, so
/// most of their rows are gone), and a rate sample after skipped ones is the average over the gap,
/// never NULL where the full data has a value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panels_stay_right_when_unchanged_objects_are_skipped() {
    let every = Databases::filled(None, Some("\"off\"")).await;
    let skipped = Databases::filled(None, Some("\"all\"")).await;
    let count = "SELECT count(*) AS rows FROM rtc_stats";
    let rows = |answer: Vec<Value>| answer[0]["rows"].as_i64().unwrap();
    let (all_rows, fewer_rows) = (
        rows(every.query("sqlite", count).await.unwrap()),
        rows(skipped.query("sqlite", count).await.unwrap()),
    );
    assert!(
        fewer_rows * 10 < all_rows * 9,
        "{fewer_rows} of {all_rows} rows stored"
    );
    let renders = standard_renders(&every).await;
    let mut compared = 0;
    for backend in every.backends() {
        for dashboard in dashboards().iter().filter(|d| d.backend == backend) {
            for (scope, render) in &renders {
                if !dashboard.uid().contains(scope.as_str()) {
                    continue;
                }
                for (title, sql) in dashboard.queries() {
                    let rendered = render.render(backend, &sql);
                    let full = every.query(backend, &rendered).await.unwrap();
                    let kept = skipped.query(backend, &rendered).await.unwrap();
                    let place = format!("{backend} {}: {title}", dashboard.uid());
                    if ["rtc_codec", "rtc_transport", "rtc_ice_candidate"]
                        .iter()
                        .any(|view| sql.contains(&format!("FROM {view} ")))
                    {
                        assert_eq!(kept, full, "{place}");
                        compared += 1;
                    } else if sql.contains("_rates")
                        && full.iter().all(|row| row.get("time").is_some())
                    {
                        let key = |row: &Value| format!("{} {}", row["time"], row["metric"]);
                        let full: HashMap<String, &Value> =
                            full.iter().map(|row| (key(row), row)).collect();
                        for row in &kept {
                            let in_full = full.get(&key(row)).unwrap_or_else(|| {
                                panic!(
                                    "{place}: {} is not a sample time of the full data",
                                    key(row)
                                )
                            });
                            for (column, value) in row.as_object().unwrap() {
                                assert!(
                                    !value.is_null() || in_full[column].is_null(),
                                    "{place}: {column} at {} is NULL after a gap",
                                    key(row)
                                );
                            }
                        }
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 10, "{compared} panels compared");

    // Where a rate sample has the same predecessor in both (the same interval), it is the same.
    for view in ["rtc_inbound_rtp_rates", "rtc_outbound_rtp_rates"] {
        let sql = format!("SELECT * FROM {view} ORDER BY connection_id, rtc_id, rtc_timestamp");
        let key = |row: &Value| {
            format!(
                "{} {} {}",
                row["connection_id"], row["rtc_id"], row["rtc_timestamp"]
            )
        };
        let full: HashMap<String, Value> = every
            .query("sqlite", &sql)
            .await
            .unwrap()
            .into_iter()
            .map(|row| (key(&row), row))
            .collect();
        let mut same_interval = 0;
        for row in skipped.query("sqlite", &sql).await.unwrap() {
            let in_full = &full[&key(&row)];
            if row["interval_seconds"] == in_full["interval_seconds"] {
                assert_eq!(&row, in_full, "{view}");
                same_interval += 1;
            }
        }
        assert!(same_interval > 0, "{view}: no sample to compare");
    }
}

/// The figures docs/summary.md promises, computed here a second way from the fixture reports' raw
/// objects (serde_json values, not Kohaku's parser): what each summary row must hold.
fn expected_summary(report: &FixtureReport) -> (f64, Vec<(&'static str, Value)>) {
    let objects: Vec<Value> = report
        .objects
        .iter()
        .map(|object| serde_json::from_str(&object.text).unwrap())
        .collect();
    let of_type = |kind: &str| -> Vec<&Value> {
        objects
            .iter()
            .filter(|object| object["type"] == kind)
            .collect()
    };
    let sum = |kind: &str, member: &str| -> Value {
        let values: Vec<f64> = of_type(kind)
            .iter()
            .filter_map(|object| object[member].as_f64())
            .collect();
        if values.is_empty() {
            Value::Null
        } else {
            serde_json::json!(values.iter().sum::<f64>())
        }
    };
    let max = |kind: &str, member: &str| -> Value {
        of_type(kind)
            .iter()
            .filter_map(|object| object[member].as_f64())
            .reduce(f64::max)
            .map_or(Value::Null, |value| serde_json::json!(value))
    };
    let by_id = |kind: &str, id: &Value| -> Option<&Value> {
        objects
            .iter()
            .find(|object| object["type"] == kind && &object["id"] == id)
    };
    let pair = of_type("transport")
        .first()
        .map(|transport| transport["selectedCandidatePairId"].clone())
        .and_then(|id| by_id("candidate-pair", &id));
    let candidate_type = |side: &str| -> Value {
        pair.and_then(|pair| {
            by_id(
                &format!("{side}-candidate"),
                &pair[format!("{side}CandidateId")],
            )
        })
        .map_or(Value::Null, |candidate| candidate["candidateType"].clone())
    };
    let codec = |kind: &str| -> Value {
        let stream = of_type("outbound-rtp")
            .into_iter()
            .chain(of_type("inbound-rtp"))
            .find(|stream| stream["kind"] == kind);
        stream
            .and_then(|stream| by_id("codec", &stream["codecId"]))
            .map_or(Value::Null, |codec| codec["mimeType"].clone())
    };
    let time = objects
        .iter()
        .map(|object| object["timestamp"].as_f64().unwrap())
        .reduce(f64::max)
        .unwrap();
    let figures = vec![
        ("stats_objects", serde_json::json!(objects.len() as f64)),
        (
            "inbound_streams",
            serde_json::json!(of_type("inbound-rtp").len() as f64),
        ),
        ("bytes_received", sum("inbound-rtp", "bytesReceived")),
        ("packets_lost", sum("inbound-rtp", "packetsLost")),
        ("jitter", max("inbound-rtp", "jitter")),
        ("frames_decoded", sum("inbound-rtp", "framesDecoded")),
        ("concealed_samples", sum("inbound-rtp", "concealedSamples")),
        ("bytes_sent", sum("outbound-rtp", "bytesSent")),
        ("frames_encoded", sum("outbound-rtp", "framesEncoded")),
        (
            "round_trip_time",
            max("remote-inbound-rtp", "roundTripTime"),
        ),
        ("fraction_lost", max("remote-inbound-rtp", "fractionLost")),
        (
            "current_round_trip_time",
            pair.map_or(Value::Null, |pair| pair["currentRoundTripTime"].clone()),
        ),
        ("local_candidate_type", candidate_type("local")),
        ("remote_candidate_type", candidate_type("remote")),
        ("audio_codec", codec("audio")),
        ("video_codec", codec("video")),
    ];
    (time, figures)
}

/// Asserts that `rows` (of `rtc_report_summary`) hold, for each of `reports`, the figures
/// [`expected_summary`] computes from its objects; returns how many text figures were compared.
fn assert_summaries_match(backend: &str, rows: &[Value], reports: &[FixtureReport]) -> usize {
    let stored: HashMap<(String, String), &Value> = rows
        .iter()
        .map(|row| {
            let time = row["rtc_timestamp"].as_f64().unwrap();
            (
                (
                    row["connection_id"].as_str().unwrap().to_owned(),
                    format!("{time:.3}"),
                ),
                row,
            )
        })
        .collect();
    let mut checked_texts = 0;
    for report in reports {
        let (time, figures) = expected_summary(report);
        let row = stored
            .get(&(report.connection_id.clone(), format!("{time:.3}")))
            .unwrap_or_else(|| panic!("{backend}: no summary at {time}"));
        for (column, expected) in figures {
            let actual = &row[column];
            match (expected.as_f64(), actual.as_f64()) {
                (Some(expected), Some(actual)) => assert!(
                    (expected - actual).abs() <= 1e-9 * expected.abs().max(1.0),
                    "{backend} {} at {time}: {column} = {actual}, expected {expected}",
                    report.connection_id
                ),
                _ => {
                    checked_texts += usize::from(expected.is_string());
                    assert_eq!(
                        actual, &expected,
                        "{backend} {} at {time}: {column}",
                        report.connection_id
                    );
                }
            }
        }
    }
    checked_texts
}

/// Every report of the fixtures has one summary, on every backend, and its figures are what the
/// raw objects give by the documented rules; `skip_unchanged` changes none of them but the count
/// of objects it did not store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_agree_with_the_raw_objects() {
    let every = Databases::filled(None, Some("\"off\"")).await;
    let skipped = Databases::filled(None, Some("\"all\"")).await;
    let reports: Vec<FixtureReport> = LOGS.iter().flat_map(|log| fixture_reports(log)).collect();
    let sql = "SELECT * FROM rtc_report_summary ORDER BY connection_id, rtc_timestamp";
    for backend in every.backends() {
        let rows = every.query(backend, sql).await.unwrap();
        assert_eq!(
            rows.len(),
            reports.len(),
            "{backend}: one summary per report"
        );
        let checked_texts = assert_summaries_match(backend, &rows, &reports);
        assert!(
            checked_texts > 50,
            "{backend}: {checked_texts} texts compared"
        );

        let without = |rows: Vec<Value>| -> Vec<Value> {
            rows.into_iter()
                .map(|mut row| {
                    row.as_object_mut()
                        .unwrap()
                        .remove("stats_objects_unchanged");
                    row
                })
                .collect()
        };
        let skipping = skipped.query(backend, sql).await.unwrap();
        let not_stored: f64 = skipping
            .iter()
            .map(|row| row["stats_objects_unchanged"].as_f64().unwrap())
            .sum();
        let count = "SELECT count(*) AS rows FROM rtc_stats";
        let rows_of = |answer: Vec<Value>| answer[0]["rows"].as_f64().unwrap();
        let all_rows = rows_of(every.query(backend, count).await.unwrap());
        let fewer_rows = rows_of(skipped.query(backend, count).await.unwrap());
        assert_eq!(
            all_rows - not_stored,
            fewer_rows,
            "{backend}: the summaries count exactly the objects skip_unchanged did not store"
        );
        assert!(
            not_stored > 0.0,
            "{backend}: skip_unchanged skipped something"
        );
        assert_eq!(
            without(skipping),
            without(rows),
            "{backend}: the same summaries"
        );
    }
}

/// `kohaku migrate --summaries` gives reports stored without a summary (as before schema 4/5)
/// theirs, read back from the stored objects: each agrees with an independent computation from the
/// objects stored for that report (an object repeated in a later report is stored once, with the
/// first), `stats_objects` counts them, and running it again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_summaries_rebuilds_the_summaries_of_stored_reports() {
    let databases = Databases::filled(None, Some("\"off\"")).await;
    let sql = "SELECT * FROM rtc_report_summary ORDER BY connection_id, rtc_timestamp";
    for backend in databases.backends() {
        databases
            .execute(backend, "DELETE FROM rtc_report_summary")
            .await;
    }
    let config = databases._dir.path().join("kohaku.toml");
    let migrate = || {
        tokio::task::block_in_place(|| {
            kohaku_command()
                .args(["migrate", "--summaries", "--config"])
                .arg(&config)
                .output()
                .expect("kohaku migrate runs")
        })
    };
    let first = migrate();
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{said}");
    assert!(said.contains("summaries of"), "{said}");
    let mut after_first = HashMap::new();
    for backend in databases.backends() {
        after_first.insert(backend, databases.query(backend, sql).await.unwrap());
    }
    let again = migrate();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    for backend in databases.backends() {
        let rebuilt = databases.query(backend, sql).await.unwrap();
        assert_eq!(
            rebuilt, after_first[backend],
            "{backend}: a second run changes nothing"
        );
        // The stored objects, grouped into the reports they were stored with.
        let objects = databases
            .query(
                backend,
                "SELECT connection_id, sora_timestamp, rtc_id, rtc_type, rtc_timestamp, rtc_data \
                 FROM rtc_stats ORDER BY connection_id, sora_timestamp, rtc_timestamp",
            )
            .await
            .unwrap();
        let mut stored: Vec<FixtureReport> = Vec::new();
        let mut last_key: Option<(Value, Value)> = None;
        for object in objects {
            let key = (
                object["connection_id"].clone(),
                object["sora_timestamp"].clone(),
            );
            let text = match &object["rtc_data"] {
                Value::String(text) => text.clone(),
                json => json.to_string(),
            };
            let fixture_object = FixtureObject {
                rtc_id: object["rtc_id"].as_str().unwrap().to_owned(),
                rtc_type: object["rtc_type"].as_str().unwrap().to_owned(),
                rtc_timestamp: object["rtc_timestamp"].as_f64().unwrap(),
                text,
            };
            if last_key.as_ref() == Some(&key) {
                stored.last_mut().unwrap().objects.push(fixture_object);
            } else {
                stored.push(FixtureReport {
                    channel_id: String::new(),
                    connection_id: key.0.as_str().unwrap().to_owned(),
                    role: String::new(),
                    group_id: None,
                    objects: vec![fixture_object],
                    body: String::new(),
                });
                last_key = Some(key);
            }
        }
        assert_eq!(
            rebuilt.len(),
            stored.len(),
            "{backend}: a summary per stored report"
        );
        let checked_texts = assert_summaries_match(backend, &rebuilt, &stored);
        assert!(
            checked_texts > 50,
            "{backend}: {checked_texts} texts compared"
        );
        assert!(
            rebuilt
                .iter()
                .all(|row| row["stats_objects_unchanged"].as_f64() == Some(0.0)),
            "{backend}: nothing known to be skipped"
        );
    }
}
