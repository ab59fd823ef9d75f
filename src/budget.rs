//! One byte budget for the report data Kohaku holds in memory (`pipeline.memory_max_bytes`):
//! request bodies while they arrive, the reports parsed from them, and the reports waiting in the
//! queue until every sink has stored them. With the spool, spool replay batches take a fixed share
//! instead of the queue. A request that would exceed the budget is answered 503 at once: memory
//! stays bounded in bytes, whatever the size of the reports or the number of streams.

use std::sync::Arc;

use kohaku_sink::Report;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What a parsed stats object costs beyond its JSON text: its id and type strings and the
/// struct and allocation overheads, rounded up (measured: ~90 bytes on 64-bit).
const OBJECT_OVERHEAD: usize = 128;
/// What a report costs beyond its objects: the connection's strings and the report struct.
const REPORT_OVERHEAD: usize = 512;

/// Bytes of report data in memory, shared by everything that holds some. Cheap to clone.
#[derive(Clone)]
pub struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    capacity: usize,
}

/// Bytes taken from a [`MemoryBudget`], given back when dropped.
pub struct Held(OwnedSemaphorePermit);

impl MemoryBudget {
    pub fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    /// Bytes held right now.
    pub fn used(&self) -> u64 {
        self.capacity
            .saturating_sub(self.semaphore.available_permits()) as u64
    }

    /// Nothing yet: a [`Held`] to grow.
    pub fn nothing(&self) -> Held {
        match Arc::clone(&self.semaphore).try_acquire_many_owned(0) {
            Ok(permit) => Held(permit),
            // Zero permits are always available; only a closed semaphore refuses, and this one
            // is never closed.
            Err(_) => unreachable!("the budget's semaphore is never closed"),
        }
    }

    /// Takes `bytes` more into `held`, or nothing and `false` when the budget has not that much
    /// left.
    pub fn try_grow(&self, held: &mut Held, bytes: usize) -> bool {
        let Ok(wanted) = u32::try_from(bytes) else {
            return false;
        };
        match Arc::clone(&self.semaphore).try_acquire_many_owned(wanted) {
            Ok(more) => {
                held.0.merge(more);
                true
            }
            Err(_) => false,
        }
    }

    /// Takes `bytes` (at most the whole budget), waiting until they are free: for callers that
    /// can wait, such as the importer.
    pub async fn take_waiting(&self, bytes: usize) -> Held {
        let wanted = u32::try_from(bytes.min(self.capacity)).unwrap_or(u32::MAX);
        match Arc::clone(&self.semaphore).acquire_many_owned(wanted).await {
            Ok(permit) => Held(permit),
            Err(_) => unreachable!("the budget's semaphore is never closed"),
        }
    }
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.0.num_permits()
    }

    /// Moves `bytes` of what is held into a [`Held`] of its own (all of it when it holds less).
    pub fn split(&mut self, bytes: usize) -> Held {
        let bytes = bytes.min(self.bytes());
        match self.0.split(bytes) {
            Some(part) => Held(part),
            None => unreachable!("split within what is held"),
        }
    }

    pub fn merge(&mut self, other: Held) {
        self.0.merge(other.0);
    }
}

/// What a parsed report costs in memory: its objects' JSON text and their overheads.
pub fn report_bytes(report: &Report) -> usize {
    REPORT_OVERHEAD
        + report
            .stats
            .iter()
            .map(|object| {
                object.rtc_data.get().len()
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
    async fn a_waiting_take_gets_at_most_the_whole_budget() {
        let budget = MemoryBudget::new(100);
        let held = budget.take_waiting(1_000).await;
        assert_eq!(held.bytes(), 100);
    }
}
