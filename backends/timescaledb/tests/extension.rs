//! The real timescaledb extension (the matrix of `scripts/test` runs these on TimescaleDB and on
//! Apache-only TimescaleDB; on plain PostgreSQL they have nothing to check and say so): the
//! hypertable and its policies, jobs kept across restarts, compressed chunks, the extension modes,
//! and converting a large existing table.

use std::time::Duration;

use kohaku_sink::testkit::sample;
use kohaku_sink::StatsSink;
use kohaku_timescaledb::testkit::{
    compress_all_chunks, execute, fresh_database, fresh_database_owned_by, server_flavor,
    UnpreloadedCluster,
};
use kohaku_timescaledb::{ExtensionMode, Flavor, TimescaleOptions, TimescaleSink};
use sqlx::postgres::PgPool;

fn on(flavors: &[&str]) -> bool {
    let flavor = server_flavor();
    let runs = flavors.contains(&flavor.as_str());
    if !runs {
        eprintln!("SKIPPED on {flavor}: needs a {flavors:?} server (scripts/test runs it there)");
    }
    runs
}

async fn sink(url: &str, change: impl FnOnce(&mut TimescaleOptions)) -> TimescaleSink {
    let mut options = TimescaleOptions::new(url);
    change(&mut options);
    let sink = TimescaleSink::connect(options).unwrap();
    sink.migrate().await.expect("migrate");
    sink
}

async fn scalar<T>(url: &str, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let pool = PgPool::connect(url).await.unwrap();
    let value = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    pool.close().await;
    value
}

/// `(job_id, schedule_interval, age)` of the compression and retention jobs on rtc_stats.
async fn jobs(url: &str) -> Vec<(String, i32, String, String)> {
    let pool = PgPool::connect(url).await.unwrap();
    let jobs = sqlx::query_as(
        "SELECT proc_name::text, job_id, schedule_interval::text, \
         coalesce(config->>'compress_after', config->>'drop_after') \
         FROM timescaledb_information.jobs WHERE hypertable_name = 'rtc_stats' ORDER BY proc_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    jobs
}

/// `required` refuses `url` with an error containing every part of `refusal`; `auto` then starts
/// on plain PostgreSQL tables. Returns the `auto` sink.
async fn required_refuses_auto_runs_plain(url: &str, refusal: &[&str]) -> TimescaleSink {
    let mut options = TimescaleOptions::new(url);
    options.extension = ExtensionMode::Required;
    let err = TimescaleSink::connect(options.clone())
        .unwrap()
        .migrate()
        .await
        .expect_err("required refuses");
    for part in refusal {
        assert!(
            err.detailed().contains(part),
            "{} lacks {part}",
            err.detailed()
        );
    }
    options.extension = ExtensionMode::Auto;
    let sink = TimescaleSink::connect(options).unwrap();
    sink.migrate().await.expect("auto starts");
    assert_eq!(sink.flavor(), Some(Flavor::PlainPostgres));
    sink
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hypertable_and_its_policies_follow_the_config_and_keep_their_jobs() {
    if !on(&["timescaledb", "apache"]) {
        return;
    }
    let url = fresh_database("policies").await;
    let first = sink(&url, |o| {
        o.settings.compress_after_days = 7;
        o.settings.retention_days = 60;
    })
    .await;
    let hypertables: i64 = scalar(
        &url,
        "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'rtc_stats'",
    )
    .await;
    assert_eq!(hypertables, 1);
    if let Some(Flavor::ApacheOnly { .. }) = first.flavor() {
        assert!(jobs(&url).await.is_empty(), "Apache-only has no policies");
        assert!(first.notices().iter().any(|n| n.contains("no compression")));
        // Apache-only TimescaleDB is TimescaleDB: `required` starts on it.
        let required = sink(&url, |o| {
            o.extension = ExtensionMode::Required;
            o.settings.compress_after_days = 0;
        })
        .await;
        assert!(matches!(required.flavor(), Some(Flavor::ApacheOnly { .. })));
        return;
    }
    let initial = jobs(&url).await;
    assert_eq!(
        initial
            .iter()
            .map(|(name, _, _, age)| (name.as_str(), age.as_str()))
            .collect::<Vec<_>>(),
        [
            ("policy_compression", "7 days"),
            ("policy_retention", "60 days")
        ]
    );
    let segmentby: String = scalar(
        &url,
        "SELECT string_agg(attname, ',' ORDER BY segmentby_column_index) \
         FROM timescaledb_information.compression_settings \
         WHERE hypertable_name = 'rtc_stats' AND segmentby_column_index IS NOT NULL",
    )
    .await;
    assert_eq!(segmentby, "channel_id,connection_id");

    // An operator's tuning, then a restart with the same config: nothing is re-created.
    let compression_job = initial[0].1;
    execute(
        &url,
        &format!("SELECT alter_job({compression_job}, schedule_interval => INTERVAL '2 hours')"),
    )
    .await
    .unwrap();
    sink(&url, |o| {
        o.settings.compress_after_days = 7;
        o.settings.retention_days = 60;
    })
    .await;
    let after_restart = jobs(&url).await;
    assert_eq!(after_restart[0].1, compression_job, "same job");
    assert_eq!(after_restart[0].2, "02:00:00", "the tuning survives");
    assert_eq!(after_restart[1].1, initial[1].1);

    // Only what the config changed changes.
    sink(&url, |o| {
        o.settings.compress_after_days = 7;
        o.settings.retention_days = 30;
    })
    .await;
    let changed = jobs(&url).await;
    assert_eq!(changed[0].1, compression_job, "compression untouched");
    assert_eq!(changed[0].2, "02:00:00");
    assert_eq!(changed[1].3, "30 days");
    assert_ne!(changed[1].1, initial[1].1, "retention replaced");
    sink(&url, |o| {
        o.settings.compress_after_days = 0;
        o.settings.retention_days = 30;
    })
    .await;
    let names: Vec<String> = jobs(&url).await.into_iter().map(|job| job.0).collect();
    assert_eq!(names, ["policy_retention"], "compression turned off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_late_rows_into_compressed_chunks_are_stored_once() {
    if !on(&["timescaledb"]) {
        return;
    }
    let url = fresh_database("compressed").await;
    let sink = sink(&url, |o| o.settings.retention_days = 0).await;
    let now_ms = kohaku_sink::OffsetDateTime::now_utc().unix_timestamp() as f64 * 1000.0;
    let connection = sample::connection(30);
    let early = sample::report(connection.clone(), now_ms - 10.0 * 86_400_000.0, 20);
    let written = sink.write(&sample::batch([early.clone()])).await.unwrap();
    assert_eq!(written.written, 20);
    compress_all_chunks(&url).await.unwrap();
    let compressed: i64 = scalar(
        &url,
        "SELECT count(*) FROM timescaledb_information.chunks \
         WHERE hypertable_name = 'rtc_stats' AND is_compressed",
    )
    .await;
    assert!(compressed >= 1, "a compressed chunk");

    let again = sink.write(&sample::batch([early])).await.unwrap();
    assert_eq!((again.written, again.duplicates), (0, 20), "duplicates");
    // A late report of the same connection whose time falls in the compressed chunk.
    let late = sample::report(connection, now_ms - 10.0 * 86_400_000.0 + 1_000.0, 20);
    let written = sink.write(&sample::batch([late.clone()])).await.unwrap();
    assert_eq!(written.written, 20, "late rows");
    let again = sink.write(&sample::batch([late])).await.unwrap();
    assert_eq!(again.duplicates, 20);
    let rows: i64 = scalar(&url, "SELECT count(*) FROM rtc_stats").await;
    assert_eq!(rows, 40);
    let distinct: i64 = scalar(
        &url,
        "SELECT count(*) FROM (SELECT DISTINCT connection_id, rtc_id, rtc_timestamp FROM rtc_stats) d",
    )
    .await;
    assert_eq!(distinct, 40, "each object once");
}

/// A role that may not create the extension (it does not own the database): `auto` runs on plain
/// PostgreSQL and says why in /health and a metric; `required` refuses, saying what to grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_to_create_the_extension_auto_falls_back_and_required_refuses() {
    if !on(&["timescaledb", "apache"]) {
        return;
    }
    let (admin, _) = fresh_database_owned_by("noext", "kohaku_noext").await;
    // Owned by the cluster's superuser again; the role may create tables, not extensions.
    let database = admin.rsplit('/').next().unwrap().to_owned();
    execute(
        &admin,
        &format!(
            "ALTER DATABASE \"{database}\" OWNER TO postgres; \
             GRANT CONNECT ON DATABASE \"{database}\" TO kohaku_noext; \
             GRANT USAGE, CREATE ON SCHEMA public TO kohaku_noext"
        ),
    )
    .await
    .unwrap();
    let url = admin.replacen("://postgres@", "://kohaku_noext@", 1);
    let sink = required_refuses_auto_runs_plain(&url, &["permission denied", "superuser"]).await;
    let fallbacks = sink
        .counters()
        .into_iter()
        .find(|c| c.name == "extension_fallbacks")
        .map(|c| c.value);
    assert_eq!(fallbacks, Some(1));
    assert!(
        sink.notices()
            .iter()
            .any(|n| n.contains("plain PostgreSQL")),
        "{:?}",
        sink.notices()
    );
    let report = sample::report(sample::connection(31), 1_753_423_611_556.5, 5);
    assert_eq!(
        sink.write(&sample::batch([report])).await.unwrap().written,
        5
    );
}

/// A server whose TimescaleDB is installed but not preloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_preloading_auto_falls_back_and_required_names_the_setting() {
    if !on(&["timescaledb", "apache"]) {
        return;
    }
    let cluster = UnpreloadedCluster::start();
    let sink = required_refuses_auto_runs_plain(&cluster.url, &["shared_preload_libraries"]).await;
    assert!(sink.notices().iter().any(|n| n.contains("preload")));
}

/// An existing plain table of 3 million rows becomes a hypertable at start-up although every
/// statement is limited to 5 s: the conversion runs without that limit, in one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_plain_table_converts_despite_a_short_statement_timeout() {
    if !on(&["timescaledb", "apache"]) {
        return;
    }
    let url = fresh_database("convert").await;
    sink(&url, |o| o.extension = ExtensionMode::Off).await;
    const ROWS: i64 = 3_000_000;
    execute(
        &url,
        &format!(
            "INSERT INTO rtc_stats SELECT now() - make_interval(secs => i), 'ch', 's', 'c', \
             'conn' || (i % 1000), NULL, 'outbound-rtp', 'OT' || i, \
             extract(epoch from now()) * 1000 - i::bigint * 1000, \
             jsonb_build_object('id', 'OT' || i, 'type', 'outbound-rtp', 'bytesSent', i), now(), now() \
             FROM generate_series(1, {ROWS}) i; ANALYZE rtc_stats"
        ),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let converted = sink(&url, |o| o.statement_timeout = Duration::from_secs(5)).await;
    eprintln!(
        "converted {ROWS} rows in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(matches!(
        converted.flavor(),
        Some(Flavor::TimescaleDb { .. } | Flavor::ApacheOnly { .. })
    ));
    let rows: i64 = scalar(&url, "SELECT count(*) FROM rtc_stats").await;
    assert_eq!(rows, ROWS);
    let chunks: i64 = scalar(&url, "SELECT count(*) FROM show_chunks('rtc_stats')").await;
    assert!(chunks >= 30, "{chunks} chunks");
}

/// Plain PostgreSQL: `auto` uses it quietly (there is nothing to fall back from), `required`
/// refuses, saying TimescaleDB must be installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_plain_postgresql_required_refuses_and_auto_runs_without_a_fallback() {
    if !on(&["plain"]) {
        return;
    }
    let url = fresh_database("plain_modes").await;
    let sink = required_refuses_auto_runs_plain(&url, &["install TimescaleDB"]).await;
    assert!(sink.notices().is_empty(), "{:?}", sink.notices());
}
