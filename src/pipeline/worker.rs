//! One worker per sink: writes batches from its source (the queue's batcher or the sink's spool
//! reader), retries transient failures until shutdown gives up, and keeps one bad report from
//! costing the others.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kohaku_sink::{SinkError, StatsBatch, StatsSink, WriteReport};
use tokio::sync::{mpsc, watch};

use super::health::SinkState;
use super::queue::InFlight;
use super::Backoff;
use crate::metrics::Metrics;
use crate::spool::{BatchLimit, SpoolBatch, SpoolReader};
use crate::sync::lock;

/// Rejected rows logged one by one per batch; the rest are summarised.
const REJECTED_ROWS_LOGGED: usize = 10;

/// Writes batches to one sink: retries transient failures forever (until shutdown gives up),
/// never retries permanent ones.
pub(super) struct SinkWorker {
    pub(super) state: Arc<SinkState>,
    backoff: Backoff,
    pub(super) give_up: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    dropped_rows: Arc<AtomicU64>,
    /// Rows abandoned at shutdown stay in the spool for the next start rather than being lost.
    spooled: bool,
}

enum Attempt {
    Written,
    Permanent(SinkError),
    GaveUp,
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivered {
    /// Every row is stored, or was refused permanently and counted.
    Done,
    /// Shutdown's deadline passed while retrying.
    GaveUp,
}

impl SinkWorker {
    pub(super) fn new(
        sink: Arc<dyn StatsSink>,
        backoff: Backoff,
        give_up: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        dropped_rows: Arc<AtomicU64>,
        spooled: bool,
    ) -> Self {
        metrics.register_sink(sink.name());
        Self {
            state: Arc::new(SinkState::new(sink)),
            backoff,
            give_up,
            metrics,
            dropped_rows,
            spooled,
        }
    }

    fn name(&self) -> &str {
        self.state.sink.name()
    }

    /// Writes what the queue's batcher sends until it stops.
    pub(super) async fn run_from_queue(self, mut receiver: mpsc::UnboundedReceiver<Arc<InFlight>>) {
        while let Some(in_flight) = receiver.recv().await {
            self.deliver(&in_flight.batch).await;
        }
        self.close().await;
    }

    /// Writes what the sink's spool reader reads, moving its cursor once a batch is stored, until
    /// the spool is closed and read to its end, or shutdown gives up.
    pub(super) async fn run_from_spool(
        self,
        mut reader: SpoolReader,
        limits: (BatchLimit, Duration),
        mut closing: watch::Receiver<bool>,
    ) {
        let give_up = self.give_up.clone();
        let mut pending = next_spooled(&mut reader, limits, &mut closing, give_up.clone()).await;
        // The next batch is read while the current one is written: the sink never waits for the
        // spool, and at most one batch more than the one being written is held in memory.
        while let Some(current) = pending {
            let deliver = async {
                if current.batch.is_empty() {
                    Delivered::Done
                } else {
                    self.deliver(&current.batch).await
                }
            };
            let (delivered, next) = tokio::join!(
                deliver,
                next_spooled(&mut reader, limits, &mut closing, give_up.clone())
            );
            if delivered == Delivered::GaveUp {
                break;
            }
            reader.ack(current.end).await;
            pending = next;
        }
        self.close().await;
    }

    async fn close(&self) {
        match self.state.sink.close().await {
            Ok(()) => tracing::info!(sink = self.name(), "sink closed"),
            Err(err) => {
                tracing::warn!(sink = self.name(), error = %err.detailed(), "closing the sink failed")
            }
        }
    }

    /// Writes the batch. When the sink refuses it permanently, writes its reports one by one so
    /// that one bad report does not cost the others.
    pub(super) async fn deliver(&self, batch: &StatsBatch) -> Delivered {
        // Here rather than in the handler: the summary is storage work, and the first worker to
        // come takes it for every sink.
        if self.state.sink.keeps_summaries() {
            for report in batch.reports() {
                report.summarize_with(crate::sora::summarize);
            }
        }
        match self.write_retrying(batch).await {
            Attempt::Written => {}
            Attempt::GaveUp => return Delivered::GaveUp,
            Attempt::Permanent(err) if batch.reports().len() > 1 => {
                tracing::warn!(sink = self.name(), error = %err.detailed(), reports = batch.reports().len(), "batch refused; writing its reports one by one");
                for report in batch.reports() {
                    let single = StatsBatch::new(vec![Arc::clone(report)]);
                    match self.write_retrying(&single).await {
                        Attempt::Written => {}
                        Attempt::Permanent(err) => self.drop_rows(&single, &err),
                        Attempt::GaveUp => return Delivered::GaveUp,
                    }
                }
            }
            Attempt::Permanent(err) => self.drop_rows(batch, &err),
        }
        Delivered::Done
    }

    fn drop_rows(&self, batch: &StatsBatch, err: &SinkError) {
        let report = batch.reports().first();
        tracing::error!(
            sink = self.name(),
            rows = batch.row_count(),
            connection_id = report.map(|r| r.connection.connection_id.as_str()),
            channel_id = report.map(|r| r.connection.channel_id.as_str()),
            error = %err.detailed(),
            "sink refused the report permanently; its rows are not stored in this sink"
        );
        self.count_dropped(batch.row_count());
    }

    fn count_dropped(&self, rows: usize) {
        self.state
            .tally
            .dropped
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.metrics
            .rows_dropped
            .get_or_create(&Metrics::sink(self.name()))
            .inc_by(rows as u64);
    }

    async fn write_retrying(&self, batch: &StatsBatch) -> Attempt {
        let labels = Metrics::sink(self.name());
        let mut give_up = self.give_up.clone();
        let mut attempt: u32 = 0;
        loop {
            if *give_up.borrow() {
                self.abandon(batch);
                return Attempt::GaveUp;
            }
            let started = Instant::now();
            let result = tokio::select! {
                result = self.state.sink.write(batch) => result,
                _ = give_up.wait_for(|given_up| *given_up) => {
                    self.abandon(batch);
                    return Attempt::GaveUp;
                }
            };
            match result {
                Ok(report) => {
                    self.metrics
                        .batch_write_seconds
                        .get_or_create(&labels)
                        .observe(started.elapsed().as_secs_f64());
                    self.record(batch, report);
                    if self.state.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(sink = self.name(), retries = attempt, "sink recovered");
                    }
                    self.metrics.sink_up.get_or_create(&labels).set(1);
                    return Attempt::Written;
                }
                Err(err) if err.is_transient() => {
                    let delay = self.backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    self.count_error("transient");
                    self.metrics.sink_retries.get_or_create(&labels).inc();
                    self.metrics.sink_up.get_or_create(&labels).set(0);
                    self.state.failing.store(true, Ordering::Relaxed);
                    *lock(&self.state.last_error) = Some(err.detailed());
                    tracing::warn!(
                        sink = self.name(),
                        error = %err.detailed(),
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        rows = batch.row_count(),
                        "transient sink error; retrying"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = give_up.wait_for(|given_up| *given_up) => {}
                    }
                }
                Err(err) => {
                    self.count_error("permanent");
                    return Attempt::Permanent(err);
                }
            }
        }
    }

    fn count_error(&self, kind: &'static str) {
        self.metrics
            .sink_errors
            .get_or_create(&crate::metrics::SinkErrorLabels {
                sink: self.name().to_owned(),
                kind,
            })
            .inc();
    }

    fn abandon(&self, batch: &StatsBatch) {
        if self.spooled {
            tracing::warn!(
                sink = self.name(),
                rows = batch.row_count(),
                "shutdown timeout: rows left in the spool; they are written at the next start"
            );
            return;
        }
        tracing::error!(
            sink = self.name(),
            rows = batch.row_count(),
            "shutdown timeout: rows not written to this sink"
        );
        self.count_dropped(batch.row_count());
        // Only what shutdown abandons makes the exit fail: a report refused for its content
        // earlier in the process's life was logged and counted then, and is not pending now.
        self.dropped_rows
            .fetch_add(batch.row_count() as u64, Ordering::Relaxed);
    }

    fn record(&self, batch: &StatsBatch, report: WriteReport) {
        let tally = &self.state.tally;
        tally.written.fetch_add(report.written, Ordering::Relaxed);
        tally
            .duplicates
            .fetch_add(report.duplicates, Ordering::Relaxed);
        tally
            .rejected
            .fetch_add(report.rejected.len() as u64, Ordering::Relaxed);
        let labels = Metrics::sink(self.name());
        self.metrics
            .rows_written
            .get_or_create(&labels)
            .inc_by(report.written);
        self.metrics
            .rows_duplicate
            .get_or_create(&labels)
            .inc_by(report.duplicates);
        if !report.rejected.is_empty() {
            self.metrics
                .rows_rejected
                .get_or_create(&labels)
                .inc_by(report.rejected.len() as u64);
            for row in report.rejected.iter().take(REJECTED_ROWS_LOGGED) {
                tracing::warn!(
                    sink = self.name(),
                    connection_id = row.connection_id,
                    rtc_id = row.rtc_id,
                    rtc_timestamp = row.rtc_timestamp,
                    reason = row.reason,
                    "row rejected by the sink"
                );
            }
            if report.rejected.len() > REJECTED_ROWS_LOGGED {
                tracing::warn!(
                    sink = self.name(),
                    more = report.rejected.len() - REJECTED_ROWS_LOGGED,
                    "further rows rejected in the same batch"
                );
            }
        }
        tracing::debug!(
            sink = self.name(),
            rows = batch.row_count(),
            written = report.written,
            duplicates = report.duplicates,
            "batch written"
        );
    }
}

/// The reader's next batch, or `None` once closing is done or shutdown gave up.
async fn next_spooled(
    reader: &mut SpoolReader,
    (limit, max_wait): (BatchLimit, Duration),
    closing: &mut watch::Receiver<bool>,
    mut give_up: watch::Receiver<bool>,
) -> Option<SpoolBatch> {
    tokio::select! {
        next = reader.next_batch(limit, max_wait, closing) => next,
        _ = give_up.wait_for(|given_up| *given_up) => None,
    }
}
