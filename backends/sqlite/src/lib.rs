//! Kohaku's embedded SQLite backend: one database file, WAL journal, one transaction per batch.
//!
//! SQLite has a single writer, so the sink owns one connection behind a mutex and runs every
//! statement on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kohaku_sink::{Report, SinkError, StatsBatch, StatsSink, WriteReport};
use rusqlite::{Connection, OpenFlags};

mod config;
mod error;
mod migrate;
mod read_back;
/// Test support, behind the `testkit` feature so that nothing test-only is in a release build.
#[cfg(feature = "testkit")]
pub mod testkit;
mod write;

pub use config::Config;
pub use error::classify;
use migrate::migrate;
pub use migrate::SCHEMA_VERSION;
use write::write_batch;

pub struct SqliteSink {
    options: Config,
    open: Arc<Mutex<OpenFile>>,
}

/// The connection and the file it has open. An operator can delete or replace the file at
/// `path` while Kohaku runs; SQLite would go on writing into the unlinked file, where nothing can
/// read it, so every write checks that the path still names the file the connection holds.
struct OpenFile {
    connection: Connection,
    file: Option<FileId>,
    /// When the planner's statistics were last brought up to date ([`optimize`]).
    optimized_at: Option<Instant>,
}

/// How often a long-running Kohaku refreshes SQLite's planner statistics, as SQLite advises for
/// long-lived connections. Without them the planner guesses, and picked the channel index for
/// one connection's rate panels, 8–13 times slower on a database with history.
const OPTIMIZE_EVERY: Duration = Duration::from_secs(3600);

/// `PRAGMA optimize`: runs `ANALYZE` on the tables never analysed or whose size changed about
/// tenfold since, each bounded by `analysis_limit` so that it costs milliseconds whatever the
/// table's size. `0x10000` has it look at every table: without it SQLite only considers the
/// tables this connection's queries used, and Kohaku's writer only inserts (a database filled by
/// an import kept the statistics of its first 5,000 rows). A failure only leaves the statistics as
/// they were, so it is logged, not returned.
fn optimize(connection: &Connection) {
    let sql = "PRAGMA analysis_limit = 1000; PRAGMA optimize = 0x10002;";
    if let Err(err) = connection.execute_batch(sql) {
        tracing::warn!(error = %err, "sqlite: PRAGMA optimize failed; planner statistics stay as they were");
    }
}

/// A file's identity: device and inode.
type FileId = (u64, u64);

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

impl OpenFile {
    fn is_current(&self, path: &Path) -> bool {
        self.file.is_some() && file_id(path) == self.file
    }

    /// Closes the connection (SQLite folds its WAL into the old file and deletes it) and opens
    /// the file now at the path, creating it and its schema if it is gone.
    fn reopen(&mut self, options: &Config) -> Result<(), SinkError> {
        tracing::warn!(
            path = %options.path.display(),
            "sqlite: the database file was deleted or replaced while Kohaku ran; writing to the file now at the path (created if missing)"
        );
        let placeholder = Connection::open_in_memory()
            .map_err(|err| classify("sqlite: cannot reopen the database", err))?;
        drop(std::mem::replace(&mut self.connection, placeholder));
        self.file = None;
        let mut connection = open_connection(options)?;
        migrate(&mut connection)?;
        self.file = file_id(&options.path);
        self.connection = connection;
        self.optimized_at = None;
        Ok(())
    }
}

fn replaced_error(path: &Path) -> SinkError {
    SinkError::classified(
        true,
        format!(
            "sqlite {}: the database file was deleted or replaced; Kohaku writes to a new file at the path",
            path.display()
        ),
    )
}

/// Opens (creating if needed) the database file with Kohaku's settings.
fn open_connection(options: &Config) -> Result<Connection, SinkError> {
    let path = &options.path;
    let context = |what: &str| format!("sqlite {}: {what}", path.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)
        .map_err(|err| classify(&context("cannot open database"), err))?;
    connection
        .busy_timeout(options.busy_timeout())
        .map_err(|err| classify(&context("cannot set busy timeout"), err))?;
    // WAL lets dashboards read while Kohaku writes; NORMAL is durable against process crashes
    // and only loses the last transactions on power loss.
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(|err| classify(&context("cannot enable WAL"), err))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SinkError::Permanent {
            message: context(&format!("journal_mode stayed {mode}; WAL is required")),
            source: None,
        });
    }
    connection
        .execute_batch("PRAGMA synchronous = NORMAL;")
        .map_err(|err| classify(&context("cannot set synchronous"), err))?;
    Ok(connection)
}

impl SqliteSink {
    /// Opens (creating if needed) the database file. The schema is created by
    /// [`StatsSink::migrate`].
    pub fn open(options: &Config) -> Result<Self, SinkError> {
        let connection = open_connection(options)?;
        let file = file_id(&options.path);
        Ok(Self {
            options: options.clone(),
            open: Arc::new(Mutex::new(OpenFile {
                connection,
                file,
                optimized_at: None,
            })),
        })
    }

    pub fn path(&self) -> &Path {
        &self.options.path
    }

    /// Runs `work` on the blocking pool with the connection locked.
    async fn with_connection<T, F>(&self, work: F) -> Result<T, SinkError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, SinkError> + Send + 'static,
    {
        self.with_open_file(move |open, _| work(&mut open.connection))
            .await
    }

    async fn with_open_file<T, F>(&self, work: F) -> Result<T, SinkError>
    where
        T: Send + 'static,
        F: FnOnce(&mut OpenFile, &Config) -> Result<T, SinkError> + Send + 'static,
    {
        let open = Arc::clone(&self.open);
        let options = self.options.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&open)?;
            work(&mut guard, &options)
        })
        .await
        .map_err(|err| SinkError::transient("sqlite worker task failed", err))?
    }
}

fn lock<T>(connection: &Mutex<T>) -> Result<MutexGuard<'_, T>, SinkError> {
    // A panic while holding the lock cannot leave a half-done transaction behind (rusqlite rolls
    // back on drop), so the connection is still usable.
    Ok(connection
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()))
}

#[async_trait]
impl StatsSink for SqliteSink {
    fn name(&self) -> &str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), SinkError> {
        // The first write need not run it again.
        self.with_open_file(|open, _| {
            migrate(&mut open.connection)?;
            optimize(&open.connection);
            open.optimized_at = Some(Instant::now());
            Ok(())
        })
        .await
    }

    async fn write(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
        if batch.is_empty() {
            return Ok(WriteReport::default());
        }
        // Cheap: a batch is a list of shared reports.
        let batch = batch.clone();
        self.with_open_file(move |open, options| {
            if !open.is_current(&options.path) {
                open.reopen(options)?;
            }
            let report = write_batch(&mut open.connection, &batch)?;
            if !open.is_current(&options.path) {
                // Deleted during this write: the rows went into the unlinked file. Reporting a
                // transient failure has the pipeline write the batch again, into a new file.
                return Err(replaced_error(&options.path));
            }
            if open
                .optimized_at
                .is_none_or(|at| at.elapsed() >= OPTIMIZE_EVERY)
            {
                optimize(&open.connection);
                open.optimized_at = Some(Instant::now());
            }
            Ok(report)
        })
        .await
    }

    async fn stored_reports_after(
        &self,
        after: Option<&str>,
    ) -> Result<Option<(String, Vec<Report>)>, SinkError> {
        let after = after.map(str::to_owned);
        self.with_connection(move |connection| {
            read_back::stored_reports_after(connection, after.as_deref())
        })
        .await
    }

    async fn health(&self) -> Result<(), SinkError> {
        // Taking the write lock proves the file is writable and not held by another process.
        self.with_open_file(|open, options| {
            if !open.is_current(&options.path) {
                return Err(replaced_error(&options.path));
            }
            open.connection
                .execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
                .map_err(|err| classify("sqlite: database is not writable", err))
        })
        .await
    }

    async fn close(&self) -> Result<(), SinkError> {
        // Fold the WAL back into the main file so the database is self-contained after exit, with
        // statistics that describe what this run wrote (an import fills a database in minutes).
        self.with_connection(|connection| {
            optimize(connection);
            connection
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(|err| classify("sqlite: checkpoint at close failed", err))
        })
        .await
    }
}
