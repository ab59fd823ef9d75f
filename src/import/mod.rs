//! `kohaku import`: Sora's `rtc_stats.jsonl` log files (docs/protocol.md §3) through the same pipeline
//! and sinks as the HTTP ingest.
//!
//! Files are read line by line on a blocking thread; consecutive lines of one connection with the
//! same report `timestamp` are put back together into the report they came from, and each report
//! waits for room in the pipeline's queue, so memory is bounded by `pipeline.queue_max_rows`
//! whatever the size of the input. Writes are idempotent, so importing a file twice stores it once.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kohaku_sink::StatsSink;

use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineOptions};

mod input;
mod progress;
mod regroup;

pub use input::{Input, Inputs, MAX_LINE_BYTES};
pub use progress::Console;
use progress::{spawn_progress_display, Progress};
use regroup::{Reader, Tally};

/// Lines regrouped into one report at most; bigger groups are split (each object is stored alike).
const MAX_REPORT_OBJECTS: usize = 1000;
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{input}: cannot open")]
    Open { input: Input, source: io::Error },
    #[error("`-` (standard input) can be given only once")]
    StdinTwice,
    #[error("the import reader failed: {0}")]
    Reader(String),
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Stop at the first bad line or unreadable input.
    pub strict: bool,
}

/// What one sink did with the imported objects.
pub use crate::pipeline::SinkTally;

#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub inputs: usize,
    pub bytes: u64,
    pub lines: u64,
    pub stats_objects: u64,
    pub reports: u64,
    /// Lines of other kinds (webhook events…), by kind.
    pub skipped: BTreeMap<String, u64>,
    /// Bad lines and read errors, each reported on stderr with its input and line number.
    pub errors: u64,
    /// Why reading stopped early (`--strict`, a signal), if it did.
    pub stopped: Option<String>,
    pub sinks: Vec<SinkTally>,
    pub elapsed: Duration,
}

impl ImportSummary {
    /// True when every stats line read was stored (or already present) in every sink and nothing
    /// stopped the import early. Skipped lines of other kinds do not count against it.
    pub fn complete(&self) -> bool {
        self.errors == 0
            && self.stopped.is_none()
            && self.sinks.iter().all(|s| s.rejected == 0 && s.dropped == 0)
    }

    pub fn objects_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.stats_objects as f64 / secs
        } else {
            0.0
        }
    }

    /// The human-readable summary printed at the end of an import.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "kohaku import: {} input{}, {} lines ({}) in {:.2} s",
            self.inputs,
            if self.inputs == 1 { "" } else { "s" },
            self.lines,
            indicatif::BinaryBytes(self.bytes),
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "  stats objects  {} in {} reports ({:.0} objects/s)",
            self.stats_objects,
            self.reports,
            self.objects_per_second()
        );
        let skipped: u64 = self.skipped.values().sum();
        let kinds: Vec<String> = self
            .skipped
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        if kinds.is_empty() {
            let _ = writeln!(out, "  skipped        0");
        } else {
            let _ = writeln!(out, "  skipped        {skipped} ({})", kinds.join(", "));
        }
        let _ = writeln!(out, "  bad lines      {}", self.errors);
        for sink in &self.sinks {
            let _ = writeln!(
                out,
                "  sink {}: written {}, duplicates {}, rejected {}, not stored {}",
                sink.sink, sink.written, sink.duplicates, sink.rejected, sink.dropped
            );
        }
        if let Some(reason) = &self.stopped {
            let _ = writeln!(out, "  stopped early: {reason}");
        }
        out
    }
}

/// Reads every input into `sinks` and flushes. The sinks must be migrated already. `cancel`
/// stops reading at the next line (what was read is still flushed).
pub async fn run(
    inputs: Inputs,
    sinks: Vec<Arc<dyn StatsSink>>,
    pipeline: PipelineOptions,
    options: ImportOptions,
    console: Console,
    cancel: Arc<AtomicBool>,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    let Inputs(opened) = inputs;
    let input_count = opened.len();
    let total_bytes: Option<u64> = opened.iter().map(|o| o.size).sum();

    let max_report_objects = MAX_REPORT_OBJECTS
        .min(pipeline.queue_max_rows as usize)
        .max(1);
    let pipeline = Pipeline::start(sinks, pipeline, Metrics::new(), None);
    let queue = pipeline
        .queue()
        .ok_or_else(|| ImportError::Reader("the pipeline has no queue".to_owned()))?;
    let progress = Arc::new(Progress::default());
    let display = spawn_progress_display(console.clone(), Arc::clone(&progress), total_bytes);

    let reader = Reader {
        queue,
        runtime: tokio::runtime::Handle::current(),
        console: console.clone(),
        progress: Arc::clone(&progress),
        strict: options.strict,
        cancel,
        max_report_objects,
        tally: Tally::default(),
    };
    let read = tokio::task::spawn_blocking(move || reader.read_all(opened)).await;
    // Whatever the reader managed to queue is flushed, even if it failed.
    let delivered = pipeline.shutdown().await;
    display.abort();
    console.finish();
    let tally = read.map_err(|err| ImportError::Reader(err.to_string()))?;
    Ok(ImportSummary {
        inputs: input_count,
        bytes: progress.bytes.load(Ordering::Relaxed),
        lines: progress.lines.load(Ordering::Relaxed),
        stats_objects: progress.objects.load(Ordering::Relaxed),
        reports: tally.reports,
        skipped: tally.skipped,
        errors: tally.errors,
        stopped: tally.stopped,
        sinks: delivered.sinks,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_complete_only_without_losses() {
        let mut summary = ImportSummary {
            inputs: 1,
            bytes: 10,
            lines: 3,
            stats_objects: 2,
            reports: 1,
            skipped: BTreeMap::from([("session.created".to_owned(), 1)]),
            errors: 0,
            stopped: None,
            sinks: vec![SinkTally {
                sink: "sqlite".into(),
                written: 2,
                duplicates: 0,
                rejected: 0,
                dropped: 0,
            }],
            elapsed: Duration::from_secs(1),
        };
        assert!(summary.complete());
        assert!(summary
            .render()
            .contains("skipped        1 (session.created 1)"));
        summary.sinks[0].dropped = 1;
        assert!(!summary.complete());
        summary.sinks[0].dropped = 0;
        summary.errors = 1;
        assert!(!summary.complete());
    }
}
