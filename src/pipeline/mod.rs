//! Between the HTTP handlers and the sinks. Reports come in through one [`Intake`] and reach one
//! [`worker`] per sink, which writes them with retries. Between the two is one of two sources:
//! the in-memory [`queue`] (bounded in rows and bytes, batched, fanned out to every worker) or,
//! with `[spool]`, the durable spool, which each worker reads at its own cursor. Either way there
//! is one start, one shutdown and one deadline.

mod backoff;
mod health;
mod intake;
mod queue;
mod unchanged;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kohaku_sink::StatsSink;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use backoff::Backoff;
pub use health::{SinkHealth, SinkStatus};
pub use intake::{AcceptError, Intake};
pub use queue::{Queue, SubmitError};
pub use unchanged::{SkipTypes, SkipUnchanged, ENTRY_BYTES, WAYS};

use crate::budget::MemoryBudget;
use crate::config::PipelineConfig;
use crate::metrics::Metrics;
use crate::spool::{BatchLimit, Spool};
use health::SinkState;
use worker::SinkWorker;

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub queue_max_rows: u32,
    /// `pipeline.memory_max_bytes`.
    pub memory_max_bytes: u64,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    pub shutdown_timeout: Duration,
    pub backoff: Backoff,
    /// `pipeline.skip_unchanged` and its cache size; `None` when off.
    pub skip_unchanged: Option<(SkipTypes, usize)>,
}

impl From<&PipelineConfig> for PipelineOptions {
    fn from(config: &PipelineConfig) -> Self {
        Self {
            // Validated against Semaphore::MAX_PERMITS, which is below u32::MAX on 64-bit targets.
            queue_max_rows: u32::try_from(config.queue_max_rows).unwrap_or(u32::MAX),
            memory_max_bytes: config.memory_max_bytes,
            batch_max_rows: usize::try_from(config.batch_max_rows).unwrap_or(usize::MAX),
            batch_max_wait: Duration::from_millis(config.batch_max_wait_ms),
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_secs),
            backoff: Backoff {
                initial: Duration::from_millis(config.retry_initial_backoff_ms),
                max: Duration::from_millis(config.retry_max_backoff_ms),
            },
            skip_unchanged: {
                use crate::config::{SkipMode, SkipUnchanged as Setting};
                let entries =
                    usize::try_from(config.skip_unchanged_cache_entries).unwrap_or(usize::MAX);
                match &config.skip_unchanged {
                    Setting::Mode(SkipMode::Off) => None,
                    Setting::Mode(SkipMode::All) => Some((SkipTypes::All, entries)),
                    Setting::Types(types) => Some((SkipTypes::Only(types.clone()), entries)),
                }
            },
        }
    }
}

/// What shutdown could not deliver, and what each sink did with the rows it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownSummary {
    /// Rows some sink never stored because the deadline passed (summed over sinks). Without the
    /// spool they are lost; with it they stay in the spool and count as zero here.
    pub dropped_rows: u64,
    /// One per sink, in the order the sinks were given.
    pub sinks: Vec<SinkTally>,
}

/// Rows one sink handled over the pipeline's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkTally {
    pub sink: String,
    /// Newly stored.
    pub written: u64,
    /// Already stored (the idempotency key matched).
    pub duplicates: u64,
    /// Refused one by one for their content.
    pub rejected: u64,
    /// Never stored: refused with their report, or abandoned at shutdown.
    pub dropped: u64,
}

pub struct Pipeline {
    intake: Intake,
    health: SinkHealth,
    metrics: Arc<Metrics>,
    /// `None` with the spool.
    queue: Option<Queue>,
    spool: Option<Spool>,
    closing: watch::Sender<bool>,
    give_up: watch::Sender<bool>,
    /// Awaited in order at shutdown: the batcher (queue only) first, then the workers.
    tasks: Vec<JoinHandle<()>>,
    states: Vec<Arc<SinkState>>,
    dropped_rows: Arc<AtomicU64>,
    shutdown_timeout: Duration,
}

impl Pipeline {
    /// Starts one worker per sink, fed by the spool when one is given and by the in-memory queue
    /// otherwise. `pipeline.memory_max_bytes` is shared out here: all of it to requests and the
    /// queue without the spool; with it, half to requests being read and appended, a quarter to
    /// the workers' replay batches (two per sink: one written while the next is read) and a
    /// quarter to the parsed reports the spool keeps for its readers.
    pub fn start(
        sinks: Vec<Arc<dyn StatsSink>>,
        options: PipelineOptions,
        mut metrics: Metrics,
        spool: Option<Spool>,
    ) -> Self {
        let memory = options.memory_max_bytes;
        let budget = MemoryBudget::new(if spool.is_some() { memory / 2 } else { memory });
        metrics.register_memory(budget.clone());
        if let Some(spool) = &spool {
            metrics.register_spool(spool.monitor());
            spool.keep_parsed(memory / 4);
        }
        let metrics = Arc::new(metrics);
        let skip = options.skip_unchanged.clone().map(|(types, entries)| {
            Arc::new(SkipUnchanged::new(types, entries, Arc::clone(&metrics)))
        });
        let (closing, closing_rx) = watch::channel(false);
        let (give_up, give_up_rx) = watch::channel(false);
        let dropped_rows = Arc::new(AtomicU64::new(0));
        let workers: Vec<SinkWorker> = sinks
            .into_iter()
            .map(|sink| {
                SinkWorker::new(
                    sink,
                    options.backoff.clone(),
                    give_up_rx.clone(),
                    Arc::clone(&metrics),
                    Arc::clone(&dropped_rows),
                    spool.is_some(),
                )
            })
            .collect();
        let states: Vec<Arc<SinkState>> = workers.iter().map(|w| Arc::clone(&w.state)).collect();
        let mut tasks = Vec::new();
        let (intake, queue) = match &spool {
            Some(spool) => {
                let names: Vec<&str> = states.iter().map(|state| state.sink.name()).collect();
                let readers = spool.readers(&names);
                let per_batch = memory / 4 / (2 * names.len().max(1) as u64);
                let limit = BatchLimit {
                    rows: options.batch_max_rows,
                    bytes: usize::try_from(per_batch).unwrap_or(usize::MAX).max(1),
                };
                for (worker, reader) in workers.into_iter().zip(readers) {
                    tasks.push(tokio::spawn(worker.run_from_spool(
                        reader,
                        (limit, options.batch_max_wait),
                        closing_rx.clone(),
                    )));
                }
                let intake = Intake::spool(spool.appender(), Arc::clone(&metrics), budget, skip);
                (intake, None)
            }
            None => {
                let mut senders = Vec::new();
                let mut worker_tasks = Vec::new();
                for worker in workers {
                    let (sender, receiver) = mpsc::unbounded_channel();
                    worker_tasks.push(tokio::spawn(worker.run_from_queue(receiver)));
                    senders.push(sender);
                }
                let (queue, batcher) = queue::start(
                    options.queue_max_rows,
                    (options.batch_max_rows, options.batch_max_wait),
                    Arc::clone(&metrics),
                    budget,
                    senders,
                    closing_rx,
                    skip,
                );
                tasks.push(batcher);
                tasks.extend(worker_tasks);
                (Intake::queue(queue.clone()), Some(queue))
            }
        };
        let health = SinkHealth::new(
            states.clone(),
            Arc::clone(&metrics),
            spool.as_ref().map(Spool::monitor),
        );
        Self {
            intake,
            health,
            metrics,
            queue,
            spool,
            closing,
            give_up,
            tasks,
            states,
            dropped_rows,
            shutdown_timeout: options.shutdown_timeout,
        }
    }

    pub fn intake(&self) -> Intake {
        self.intake.clone()
    }

    /// The in-memory queue, for a caller that waits for room instead of being refused (the
    /// importer); `None` when the pipeline reads the spool.
    pub fn queue(&self) -> Option<Queue> {
        self.queue.clone()
    }

    pub fn health(&self) -> SinkHealth {
        self.health.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// [`Pipeline::shutdown_by`] with `pipeline.shutdown_timeout_secs` from now.
    pub async fn shutdown(self) -> ShutdownSummary {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.shutdown_by(deadline).await
    }

    /// Refuses new reports and lets every sink store what was accepted until `deadline` (a
    /// shutdown that began earlier passes its own: `pipeline.shutdown_timeout_secs` bounds the
    /// whole of it), then closes the sinks. Without the spool, what a sink has not stored by then
    /// is lost, counted and logged; with it, it stays in the spool for the next start.
    pub async fn shutdown_by(mut self, deadline: tokio::time::Instant) -> ShutdownSummary {
        if let Some(queue) = &self.queue {
            queue.close();
            tracing::info!(
                queued_rows = queue.queued_rows(),
                timeout_secs = self.shutdown_timeout.as_secs(),
                "flushing queued stats to the sinks"
            );
        }
        if let Some(spool) = &mut self.spool {
            // Closed before the workers are told: the spool's end is final when they see it.
            spool.close_writer().await;
            tracing::info!(
                spool_bytes = spool.bytes(),
                timeout_secs = self.shutdown_timeout.as_secs(),
                "spool closed; letting the sinks catch up"
            );
        }
        let _ = self.closing.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        let all_done = async {
            for task in tasks {
                if let Err(err) = task.await {
                    tracing::error!(error = %err, "pipeline task failed");
                }
            }
        };
        tokio::pin!(all_done);
        tokio::select! {
            () = &mut all_done => {}
            () = tokio::time::sleep_until(deadline) => {
                if self.spool.is_some() {
                    tracing::warn!(timeout_secs = self.shutdown_timeout.as_secs(), "shutdown timeout reached; what the sinks have not stored stays in the spool");
                } else {
                    tracing::error!(timeout_secs = self.shutdown_timeout.as_secs(), "shutdown timeout reached; abandoning unwritten stats");
                }
                let _ = self.give_up.send(true);
                all_done.await;
            }
        }
        if let Some(spool) = &self.spool {
            let status = spool.monitor().status();
            tracing::info!(
                spool_bytes = status.bytes,
                segments = status.segments,
                "spool left for the next start"
            );
        }
        ShutdownSummary {
            dropped_rows: self.dropped_rows.load(Ordering::Relaxed),
            sinks: self.states.iter().map(|state| state.tally()).collect(),
        }
    }
}
