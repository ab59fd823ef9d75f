//! Log lines back into reports: consecutive lines of one connection with the same report
//! `timestamp` are one report, handed to the pipeline's queue as it has room.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kohaku_sink::{OffsetDateTime, Report};

use crate::pipeline::{Queue, SubmitError};
use crate::sora::{self, LogLine, LogStats};

use super::input::{
    read_line, trim_line_end, CountingReader, Input, Opened, ReadLine, GZIP_MAGIC, MAX_LINE_BYTES,
};
use super::progress::{Console, Progress};

#[derive(Default)]
pub(super) struct Tally {
    pub(super) reports: u64,
    pub(super) skipped: BTreeMap<String, u64>,
    pub(super) errors: u64,
    pub(super) stopped: Option<String>,
}

pub(super) struct Reader {
    pub(super) queue: Queue,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) console: Console,
    pub(super) progress: Arc<Progress>,
    pub(super) strict: bool,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) max_report_objects: usize,
    pub(super) tally: Tally,
}

pub(super) enum Flow {
    Continue,
    Stop,
}

impl Reader {
    pub(super) fn read_all(mut self, inputs: Vec<Opened>) -> Tally {
        for opened in inputs {
            if let Flow::Stop = self.read_input(opened) {
                break;
            }
        }
        self.tally
    }

    pub(super) fn read_input(&mut self, opened: Opened) -> Flow {
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

    pub(super) fn read_error(&mut self, input: &Input, after_line: u64, err: &io::Error) -> Flow {
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
    pub(super) fn add(&mut self, pending: &mut Option<Report>, stats: LogStats) -> Flow {
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
        let next = Report::new(
            stats.connection,
            stats.sora_timestamp,
            OffsetDateTime::now_utc(),
            vec![stats.object],
        );
        match pending.replace(next) {
            Some(done) => self.submit(done),
            None => Flow::Continue,
        }
    }

    pub(super) fn submit(&mut self, report: Report) -> Flow {
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
