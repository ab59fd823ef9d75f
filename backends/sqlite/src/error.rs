//! Which SQLite failures a retry can cure.

use kohaku_sink::SinkError;
use rusqlite::ErrorCode;

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
