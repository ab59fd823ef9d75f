//! `kohaku import`: Sora's `rtc_stats.jsonl` log files (docs/protocol.md §3) through the same pipeline
//! and sinks as the HTTP ingest.
//!
//! Files are read line by line on a blocking thread; consecutive lines of one connection with the
//! same report `timestamp` are put back together into the report they came from, and each report
//! waits for room in the pipeline's queue, so memory is bounded by `pipeline.queue_max_rows`
//! whatever the size of the input. Writes are idempotent, so importing a file twice stores it once.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal as _, Read, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kohaku_sink::{OffsetDateTime, Report, StatsSink};

use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineOptions, Queue, SubmitError};
use crate::sora::{self, LogLine, LogStats};

/// Longer lines are reported and skipped without being held in memory. One stats object per line
/// makes even this generous.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
/// Lines regrouped into one report at most; bigger groups are split (each object is stored alike).
const MAX_REPORT_OBJECTS: usize = 1000;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const BAR_REFRESH: Duration = Duration::from_millis(200);
const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// One thing to read: a file, or standard input (`-` on the command line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin,
    File(PathBuf),
}

impl Input {
    pub fn from_arg(arg: PathBuf) -> Self {
        if arg.as_os_str() == "-" {
            Self::Stdin
        } else {
            Self::File(arg)
        }
    }
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdin => f.write_str("stdin"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{input}: cannot open")]
    Open { input: Input, source: io::Error },
    #[error("`-` (standard input) can be given only once")]
    StdinTwice,
    #[error("the import reader failed: {0}")]
    Reader(String),
}

/// Where progress, bad lines and log records go: stderr, drawn around a progress bar on a
/// terminal, plain lines otherwise.
#[derive(Clone)]
pub struct Console {
    bar: Option<ProgressBar>,
}

impl Console {
    /// A progress bar when stderr is a terminal.
    pub fn detect() -> Self {
        Self::new(io::stderr().is_terminal())
    }

    pub fn new(interactive: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar }
    }

    pub fn is_interactive(&self) -> bool {
        self.bar.is_some()
    }

    /// Writes one line to stderr without tearing the progress bar.
    pub fn println(&self, line: &str) {
        self.write(format!("{line}\n").as_bytes());
    }

    fn write(&self, bytes: &[u8]) {
        let write = || {
            let mut stderr = io::stderr().lock();
            let _ = stderr.write_all(bytes);
            let _ = stderr.flush();
        };
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A log writer for `tracing_subscriber` that goes through the console.
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Console {
    type Writer = ConsoleRecord;

    fn make_writer(&'a self) -> Self::Writer {
        ConsoleRecord {
            console: self.clone(),
            buffer: Vec::new(),
        }
    }
}

/// One log record, written in one piece when dropped.
pub struct ConsoleRecord {
    console: Console,
    buffer: Vec<u8>,
}

impl io::Write for ConsoleRecord {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleRecord {
    fn drop(&mut self) {
        if !self.buffer.is_empty() {
            self.console.write(&self.buffer);
        }
    }
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

/// Counters the reader updates and the progress display reads.
#[derive(Default)]
struct Progress {
    bytes: AtomicU64,
    lines: AtomicU64,
    objects: AtomicU64,
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

struct Opened {
    input: Input,
    source: Box<dyn Read + Send>,
    /// Known for files, used for the progress bar.
    size: Option<u64>,
}

/// Every input, open. Opened before any sink is touched, so a mistyped path fails the whole
/// command instead of leaving a partial import (or a stray database file) behind.
pub struct Inputs(Vec<Opened>);

impl Inputs {
    pub fn open(inputs: &[Input]) -> Result<Self, ImportError> {
        if inputs.iter().filter(|i| **i == Input::Stdin).count() > 1 {
            return Err(ImportError::StdinTwice);
        }
        inputs
            .iter()
            .map(|input| {
                let (source, size): (Box<dyn Read + Send>, _) = match input {
                    Input::Stdin => (Box::new(io::stdin()), None),
                    Input::File(path) => {
                        let open_error = |source| ImportError::Open {
                            input: input.clone(),
                            source,
                        };
                        let file = File::open(path).map_err(open_error)?;
                        let metadata = file.metadata().map_err(open_error)?;
                        if metadata.is_dir() {
                            return Err(open_error(io::Error::other("is a directory")));
                        }
                        (Box::new(file), Some(metadata.len()))
                    }
                };
                Ok(Opened {
                    input: input.clone(),
                    source,
                    size,
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

fn spawn_progress_display(
    console: Console,
    progress: Arc<Progress>,
    total_bytes: Option<u64>,
) -> tokio::task::JoinHandle<()> {
    if let (Some(bar), Some(total)) = (&console.bar, total_bytes) {
        bar.set_length(total);
    }
    let started = Instant::now();
    tokio::spawn(async move {
        let every = if console.is_interactive() {
            BAR_REFRESH
        } else {
            PLAIN_PROGRESS_INTERVAL
        };
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            ticks.tick().await;
            let bytes = progress.bytes.load(Ordering::Relaxed);
            let lines = progress.lines.load(Ordering::Relaxed);
            let objects = progress.objects.load(Ordering::Relaxed);
            let rate = objects as f64 / started.elapsed().as_secs_f64().max(0.001);
            match &console.bar {
                Some(bar) => {
                    bar.set_position(bytes);
                    bar.set_message(format!("{lines} lines, {objects} objects, {rate:.0}/s"));
                    bar.tick();
                }
                None => {
                    let of_total = total_bytes
                        .filter(|total| *total > 0)
                        .map(|total| {
                            format!(
                                " of {} ({:.0}%)",
                                indicatif::BinaryBytes(total),
                                bytes as f64 * 100.0 / total as f64
                            )
                        })
                        .unwrap_or_default();
                    console.println(&format!(
                        "kohaku import: {}{of_total} read, {lines} lines, {objects} stats objects, {rate:.0} objects/s",
                        indicatif::BinaryBytes(bytes)
                    ));
                }
            }
        }
    })
}

#[derive(Default)]
struct Tally {
    reports: u64,
    skipped: BTreeMap<String, u64>,
    errors: u64,
    stopped: Option<String>,
}

struct Reader {
    queue: Queue,
    runtime: tokio::runtime::Handle,
    console: Console,
    progress: Arc<Progress>,
    strict: bool,
    cancel: Arc<AtomicBool>,
    max_report_objects: usize,
    tally: Tally,
}

enum Flow {
    Continue,
    Stop,
}

impl Reader {
    fn read_all(mut self, inputs: Vec<Opened>) -> Tally {
        for opened in inputs {
            if let Flow::Stop = self.read_input(opened) {
                break;
            }
        }
        self.tally
    }

    fn read_input(&mut self, opened: Opened) -> Flow {
        let input = opened.input;
        let counted = CountingReader {
            inner: opened.source,
            progress: Arc::clone(&self.progress),
        };
        let mut raw = BufReader::with_capacity(256 * 1024, counted);
        let gzipped = match raw.fill_buf() {
            Ok(head) => head.starts_with(&GZIP_MAGIC),
            Err(err) => return self.read_error(&input, 0, &err),
        };
        let mut lines: Box<dyn BufRead> = if gzipped {
            // Multi-member, as `cat a.gz b.gz` and some rotators produce.
            Box::new(BufReader::with_capacity(
                256 * 1024,
                flate2::bufread::MultiGzDecoder::new(raw),
            ))
        } else {
            Box::new(raw)
        };

        // The report being put back together from consecutive lines.
        let mut pending: Option<Report> = None;
        let mut buffer = Vec::new();
        let mut number: u64 = 0;
        let flow = loop {
            if self.cancel.load(Ordering::Relaxed) {
                self.tally.stopped = Some("interrupted".to_owned());
                break Flow::Stop;
            }
            let line = match read_line(&mut *lines, &mut buffer, MAX_LINE_BYTES) {
                Ok(ReadLine::Eof) => break Flow::Continue,
                Ok(ReadLine::TooLong) => Err(format!(
                    "line longer than {} MiB; skipped",
                    MAX_LINE_BYTES / (1024 * 1024)
                )),
                Ok(ReadLine::Line { terminated }) => Ok(terminated),
                Err(err) => break self.read_error(&input, number, &err),
            };
            number += 1;
            self.progress.lines.fetch_add(1, Ordering::Relaxed);
            let problem = match line {
                Err(problem) => Some(problem),
                Ok(terminated) => {
                    let text = trim_line_end(&buffer);
                    if text.iter().all(u8::is_ascii_whitespace) {
                        None
                    } else {
                        match sora::parse_log_line(text) {
                            Ok(LogLine::Stats(stats)) => {
                                if let Flow::Stop = self.add(&mut pending, stats) {
                                    break Flow::Stop;
                                }
                                None
                            }
                            Ok(LogLine::Other { kind }) => {
                                *self.tally.skipped.entry(kind).or_default() += 1;
                                None
                            }
                            Err(invalid) if !terminated => Some(format!(
                                "truncated last line (no newline at the end): {invalid}"
                            )),
                            Err(invalid) => Some(invalid.to_string()),
                        }
                    }
                }
            };
            if let Some(problem) = problem {
                self.tally.errors += 1;
                self.console
                    .println(&format!("kohaku import: {input}:{number}: {problem}"));
                if self.strict {
                    self.tally.stopped = Some(format!("--strict: bad line {input}:{number}"));
                    break Flow::Stop;
                }
            }
        };
        if let Some(pending) = pending {
            if let Flow::Stop = self.submit(pending) {
                return Flow::Stop;
            }
        }
        flow
    }

    fn read_error(&mut self, input: &Input, after_line: u64, err: &io::Error) -> Flow {
        self.tally.errors += 1;
        self.console.println(&format!(
            "kohaku import: {input}: read error after line {after_line}: {err}"
        ));
        if self.strict {
            self.tally.stopped = Some(format!("--strict: cannot read {input}"));
            Flow::Stop
        } else {
            Flow::Continue
        }
    }

    /// Adds the object to the report being rebuilt, submitting that report first when the line
    /// starts another one.
    fn add(&mut self, pending: &mut Option<Report>, stats: LogStats) -> Flow {
        self.progress.objects.fetch_add(1, Ordering::Relaxed);
        if let Some(current) = pending {
            let same_report = current.connection.connection_id == stats.connection.connection_id
                && current.sora_timestamp == stats.sora_timestamp
                && current.stats.len() < self.max_report_objects;
            if same_report {
                current.stats.push(stats.object);
                return Flow::Continue;
            }
        }
        let next = Report {
            connection: stats.connection,
            sora_timestamp: stats.sora_timestamp,
            received_at: OffsetDateTime::now_utc(),
            stats: vec![stats.object],
        };
        match pending.replace(next) {
            Some(done) => self.submit(done),
            None => Flow::Continue,
        }
    }

    fn submit(&mut self, report: Report) -> Flow {
        match self.runtime.block_on(self.queue.submit_waiting(report)) {
            Ok(()) => {
                self.tally.reports += 1;
                Flow::Continue
            }
            Err(SubmitError::Closed) => {
                self.tally.stopped = Some("the pipeline closed".to_owned());
                Flow::Stop
            }
            // Reports are capped below the queue's capacity, so this cannot happen; if it did,
            // say so rather than lose the rows silently.
            Err(err @ (SubmitError::TooLarge { .. } | SubmitError::QueueFull)) => {
                self.tally.errors += 1;
                self.console
                    .println(&format!("kohaku import: report not queued: {err}"));
                Flow::Continue
            }
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[derive(Debug, PartialEq, Eq)]
enum ReadLine {
    /// A line is in the buffer, without its `\n`; `terminated` is false for a last line that had
    /// none (often a file cut off mid-write).
    Line {
        terminated: bool,
    },
    /// The line exceeded the limit; it was consumed and discarded.
    TooLong,
    Eof,
}

/// `BufRead::read_until` that never buffers more than `max` bytes of one line.
fn read_line(reader: &mut dyn BufRead, buffer: &mut Vec<u8>, max: usize) -> io::Result<ReadLine> {
    buffer.clear();
    let mut too_long = false;
    let mut consumed_any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if available.is_empty() {
            return Ok(match (consumed_any, too_long) {
                (false, _) => ReadLine::Eof,
                (true, true) => ReadLine::TooLong,
                (true, false) => ReadLine::Line { terminated: false },
            });
        }
        consumed_any = true;
        let (chunk, newline) = match available.iter().position(|b| *b == b'\n') {
            Some(at) => (&available[..at], true),
            None => (available, false),
        };
        if !too_long {
            if buffer.len() + chunk.len() > max {
                too_long = true;
                buffer.clear();
            } else {
                buffer.extend_from_slice(chunk);
            }
        }
        let used = chunk.len() + usize::from(newline);
        reader.consume(used);
        if newline {
            return Ok(if too_long {
                ReadLine::TooLong
            } else {
                ReadLine::Line { terminated: true }
            });
        }
    }
}

/// Counts the bytes read from an input (compressed bytes for `.gz`), for the progress display.
struct CountingReader {
    inner: Box<dyn Read + Send>,
    progress: Arc<Progress>,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.progress
            .bytes
            .fetch_add(read as u64, Ordering::Relaxed);
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Result<Vec<u8>, ReadLine>> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut buffer = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line(&mut reader, &mut buffer, max).unwrap() {
                ReadLine::Eof => return out,
                ReadLine::Line { terminated: true } => out.push(Ok(buffer.clone())),
                other => out.push(Err(other)),
            }
        }
    }

    #[test]
    fn reads_lines_across_buffer_boundaries() {
        assert_eq!(
            lines(b"first line\n\nsecond\n", 100),
            [
                Ok(b"first line".to_vec()),
                Ok(Vec::new()),
                Ok(b"second".to_vec())
            ]
        );
    }

    #[test]
    fn reports_a_last_line_without_newline() {
        assert_eq!(
            lines(b"one\ntwo", 100),
            [
                Ok(b"one".to_vec()),
                Err(ReadLine::Line { terminated: false })
            ]
        );
        assert_eq!(lines(b"", 100), []);
    }

    #[test]
    fn discards_overlong_lines_and_goes_on() {
        assert_eq!(
            lines(b"short\nthis line is too long\nok\nalso far too long", 8),
            [
                Ok(b"short".to_vec()),
                Err(ReadLine::TooLong),
                Ok(b"ok".to_vec()),
                Err(ReadLine::TooLong)
            ]
        );
    }

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
