//! What `/health` says about the sinks: a probe per sink, what its worker's failing writes say,
//! the spool's write error, and each sink's notices.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kohaku_sink::StatsSink;

use super::SinkTally;
use crate::metrics::Metrics;
use crate::spool::SpoolMonitor;
use crate::sync::lock;

/// How long a health probe may take before the sink counts as unhealthy.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What one sink is doing, as `/health` reports it.
pub(super) struct SinkState {
    pub(super) sink: Arc<dyn StatsSink>,
    /// The last write failed transiently and is being retried.
    pub(super) failing: AtomicBool,
    pub(super) last_error: Mutex<Option<String>>,
    /// What the worker has done with the rows it was given, for [`super::ShutdownSummary`].
    pub(super) tally: RowTally,
}

impl SinkState {
    pub(super) fn new(sink: Arc<dyn StatsSink>) -> Self {
        Self {
            sink,
            failing: AtomicBool::new(false),
            last_error: Mutex::new(None),
            tally: RowTally::default(),
        }
    }

    pub(super) fn tally(&self) -> SinkTally {
        SinkTally {
            sink: self.sink.name().to_owned(),
            written: self.tally.written.load(Ordering::Relaxed),
            duplicates: self.tally.duplicates.load(Ordering::Relaxed),
            rejected: self.tally.rejected.load(Ordering::Relaxed),
            dropped: self.tally.dropped.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
pub(super) struct RowTally {
    pub(super) written: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) dropped: AtomicU64,
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
    pub(super) fn new(
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
