//! Small waiting and locking helpers shared by the pipeline and the spool.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex` even if a thread panicked while holding it: the guarded values (sink states,
/// spool progress) stay consistent at every await point, so a poisoned lock is still usable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sleeps until `at`, or forever when there is nothing to wait for (a `select!` arm that stays
/// idle until a deadline exists).
pub(crate) async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
