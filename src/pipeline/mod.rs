//! Between the HTTP handlers and the sinks: a queue bounded in stats rows, a batcher, and one
//! worker per sink that retries transient failures.
//!
//! The queue is a semaphore of rows. A report takes as many permits as it has stats objects and
//! gives them back only when every sink has finished with the batch holding it, so memory is
//! bounded by `queue_max_rows` wherever the rows are: waiting to be batched, batched and waiting
//! for a slow sink, or being retried.

mod backoff;
mod spooled;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kohaku_sink::{Report, SinkError, StatsBatch, StatsSink, WriteReport};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

pub use backoff::Backoff;
pub use spooled::SpooledPipeline;

use crate::budget::{report_bytes, Held, MemoryBudget};
use crate::config::PipelineConfig;
use crate::metrics::Metrics;
use crate::sora::Protocol;
use crate::spool::{AppendError, SpoolAppender, SpoolMonitor};
use crate::sync::{lock, sleep_until_some};

/// How long a health probe may take before the sink counts as unhealthy.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Rejected rows logged one by one per batch; the rest are summarised.
const REJECTED_ROWS_LOGGED: usize = 10;

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub queue_max_rows: u32,
    /// `pipeline.memory_max_bytes`.
    pub memory_max_bytes: u64,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    pub shutdown_timeout: Duration,
    pub backoff: Backoff,
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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full")]
    QueueFull,
    #[error("the report has {rows} stats objects, more than the whole queue holds ({capacity}, pipeline.queue_max_rows)")]
    TooLarge { rows: usize, capacity: u32 },
    #[error("Kohaku is shutting down")]
    Closed,
}

struct Queued {
    report: Arc<Report>,
    permit: OwnedSemaphorePermit,
    memory: Held,
}

/// The handlers' side of the pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    permits: Arc<Semaphore>,
    capacity: u32,
    sender: mpsc::UnboundedSender<Queued>,
    metrics: Arc<Metrics>,
    budget: MemoryBudget,
}

impl Ingest {
    /// Queues the report that came by `protocol`, with the memory it holds, or says why not.
    /// `Ok` means it is in the pipeline: answer 204.
    pub fn submit(
        &self,
        report: Report,
        protocol: Protocol,
        memory: Held,
    ) -> Result<(), SubmitError> {
        let wanted = self.permits_for(&report)?;
        let permit = match Arc::clone(&self.permits).try_acquire_many_owned(wanted) {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => return Err(SubmitError::QueueFull),
            Err(TryAcquireError::Closed) => return Err(SubmitError::Closed),
        };
        self.enqueue(report, permit, protocol, memory)
    }

    /// The memory budget requests and the queue share.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Queues the report, waiting while the queue is full. For callers that can wait (the
    /// importer), so that reading never outruns the sinks and memory stays bounded.
    pub async fn submit_waiting(&self, report: Report) -> Result<(), SubmitError> {
        let wanted = self.permits_for(&report)?;
        let permit = Arc::clone(&self.permits)
            .acquire_many_owned(wanted)
            .await
            .map_err(|_| SubmitError::Closed)?;
        let memory = self.budget.take_waiting(report_bytes(&report)).await;
        self.enqueue(report, permit, Protocol::Import, memory)
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
    ) -> Result<(), SubmitError> {
        let rows = report.row_count();
        self.sender
            .send(Queued {
                report: Arc::new(report),
                permit,
                memory,
            })
            .map_err(|_| SubmitError::Closed)?;
        self.metrics.count_accepted(rows, protocol);
        self.metrics
            .queue_rows
            .set(queued_rows(&self.permits, self.capacity));
        Ok(())
    }

    /// Rows accepted and not yet written to every sink.
    pub fn queued_rows(&self) -> i64 {
        queued_rows(&self.permits, self.capacity)
    }
}

fn queued_rows(permits: &Semaphore, capacity: u32) -> i64 {
    i64::from(capacity) - permits.available_permits() as i64
}

/// Why [`Intake::accept`] refused a report, whichever intake it was: all the HTTP layer needs to
/// know to answer (503 for the first three, 413 for the last).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// No room now (`what`: `queue` or `spool`); the message says which limit.
    #[error("{message}")]
    Full { what: &'static str, message: String },
    /// The intake cannot take data now (the spool cannot be written).
    #[error("{message}")]
    Unavailable { what: &'static str, message: String },
    /// Kohaku is shutting down.
    #[error("Kohaku is shutting down")]
    Closed,
    /// Larger than the whole intake could ever hold.
    #[error("{0}")]
    TooLarge(String),
}

impl From<SubmitError> for AcceptError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::QueueFull => Self::Full {
                what: "queue",
                message: "the queue is full (pipeline.queue_max_rows)".to_owned(),
            },
            SubmitError::Closed => Self::Closed,
            too_large @ SubmitError::TooLarge { .. } => Self::TooLarge(too_large.to_string()),
        }
    }
}

impl From<AppendError> for AcceptError {
    fn from(err: AppendError) -> Self {
        match err {
            full @ AppendError::Full { .. } => Self::Full {
                what: "spool",
                message: full.to_string(),
            },
            write @ AppendError::Write(_) => Self::Unavailable {
                what: "spool",
                message: write.to_string(),
            },
            AppendError::Closed => Self::Closed,
        }
    }
}

/// Where the ingest handler puts an accepted report: the in-memory queue, or the durable spool.
#[derive(Clone)]
pub enum Intake {
    Queue(Ingest),
    Spool {
        appender: SpoolAppender,
        metrics: Arc<Metrics>,
        /// What requests may hold while they are read, parsed and appended.
        budget: MemoryBudget,
    },
}

impl Intake {
    /// `Ok` means the report is accepted (in the queue, or on disk in the spool): answer 204.
    /// `body` is the request body `report` was parsed from, as it came by `protocol`; the spool
    /// keeps it as received.
    /// `memory` is what the request holds of the budget for the parsed report; the queue keeps
    /// it until every sink has stored the report, the spool gives it back once it is on disk.
    pub async fn accept(
        &self,
        report: Report,
        body: bytes::Bytes,
        protocol: Protocol,
        memory: Held,
    ) -> Result<(), AcceptError> {
        match self {
            Self::Queue(ingest) => Ok(ingest.submit(report, protocol, memory)?),
            Self::Spool {
                appender, metrics, ..
            } => {
                appender.append(report.received_at, protocol, body).await?;
                metrics.count_accepted(report.row_count(), protocol);
                Ok(())
            }
        }
    }

    /// The memory budget requests are read and parsed within.
    pub fn budget(&self) -> &MemoryBudget {
        match self {
            Self::Queue(ingest) => ingest.budget(),
            Self::Spool { budget, .. } => budget,
        }
    }
}

/// A batch on its way to every sink. Its rows leave the queue (and its bytes the memory budget)
/// when the last sink drops it.
struct InFlight {
    batch: StatsBatch,
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

/// What one sink is doing, as `/health` reports it.
struct SinkState {
    sink: Arc<dyn StatsSink>,
    /// The last write failed transiently and is being retried.
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SinkStatus {
    pub sink: String,
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the sink wants an operator to know without being unhealthy ([`StatsSink::notices`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
}

/// The configured sinks and their state, shared with the health endpoints.
#[derive(Clone)]
pub struct SinkHealth {
    states: Arc<Vec<Arc<SinkState>>>,
    metrics: Arc<Metrics>,
    spool: Option<SpoolMonitor>,
    /// The last probes' answer and when they started; the lock makes probes single-flight.
    last_check: Arc<tokio::sync::Mutex<Option<LastCheck>>>,
}

struct LastCheck {
    started: Instant,
    statuses: Vec<SinkStatus>,
}

impl SinkHealth {
    fn new(
        states: Vec<Arc<SinkState>>,
        metrics: Arc<Metrics>,
        spool: Option<SpoolMonitor>,
    ) -> Self {
        Self {
            states: Arc::new(states),
            metrics,
            spool,
            last_check: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }
}

impl SinkHealth {
    pub fn spool(&self) -> Option<&SpoolMonitor> {
        self.spool.as_ref()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Every sink's status, from probes started after this call: one probe per sink at a time,
    /// whose answer every caller that was waiting for it shares. A load balancer polling `/.ok`
    /// hard, or many requests at once, then costs a probe or two, not one per request (a probe of
    /// a locked SQLite holds a thread for its busy timeout). A sink whose writes are failing is
    /// unhealthy even if a probe happens to pass.
    pub async fn check(&self) -> Vec<SinkStatus> {
        let asked = Instant::now();
        let mut last = self.last_check.lock().await;
        if let Some(last) = last.as_ref().filter(|last| last.started >= asked) {
            return last.statuses.clone();
        }
        let started = Instant::now();
        let statuses = self.probe_all().await;
        *last = Some(LastCheck {
            started,
            statuses: statuses.clone(),
        });
        statuses
    }

    async fn probe_all(&self) -> Vec<SinkStatus> {
        let mut probes = tokio::task::JoinSet::new();
        for (index, state) in self.states.iter().enumerate() {
            let state = Arc::clone(state);
            probes.spawn(async move { (index, probe(&state).await) });
        }
        let mut statuses: Vec<(usize, SinkStatus)> = Vec::with_capacity(self.states.len());
        while let Some(joined) = probes.join_next().await {
            match joined {
                Ok(status) => statuses.push(status),
                Err(err) => tracing::error!(error = %err, "sink health probe failed"),
            }
        }
        statuses.sort_by_key(|(index, _)| *index);
        let statuses: Vec<SinkStatus> = statuses.into_iter().map(|(_, status)| status).collect();
        for status in &statuses {
            self.metrics
                .sink_up
                .get_or_create(&Metrics::sink(&status.sink))
                .set(i64::from(status.healthy));
        }
        statuses
    }
}

async fn probe(state: &SinkState) -> SinkStatus {
    let name = state.sink.name().to_owned();
    let error = match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, state.sink.health()).await {
        Err(_) => Some(format!(
            "health check timed out after {HEALTH_PROBE_TIMEOUT:?}"
        )),
        Ok(Err(err)) => Some(err.detailed()),
        Ok(Ok(())) if state.failing.load(Ordering::Relaxed) => Some(format!(
            "writes failing, retrying: {}",
            lock(&state.last_error).clone().unwrap_or_default()
        )),
        Ok(Ok(())) => None,
    };
    SinkStatus {
        sink: name,
        healthy: error.is_none(),
        error,
        notices: state.sink.notices(),
    }
}

pub struct Pipeline {
    ingest: Ingest,
    health: SinkHealth,
    closing: watch::Sender<bool>,
    give_up: watch::Sender<bool>,
    batcher: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    dropped_rows: Arc<AtomicU64>,
    shutdown_timeout: Duration,
}

/// What shutdown could not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownSummary {
    /// Rows some sink never stored because the deadline passed (summed over sinks).
    pub dropped_rows: u64,
}

impl Pipeline {
    /// `budget` is shared with the ingest handlers, which read bodies within it.
    pub fn start(
        sinks: Vec<Arc<dyn StatsSink>>,
        options: PipelineOptions,
        metrics: Arc<Metrics>,
        budget: MemoryBudget,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(options.queue_max_rows as usize));
        metrics
            .queue_capacity_rows
            .set(i64::from(options.queue_max_rows));
        let (sender, receiver) = mpsc::unbounded_channel();
        let (closing, closing_rx) = watch::channel(false);
        let (give_up, give_up_rx) = watch::channel(false);
        let dropped_rows = Arc::new(AtomicU64::new(0));

        let mut states = Vec::new();
        let mut sink_senders = Vec::new();
        let mut workers = Vec::new();
        for sink in sinks {
            let worker = SinkWorker::new(
                sink,
                &options,
                give_up_rx.clone(),
                Arc::clone(&metrics),
                Arc::clone(&dropped_rows),
                false,
            );
            let state = Arc::clone(&worker.state);
            let (batch_sender, batch_receiver) = mpsc::unbounded_channel();
            workers.push(tokio::spawn(worker.run(batch_receiver)));
            sink_senders.push(batch_sender);
            states.push(state);
        }

        let batcher = Batcher {
            sink_senders,
            batch_max_rows: options.batch_max_rows,
            batch_max_wait: options.batch_max_wait,
            permits: Arc::clone(&permits),
            capacity: options.queue_max_rows,
            metrics: Arc::clone(&metrics),
        };
        let batcher = tokio::spawn(batcher.run(receiver, closing_rx));

        Self {
            ingest: Ingest {
                permits,
                capacity: options.queue_max_rows,
                sender,
                metrics: Arc::clone(&metrics),
                budget,
            },
            health: SinkHealth::new(states, metrics, None),
            closing,
            give_up,
            batcher,
            workers,
            dropped_rows,
            shutdown_timeout: options.shutdown_timeout,
        }
    }

    pub fn ingest(&self) -> Ingest {
        self.ingest.clone()
    }

    pub fn health(&self) -> SinkHealth {
        self.health.clone()
    }

    /// Refuses new reports, writes what is queued, and returns once every sink is done and
    /// closed, or once `shutdown_timeout` has passed (whatever is still unwritten is counted and
    /// logged).
    pub async fn shutdown(self) -> ShutdownSummary {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.shutdown_by(deadline).await
    }

    /// [`Pipeline::shutdown`] with the deadline of a shutdown that began earlier (the listener's
    /// drain took part of it): `pipeline.shutdown_timeout_secs` bounds the whole shutdown.
    pub async fn shutdown_by(self, deadline: tokio::time::Instant) -> ShutdownSummary {
        self.ingest.permits.close();
        let _ = self.closing.send(true);
        let queued = self.ingest.queued_rows();
        tracing::info!(
            queued_rows = queued,
            timeout_secs = self.shutdown_timeout.as_secs(),
            "flushing queued stats to the sinks"
        );
        let give_up = self.give_up;
        let deadline = tokio::time::sleep_until(deadline);
        let all_done = async {
            if let Err(err) = self.batcher.await {
                tracing::error!(error = %err, "batcher task failed");
            }
            for worker in self.workers {
                if let Err(err) = worker.await {
                    tracing::error!(error = %err, "sink worker task failed");
                }
            }
        };
        tokio::pin!(all_done);
        tokio::select! {
            () = &mut all_done => {}
            () = deadline => {
                tracing::error!(timeout_secs = self.shutdown_timeout.as_secs(), "shutdown timeout reached; abandoning unwritten stats");
                let _ = give_up.send(true);
                all_done.await;
            }
        }
        ShutdownSummary {
            dropped_rows: self.dropped_rows.load(Ordering::Relaxed),
        }
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

/// Writes batches to one sink: retries transient failures forever (until shutdown gives up),
/// never retries permanent ones.
struct SinkWorker {
    state: Arc<SinkState>,
    backoff: Backoff,
    give_up: watch::Receiver<bool>,
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
enum Delivered {
    /// Every row is stored, or was refused permanently and counted.
    Done,
    /// Shutdown's deadline passed while retrying.
    GaveUp,
}

impl SinkWorker {
    fn new(
        sink: Arc<dyn StatsSink>,
        options: &PipelineOptions,
        give_up: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        dropped_rows: Arc<AtomicU64>,
        spooled: bool,
    ) -> Self {
        metrics.register_sink(sink.name());
        Self {
            state: Arc::new(SinkState {
                sink,
                failing: AtomicBool::new(false),
                last_error: Mutex::new(None),
            }),
            backoff: options.backoff.clone(),
            give_up,
            metrics,
            dropped_rows,
            spooled,
        }
    }

    fn name(&self) -> &str {
        self.state.sink.name()
    }

    async fn run(self, mut receiver: mpsc::UnboundedReceiver<Arc<InFlight>>) {
        while let Some(in_flight) = receiver.recv().await {
            self.deliver(&in_flight.batch).await;
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
    async fn deliver(&self, batch: &StatsBatch) -> Delivered {
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
