//! The inputs of an import: files (plain or gzip) and stdin, opened before any sink is touched,
//! and read line by line within a line-length limit.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{ImportError, Progress};

/// Longer lines are reported and skipped without being held in memory. One stats object per line
/// makes even this generous.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;
pub(super) const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
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

pub(super) struct Opened {
    pub(super) input: Input,
    pub(super) source: Box<dyn Read + Send>,
    /// Known for files, used for the progress bar.
    pub(super) size: Option<u64>,
}

/// Every input, open. Opened before any sink is touched, so a mistyped path fails the whole
/// command instead of leaving a partial import (or a stray database file) behind.
pub struct Inputs(pub(super) Vec<Opened>);

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

pub(super) fn trim_line_end(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadLine {
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
pub(super) fn read_line(
    reader: &mut dyn BufRead,
    buffer: &mut Vec<u8>,
    max: usize,
) -> io::Result<ReadLine> {
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
pub(super) struct CountingReader {
    pub(super) inner: Box<dyn Read + Send>,
    pub(super) progress: Arc<Progress>,
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
    use std::io::BufReader;

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
}
