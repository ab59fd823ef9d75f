//! The PostgreSQL the tests use: a throwaway cluster started by `scripts/test` (through
//! `scripts/pg-cluster`), described by environment variables. Every test gets its own database.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::postgres::PgPool;

/// `postgres://…/postgres` of the test cluster.
pub const URL_VAR: &str = "KOHAKU_TEST_PG_URL";
/// The cluster's directory, for stopping and starting it.
pub const DIR_VAR: &str = "KOHAKU_TEST_PG_DIR";
/// The `scripts/pg-cluster` path.
pub const SCRIPT_VAR: &str = "KOHAKU_TEST_PG_SCRIPT";

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the PostgreSQL tests through ./scripts/test, which starts a throwaway cluster")
    })
}

/// The server's URL, with `database` as the database.
pub fn url_of(database: &str) -> String {
    let base = var(URL_VAR);
    match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{database}"),
        None => base,
    }
}

/// Creates an empty database named after `prefix` and returns its URL.
pub async fn fresh_database(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let admin = PgPool::connect(&var(URL_VAR))
        .await
        .expect("connect to the test cluster");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .expect("create a test database");
    admin.close().await;
    url_of(&name)
}

/// Creates an empty database owned by `role` (a login role without superuser rights, created when
/// missing), as an operator sets Kohaku up: privileges then apply to it, and a `REVOKE` bites.
/// Returns the database's URL as the cluster's superuser and as `role`.
pub async fn fresh_database_owned_by(prefix: &str, role: &str) -> (String, String) {
    let admin_url = fresh_database(prefix).await;
    let database = admin_url.rsplit('/').next().unwrap_or_default().to_owned();
    execute(
        &var(URL_VAR),
        &format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN \
             CREATE ROLE \"{role}\" LOGIN; END IF; END $$; \
             ALTER DATABASE \"{database}\" OWNER TO \"{role}\""
        ),
    )
    .await
    .expect("role and database ownership");
    let role_url = admin_url.replacen("://postgres@", &format!("://{role}@"), 1);
    assert_ne!(
        role_url, admin_url,
        "the test cluster's URL names its superuser `postgres`"
    );
    (admin_url, role_url)
}

/// Runs `sql` (one or more statements) at `url`.
pub async fn execute(url: &str, sql: &str) -> Result<(), String> {
    let pool = PgPool::connect(url)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&pool)
        .await;
    pool.close().await;
    result.map(|_| ()).map_err(|err| err.to_string())
}

/// Compresses every chunk of `rtc_stats`. The compression policy's background job may compress a
/// chunk between `compress_chunk`'s own check and its work, which fails the statement with "already
/// compressed"; the chunk is then what the caller wants, so the statement is run again.
pub async fn compress_all_chunks(url: &str) -> Result<(), String> {
    let sql = "SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('rtc_stats') c";
    let mut attempts = 0;
    loop {
        match execute(url, sql).await {
            Err(err) if err.contains("already compressed") && attempts < 10 => attempts += 1,
            other => return other,
        }
    }
}

/// Which server the test cluster is (`KOHAKU_TEST_PG_FLAVOR`, set by `scripts/test`): `plain`
/// PostgreSQL, full `timescaledb`, or `apache`-only TimescaleDB.
pub fn server_flavor() -> String {
    std::env::var("KOHAKU_TEST_PG_FLAVOR").unwrap_or_else(|_| "plain".to_owned())
}

/// Whether `flavor` is what `extension = "auto"` makes of the test cluster.
pub fn is_expected_flavor(flavor: &crate::Flavor) -> bool {
    matches!(
        (server_flavor().as_str(), flavor),
        ("plain", crate::Flavor::PlainPostgres)
            | ("timescaledb", crate::Flavor::TimescaleDb { .. })
            | ("apache", crate::Flavor::ApacheOnly { .. })
    )
}

/// A second cluster of the same server binaries as the test cluster, but without preloading
/// TimescaleDB: the extension is listed as available and `CREATE EXTENSION` fails, as on a
/// server where nobody edited `shared_preload_libraries`. Removed when dropped.
pub struct UnpreloadedCluster {
    dir: String,
    /// `postgres://…/postgres` of the new cluster.
    pub url: String,
}

impl UnpreloadedCluster {
    pub fn start() -> Self {
        let bin = std::fs::read_to_string(format!("{}/bin", var(DIR_VAR)))
            .expect("the test cluster records its binaries");
        let output = Command::new(var(SCRIPT_VAR))
            .arg("create")
            .env("PG_BIN", bin.trim())
            .env_remove("PG_PRELOAD")
            .output()
            .expect("run scripts/pg-cluster");
        assert!(output.status.success(), "scripts/pg-cluster create failed");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut lines = text.lines();
        let dir = lines.next().unwrap_or_default().to_owned();
        let url = lines.next().unwrap_or_default().to_owned();
        Self { dir, url }
    }
}

impl Drop for UnpreloadedCluster {
    fn drop(&mut self) {
        let _ = Command::new(var(SCRIPT_VAR))
            .args(["destroy", &self.dir])
            .status();
    }
}

fn cluster(action: &str) {
    let status = Command::new(var(SCRIPT_VAR))
        .args([action, &var(DIR_VAR)])
        .status()
        .expect("run scripts/pg-cluster");
    assert!(status.success(), "scripts/pg-cluster {action} failed");
}

/// Stops the whole test cluster (an outage). Only for test binaries that own the cluster alone.
pub fn stop_server() {
    cluster("stop");
}

/// Starts it again on the same port.
pub fn start_server() {
    cluster("start");
}

/// `SELECT count(*)`-style query returning one bigint.
pub async fn count(url: &str, sql: &'static str) -> i64 {
    let pool = PgPool::connect(url)
        .await
        .expect("connect to the test database");
    let value = sqlx::query_scalar(sql)
        .fetch_one(&pool)
        .await
        .expect("count query");
    pool.close().await;
    value
}

/// One stored stats row, as tests compare it.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub connection_id: String,
    pub rtc_id: String,
    pub rtc_type: String,
    pub rtc_timestamp: f64,
    /// `rtc_data::text`: the jsonb value, normalised by PostgreSQL.
    pub rtc_data: String,
}

impl StoredRow {
    /// The idempotency key: `(connection_id, rtc_id, rtc_timestamp bits)`.
    pub fn key(&self) -> (String, String, u64) {
        (
            self.connection_id.clone(),
            self.rtc_id.clone(),
            self.rtc_timestamp.to_bits(),
        )
    }
}

pub async fn stored_rows(url: &str) -> Vec<StoredRow> {
    use sqlx::Row;
    let pool = PgPool::connect(url)
        .await
        .expect("connect to the test database");
    let rows = sqlx::query("SELECT connection_id, rtc_id, rtc_type, rtc_timestamp, rtc_data::text AS rtc_data FROM rtc_stats")
        .fetch_all(&pool)
        .await
        .expect("read rtc_stats");
    pool.close().await;
    rows.iter()
        .map(|row| StoredRow {
            connection_id: row.get("connection_id"),
            rtc_id: row.get("rtc_id"),
            rtc_type: row.get("rtc_type"),
            rtc_timestamp: row.get("rtc_timestamp"),
            rtc_data: row.get("rtc_data"),
        })
        .collect()
}

/// Runs any query and returns its rows as JSON objects (column name → value), the way a client
/// such as Grafana would see them; `Err` carries PostgreSQL's message.
pub async fn query_json(url: &str, sql: &str) -> Result<Vec<serde_json::Value>, String> {
    let client = QueryClient::connect(url).await?;
    let result = client.query_json(sql).await;
    client.close().await;
    result
}

/// A connection kept open for many queries, as Grafana keeps its datasource's: what the dashboard
/// benchmark times is the query, not a connection set-up.
pub struct QueryClient {
    pool: PgPool,
}

impl QueryClient {
    pub async fn connect(url: &str) -> Result<Self, String> {
        let pool = PgPool::connect(url)
            .await
            .map_err(|err| format!("connect: {err}"))?;
        Ok(Self { pool })
    }

    /// [`query_json`] on this connection.
    pub async fn query_json(&self, sql: &str) -> Result<Vec<serde_json::Value>, String> {
        // json_agg keeps every column's type readable without knowing the query's columns.
        let wrapped = format!("SELECT coalesce(json_agg(q), '[]')::text FROM ({sql}) AS q");
        let text: String = sqlx::query_scalar(sqlx::AssertSqlSafe(wrapped))
            .fetch_one(&self.pool)
            .await
            .map_err(|err| err.to_string())?;
        serde_json::from_str(&text).map_err(|err| format!("json_agg result: {err}"))
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}
