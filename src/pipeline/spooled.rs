//! The pipeline with the durable spool: the handlers append to the spool, and one task per sink
//! reads it at that sink's cursor, writes batches, and moves the cursor once they are stored.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use kohaku_sink::StatsSink;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Delivered, Intake, PipelineOptions, ShutdownSummary, SinkHealth, SinkWorker};
use crate::budget::MemoryBudget;
use crate::metrics::Metrics;
use crate::spool::{BatchLimit, Spool, SpoolReader};

pub struct SpooledPipeline {
    spool: Spool,
    intake: Intake,
    health: SinkHealth,
    closing: watch::Sender<bool>,
    give_up: watch::Sender<bool>,
    readers: Vec<JoinHandle<()>>,
    dropped_rows: Arc<AtomicU64>,
    shutdown_timeout: Duration,
}

impl SpooledPipeline {
    /// `budget` is what requests hold while they are read and appended; the sinks' replay batches
    /// share `replay_bytes`, two batches per sink (one written while the next is read).
    pub fn start(
        sinks: Vec<Arc<dyn StatsSink>>,
        options: PipelineOptions,
        spool: Spool,
        metrics: Arc<Metrics>,
        budget: MemoryBudget,
        replay_bytes: u64,
    ) -> Self {
        let (closing, closing_rx) = watch::channel(false);
        let (give_up, give_up_rx) = watch::channel(false);
        let dropped_rows = Arc::new(AtomicU64::new(0));
        let names: Vec<&str> = sinks.iter().map(|sink| sink.name()).collect();
        let spool_readers = spool.readers(&names);
        let limit = BatchLimit {
            rows: options.batch_max_rows,
            bytes: usize::try_from(replay_bytes / (2 * names.len().max(1) as u64))
                .unwrap_or(usize::MAX)
                .max(1),
        };
        let mut states = Vec::new();
        let mut readers = Vec::new();
        for (sink, reader) in sinks.into_iter().zip(spool_readers) {
            let worker = SinkWorker::new(
                sink,
                &options,
                give_up_rx.clone(),
                Arc::clone(&metrics),
                Arc::clone(&dropped_rows),
                true,
            );
            states.push(Arc::clone(&worker.state));
            readers.push(tokio::spawn(run(
                worker,
                reader,
                limit,
                options.batch_max_wait,
                closing_rx.clone(),
            )));
        }
        let intake = Intake::Spool {
            appender: spool.appender(),
            metrics: Arc::clone(&metrics),
            budget,
        };
        let health = SinkHealth::new(states, metrics, Some(spool.monitor()));
        Self {
            spool,
            intake,
            health,
            closing,
            give_up,
            readers,
            dropped_rows,
            shutdown_timeout: options.shutdown_timeout,
        }
    }

    pub fn intake(&self) -> Intake {
        self.intake.clone()
    }

    pub fn health(&self) -> SinkHealth {
        self.health.clone()
    }

    /// Syncs the spool and refuses further appends, then lets every sink catch up until
    /// `deadline`; what a sink has not stored by then stays in the spool for the next start.
    pub async fn shutdown_by(mut self, deadline: tokio::time::Instant) -> ShutdownSummary {
        self.spool.close_writer().await;
        let _ = self.closing.send(true);
        tracing::info!(
            spool_bytes = self.spool.bytes(),
            timeout_secs = self.shutdown_timeout.as_secs(),
            "spool closed; letting the sinks catch up"
        );
        let readers = self.readers;
        let all_done = async {
            for reader in readers {
                if let Err(err) = reader.await {
                    tracing::error!(error = %err, "spool reader task failed");
                }
            }
        };
        tokio::pin!(all_done);
        tokio::select! {
            () = &mut all_done => {}
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(timeout_secs = self.shutdown_timeout.as_secs(), "shutdown timeout reached; what the sinks have not stored stays in the spool");
                let _ = self.give_up.send(true);
                all_done.await;
            }
        }
        let status = self.spool.monitor().status();
        tracing::info!(
            spool_bytes = status.bytes,
            segments = status.segments,
            "spool left for the next start"
        );
        ShutdownSummary {
            dropped_rows: self.dropped_rows.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

async fn run(
    worker: SinkWorker,
    mut reader: SpoolReader,
    limit: BatchLimit,
    batch_max_wait: Duration,
    mut closing: watch::Receiver<bool>,
) {
    let limits = (limit, batch_max_wait);
    let give_up = worker.give_up.clone();
    let mut pending = next_batch(&mut reader, limits, &mut closing, give_up.clone()).await;
    // The next batch is read and parsed while the current one is written: the sink never waits
    // for the spool, and at most one batch more than the one being written is held in memory.
    while let Some(current) = pending {
        let deliver = async {
            if current.batch.is_empty() {
                Delivered::Done
            } else {
                worker.deliver(&current.batch).await
            }
        };
        let (delivered, next) = tokio::join!(
            deliver,
            next_batch(&mut reader, limits, &mut closing, give_up.clone())
        );
        if delivered == Delivered::GaveUp {
            break;
        }
        reader.ack(current.end).await;
        pending = next;
    }
    worker.close().await;
}

/// The reader's next batch, or `None` once closing is done or shutdown gave up.
async fn next_batch(
    reader: &mut SpoolReader,
    (limit, max_wait): (BatchLimit, Duration),
    closing: &mut watch::Receiver<bool>,
    mut give_up: watch::Receiver<bool>,
) -> Option<crate::spool::SpoolBatch> {
    tokio::select! {
        next = reader.next_batch(limit, max_wait, closing) => next,
        _ = give_up.wait_for(|given_up| *given_up) => None,
    }
}
