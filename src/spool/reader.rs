//! One sink's view of the spool: batches of reports from its cursor on, and the cursor file that
//! records how far the sink has stored.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use kohaku_sink::StatsBatch;
use tokio::sync::watch;

use super::record::{self, DecodeError, Format, HEADER_LEN, SEGMENT_MAGIC};
use super::{Position, Shared, SinkProgress};
use crate::budget::report_bytes;
use crate::sync::{lock, sleep_until_some};

/// Bytes read from a segment at once; a larger record is read whole.
const READ_CHUNK: usize = 1 << 20;
const CURSOR_MAGIC: &str = "kohaku-spool-cursor-v1";

/// How much one batch read from the spool may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimit {
    /// Stats objects (`pipeline.batch_max_rows`).
    pub rows: usize,
    /// Bytes of parsed reports ([`crate::budget::report_bytes`]): a backlog of large reports is
    /// replayed in batches that fit the memory budget, not in `rows` of them at once.
    pub bytes: usize,
}

impl BatchLimit {
    fn is_full(&self, rows: usize, bytes: usize) -> bool {
        rows >= self.rows || bytes >= self.bytes
    }

    /// What is left of the limit after `rows` and `bytes`; at least one report's worth.
    fn room(&self, rows: usize, bytes: usize) -> Self {
        Self {
            rows: self.rows.saturating_sub(rows).max(1),
            bytes: self.bytes.saturating_sub(bytes).max(1),
        }
    }
}

/// Reports read from the spool for one sink, and where the sink's cursor moves once it has stored
/// them.
pub struct SpoolBatch {
    pub batch: StatsBatch,
    pub end: Position,
}

/// The blocking half, moved to a blocking thread for each read.
struct Cursor {
    shared: Arc<Shared>,
    sink: String,
    /// The next record to read.
    position: Position,
    /// The open segment: its id, its file and how its records are laid out.
    file: Option<(u64, File, Format)>,
    buffer: Vec<u8>,
}

pub struct SpoolReader {
    cursor: Option<Cursor>,
    committed: watch::Receiver<Position>,
}

impl SpoolReader {
    pub(super) fn new(shared: Arc<Shared>, sink: &str) -> Self {
        let start = load_cursor(&shared, sink);
        lock(&shared.sinks).insert(
            sink.to_owned(),
            SinkProgress {
                acked: start,
                oldest_unsent: None,
            },
        );
        let committed = shared.committed.subscribe();
        Self {
            cursor: Some(Cursor {
                shared,
                sink: sink.to_owned(),
                position: start,
                file: None,
                buffer: Vec::new(),
            }),
            committed,
        }
    }

    /// The next batch: up to `limit` (the first report always fits), returned once full, once the
    /// first report read has waited `max_wait` for company, or at once when replaying a backlog.
    /// `None` once `closing` is set and everything written has been read.
    pub async fn next_batch(
        &mut self,
        limit: BatchLimit,
        max_wait: Duration,
        closing: &mut watch::Receiver<bool>,
    ) -> Option<SpoolBatch> {
        let mut batch = StatsBatch::default();
        let mut bytes = 0;
        let mut flush_at: Option<tokio::time::Instant> = None;
        loop {
            let committed = *self.committed.borrow_and_update();
            let room = limit.room(batch.row_count(), bytes);
            let (caught_up, read) = self.read(committed, room).await;
            if !read.is_empty() {
                for report in read.reports() {
                    bytes += report_bytes(report);
                    batch.push(Arc::clone(report));
                }
                if flush_at.is_none() {
                    flush_at = Some(tokio::time::Instant::now() + max_wait);
                    self.note_oldest(&batch);
                }
            }
            let end = self.position();
            let moved = end != self.acked();
            if !caught_up || limit.is_full(batch.row_count(), bytes) {
                // The batch is full: a backlog is written without waiting.
                return Some(SpoolBatch { batch, end });
            }
            if *closing.borrow() {
                // The writer closes before readers are told, so `committed` is final by now.
                if *self.committed.borrow() != committed {
                    continue;
                }
                return (!batch.is_empty() || moved).then_some(SpoolBatch { batch, end });
            }
            if batch.is_empty() && moved {
                // Passed segment ends or unreadable records only: recording it frees segments.
                return Some(SpoolBatch { batch, end });
            }
            tokio::select! {
                _ = self.committed.changed() => {}
                () = sleep_until_some(flush_at) => return Some(SpoolBatch { batch, end }),
                _ = closing.wait_for(|closing| *closing) => {}
            }
        }
    }

    fn note_oldest(&self, batch: &StatsBatch) {
        let Some(cursor) = &self.cursor else { return };
        let oldest = batch.reports().first().map(|report| report.received_at);
        if let Some(progress) = lock(&cursor.shared.sinks).get_mut(&cursor.sink) {
            progress.oldest_unsent = oldest;
        }
    }

    fn position(&self) -> Position {
        self.cursor.as_ref().map_or(
            Position {
                segment: 0,
                offset: 0,
            },
            |cursor| cursor.position,
        )
    }

    fn acked(&self) -> Position {
        let Some(cursor) = &self.cursor else {
            return self.position();
        };
        lock(&cursor.shared.sinks)
            .get(&cursor.sink)
            .map_or(cursor.position, |progress| progress.acked)
    }

    /// Reads on a blocking thread. Returns whether everything committed has been read.
    async fn read(&mut self, committed: Position, limit: BatchLimit) -> (bool, StatsBatch) {
        let Some(mut cursor) = self.cursor.take() else {
            return (true, StatsBatch::default());
        };
        let joined = tokio::task::spawn_blocking(move || {
            let result = cursor.read(committed, limit);
            (cursor, result)
        })
        .await;
        match joined {
            Ok((cursor, result)) => {
                self.cursor = Some(cursor);
                result
            }
            Err(err) => {
                tracing::error!(error = %err, "spool reader failed");
                (true, StatsBatch::default())
            }
        }
    }

    /// Records that the sink has stored everything before `end`: the cursor file is replaced
    /// (atomically, by rename) and segments every sink has passed are deleted.
    pub async fn ack(&mut self, end: Position) {
        let Some(cursor) = &self.cursor else { return };
        let shared = Arc::clone(&cursor.shared);
        let sink = cursor.sink.clone();
        let caught_up = end >= *self.committed.borrow();
        {
            let mut sinks = lock(&shared.sinks);
            if let Some(progress) = sinks.get_mut(&sink) {
                progress.acked = end;
                if caught_up {
                    progress.oldest_unsent = None;
                }
            }
        }
        let stored = tokio::task::spawn_blocking(move || {
            if let Err(err) = store_cursor(&shared, &sink, end) {
                // Only costs a replay (harmless duplicates) after a crash.
                tracing::warn!(sink, error = %err, "cannot save the spool cursor");
            }
            shared.collect_garbage();
        })
        .await;
        if let Err(err) = stored {
            tracing::error!(error = %err, "spool cursor task failed");
        }
    }
}

impl Cursor {
    fn read(&mut self, committed: Position, limit: BatchLimit) -> (bool, StatsBatch) {
        let mut batch = StatsBatch::default();
        let mut bytes = 0;
        loop {
            if self.position >= committed {
                return (true, batch);
            }
            if limit.is_full(batch.row_count(), bytes) {
                return (false, batch);
            }
            let sealed = self.position.segment < committed.segment;
            let Some(file) = self.open() else {
                if !self.next_segment(committed) {
                    return (true, batch);
                }
                continue;
            };
            let segment_end = if sealed {
                match file.metadata() {
                    Ok(meta) => meta.len(),
                    Err(err) => {
                        self.skip_segment(&format!("cannot read its size: {err}"));
                        continue;
                    }
                }
            } else {
                committed.offset
            };
            if self.position.offset >= segment_end {
                if !self.next_segment(committed) {
                    return (true, batch);
                }
                continue;
            }
            let mut wanted = (segment_end - self.position.offset).min(READ_CHUNK as u64) as usize;
            loop {
                self.buffer.resize(wanted, 0);
                let Some((_, file, _)) = &self.file else {
                    break;
                };
                if let Err(err) = file.read_exact_at(&mut self.buffer, self.position.offset) {
                    self.skip_segment(&format!("cannot read: {err}"));
                    break;
                }
                match self.decode_buffer(&mut batch, &mut bytes, limit) {
                    Ok(()) => break,
                    Err(DecodeError::Torn { needed, .. })
                        if needed > wanted
                            && self.position.offset + needed as u64 <= segment_end =>
                    {
                        wanted = needed;
                    }
                    Err(err) => {
                        self.skip_segment(&err.to_string());
                        break;
                    }
                }
            }
        }
    }

    /// Takes the buffer's whole records into the batch; the cursor moves past each.
    fn decode_buffer(
        &mut self,
        batch: &mut StatsBatch,
        bytes: &mut usize,
        limit: BatchLimit,
    ) -> Result<(), DecodeError> {
        let format = self
            .file
            .as_ref()
            .map_or(Format::V2, |(_, _, format)| *format);
        let mut at = 0;
        while !limit.is_full(batch.row_count(), *bytes) {
            let decoded = record::decode(&self.buffer[at..], format);
            let (record, len) = match decoded {
                Ok(None) => return Ok(()),
                Ok(Some(found)) => found,
                // A record cut by the chunk boundary: the next read starts from it.
                Err(DecodeError::Torn { .. }) if at > 0 => return Ok(()),
                Err(err) => return Err(err),
            };
            let parsed = match self.shared.parsed_at(self.position) {
                Some(report) => Ok(report),
                None => {
                    crate::sora::parse_spooled(record.protocol, record.body, record.received_at)
                        .map(Arc::new)
                }
            };
            match parsed {
                Ok(report) => {
                    *bytes += report_bytes(&report);
                    batch.push(report);
                }
                Err(invalid) => tracing::error!(
                    sink = self.sink,
                    segment = self.position.segment,
                    offset = self.position.offset,
                    error = %invalid,
                    "a spooled report no longer parses; skipped"
                ),
            }
            at += len;
            self.position.offset += len as u64;
        }
        Ok(())
    }

    fn open(&mut self) -> Option<&File> {
        let segment = self.position.segment;
        if self.file.as_ref().is_some_and(|(id, _, _)| *id == segment) {
            return self.file.as_ref().map(|(_, file, _)| file);
        }
        self.file = None;
        let path = self.shared.segment_path(segment);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
            Err(err) => {
                tracing::error!(sink = self.sink, segment = %path.display(), error = %err, "cannot open a spool segment; skipping it");
                return None;
            }
        };
        let mut magic = [0u8; SEGMENT_MAGIC.len()];
        let format = file
            .read_exact_at(&mut magic, 0)
            .ok()
            .and_then(|()| Format::of_header(&magic));
        let Some(format) = format else {
            tracing::error!(sink = self.sink, segment = %path.display(), "spool segment has no valid header; skipping it");
            return None;
        };
        if self.position.offset < HEADER_LEN {
            self.position.offset = HEADER_LEN;
        }
        self.file = Some((segment, file, format));
        self.file.as_ref().map(|(_, file, _)| file)
    }

    /// Moves to the next segment that exists; false when there is none yet.
    fn next_segment(&mut self, committed: Position) -> bool {
        let next = self
            .shared
            .next_segment_after(self.position.segment)
            .filter(|next| *next <= committed.segment);
        match next {
            Some(next) => {
                self.position = Position {
                    segment: next,
                    offset: HEADER_LEN,
                };
                self.file = None;
                true
            }
            None => false,
        }
    }

    fn skip_segment(&mut self, reason: &str) {
        let end = self
            .file
            .as_ref()
            .and_then(|(_, file, _)| file.metadata().ok())
            .map_or(0, |meta| meta.len());
        tracing::warn!(
            sink = self.sink,
            segment = self.position.segment,
            offset = self.position.offset,
            skipped_bytes = end.saturating_sub(self.position.offset),
            reason,
            "unreadable spool record; skipping the rest of the segment"
        );
        // Past the end: the next read moves on to the following segment.
        self.position.offset = end.max(self.position.offset + 1);
    }
}

fn load_cursor(shared: &Shared, sink: &str) -> Position {
    let oldest = Position {
        segment: shared.first_segment().unwrap_or(1),
        offset: HEADER_LEN,
    };
    let path = shared.cursor_path(sink);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(
                sink,
                "no spool cursor for this sink; it reads the spool from its oldest segment"
            );
            return oldest;
        }
        Err(err) => {
            tracing::warn!(sink, error = %err, "cannot read the spool cursor; replaying the spool from its oldest segment");
            return oldest;
        }
    };
    let mut words = text.split_whitespace();
    let parsed = match (words.next(), words.next(), words.next(), words.next()) {
        (Some(CURSOR_MAGIC), Some(segment), Some(offset), None) => segment
            .parse()
            .ok()
            .zip(offset.parse().ok())
            .map(|(segment, offset)| Position { segment, offset }),
        _ => None,
    };
    match parsed {
        // A cursor into a deleted segment: everything before the oldest remaining one was stored.
        Some(position) if position < oldest => oldest,
        Some(position) => position,
        None => {
            tracing::warn!(sink, cursor = %path.display(), "unreadable spool cursor; replaying the spool from its oldest segment");
            oldest
        }
    }
}

fn store_cursor(shared: &Shared, sink: &str, position: Position) -> std::io::Result<()> {
    let path = shared.cursor_path(sink);
    let temporary = path.with_extension("tmp");
    std::fs::write(
        &temporary,
        format!("{CURSOR_MAGIC} {} {}\n", position.segment, position.offset),
    )?;
    std::fs::rename(&temporary, &path)
}
