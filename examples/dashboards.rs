//! The dashboard benchmark (`./scripts/bench dashboards`): what each Grafana panel costs on
//! databases of production size, on SQLite and PostgreSQL, and whether that cost follows the time
//! range shown or the history stored.
//!
//! It generates reports shaped like the Chromium fixture (its first report's objects, counters
//! growing with time) and loads them with `kohaku import` into both backends at once:
//! - **small**: the last hour of 200 connections in 10 channels, a report every 10 s;
//! - **large**: 7 days of history (16 connections, a report a minute), then the same hour,
//!   at least 6 million objects in all, in time order on disk.
//!
//! Then every panel query of both dashboards, rendered as Grafana renders it, runs for the last
//! 1 h, 6 h and 24 h (the overview with every channel selected, the connection dashboard with one
//! connection of the last hour): the median of a few runs, in milliseconds, on each database,
//! and the ratio large / small. It also prints bytes per stored object.
//!
//! Usage: `bench-dashboards KOHAKU_BINARY` with `KOHAKU_BENCH_PG_URL` naming a PostgreSQL
//! superuser URL of a throwaway cluster (`scripts/bench dashboards` starts one).

#[path = "../tests/common/grafana.rs"]
mod grafana;
#[path = "../tests/common/support.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use grafana::{dashboards, Render};
use serde_json::Value;

type AnyError = Box<dyn std::error::Error + Send + Sync>;

const CHANNELS: usize = 10;
const RECENT_CONNECTIONS: usize = 200;
const RECENT_INTERVAL_MS: u64 = 10_000;
const HISTORY_CONNECTIONS: usize = 16;
const HISTORY_INTERVAL_MS: u64 = 60_000;
const HISTORY_DAYS: u64 = 7;
const HOUR_MS: u64 = 3_600_000;
/// Runs per panel and database, after one to warm the caches; the median is reported.
const RUNS: usize = 9;
const RANGES_HOURS: [u64; 3] = [1, 6, 24];

/// A send-and-receive connection's report made of the Chromium fixture's two peer connections
/// (one sends, one receives): the fullest report of each, merged by object id. Each generated
/// report carries these objects, with their counters moved on by the report's age.
fn template() -> Result<Vec<Value>, AnyError> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chromium/rtc_stats.chromium-av.jsonl");
    let text = std::fs::read_to_string(fixture)?;
    let mut reports: Vec<((String, String), Vec<Value>)> = Vec::new();
    for line in text.lines() {
        let line: Value = serde_json::from_str(line)?;
        let key = (
            line["connection_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            line["timestamp"].as_str().unwrap_or_default().to_owned(),
        );
        match reports.last_mut() {
            Some((last, objects)) if *last == key => objects.push(line["rtc_data"].clone()),
            _ => reports.push((key, vec![line["rtc_data"].clone()])),
        }
    }
    let mut fullest: Vec<(String, Vec<Value>)> = Vec::new();
    for ((connection, _), objects) in reports {
        match fullest.iter_mut().find(|(c, _)| *c == connection) {
            Some((_, kept)) if kept.len() >= objects.len() => {}
            Some((_, kept)) => *kept = objects,
            None => fullest.push((connection, objects)),
        }
    }
    let mut merged: Vec<Value> = Vec::new();
    for object in fullest.into_iter().flat_map(|(_, objects)| objects) {
        if !merged.iter().any(|kept| kept["id"] == object["id"]) {
            merged.push(object);
        }
    }
    Ok(merged)
}

/// Per second of call: how much each counter a dashboard reads grows.
const GROWTH: &[(&str, f64)] = &[
    ("bytesReceived", 60_000.0),
    ("bytesSent", 60_000.0),
    ("packetsReceived", 60.0),
    ("packetsSent", 60.0),
    ("headerBytesReceived", 1_500.0),
    ("headerBytesSent", 1_500.0),
    ("framesDecoded", 30.0),
    ("framesEncoded", 30.0),
    ("framesReceived", 30.0),
    ("framesSent", 30.0),
    ("totalSamplesReceived", 48_000.0),
    ("concealedSamples", 40.0),
    ("jitterBufferDelay", 3.0),
    ("jitterBufferEmittedCount", 48_000.0),
    ("retransmittedBytesSent", 500.0),
    ("retransmittedPacketsSent", 0.5),
    ("nackCount", 0.2),
    ("totalEncodeTime", 0.1),
];

/// Writes `rtc_stats.jsonl` lines, as Sora logs them, of `connections` connections (ids from
/// `first_connection`) reporting every `interval_ms` from `from_ms` until `to_ms`.
fn write_lines(
    out: &mut dyn Write,
    template: &[Value],
    first_connection: usize,
    connections: usize,
    interval_ms: u64,
    from_ms: u64,
    to_ms: u64,
) -> Result<u64, AnyError> {
    let mut objects = 0;
    let newest = template
        .iter()
        .filter_map(|object| object["timestamp"].as_f64())
        .fold(f64::MIN, f64::max);
    let mut at = from_ms;
    let mut round = 0u64;
    while at < to_ms {
        for index in first_connection..first_connection + connections {
            let connection_id = format!("DASH{index:022}");
            let channel = format!("channel-{}", index % CHANNELS);
            let sora_time = kohaku_sink::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(at + 250) * 1_000_000,
            )?;
            let envelope = format!(
                r#""type":"connection.rtc","id":"R{index}-{round}","timestamp":"{}","label":"WebRTC SFU Sora","version":"2025.2.0","node_name":"sora@10.0.0.{}","role":"sendrecv","channel_id":"{channel}","session_id":"S{index:025}","client_id":"C{index}","connection_id":"{connection_id}","multistream":true,"simulcast":false,"spotlight":false"#,
                kohaku_sink::format_timestamp(sora_time),
                index % 4
            );
            let seconds = (round * interval_ms) as f64 / 1000.0;
            // Connections do not report in step: each has its own phase in the interval, and a
            // report's objects keep their own times as in the fixture (remote-* ones are older).
            let phase = ((index as u64 * 7_919) % interval_ms) as f64;
            for object in template {
                let mut object = object.clone();
                if let Some(members) = object.as_object_mut() {
                    let offset = members
                        .get("timestamp")
                        .and_then(Value::as_f64)
                        .map_or(0.0, |own| own - newest);
                    members.insert(
                        "timestamp".into(),
                        Value::from(at as f64 - phase + offset + 0.5),
                    );
                    for (name, per_second) in GROWTH {
                        if let Some(value) = members.get(*name).and_then(Value::as_f64) {
                            let grown = value + per_second * seconds;
                            let number = if value.fract() == 0.0 && per_second.fract() == 0.0 {
                                Value::from(grown as u64)
                            } else {
                                Value::from(grown)
                            };
                            members.insert((*name).into(), number);
                        }
                    }
                    // A little loss, varying by connection and time.
                    if members.contains_key("packetsLost") {
                        let lost = (seconds * (index % 7) as f64 / 50.0).floor();
                        members.insert("packetsLost".into(), Value::from(lost as u64));
                    }
                }
                writeln!(out, "{{{envelope},\"rtc_data\":{object}}}")?;
                objects += 1;
            }
        }
        at += interval_ms;
        round += 1;
    }
    Ok(objects)
}

/// `kohaku import -` with `config`, fed by `fill`; returns the objects generated.
fn import(
    kohaku: &Path,
    config: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<u64, AnyError>,
) -> Result<u64, AnyError> {
    let mut child = Command::new(kohaku)
        .args(["import", "--config"])
        .arg(config)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stdin = child.stdin.take().ok_or("import without stdin")?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, stdin);
    let objects = fill(&mut writer)?;
    writer.flush()?;
    drop(writer);
    if !child.wait()?.success() {
        return Err(format!("kohaku import ({}) failed", config.display()).into());
    }
    Ok(objects)
}

fn psql(url: &str, command: &str) -> Result<String, AnyError> {
    Ok(support::psql(url, command)?)
}

fn database_url(admin_url: &str, name: &str) -> Result<String, AnyError> {
    match admin_url.rsplit_once('/') {
        Some((server, _)) => Ok(format!("{server}/{name}")),
        None => Err("PostgreSQL URL without a database".into()),
    }
}

struct Database {
    name: &'static str,
    sqlite: PathBuf,
    postgres: String,
}

fn config_of(work: &Path, database: &Database) -> Result<PathBuf, AnyError> {
    let path = work.join(format!("{}.toml", database.name));
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nskip_unchanged = \"off\"\n\n[sinks.sqlite]\npath = \"{}\"\n\n\
             [sinks.timescaledb]\nuri = \"{}\"\nretention_days = 0\n",
            database.sqlite.display(),
            database.postgres
        ),
    )?;
    Ok(path)
}

/// Bytes per stored object: SQLite's file, PostgreSQL's relations with their indexes (the raw
/// objects, the summaries, the connections).
fn bytes_per_object(database: &Database) -> Result<(f64, f64, f64, f64), AnyError> {
    let sqlite = rusqlite::Connection::open(&database.sqlite)?;
    let rows: f64 = sqlite.query_row("SELECT count(*) FROM rtc_stats", [], |row| row.get(0))?;
    let file = std::fs::metadata(&database.sqlite)?.len() as f64;
    let summary_bytes: f64 = sqlite.query_row(
        "SELECT sum(pgsize) FROM dbstat WHERE name LIKE 'rtc_report_summary%'",
        [],
        |row| row.get(0),
    )?;
    let size = |relation: &str| -> Result<f64, AnyError> {
        Ok(psql(
            &database.postgres,
            &format!("SELECT coalesce(hypertable_size('{relation}'), pg_total_relation_size('{relation}'))"),
        )
        .or_else(|_| {
            psql(
                &database.postgres,
                &format!("SELECT pg_total_relation_size('{relation}')"),
            )
        })?
        .parse()?)
    };
    let pg_stats = size("rtc_stats")?;
    let pg_summaries = size("rtc_report_summary")?;
    Ok((
        (file - summary_bytes) / rows,
        summary_bytes / rows,
        pg_stats / rows,
        pg_summaries / rows,
    ))
}

fn sqlite_query(connection: &rusqlite::Connection, sql: &str) -> Result<usize, AnyError> {
    let mut statement = connection.prepare(sql)?;
    let columns = statement.column_count();
    let mut rows = statement.query([])?;
    let mut count = 0;
    while let Some(row) = rows.next()? {
        for column in 0..columns {
            let _ = row.get_ref(column)?;
        }
        count += 1;
    }
    Ok(count)
}

/// One panel's figures: milliseconds on the small and the large database.
struct Timing {
    dashboard: String,
    panel: String,
    backend: &'static str,
    hours: u64,
    small_ms: f64,
    large_ms: f64,
}

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), AnyError> {
    let kohaku = std::fs::canonicalize(
        std::env::args()
            .nth(1)
            .ok_or("usage: bench-dashboards KOHAKU_BINARY")?,
    )?;
    let admin_url = std::env::var("KOHAKU_BENCH_PG_URL")?;
    // KOHAKU_BENCH_DASHBOARDS_DIR keeps the SQLite files there (to look into a plan afterwards);
    // by default they go with a temporary directory.
    let temporary = tempfile::tempdir()?;
    let work = match std::env::var_os("KOHAKU_BENCH_DASHBOARDS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => temporary.path().to_owned(),
    };
    let work = work.as_path();
    let template = template()?;
    // KOHAKU_BENCH_DASHBOARDS_REUSE=1 (with KOHAKU_BENCH_DASHBOARDS_DIR and the same cluster)
    // measures the databases a previous run loaded, for iterating on a query.
    let now_file = work.join("now_ms");
    let reuse = std::env::var_os("KOHAKU_BENCH_DASHBOARDS_REUSE").is_some() && now_file.exists();
    let now_ms: u64 = if reuse {
        std::fs::read_to_string(&now_file)?.trim().parse()?
    } else {
        (kohaku_sink::OffsetDateTime::now_utc().unix_timestamp() as u64) * 1000
    };
    let recent_from = now_ms - HOUR_MS;

    let small = Database {
        name: "small",
        sqlite: work.join("small.db"),
        postgres: database_url(&admin_url, "dash_small")?,
    };
    let large = Database {
        name: "large",
        sqlite: work.join("large.db"),
        postgres: database_url(&admin_url, "dash_large")?,
    };
    if !reuse {
        for name in ["dash_small", "dash_large"] {
            psql(&admin_url, &format!("DROP DATABASE IF EXISTS {name}"))?;
        }
        psql(&admin_url, "CREATE DATABASE dash_small")?;

        eprintln!("dashboards: loading the last hour ({RECENT_CONNECTIONS} connections, a report every 10 s) into both backends");
        let started = Instant::now();
        let recent = import(&kohaku, &config_of(work, &small)?, |out| {
            write_lines(
                out,
                &template,
                0,
                RECENT_CONNECTIONS,
                RECENT_INTERVAL_MS,
                recent_from,
                now_ms,
            )
        })?;
        eprintln!(
            "dashboards: {recent} objects in {:.0} s",
            started.elapsed().as_secs_f64()
        );

        // The large database gets the history first and then the very same last hour, so that
        // its rows lie in time order on disk as a database that grew over the week has them.
        psql(&admin_url, "CREATE DATABASE dash_large")?;
        eprintln!("dashboards: loading {HISTORY_DAYS} days of history ({HISTORY_CONNECTIONS} connections, a report a minute), then the same last hour, into the large databases");
        let started = Instant::now();
        let history_from = recent_from - HISTORY_DAYS * 24 * HOUR_MS;
        let large_config = config_of(work, &large)?;
        let history = import(&kohaku, &large_config, |out| {
            write_lines(
                out,
                &template,
                RECENT_CONNECTIONS,
                HISTORY_CONNECTIONS,
                HISTORY_INTERVAL_MS,
                history_from,
                recent_from,
            )
        })?;
        let again = import(&kohaku, &large_config, |out| {
            write_lines(
                out,
                &template,
                0,
                RECENT_CONNECTIONS,
                RECENT_INTERVAL_MS,
                recent_from,
                now_ms,
            )
        })?;
        eprintln!(
            "dashboards: {} objects in {:.0} s",
            history + again,
            started.elapsed().as_secs_f64(),
        );
        // What autovacuum would do in the background after a load, done before measuring, so that
        // it does not take a core from one query and not another.
        for database in [&small, &large] {
            psql(&database.postgres, "VACUUM ANALYZE")?;
        }
        std::fs::write(&now_file, now_ms.to_string())?;
    }

    let pg_small = kohaku_timescaledb::testkit::QueryClient::connect(&small.postgres).await?;
    let pg_large = kohaku_timescaledb::testkit::QueryClient::connect(&large.postgres).await?;
    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("channel-{c}")).collect();
    // A connection of the last hour (the first one of channel 3).
    let connection = ("channel-3".to_owned(), format!("DASH{:022}", 3));

    let mut timings: Vec<Timing> = Vec::new();
    for dashboard in dashboards() {
        let backend: &'static str = if dashboard.backend == "sqlite" {
            "sqlite"
        } else {
            "postgres"
        };
        let overview = dashboard.uid().contains("overview");
        for hours in RANGES_HOURS {
            let mut render = Render::new((now_ms - hours * HOUR_MS) as f64, now_ms as f64);
            if overview {
                render
                    .variables
                    .insert("channel_id".into(), channels.clone());
            } else {
                render
                    .variables
                    .insert("channel_id".into(), vec![connection.0.clone()]);
                render
                    .variables
                    .insert("connection_id".into(), vec![connection.1.clone()]);
            }
            for (panel, sql) in dashboard.queries() {
                let rendered = render.render(&dashboard.backend, &sql);
                // Small and large alternate round by round, so that a disturbance of the machine
                // hits both alike; the first round only warms the caches (a freshly loaded
                // database is partly on disk). SQLite gets a connection of its own for each run:
                // two connections open at once in one process made the first one's queries twice
                // as slow, whichever file it had.
                let mut runs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
                for round in 0..=RUNS {
                    for (which, runs) in runs.iter_mut().enumerate() {
                        let database = if which == 0 { &small } else { &large };
                        let sqlite = if backend == "sqlite" {
                            let connection = rusqlite::Connection::open(&database.sqlite)?;
                            // The schema read by the first statement, as Grafana's kept
                            // connection has it.
                            connection.query_row(
                                "SELECT count(*) FROM sqlite_schema",
                                [],
                                |_| Ok(()),
                            )?;
                            Some(connection)
                        } else {
                            None
                        };
                        let start = Instant::now();
                        if let Some(connection) = &sqlite {
                            sqlite_query(connection, &rendered)
                                .map_err(|err| format!("{panel}: {err}\n{rendered}"))?;
                        } else {
                            let client = if which == 0 { &pg_small } else { &pg_large };
                            client
                                .query_json(&rendered)
                                .await
                                .map_err(|err| format!("{panel}: {err}\n{rendered}"))?;
                        }
                        if round > 0 {
                            runs.push(start.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                }
                let [small_runs, large_runs] = runs;
                let figures = [median(small_runs), median(large_runs)];
                timings.push(Timing {
                    dashboard: if overview { "overview" } else { "connection" }.to_owned(),
                    panel,
                    backend,
                    hours,
                    small_ms: figures[0],
                    large_ms: figures[1],
                });
            }
        }
    }

    println!();
    println!("| dashboard | panel | backend | range | small ms | large ms | large / small |");
    println!("|---|---|---|---|---|---|---|");
    for timing in &timings {
        println!(
            "| {} | {} | {} | {} h | {:.1} | {:.1} | {:.2} |",
            timing.dashboard,
            timing.panel,
            timing.backend,
            timing.hours,
            timing.small_ms,
            timing.large_ms,
            timing.large_ms / timing.small_ms.max(0.001)
        );
    }
    println!();
    for (dashboard, hours) in [("overview", 24), ("connection", 24), ("connection", 1)] {
        for backend in ["sqlite", "postgres"] {
            let of: Vec<&Timing> = timings
                .iter()
                .filter(|t| t.dashboard == dashboard && t.backend == backend && t.hours == hours)
                .collect();
            let slowest = of.iter().map(|t| t.large_ms).fold(0.0, f64::max);
            println!(
                "{dashboard} {hours} h, {backend}: slowest panel {slowest:.1} ms on the large database"
            );
        }
    }
    let one_hour: Vec<f64> = timings
        .iter()
        .filter(|t| t.hours == 1 && t.small_ms >= 5.0)
        .map(|t| t.large_ms / t.small_ms)
        .collect();
    println!(
        "1 h range, the same rows on both databases: large / small from {:.2} to {:.2} (panels over 5 ms)",
        one_hour.iter().copied().fold(f64::INFINITY, f64::min),
        one_hour.iter().copied().fold(0.0, f64::max)
    );
    for database in [&small, &large] {
        let (sqlite_raw, sqlite_summary, pg_raw, pg_summary) = bytes_per_object(database)?;
        println!(
            "{}: bytes per stored object: SQLite {sqlite_raw:.0} (+{sqlite_summary:.0} for summaries), \
             PostgreSQL {pg_raw:.0} (+{pg_summary:.0} for summaries)",
            database.name
        );
    }
    pg_small.close().await;
    pg_large.close().await;

    // The index review: what the channel index schema 4/5 dropped from rtc_stats would cost again.
    let objects: f64 = psql(&large.postgres, "SELECT count(*) FROM rtc_stats")?.parse()?;
    let sqlite = rusqlite::Connection::open(&large.sqlite)?;
    sqlite.execute_batch(
        "CREATE INDEX rtc_stats_channel_time ON rtc_stats (channel_id, rtc_timestamp)",
    )?;
    let sqlite_index: f64 = sqlite.query_row(
        "SELECT sum(pgsize) FROM dbstat WHERE name = 'rtc_stats_channel_time'",
        [],
        |row| row.get(0),
    )?;
    let sqlite_index = sqlite_index / objects;
    psql(
        &large.postgres,
        "CREATE INDEX rtc_stats_channel_time ON rtc_stats (channel_id, rtc_time)",
    )?;
    let pg_index: f64 = psql(
        &large.postgres,
        "SELECT pg_relation_size('rtc_stats_channel_time')",
    )?
    .parse()?;
    println!(
        "the dropped (channel_id, time) index of rtc_stats, built again on the large database: \
         SQLite {sqlite_index:.0} bytes per object, PostgreSQL {:.0}",
        pg_index / objects
    );
    Ok(())
}
