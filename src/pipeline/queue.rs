//! The in-memory queue: a semaphore of rows, a batcher that groups reports into batches, and
//! the batches on their way to every sink.
//!
//! A report takes as many permits as it has stats objects and gives them back only when every
//! sink has finished with the batch holding it, so memory is bounded by `queue_max_rows` wherever
//! the rows are: waiting to be batched, batched and waiting for a slow sink, or being retried.

use std::sync::Arc;
use std::time::Duration;

use kohaku_sink::{Report, StatsBatch};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

use super::unchanged::{Kept, SkipUnchanged};
use crate::budget::{report_bytes, Held, MemoryBudget};
use crate::metrics::Metrics;
use crate::sora::Protocol;
use crate::sync::sleep_until_some;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full")]
    QueueFull,
    #[error("the report has {rows} stats objects, more than the whole queue holds ({capacity}, pipeline.queue_max_rows)")]
    TooLarge { rows: usize, capacity: u32 },
    #[error("Kohaku is shutting down")]
    Closed,
}

pub(super) struct Queued {
    report: Arc<Report>,
    permit: OwnedSemaphorePermit,
    memory: Held,
}

/// The in-memory queue's intake: the handlers' and the importer's side. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    /// `[pipeline] skip_unchanged`, when on.
    skip: Option<Arc<SkipUnchanged>>,
    permits: Arc<Semaphore>,
    capacity: u32,
    sender: mpsc::UnboundedSender<Queued>,
    metrics: Arc<Metrics>,
    budget: MemoryBudget,
}

impl Queue {
    /// Queues the report that came by `protocol`, with the memory it holds, or says why not.
    /// `Ok` means it is in the pipeline: answer 204.
    pub fn submit(
        &self,
        mut report: Report,
        protocol: Protocol,
        memory: Held,
    ) -> Result<(), SubmitError> {
        let received = report.row_count();
        let kept = self.skip.as_ref().map(|skip| skip.filter(&mut report));
        let wanted = self.permits_for(&report)?;
        let permit = match Arc::clone(&self.permits).try_acquire_many_owned(wanted) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => return Err(SubmitError::QueueFull),
            Err(TryAcquireError::Closed) => return Err(SubmitError::Closed),
        };
        self.enqueue(report, permit, protocol, memory, received)?;
        self.remember(kept);
        Ok(())
    }

    fn remember(&self, kept: Option<Kept>) {
        if let (Some(skip), Some(kept)) = (&self.skip, kept) {
            skip.remember(kept);
        }
    }

    /// The memory budget requests and the queue share.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Queues the report, waiting while the queue is full. For callers that can wait (the
    /// importer), so that reading never outruns the sinks and memory stays bounded.
    pub async fn submit_waiting(&self, mut report: Report) -> Result<(), SubmitError> {
        let received = report.row_count();
        let kept = self.skip.as_ref().map(|skip| skip.filter(&mut report));
        let wanted = self.permits_for(&report)?;
        let permit = Arc::clone(&self.permits)
            .acquire_many_owned(wanted)
            .await
            .map_err(|_| SubmitError::Closed)?;
        let memory = self.budget.take_waiting(report_bytes(&report)).await;
        self.enqueue(report, permit, Protocol::Import, memory, received)?;
        self.remember(kept);
        Ok(())
    }

    fn permits_for(&self, report: &Report) -> Result<u32, SubmitError> {
        let rows = report.row_count();
        // A report without stats still updates its connection, so it takes a slot too.
        let wanted = u32::try_from(rows.max(1)).unwrap_or(u32::MAX);
        if wanted > self.capacity {
            return Err(SubmitError::TooLarge {
                rows,
                capacity: self.capacity,
            });
        }
        Ok(wanted)
    }

    fn enqueue(
        &self,
        report: Report,
        permit: OwnedSemaphorePermit,
        protocol: Protocol,
        memory: Held,
        received: usize,
    ) -> Result<(), SubmitError> {
        self.sender
            .send(Queued {
                report: Arc::new(report),
                permit,
                memory,
            })
            .map_err(|_| SubmitError::Closed)?;
        self.metrics.count_accepted(received, protocol);
        self.metrics
            .queue_rows
            .set(queued_rows(&self.permits, self.capacity));
        Ok(())
    }

    /// Rows accepted and not yet written to every sink.
    pub fn queued_rows(&self) -> i64 {
        queued_rows(&self.permits, self.capacity)
    }

    /// Refuses further reports; what is queued still reaches the sinks.
    pub(super) fn close(&self) {
        self.permits.close();
    }
}

/// Starts the batcher. Reports submitted to the returned queue reach every one of `sinks` in
/// batches of up to `batch_max_rows`; the batcher ends once `closing` is set and the queue is
/// drained.
pub(super) fn start(
    capacity: u32,
    (batch_max_rows, batch_max_wait): (usize, Duration),
    metrics: Arc<Metrics>,
    budget: MemoryBudget,
    sinks: Vec<mpsc::UnboundedSender<Arc<InFlight>>>,
    closing: watch::Receiver<bool>,
    skip: Option<Arc<SkipUnchanged>>,
) -> (Queue, JoinHandle<()>) {
    let permits = Arc::new(Semaphore::new(capacity as usize));
    metrics.queue_capacity_rows.set(i64::from(capacity));
    let (sender, receiver) = mpsc::unbounded_channel();
    let batcher = Batcher {
        sink_senders: sinks,
        batch_max_rows,
        batch_max_wait,
        permits: Arc::clone(&permits),
        capacity,
        metrics: Arc::clone(&metrics),
    };
    let batcher = tokio::spawn(batcher.run(receiver, closing));
    let queue = Queue {
        skip,
        permits,
        capacity,
        sender,
        metrics,
        budget,
    };
    (queue, batcher)
}

fn queued_rows(permits: &Semaphore, capacity: u32) -> i64 {
    i64::from(capacity) - permits.available_permits() as i64
}

/// A batch on its way to every sink. Its rows leave the queue (and its bytes the memory budget)
/// when the last sink drops it.
pub(super) struct InFlight {
    pub(super) batch: StatsBatch,
    permit: Option<OwnedSemaphorePermit>,
    /// Given back with the batch.
    _memory: Held,
    permits: Arc<Semaphore>,
    capacity: u32,
    metrics: Arc<Metrics>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.metrics
            .queue_rows
            .set(queued_rows(&self.permits, self.capacity));
    }
}

struct Batcher {
    sink_senders: Vec<mpsc::UnboundedSender<Arc<InFlight>>>,
    batch_max_rows: usize,
    batch_max_wait: Duration,
    permits: Arc<Semaphore>,
    capacity: u32,
    metrics: Arc<Metrics>,
}

struct Pending {
    batch: StatsBatch,
    permit: OwnedSemaphorePermit,
    memory: Held,
    flush_at: tokio::time::Instant,
}

impl Batcher {
    async fn run(
        self,
        mut receiver: mpsc::UnboundedReceiver<Queued>,
        mut closing: watch::Receiver<bool>,
    ) {
        let mut pending: Option<Pending> = None;
        let mut closing_seen = false;
        loop {
            let flush_at = pending.as_ref().map(|p| p.flush_at);
            tokio::select! {
                queued = receiver.recv() => {
                    let Some(queued) = queued else { break };
                    let full = {
                        let pending = self.add(&mut pending, queued);
                        pending.batch.row_count() >= self.batch_max_rows
                    };
                    if full {
                        self.flush(pending.take());
                    }
                }
                () = sleep_until_some(flush_at) => self.flush(pending.take()),
                changed = closing.changed(), if !closing_seen => {
                    closing_seen = true;
                    if changed.is_err() || *closing.borrow() {
                        // Refuse further sends but keep draining what is already queued.
                        receiver.close();
                    }
                }
            }
        }
        self.flush(pending.take());
    }

    fn add<'a>(&self, pending: &'a mut Option<Pending>, queued: Queued) -> &'a mut Pending {
        match pending {
            Some(existing) => {
                existing.batch.push(queued.report);
                existing.permit.merge(queued.permit);
                existing.memory.merge(queued.memory);
                existing
            }
            None => pending.insert(Pending {
                batch: StatsBatch::new(vec![queued.report]),
                permit: queued.permit,
                memory: queued.memory,
                flush_at: tokio::time::Instant::now() + self.batch_max_wait,
            }),
        }
    }

    fn flush(&self, pending: Option<Pending>) {
        let Some(pending) = pending else { return };
        let in_flight = Arc::new(InFlight {
            batch: pending.batch,
            permit: Some(pending.permit),
            _memory: pending.memory,
            permits: Arc::clone(&self.permits),
            capacity: self.capacity,
            metrics: Arc::clone(&self.metrics),
        });
        for sender in &self.sink_senders {
            if sender.send(Arc::clone(&in_flight)).is_err() {
                tracing::error!("a sink worker has stopped; its rows are not delivered");
            }
        }
    }
}
