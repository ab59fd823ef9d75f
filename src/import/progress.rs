//! What an import shows while it runs: a progress bar on a terminal, a line every few seconds
//! otherwise, with log lines printed above the bar.

use std::io::{self, IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub(super) const BAR_REFRESH: Duration = Duration::from_millis(200);
pub(super) const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Where progress, bad lines and log records go: stderr, drawn around a progress bar on a
/// terminal, plain lines otherwise.
#[derive(Clone)]
pub struct Console {
    pub(super) bar: Option<ProgressBar>,
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

    pub(super) fn write(&self, bytes: &[u8]) {
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

    pub(super) fn finish(&self) {
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
    pub(super) console: Console,
    pub(super) buffer: Vec<u8>,
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

/// Counters the reader updates and the progress display reads.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) bytes: AtomicU64,
    pub(super) lines: AtomicU64,
    pub(super) objects: AtomicU64,
}

pub(super) fn spawn_progress_display(
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
