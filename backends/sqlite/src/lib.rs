//! Kohaku's embedded SQLite backend: one database file, WAL journal, one transaction per batch.
//!
//! SQLite has a single writer, so the sink owns one connection behind a mutex and runs every
//! statement on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use kohaku_sink::{format_timestamp, Report, SinkError, StatsBatch, StatsSink, WriteReport};
use rusqlite::{params, Connection, ErrorCode, OpenFlags};

mod config;
pub use config::Config;

/// Numbered migrations from `schemas/sqlite/`, applied in order; the applied version is recorded
/// in `kohaku_schema_migrations`.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../schemas/sqlite/0001_init.sql"),
    ),
    (
        2,
        "views",
        include_str!("../../../schemas/sqlite/0002_views.sql"),
    ),
    (
        3,
        "group_id",
        include_str!("../../../schemas/sqlite/0003_group_id.sql"),
    ),
];

/// The schema version this build creates: the last migration's.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

const INSERT_STATS: &str =
    "INSERT INTO rtc_stats (channel_id, session_id, client_id, connection_id, bundle_id, \
     rtc_type, rtc_id, rtc_timestamp, rtc_data, sora_timestamp, received_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
     ON CONFLICT (connection_id, rtc_timestamp, rtc_id) DO NOTHING";

// A late, older report must not move last_seen backwards nor overwrite newer metadata.
const UPSERT_CONNECTION: &str = "INSERT INTO sora_connection (channel_id, session_id, client_id, connection_id, \
     bundle_id, label, version, node_name, role, multistream, simulcast, spotlight, first_seen, last_seen, group_id) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, ?14) \
     ON CONFLICT (connection_id) DO UPDATE SET \
       first_seen = min(first_seen, excluded.first_seen), \
       last_seen = max(last_seen, excluded.last_seen), \
       channel_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.channel_id ELSE channel_id END, \
       session_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.session_id ELSE session_id END, \
       client_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.client_id ELSE client_id END, \
       bundle_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.bundle_id ELSE bundle_id END, \
       group_id = CASE WHEN excluded.last_seen >= last_seen THEN excluded.group_id ELSE group_id END, \
       label = CASE WHEN excluded.last_seen >= last_seen THEN excluded.label ELSE label END, \
       version = CASE WHEN excluded.last_seen >= last_seen THEN excluded.version ELSE version END, \
       node_name = CASE WHEN excluded.last_seen >= last_seen THEN excluded.node_name ELSE node_name END, \
       role = CASE WHEN excluded.last_seen >= last_seen THEN excluded.role ELSE role END, \
       multistream = CASE WHEN excluded.last_seen >= last_seen THEN excluded.multistream ELSE multistream END, \
       simulcast = CASE WHEN excluded.last_seen >= last_seen THEN excluded.simulcast ELSE simulcast END, \
       spotlight = CASE WHEN excluded.last_seen >= last_seen THEN excluded.spotlight ELSE spotlight END";

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
            open: Arc::new(Mutex::new(OpenFile { connection, file })),
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

/// Which SQLite failures a retry can cure. Only errors tied to a row's content are permanent (a
/// constraint, a value too big, a type mismatch). Every other SQLite error comes from the
/// database's state: locks held by another process, a full or failing disk, a file made
/// read-only, deleted or damaged. An operator can fix those while the pipeline waits, holding the
/// data and showing the error in `/health`; refusing the rows instead would lose acknowledged
/// data. Errors from outside SQLite (a parameter Kohaku got wrong) are permanent.
pub fn classify(context: &str, err: rusqlite::Error) -> SinkError {
    let transient = match err.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch) => false,
        Some(_) => true,
        None => false,
    };
    if transient {
        SinkError::transient(context.to_owned(), err)
    } else {
        SinkError::permanent(context.to_owned(), err)
    }
}

fn migrate(connection: &mut Connection) -> Result<(), SinkError> {
    let fail = |what: &'static str| move |err| classify(what, err);
    connection
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS kohaku_schema_migrations (\
               version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
        )
        .map_err(fail("sqlite: cannot create kohaku_schema_migrations"))?;
    let applied: i64 = connection
        .query_row(
            "SELECT coalesce(max(version), 0) FROM kohaku_schema_migrations",
            [],
            |row| row.get(0),
        )
        .map_err(fail("sqlite: cannot read the schema version"))?;
    let newest = MIGRATIONS.last().map_or(0, |(version, _, _)| *version);
    if applied > newest {
        return Err(SinkError::Permanent {
            message: format!(
                "sqlite: the database schema is at version {applied}, newer than this Kohaku knows ({newest}); \
                 upgrade Kohaku or use another database file"
            ),
            source: None,
        });
    }
    for (version, name, sql) in MIGRATIONS
        .iter()
        .filter(|(version, _, _)| *version > applied)
    {
        let tx = connection
            .transaction()
            .map_err(fail("sqlite: cannot begin migration"))?;
        tx.execute_batch(sql).map_err(|err| {
            classify(&format!("sqlite: migration {version} ({name}) failed"), err)
        })?;
        tx.execute(
            "INSERT INTO kohaku_schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![
                version,
                name,
                format_timestamp(kohaku_sink::OffsetDateTime::now_utc())
            ],
        )
        .map_err(fail("sqlite: cannot record the migration"))?;
        tx.commit()
            .map_err(fail("sqlite: cannot commit migration"))?;
        tracing::info!(version, name, "sqlite: applied schema migration");
    }
    Ok(())
}

fn write_batch(connection: &mut Connection, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
    let fail = |what: &'static str| move |err| classify(what, err);
    let tx = connection
        .transaction()
        .map_err(fail("sqlite: cannot begin transaction"))?;
    let mut report = WriteReport::default();
    {
        let mut insert_stats = tx
            .prepare_cached(INSERT_STATS)
            .map_err(fail("sqlite: cannot prepare insert"))?;
        let mut upsert_connection = tx
            .prepare_cached(UPSERT_CONNECTION)
            .map_err(fail("sqlite: cannot prepare connection upsert"))?;
        for stats_report in batch.reports() {
            let Report {
                connection,
                sora_timestamp,
                received_at,
                stats,
            } = stats_report.as_ref();
            let sora_timestamp = format_timestamp(*sora_timestamp);
            let received_at = format_timestamp(*received_at);
            upsert_connection
                .execute(params![
                    connection.channel_id,
                    connection.session_id,
                    connection.client_id,
                    connection.connection_id,
                    connection.bundle_id,
                    connection.label,
                    connection.version,
                    connection.node_name,
                    connection.role,
                    connection.multistream,
                    connection.simulcast,
                    connection.spotlight,
                    sora_timestamp,
                    connection.group_id,
                ])
                .map_err(fail("sqlite: cannot upsert sora_connection"))?;
            for object in stats {
                let inserted = insert_stats
                    .execute(params![
                        connection.channel_id,
                        connection.session_id,
                        connection.client_id,
                        connection.connection_id,
                        connection.bundle_id,
                        object.rtc_type,
                        object.rtc_id,
                        object.rtc_timestamp,
                        object.rtc_data.get(),
                        sora_timestamp,
                        received_at,
                    ])
                    .map_err(fail("sqlite: cannot insert into rtc_stats"))?;
                if inserted == 0 {
                    report.duplicates += 1;
                } else {
                    report.written += 1;
                }
            }
        }
    }
    tx.commit().map_err(fail("sqlite: cannot commit"))?;
    Ok(report)
}

#[async_trait]
impl StatsSink for SqliteSink {
    fn name(&self) -> &str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), SinkError> {
        self.with_connection(migrate).await
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
            Ok(report)
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
        // Fold the WAL back into the main file so the database is self-contained after exit.
        self.with_connection(|connection| {
            connection
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .map_err(|err| classify("sqlite: checkpoint at close failed", err))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_error(code: std::os::raw::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn only_a_rows_content_is_refused_permanently() {
        for state in [
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_LOCKED,
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_IOERR,
            rusqlite::ffi::SQLITE_CANTOPEN,
            rusqlite::ffi::SQLITE_PERM,
            rusqlite::ffi::SQLITE_CORRUPT,
            rusqlite::ffi::SQLITE_NOTADB,
        ] {
            assert!(classify("x", sqlite_error(state)).is_transient(), "{state}");
        }
        for content in [
            rusqlite::ffi::SQLITE_CONSTRAINT,
            rusqlite::ffi::SQLITE_TOOBIG,
            rusqlite::ffi::SQLITE_MISMATCH,
        ] {
            assert!(
                !classify("x", sqlite_error(content)).is_transient(),
                "{content}"
            );
        }
        assert!(!classify("x", rusqlite::Error::InvalidParameterCount(1, 2)).is_transient());
    }
}
