//! The schema: numbered migrations from `schemas/sqlite/`, applied in order in one transaction
//! each.

use kohaku_sink::{format_timestamp, SinkError};
use rusqlite::{params, Connection};

use crate::error::classify;

/// Numbered migrations from `schemas/sqlite/`, applied in order; the applied version is recorded
/// in `kohaku_schema_migrations`.
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
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
    (
        4,
        "summaries",
        include_str!("../../../schemas/sqlite/0004_summaries.sql"),
    ),
];

/// The schema version this build creates: the last migration's.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

pub(crate) fn migrate(connection: &mut Connection) -> Result<(), SinkError> {
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
