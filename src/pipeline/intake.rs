//! Where a handler hands an accepted report: the pipeline's in-memory queue, or its durable spool.

use std::sync::Arc;

use kohaku_sink::Report;

use super::queue::{Queue, SubmitError};
use super::unchanged::SkipUnchanged;
use crate::budget::{Held, MemoryBudget};
use crate::metrics::Metrics;
use crate::sora::Protocol;
use crate::spool::{AppendError, SpoolAppender};

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

/// Where the ingest handler puts an accepted report, whichever source feeds the sinks. Cheap to
/// clone.
#[derive(Clone)]
pub struct Intake {
    target: Target,
    /// What requests may hold while they are read and parsed.
    budget: MemoryBudget,
}

#[derive(Clone)]
enum Target {
    Queue(Queue),
    Spool {
        appender: SpoolAppender,
        metrics: Arc<Metrics>,
        skip: Option<Arc<SkipUnchanged>>,
    },
}

impl Intake {
    pub(super) fn queue(queue: Queue) -> Self {
        Self {
            budget: queue.budget().clone(),
            target: Target::Queue(queue),
        }
    }

    pub(super) fn spool(
        appender: SpoolAppender,
        metrics: Arc<Metrics>,
        budget: MemoryBudget,
        skip: Option<Arc<SkipUnchanged>>,
    ) -> Self {
        Self {
            target: Target::Spool {
                appender,
                metrics,
                skip,
            },
            budget,
        }
    }

    /// `Ok` means the report is accepted (in the queue, or on disk in the spool): answer 204.
    /// `body` is the request body `report` was parsed from, as it came by `protocol`; the spool
    /// keeps it as received, and hands `report` to its readers so that they need not parse the
    /// body again.
    /// `memory` is what the request holds of the budget for the parsed report; the queue keeps
    /// it until every sink has stored the report, the spool gives it back once it is on disk.
    pub async fn accept(
        &self,
        report: Report,
        body: bytes::Bytes,
        protocol: Protocol,
        memory: Held,
    ) -> Result<(), AcceptError> {
        match &self.target {
            Target::Queue(queue) => Ok(queue.submit(report, protocol, memory)?),
            Target::Spool {
                appender,
                metrics,
                skip,
            } => {
                let mut report = report;
                let rows = report.row_count();
                // The spool keeps the body whole: a replay that misses the parsed report stores
                // the skipped objects once more, which costs repeats, never a change.
                let kept = skip.as_ref().map(|skip| skip.filter(&mut report));
                appender
                    .append_parsed(protocol, body, Arc::new(report))
                    .await?;
                if let (Some(skip), Some(kept)) = (skip, kept) {
                    skip.remember(kept);
                }
                drop(memory);
                metrics.count_accepted(rows, protocol);
                Ok(())
            }
        }
    }

    /// The memory budget requests are read and parsed within.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }
}
