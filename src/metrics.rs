//! Every metric Kohaku exports, registered in one place so names and help texts stay consistent.
//! Counters are named without `_total`; the OpenMetrics encoder appends it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use kohaku_sink::StatsSink;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::sora::Protocol;
use crate::sync::lock;

/// Distinct ignored webhook types that get a series of their own; later ones share `other`, so a
/// sender cannot grow the exporter's output without bound.
const MAX_IGNORED_TYPE_LABELS: usize = 32;
const MAX_IGNORED_TYPE_LEN: usize = 64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's path as configured; `other` for paths Kohaku does not serve.
    pub path: Cow<'static, str>,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// Encoded as `type`.
    pub r#type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkErrorLabels {
    pub sink: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The label a sender-chosen type gets: its own for the first few (and short ones), `other`
/// after, so that no sender can grow the exporter's output. True the first time a label is used.
fn capped_label(seen: &Mutex<HashSet<String>>, kind: &str) -> (String, bool) {
    const OTHER: &str = "other";
    let mut seen = lock(seen);
    if seen.contains(kind) {
        (kind.to_owned(), false)
    } else if seen.len() < MAX_IGNORED_TYPE_LABELS && kind.len() <= MAX_IGNORED_TYPE_LEN {
        (kind.to_owned(), seen.insert(kind.to_owned()))
    } else {
        (OTHER.to_owned(), seen.insert(OTHER.to_owned()))
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    reports_received: Family<ProtocolLabels, Counter>,
    stats_objects_received: Family<ProtocolLabels, Counter>,
    reports_ignored: Family<TypeLabels, Counter>,
    /// Ignored types that have a series (and were logged) already.
    ignored_types: Mutex<HashSet<String>>,
    objects_unchanged: Family<TypeLabels, Counter>,
    /// Stats types that have an `objects_unchanged` series already.
    unchanged_types: Mutex<HashSet<String>>,
    pub skip_cache_entries: Gauge,
    pub skip_cache_capacity: Gauge,
    pub skip_cache_evictions: Counter,
    pub rows_written: Family<SinkLabels, Counter>,
    pub rows_duplicate: Family<SinkLabels, Counter>,
    pub rows_rejected: Family<SinkLabels, Counter>,
    pub rows_dropped: Family<SinkLabels, Counter>,
    pub batch_write_seconds: HistogramFamily<SinkLabels>,
    pub sink_errors: Family<SinkErrorLabels, Counter>,
    pub sink_retries: Family<SinkLabels, Counter>,
    pub sink_up: Family<SinkLabels, Gauge>,
    pub queue_rows: Gauge,
    pub queue_capacity_rows: Gauge,
}

fn write_latency_histogram() -> Histogram {
    // 1 ms .. ~65 s: a healthy batch takes milliseconds, a struggling database seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kohaku");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by path and status",
            requests.clone(),
        );
        let reports_received = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "reports_received",
            "Sora reports accepted into the pipeline (answered 204, or read by kohaku import), by the protocol they came by",
            reports_received.clone(),
        );
        let stats_objects_received = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "stats_objects_received",
            "Stats objects accepted into the pipeline, by the protocol they came by",
            stats_objects_received.clone(),
        );
        for protocol in Protocol::ALL {
            let labels = ProtocolLabels {
                protocol: protocol.as_str(),
            };
            drop(reports_received.get_or_create(&labels));
            drop(stats_objects_received.get_or_create(&labels));
        }
        let reports_ignored = Family::<TypeLabels, Counter>::default();
        registry.register(
            "reports_ignored",
            "Stats-webhook requests of a type Kohaku does not store, answered 200 so that Sora does not count them as failures",
            reports_ignored.clone(),
        );
        let objects_unchanged = Family::<TypeLabels, Counter>::default();
        registry.register(
            "stats_objects_unchanged",
            "Stats objects not stored because they equal the same connection's previous one but for their timestamp ([pipeline] skip_unchanged), by type",
            objects_unchanged.clone(),
        );
        let skip_cache_entries = Gauge::default();
        registry.register(
            "skip_unchanged_cache_entries",
            "Objects the skip_unchanged cache remembers",
            skip_cache_entries.clone(),
        );
        let skip_cache_capacity = Gauge::default();
        registry.register(
            "skip_unchanged_cache_capacity_entries",
            "pipeline.skip_unchanged_cache_entries, rounded up to whole sets",
            skip_cache_capacity.clone(),
        );
        let skip_cache_evictions = Counter::default();
        registry.register(
            "skip_unchanged_cache_evictions",
            "Objects the skip_unchanged cache forgot to remember others; each costs at most one stored repeat",
            skip_cache_evictions.clone(),
        );
        let rows_written = Family::<SinkLabels, Counter>::default();
        registry.register(
            "sink_rows_written",
            "Stats rows newly stored, per sink",
            rows_written.clone(),
        );
        let rows_duplicate = Family::<SinkLabels, Counter>::default();
        registry.register(
            "sink_rows_duplicate",
            "Stats rows a sink already held (same connection_id, rtc_id, rtc_timestamp)",
            rows_duplicate.clone(),
        );
        let rows_rejected = Family::<SinkLabels, Counter>::default();
        registry.register(
            "sink_rows_rejected",
            "Stats rows a sink refused as invalid; the rest of their batch was stored",
            rows_rejected.clone(),
        );
        let rows_dropped = Family::<SinkLabels, Counter>::default();
        registry.register(
            "sink_rows_dropped",
            "Stats rows never stored by a sink: its write failed permanently, or shutdown's deadline passed while retrying",
            rows_dropped.clone(),
        );
        let batch_write_seconds: HistogramFamily<SinkLabels> =
            Family::new_with_constructor(write_latency_histogram as fn() -> Histogram);
        registry.register(
            "sink_batch_write_seconds",
            "Time of one successful batch write, per sink",
            batch_write_seconds.clone(),
        );
        let sink_errors = Family::<SinkErrorLabels, Counter>::default();
        registry.register(
            "sink_errors",
            "Failed batch writes, per sink and kind (transient: retried; permanent: not retried)",
            sink_errors.clone(),
        );
        let sink_retries = Family::<SinkLabels, Counter>::default();
        registry.register(
            "sink_retries",
            "Batch writes retried after a transient failure",
            sink_retries.clone(),
        );
        let sink_up = Family::<SinkLabels, Gauge>::default();
        registry.register(
            "sink_up",
            "1 when the sink's last write or health check succeeded, 0 otherwise",
            sink_up.clone(),
        );
        let queue_rows = Gauge::default();
        registry.register(
            "queue_rows",
            "Stats rows accepted but not yet written to every sink",
            queue_rows.clone(),
        );
        let queue_capacity_rows = Gauge::default();
        registry.register(
            "queue_capacity_rows",
            "pipeline.queue_max_rows: beyond it requests get 503",
            queue_capacity_rows.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Kohaku's version", build_info);
        Self {
            registry,
            requests,
            reports_received,
            stats_objects_received,
            reports_ignored,
            ignored_types: Mutex::new(HashSet::new()),
            objects_unchanged,
            unchanged_types: Mutex::new(HashSet::new()),
            skip_cache_entries,
            skip_cache_capacity,
            skip_cache_evictions,
            rows_written,
            rows_duplicate,
            rows_rejected,
            rows_dropped,
            batch_write_seconds,
            sink_errors,
            sink_retries,
            sink_up,
            queue_rows,
            queue_capacity_rows,
        }
    }

    /// Creates every per-sink series at zero, so dashboards and alerts see them before the first
    /// write or failure.
    pub fn register_sink(&self, name: &str) {
        let labels = Self::sink(name);
        drop(self.rows_written.get_or_create(&labels));
        drop(self.rows_duplicate.get_or_create(&labels));
        drop(self.rows_rejected.get_or_create(&labels));
        drop(self.rows_dropped.get_or_create(&labels));
        drop(self.batch_write_seconds.get_or_create(&labels));
        drop(self.sink_retries.get_or_create(&labels));
        for kind in ["transient", "permanent"] {
            drop(self.sink_errors.get_or_create(&SinkErrorLabels {
                sink: name.to_owned(),
                kind,
            }));
        }
        self.sink_up.get_or_create(&labels).set(1);
    }

    /// One report accepted (answered 204, or queued by the importer) with `rows` stats objects.
    pub fn count_accepted(&self, rows: usize, protocol: Protocol) {
        let labels = ProtocolLabels {
            protocol: protocol.as_str(),
        };
        self.reports_received.get_or_create(&labels).inc();
        self.stats_objects_received
            .get_or_create(&labels)
            .inc_by(rows as u64);
    }

    /// One webhook of a type Kohaku does not store. True the first time its label is used, so
    /// that the caller logs each type once, not once per request.
    pub fn count_ignored(&self, kind: &str) -> bool {
        let (label, first) = capped_label(&self.ignored_types, kind);
        self.reports_ignored
            .get_or_create(&TypeLabels { r#type: label })
            .inc();
        first
    }

    /// `count` stats objects of `rtc_type` not stored because they did not change.
    pub fn count_unchanged(&self, rtc_type: &str, count: u64) {
        let (label, _) = capped_label(&self.unchanged_types, rtc_type);
        self.objects_unchanged
            .get_or_create(&TypeLabels { r#type: label })
            .inc_by(count);
    }

    pub fn sink(name: &str) -> SinkLabels {
        SinkLabels {
            sink: name.to_owned(),
        }
    }

    /// Exports each sink's own counters ([`StatsSink::counters`]) as `kohaku_sink_<name>_total`.
    pub fn register_sink_counters(&mut self, sinks: &[Arc<dyn StatsSink>]) {
        self.registry.register_collector(Box::new(SinkCounters {
            sinks: sinks.to_vec(),
        }));
    }

    /// Exports the spool's size and each sink's oldest unsent report, read at each scrape.
    pub fn register_memory(&mut self, budget: crate::budget::MemoryBudget) {
        self.registry
            .register_collector(Box::new(MemoryGauges { budget }));
    }

    pub fn register_spool(&mut self, monitor: crate::spool::SpoolMonitor) {
        self.registry
            .register_collector(Box::new(SpoolGauges { monitor }));
    }

    /// The OpenMetrics text exposition, which Prometheus scrapes natively.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads the sinks' own counters at scrape time.
struct SinkCounters {
    sinks: Vec<Arc<dyn StatsSink>>,
}

impl std::fmt::Debug for SinkCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.sinks.iter().map(|sink| sink.name()))
            .finish()
    }
}

impl Collector for SinkCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Series = (&'static str, Vec<(String, u64)>);
        let mut by_name: BTreeMap<&'static str, Series> = BTreeMap::new();
        for sink in &self.sinks {
            for counter in sink.counters() {
                by_name
                    .entry(counter.name)
                    .or_insert_with(|| (counter.help, Vec::new()))
                    .1
                    .push((sink.name().to_owned(), counter.value));
            }
        }
        for (name, (help, values)) in by_name {
            let name = format!("sink_{name}");
            let mut family = encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
            for (sink, value) in values {
                let labels = SinkLabels { sink };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Reads the spool's state at scrape time, so ages are current rather than last-set.
struct MemoryGauges {
    budget: crate::budget::MemoryBudget,
}

impl std::fmt::Debug for MemoryGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryGauges")
    }
}

impl Collector for MemoryGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::gauge::ConstGauge;
        for (name, help, value) in [
            (
                "memory_used_bytes",
                "Bytes of report data held in memory for requests and the queue (pipeline.memory_max_bytes)",
                self.budget.used(),
            ),
            (
                "memory_max_bytes",
                "What requests and the queue may hold; beyond it requests get 503 (with [spool]: half of pipeline.memory_max_bytes)",
                self.budget.capacity(),
            ),
        ] {
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(
                encoder.encode_descriptor(name, help, None, MetricType::Gauge)?,
            )?;
        }
        Ok(())
    }
}

struct SpoolGauges {
    monitor: crate::spool::SpoolMonitor,
}

impl std::fmt::Debug for SpoolGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpoolGauges")
    }
}

impl Collector for SpoolGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::gauge::ConstGauge;
        let status = self.monitor.status();
        let gauges: [(&str, &str, i64); 3] = [
            (
                "spool_bytes",
                "Bytes of reports in the spool: accepted and not yet stored by every sink",
                i64::try_from(status.bytes).unwrap_or(i64::MAX),
            ),
            (
                "spool_max_bytes",
                "spool.max_bytes: beyond it requests get 503",
                i64::try_from(status.max_bytes).unwrap_or(i64::MAX),
            ),
            (
                "spool_segments",
                "Segment files in the spool",
                i64::try_from(status.segments).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        let mut family = encoder.encode_descriptor(
            "spool_oldest_unsent_seconds",
            "Per sink: age of the oldest accepted report it has not stored yet (0 when caught up)",
            None,
            MetricType::Gauge,
        )?;
        for (sink, age) in status.oldest_unsent_seconds {
            ConstGauge::new(age).encode(family.encode_family(&SinkLabels { sink })?)?;
        }
        Ok(())
    }
}
