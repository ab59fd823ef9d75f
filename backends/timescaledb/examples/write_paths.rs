//! Compares ways of writing stats rows into PostgreSQL, on the same rows, in one run:
//!
//! 1. `COPY rtc_stats FROM STDIN` straight into the table — the ceiling; not idempotent.
//! 2. The backend's write path: COPY into a staging table, then `INSERT … SELECT … ON CONFLICT DO
//!    NOTHING` (what `TimescaleSink::write` does).
//! 3. Multi-row `INSERT … VALUES … ON CONFLICT DO NOTHING`.
//!
//! Each runs in a fresh database, in batches of 5,000 rows (Kohaku's default batch).
//!
//! ```sh
//! KOHAKU_TEST_PG_URL=postgres://postgres@127.0.0.1:PORT/postgres \
//!   cargo run --release -p kohaku-timescaledb --example write_paths [ROWS]
//! ```
//! `./scripts/bench-postgres` starts a throwaway cluster and runs it.

use std::time::Instant;

use kohaku_sink::testkit::sample;
use kohaku_sink::{format_timestamp, Report, StatsBatch, StatsSink};
use kohaku_timescaledb::testkit::fresh_database;
use kohaku_timescaledb::{TimescaleOptions, TimescaleSink};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, QueryBuilder};

const OBJECTS_PER_REPORT: usize = 30;
const BATCH_ROWS: usize = 5_000;

fn reports(rows: usize) -> Vec<Report> {
    (0..rows.div_ceil(OBJECTS_PER_REPORT))
        .map(|i| {
            sample::report(
                sample::connection(i as u64 % 200),
                1_795_483_359_508.797 + i as f64 * 1000.0,
                OBJECTS_PER_REPORT,
            )
        })
        .collect()
}

fn batches(reports: &[Report]) -> Vec<StatsBatch> {
    reports
        .chunks(BATCH_ROWS / OBJECTS_PER_REPORT)
        .map(|chunk| sample::batch(chunk.iter().cloned()))
        .collect()
}

async fn migrated(prefix: &str) -> (String, TimescaleSink) {
    let url = fresh_database(prefix).await;
    let mut options = TimescaleOptions::new(&url);
    options.settings.retention_days = 0;
    let sink = TimescaleSink::connect(options).expect("sink");
    sink.migrate().await.expect("migrate");
    (url, sink)
}

async fn raw_copy(batches: &[StatsBatch]) -> f64 {
    let (url, _sink) = migrated("bench_copy").await;
    let pool = PgPool::connect(&url).await.expect("connect");
    let started = Instant::now();
    for batch in batches {
        let mut text = Vec::with_capacity(batch.row_count() * 700);
        for row in batch.rows() {
            let c = &row.report.connection;
            let time = format_timestamp(sample::time_of(row.object.rtc_timestamp));
            let fields = [
                time.as_str(),
                &c.channel_id,
                &c.session_id,
                &c.client_id,
                &c.connection_id,
                c.bundle_id.as_deref().unwrap_or("\\N"),
                &row.object.rtc_type,
                &row.object.rtc_id,
            ];
            text.extend_from_slice(fields.join("\t").as_bytes());
            text.extend_from_slice(format!("\t{:?}\t", row.object.rtc_timestamp).as_bytes());
            text.extend_from_slice(row.object.rtc_data.get().replace('\\', "\\\\").as_bytes());
            text.extend_from_slice(
                format!(
                    "\t{}\t{}\n",
                    format_timestamp(row.report.sora_timestamp),
                    format_timestamp(row.report.received_at)
                )
                .as_bytes(),
            );
        }
        let mut connection = pool.acquire().await.expect("acquire");
        let mut copy = connection
            .copy_in_raw(
                "COPY rtc_stats (rtc_time, channel_id, session_id, client_id, connection_id, bundle_id, rtc_type, \
                 rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) FROM STDIN",
            )
            .await
            .expect("copy");
        copy.send(text).await.expect("send");
        copy.finish().await.expect("finish");
    }
    started.elapsed().as_secs_f64()
}

async fn sink_path(batches: &[StatsBatch]) -> f64 {
    let (_url, sink) = migrated("bench_sink").await;
    let started = Instant::now();
    for batch in batches {
        sink.write(batch).await.expect("write");
    }
    started.elapsed().as_secs_f64()
}

async fn multi_row_insert(batches: &[StatsBatch]) -> f64 {
    let (url, _sink) = migrated("bench_insert").await;
    let pool = PgPool::connect(&url).await.expect("connect");
    let started = Instant::now();
    for batch in batches {
        let rows: Vec<_> = batch.rows().collect();
        // 11 parameters per row, under PostgreSQL's 65535.
        for chunk in rows.chunks(5_000) {
            let mut query = QueryBuilder::<Postgres>::new(
                "INSERT INTO rtc_stats (rtc_time, channel_id, session_id, client_id, connection_id, bundle_id, \
                 rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) ",
            );
            query.push_values(chunk, |mut b, row| {
                let c = &row.report.connection;
                b.push("to_timestamp(")
                    .push_bind_unseparated(row.object.rtc_timestamp)
                    .push_unseparated(" / 1000.0)")
                    .push_bind(&c.channel_id)
                    .push_bind(&c.session_id)
                    .push_bind(&c.client_id)
                    .push_bind(&c.connection_id)
                    .push_bind(&c.bundle_id)
                    .push_bind(&row.object.rtc_type)
                    .push_bind(&row.object.rtc_id)
                    .push_bind(row.object.rtc_timestamp)
                    .push_bind(row.object.rtc_data.get())
                    .push_unseparated("::jsonb")
                    .push_bind(format_timestamp(row.report.sora_timestamp))
                    .push_unseparated("::timestamptz")
                    .push_bind(format_timestamp(row.report.received_at))
                    .push_unseparated("::timestamptz");
            });
            query.push(" ON CONFLICT DO NOTHING");
            query.build().execute(&pool).await.expect("insert");
        }
    }
    started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let reports = reports(rows);
    let batches = batches(&reports);
    let total: usize = batches.iter().map(StatsBatch::row_count).sum();
    let bytes: usize = batches
        .iter()
        .flat_map(|b| b.rows())
        .map(|r| r.object.rtc_data.len())
        .sum();
    println!(
        "{total} rows ({} bytes of JSON on average), batches of {BATCH_ROWS}",
        bytes / total
    );
    let ceiling = raw_copy(&batches).await;
    let chosen = sink_path(&batches).await;
    let insert = multi_row_insert(&batches).await;
    println!("{:<58} {:>12} {:>8}", "path", "rows/s", "ratio");
    for (name, seconds) in [
        ("raw COPY into rtc_stats (ceiling, not idempotent)", ceiling),
        (
            "COPY to staging + INSERT…SELECT ON CONFLICT (the sink)",
            chosen,
        ),
        ("multi-row INSERT … ON CONFLICT DO NOTHING", insert),
    ] {
        println!(
            "{:<58} {:>12.0} {:>8.2}",
            name,
            total as f64 / seconds,
            ceiling / seconds
        );
    }
}
