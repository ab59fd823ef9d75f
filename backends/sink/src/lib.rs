//! The contract between Kohaku's ingest pipeline and its storage backends.
//!
//! A backend implements [`StatsSink`]. The pipeline hands it [`StatsBatch`]es of whole reports, each
//! report being one connection's `getStats()` result as Sora forwarded it. Every stats object keeps
//! the exact JSON text the client produced ([`StatsObject::rtc_data`]); backends store it whole.
//!
//! Writes must be idempotent on `(connection_id, rtc_id, rtc_timestamp)` so that the pipeline can
//! retry a batch after a [`SinkError::Transient`] without storing duplicates.

use std::error::Error as StdError;
use std::sync::Arc;

use async_trait::async_trait;
pub use serde_json::value::RawValue;
pub use time::OffsetDateTime;

mod redact;
mod stored;
mod summary;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use redact::redact_uri;
pub use stored::{reports_from_stored, StoredObject};
pub use summary::{summary_columns, ReportSummary, SummaryNumber, SummaryText};

/// How every backend and log line spells a point in time: ISO-8601 UTC with microseconds, e.g.
/// `2025-07-25T06:06:51.592776Z`. Fixed width, so text comparison orders it as time.
pub const TIMESTAMP_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
);

pub fn format_timestamp(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(TIMESTAMP_FORMAT)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// Parses what [`format_timestamp`] writes.
pub fn parse_timestamp(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    time::PrimitiveDateTime::parse(text, TIMESTAMP_FORMAT).map(|t| t.assume_utc())
}

/// The descriptive fields Sora sends with every report of one connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Connection {
    pub channel_id: String,
    pub session_id: String,
    pub client_id: String,
    pub connection_id: String,
    pub bundle_id: Option<String>,
    /// The stats webhook's `group_id` (Sora 2025.2 and later); the exporter does not send it.
    pub group_id: Option<String>,
    pub label: String,
    pub version: String,
    pub node_name: String,
    pub role: String,
    /// Newer Sora versions no longer send it; `None` is stored as NULL.
    pub multistream: Option<bool>,
    pub simulcast: bool,
    pub spotlight: bool,
}

/// One W3C `RTCStats` object, with the three fields Kohaku reads pulled out of it.
#[derive(Debug, Clone)]
pub struct StatsObject {
    pub rtc_id: String,
    pub rtc_type: String,
    /// The object's own `timestamp`: milliseconds since the Unix epoch, possibly fractional.
    pub rtc_timestamp: f64,
    /// The object exactly as the client sent it (field order, number spelling, unknown fields).
    pub rtc_data: RawJson,
}

/// A stats object's JSON text exactly as received. It shares the request body it came in rather
/// than copying it: a report's objects are slices of one buffer.
#[derive(Clone, PartialEq, Eq)]
pub struct RawJson(bytes::Bytes);

impl RawJson {
    /// `text` after checking that it is JSON: for callers holding their own string (tests, the
    /// samples).
    pub fn from_string(text: String) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<serde::de::IgnoredAny>(&text)?;
        Ok(Self(bytes::Bytes::from(text)))
    }

    /// The part of `body` that `text` is, without a copy; `text` must be JSON the caller has
    /// validated. A `text` that is not inside `body` is copied instead.
    pub fn slice_of(body: &bytes::Bytes, text: &str) -> Self {
        let start = (text.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
        if start <= body.len() && text.len() <= body.len() - start {
            Self(body.slice(start..start + text.len()))
        } else {
            Self(bytes::Bytes::copy_from_slice(text.as_bytes()))
        }
    }

    /// The text's length in bytes, without reading it.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self) -> &str {
        // Both constructors take the bytes of a `str`, so this never fails; checking rather than
        // assuming keeps the crate free of `unsafe` for a scan far cheaper than the copy it saves.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

/// One `getStats()` result of one connection.
#[derive(Debug, Clone)]
pub struct Report {
    pub connection: Connection,
    /// When Sora sent the report (the body's `timestamp`).
    pub sora_timestamp: OffsetDateTime,
    /// When Kohaku received it.
    pub received_at: OffsetDateTime,
    pub stats: Vec<StatsObject>,
    /// The objects `skip_unchanged` found unchanged and took out of `stats`, with their places
    /// in the report as received: not stored, but part of the report's summary.
    pub unchanged: Vec<(usize, StatsObject)>,
    /// The report's connection summary ([`Report::summary`]), taken once from every object it
    /// carried, by the first sink worker that writes it (off the request path, once for every
    /// sink).
    summary: std::sync::OnceLock<Option<Box<ReportSummary>>>,
}

impl Report {
    /// A report without a summary yet (Kohaku's parser adds it).
    pub fn new(
        connection: Connection,
        sora_timestamp: OffsetDateTime,
        received_at: OffsetDateTime,
        stats: Vec<StatsObject>,
    ) -> Self {
        Self {
            connection,
            sora_timestamp,
            received_at,
            stats,
            unchanged: Vec::new(),
            summary: std::sync::OnceLock::new(),
        }
    }

    /// The report's summary once taken ([`Report::summarize_with`] or [`Report::set_summary`]);
    /// `None` before, and for a report without objects. Backends that keep summaries store it
    /// with the report's objects, in the same transaction.
    pub fn summary(&self) -> Option<&ReportSummary> {
        self.summary.get().and_then(Option::as_deref)
    }

    /// Takes the summary with `take`, given every object the report carried in the order it
    /// carried them (the stored ones and those `skip_unchanged` took out), unless it is taken
    /// already; `stats_objects_unchanged` is set from what `skip_unchanged` took out.
    pub fn summarize_with(&self, take: impl FnOnce(&[&StatsObject]) -> Option<ReportSummary>) {
        self.summary.get_or_init(|| {
            // Each object taken out goes back to its place; in ascending order every place
            // before it is filled already.
            let mut all: Vec<&StatsObject> = self.stats.iter().collect();
            for (at, object) in &self.unchanged {
                all.insert(*at, object);
            }
            let mut summary = take(&all);
            if let Some(summary) = summary.as_mut() {
                summary.set_number(
                    SummaryNumber::StatsObjectsUnchanged,
                    Some(self.unchanged.len() as f64),
                );
            }
            summary.map(Box::new)
        });
    }

    /// Sets the summary outright (a test's, or one made from stored objects by
    /// `kohaku migrate --summaries`).
    pub fn set_summary(&mut self, summary: Option<ReportSummary>) {
        self.summary = std::sync::OnceLock::from(summary.map(Box::new));
    }

    pub fn row_count(&self) -> usize {
        self.stats.len()
    }
}

/// What a sink is asked to write in one go. Reports are never split across batches, so a backend
/// that writes a batch in one transaction never leaves half a report behind.
#[derive(Debug, Clone, Default)]
pub struct StatsBatch {
    reports: Vec<Arc<Report>>,
    rows: usize,
}

/// One stats row: the object and the report (connection, times) it came with.
#[derive(Debug, Clone, Copy)]
pub struct StatsRow<'a> {
    pub report: &'a Report,
    pub object: &'a StatsObject,
}

impl StatsBatch {
    pub fn new(reports: Vec<Arc<Report>>) -> Self {
        let rows = reports.iter().map(|r| r.row_count()).sum();
        Self { reports, rows }
    }

    pub fn push(&mut self, report: Arc<Report>) {
        self.rows += report.row_count();
        self.reports.push(report);
    }

    pub fn reports(&self) -> &[Arc<Report>] {
        &self.reports
    }

    /// Number of stats objects in the batch.
    pub fn row_count(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0 && self.reports.is_empty()
    }

    pub fn rows(&self) -> impl Iterator<Item = StatsRow<'_>> + '_ {
        self.reports.iter().flat_map(|report| {
            report
                .stats
                .iter()
                .map(move |object| StatsRow { report, object })
        })
    }
}

/// The outcome of a successful [`StatsSink::write`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteReport {
    /// Rows newly stored.
    pub written: u64,
    /// Rows already present under the same `(connection_id, rtc_id, rtc_timestamp)`.
    pub duplicates: u64,
    /// Rows the backend cannot store, whatever the number of retries; the rest of the batch was
    /// written.
    pub rejected: Vec<RejectedRow>,
}

impl WriteReport {
    pub fn merge(&mut self, other: WriteReport) {
        self.written += other.written;
        self.duplicates += other.duplicates;
        self.rejected.extend(other.rejected);
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRow {
    pub connection_id: String,
    pub rtc_id: String,
    pub rtc_timestamp: f64,
    pub reason: String,
}

pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Whether retrying can help is the only thing the pipeline needs to know about a failure.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The store is unreachable, busy, throttling or timed out: the same write may succeed later.
    #[error("{message}")]
    Transient {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The store rejects the write itself (bad schema, bad configuration, bad data): retrying the
    /// same write cannot succeed.
    #[error("{message}")]
    Permanent {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl SinkError {
    pub fn transient(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Transient {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub fn permanent(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Permanent {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A failure described by its message alone, retried or not as `transient` says; for
    /// backends that classify an error before they wrap it.
    pub fn classified(transient: bool, message: impl Into<String>) -> Self {
        let message = message.into();
        if transient {
            Self::Transient {
                message,
                source: None,
            }
        } else {
            Self::Permanent {
                message,
                source: None,
            }
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// The message with its whole chain of causes, for logs and health answers.
    pub fn detailed(&self) -> String {
        let mut text = self.to_string();
        let mut cause = StdError::source(self);
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        text
    }
}

/// A backend setting that cannot work, found without contacting anything. `key` is relative to
/// the backend's table (`busy_timeout_ms`); Kohaku adds `sinks.<backend>.` and the file's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct InvalidSetting {
    pub key: &'static str,
    pub message: String,
}

impl InvalidSetting {
    pub fn new(key: &'static str, message: impl Into<String>) -> Self {
        Self {
            key,
            message: message.into(),
        }
    }

    /// Refuses a time setting far past any sensible value: a typo, and some would also overflow
    /// a timer or a store's own limit and fail only at the first write.
    pub fn check_at_most(key: &'static str, value: u64, max: u64, unit: &str) -> Result<(), Self> {
        if value > max {
            return Err(Self::new(
                key,
                format!("{value} {unit} is more than the largest accepted value, {max} {unit}"),
            ));
        }
        Ok(())
    }
}

/// An hour in milliseconds and a day in seconds: the bounds of the time settings.
pub const HOUR_MS: u64 = 3_600_000;
pub const DAY_SECS: u64 = 86_400;

/// A backend-specific counter, exported as `kohaku_sink_<name>_total{sink="…"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkCounter {
    pub name: &'static str,
    pub help: &'static str,
    pub value: u64,
}

/// A storage backend.
#[async_trait]
pub trait StatsSink: Send + Sync {
    /// A short stable name used in metrics labels, logs and health answers (e.g. `sqlite`).
    fn name(&self) -> &str;

    /// Create or upgrade the schema. Re-running it is a no-op.
    async fn migrate(&self) -> Result<(), SinkError>;

    /// Store every row of the batch, idempotently.
    async fn write(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError>;

    /// The stored reports of the first connection whose id sorts after `after` (the first
    /// connection when `None`), read back so that data stored before summaries existed can be
    /// given its summaries (`kohaku migrate --summaries`): the connection's id and its reports, in
    /// Sora's time order, each with the objects stored for it. `Ok(None)` when no connection is
    /// left. A backend that cannot read its rows back keeps this answer.
    async fn stored_reports_after(
        &self,
        after: Option<&str>,
    ) -> Result<Option<(String, Vec<Report>)>, SinkError> {
        let _ = after;
        Err(SinkError::Permanent {
            message: format!("{}: stored stats cannot be read back", self.name()),
            source: None,
        })
    }

    /// Whether the store is usable right now.
    async fn health(&self) -> Result<(), SinkError>;

    /// Flush and release connections.
    async fn close(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Whether the backend stores each report's summary ([`Report::summary`]). The pipeline
    /// takes summaries only when some sink keeps them: the work is part of storing.
    fn keeps_summaries(&self) -> bool {
        true
    }

    /// Counters of work the backend does on its own (e.g. retention sweeps), read at each scrape.
    fn counters(&self) -> Vec<SinkCounter> {
        Vec::new()
    }

    /// What an operator should know that does not make the store unusable (a feature fallen
    /// back from, a maintenance job that failed), shown in `/health` beside the sink's status.
    fn notices(&self) -> Vec<String> {
        Vec::new()
    }
}
