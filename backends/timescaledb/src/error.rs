//! Which database errors a retry can help, by SQLSTATE, with the password kept out of messages.

use std::borrow::Cow;

use kohaku_sink::{redact_uri, SinkError};

pub(crate) fn sqlstate(err: &sqlx::Error) -> Option<Cow<'_, str>> {
    match err {
        sqlx::Error::Database(db) => db.code(),
        _ => None,
    }
}

/// Class 22: the data itself is wrong (bad JSON escape, value out of range…).
pub(crate) fn is_data_error(err: &sqlx::Error) -> bool {
    sqlstate(err).is_some_and(|code| code.starts_with("22"))
}

/// Whether a SQLSTATE means "try again later". Everything else from the database is permanent.
/// Whether a retry can help, by SQLSTATE. Only errors tied to a row's content are permanent:
/// class 22 (data exception: a value out of range, bad text), 23 (integrity constraint) and 54
/// (program limit exceeded: an index row too long). Everything else comes from the database's state
/// (outages, locks, a revoked privilege, a dropped table, a read-only standby, a changed password),
/// which an operator can fix while Kohaku retries with backoff, holds the data and reports the
/// error in `/health`; refusing the rows instead would lose acknowledged data for a mistake fixed
/// in minutes.
pub fn is_transient_sqlstate(code: &str) -> bool {
    !(code.starts_with("22") || code.starts_with("23") || code.starts_with("54"))
}

pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        _ => false,
    }
}

pub(crate) fn classify_error(context: &str, err: sqlx::Error) -> SinkError {
    let message = format!("{context}: {}", redact_uri(&err.to_string()));
    SinkError::classified(is_transient(&err), message)
}

pub(crate) fn classify(context: &'static str) -> impl Fn(sqlx::Error) -> SinkError {
    move |err| classify_error(context, err)
}

pub(crate) fn classify_owned(context: String) -> impl Fn(sqlx::Error) -> SinkError {
    move |err| classify_error(&context, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for transient in [
            "08000", "08006", "08001", "57P01", "57P03", "40001", "40P01", "53300", "53100",
            "55P03", "57014",
        ] {
            assert!(is_transient_sqlstate(transient), "{transient}");
        }
        // The database's state: an operator's fix makes the same write succeed.
        for state in [
            "42501", "42P01", "42703", "28P01", "3D000", "25006", "0A000", "XX000",
        ] {
            assert!(is_transient_sqlstate(state), "{state}");
        }
        for permanent in [
            "22P02", "22003", "22P05", "22008", "23505", "23502", "54000",
        ] {
            assert!(!is_transient_sqlstate(permanent), "{permanent}");
        }
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }
}
