//! One byte budget for the report data Kohaku holds in memory (`pipeline.memory_max_bytes`):
//! request bodies while they arrive, the reports parsed from them, and the reports waiting in the
//! queue until every sink has stored them. With the spool, spool replay batches take a fixed share
//! instead of the queue. A request that would exceed the budget is answered 503 at once: memory
//! stays bounded in bytes, whatever the size of the reports or the number of streams.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kohaku_sink::Report;
use tokio::sync::Notify;

/// What a parsed stats object costs beyond its JSON text: its id and type strings and the
/// struct and allocation overheads, rounded up (measured: ~90 bytes on 64-bit).
const OBJECT_OVERHEAD: usize = 128;
/// What a report costs beyond its objects: the connection's strings and the report struct.
const REPORT_OVERHEAD: usize = 512;

/// Bytes of report data in memory, shared by everything that holds some. Cheap to clone.
///
/// A counter rather than a semaphore: every request takes and gives back bytes, and a
/// semaphore's release takes a lock that 160 concurrent streams contend on (measured: −15 % of
/// HTTP/2 ingest). Only the importer waits for bytes, so only it pays for being woken.
#[derive(Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    used: AtomicUsize,
    /// Callers of [`MemoryBudget::take_waiting`] waiting now; releases notify only then.
    waiting: AtomicUsize,
    released: Notify,
}

/// Bytes taken from a [`MemoryBudget`], given back when dropped.
pub struct Held {
    inner: Arc<Inner>,
    bytes: usize,
}

impl MemoryBudget {
    pub fn new(capacity: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
                used: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                released: Notify::new(),
            }),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.inner.capacity as u64
    }

    /// Bytes held right now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed) as u64
    }

    /// Nothing yet: a [`Held`] to grow.
    pub fn nothing(&self) -> Held {
        Held {
            inner: Arc::clone(&self.inner),
            bytes: 0,
        }
    }

    /// Takes `bytes` more into `held`, or nothing and `false` when the budget has not that much
    /// left.
    pub fn try_grow(&self, held: &mut Held, bytes: usize) -> bool {
        if self.inner.try_take(bytes) {
            held.bytes += bytes;
            true
        } else {
            false
        }
    }

    /// Takes `bytes` (at most the whole budget), waiting until they are free: for callers that
    /// can wait, such as the importer.
    pub async fn take_waiting(&self, bytes: usize) -> Held {
        let bytes = bytes.min(self.inner.capacity);
        self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        loop {
            let released = self.inner.released.notified();
            if self.inner.try_take(bytes) {
                break;
            }
            released.await;
        }
        self.inner.waiting.fetch_sub(1, Ordering::SeqCst);
        Held {
            inner: Arc::clone(&self.inner),
            bytes,
        }
    }
}

impl Inner {
    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|total| *total <= self.capacity)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.released.notify_waiters();
        }
    }
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Moves `bytes` of what is held into a [`Held`] of its own (all of it when it holds less).
    pub fn split(&mut self, bytes: usize) -> Held {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Held {
            inner: Arc::clone(&self.inner),
            bytes,
        }
    }

    /// Takes over what `other` holds. Both must come from the same budget.
    pub fn merge(&mut self, mut other: Held) {
        debug_assert!(Arc::ptr_eq(&self.inner, &other.inner));
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.inner.give_back(self.bytes);
    }
}

/// What a parsed report costs in memory: its objects' JSON text and their overheads.
pub fn report_bytes(report: &Report) -> usize {
    REPORT_OVERHEAD
        + report
            .stats
            .iter()
            .map(|object| {
                object.rtc_data.len()
                    + object.rtc_id.len()
                    + object.rtc_type.len()
                    + OBJECT_OVERHEAD
            })
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_taken_up_to_the_capacity_and_given_back_when_dropped() {
        let budget = MemoryBudget::new(1_000);
        let mut held = budget.nothing();
        assert!(budget.try_grow(&mut held, 600));
        assert!(!budget.try_grow(&mut held, 500), "over the budget");
        assert_eq!(held.bytes(), 600, "a refused grow takes nothing");
        let part = held.split(200);
        assert_eq!((held.bytes(), part.bytes(), budget.used()), (400, 200, 600));
        drop(held);
        assert_eq!(budget.used(), 200);
        let mut other = budget.nothing();
        assert!(budget.try_grow(&mut other, 800));
        other.merge(part);
        assert_eq!(budget.used(), 1_000);
        drop(other);
        assert_eq!(budget.used(), 0);
        assert!(!budget.try_grow(&mut budget.nothing(), usize::MAX));
    }

    #[tokio::test]
    async fn a_waiting_take_gets_at_most_the_whole_budget_once_it_is_given_back() {
        let budget = MemoryBudget::new(100);
        let held = budget.take_waiting(1_000).await;
        assert_eq!(held.bytes(), 100);
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take_waiting(60).await.bytes() }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits while the budget is spent");
        drop(held);
        assert_eq!(waiter.await.unwrap(), 60);
        assert_eq!(budget.used(), 0);
    }
}
