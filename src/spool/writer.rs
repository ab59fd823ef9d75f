//! The spool's one writer thread: appends grouped into one write (and one sync, per policy),
//! segments started when full, and a failed write cut back so that no partial record stays.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use bytes::Bytes;
use kohaku_sink::{OffsetDateTime, Report};
use tokio::sync::oneshot;

use super::record::{self, HEADER_LEN, SEGMENT_MAGIC};
use super::{io_error, segment_path, AppendError, FsyncPolicy, Position, Shared, SpoolError};
use crate::sora::Protocol;
use crate::sync::lock;

/// Appends written (and synced) together at most; more wait for the next round.
const MAX_GROUP: usize = 4096;

pub(super) enum Message {
    Append {
        received_at: OffsetDateTime,
        protocol: Protocol,
        body: Bytes,
        parsed: Option<Arc<Report>>,
        reserved: u64,
        done: oneshot::Sender<Result<(), AppendError>>,
    },
    Close(oneshot::Sender<()>),
}

pub(super) fn create_segment(dir: &Path, id: u64) -> Result<File, SpoolError> {
    let path = segment_path(dir, id);
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io_error(dir, format!("cannot create {}", path.display())))?;
    if let Err(err) = file
        .write_all(SEGMENT_MAGIC)
        .and_then(|()| file.sync_data())
    {
        // Left behind, a file without its header would block this segment id for good.
        let _ = std::fs::remove_file(&path);
        return Err(io_error(dir, format!("cannot write {}", path.display()))(
            err,
        ));
    }
    // The new name must survive a crash too, or the records in it would be lost with it.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, "cannot sync the directory"))?;
    Ok(file)
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) fsync: FsyncPolicy,
    pub(super) segment_bytes: u64,
    pub(super) file: File,
    /// Where the next record goes, counting records buffered but not yet written.
    pub(super) position: Position,
    /// The end of what was written to the active segment without error: a failed write is cut
    /// back to it, so that no partial record stays behind for readers (or the byte count).
    pub(super) written_end: u64,
    pub(super) unsynced: bool,
    /// A write failed: the next append starts a new segment rather than trusting this one.
    pub(super) broken: bool,
    pub(super) buffer: Vec<u8>,
}

/// An append written but not yet committed: its reservation, its answer, and the report to keep
/// for the readers once it is.
struct Waiting {
    reserved: u64,
    done: oneshot::Sender<Result<(), AppendError>>,
    parsed: Option<(Position, Arc<Report>)>,
}

impl Writer {
    pub(super) fn run(mut self, receiver: std_mpsc::Receiver<Message>) {
        let mut closed: Option<oneshot::Sender<()>> = None;
        let mut last_sync = Instant::now();
        while closed.is_none() {
            let first = match self.fsync {
                FsyncPolicy::Always => receiver.recv().ok(),
                FsyncPolicy::Interval(interval) if self.unsynced => {
                    let wait = interval.saturating_sub(last_sync.elapsed());
                    match receiver.recv_timeout(wait) {
                        Ok(message) => Some(message),
                        Err(std_mpsc::RecvTimeoutError::Timeout) => {
                            self.sync();
                            last_sync = Instant::now();
                            continue;
                        }
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => None,
                    }
                }
                FsyncPolicy::Interval(_) => receiver.recv().ok(),
            };
            let Some(first) = first else { break };
            let mut waiting: Vec<Waiting> = Vec::new();
            let mut message = Some(first);
            while let Some(current) = message.take() {
                match current {
                    Message::Append {
                        received_at,
                        protocol,
                        body,
                        parsed,
                        reserved,
                        done,
                    } => {
                        // A new segment is started only between groups: the records buffered so
                        // far are committed (or refused) first, each request answered for its
                        // own bytes, never for a write that failed with another's.
                        if self.needs_new_segment() && !waiting.is_empty() {
                            self.commit(std::mem::take(&mut waiting), &mut last_sync);
                        }
                        match self.append(received_at, protocol, &body) {
                            Ok(at) => waiting.push(Waiting {
                                reserved,
                                done,
                                parsed: parsed.map(|report| (at, report)),
                            }),
                            Err(err) => {
                                tracing::error!(error = %err, "cannot start a new spool segment; answering 503");
                                self.note_write_error(&err);
                                self.fail(reserved, done, &err);
                            }
                        }
                    }
                    Message::Close(done) => {
                        closed = Some(done);
                        break;
                    }
                }
                if waiting.len() < MAX_GROUP {
                    message = receiver.try_recv().ok();
                }
            }
            if !waiting.is_empty() {
                self.commit(waiting, &mut last_sync);
            }
        }
        self.sync();
        if let Some(done) = closed {
            let _ = done.send(());
        }
    }

    /// Writes the buffered records (and syncs them, per policy), then answers their requests:
    /// `Ok` only when their own bytes are written. On failure the segment is cut back to what was
    /// written before, and the next append starts a new segment.
    fn commit(&mut self, mut waiting: Vec<Waiting>, last_sync: &mut Instant) {
        let result = self.flush().and_then(|()| match self.fsync {
            FsyncPolicy::Always => self.file.sync_data(),
            FsyncPolicy::Interval(interval) => {
                self.unsynced = true;
                if last_sync.elapsed() >= interval {
                    *last_sync = Instant::now();
                    self.sync();
                }
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                self.written_end = self.position.offset;
                {
                    // Before readers learn of the new end, so that they find what they read.
                    let mut parsed = lock(&self.shared.parsed);
                    for waiting in &mut waiting {
                        if let Some((at, report)) = waiting.parsed.take() {
                            parsed.insert(at, report);
                        }
                    }
                }
                self.shared.committed.send_replace(self.position);
                if lock(&self.shared.write_error).take().is_some() {
                    tracing::info!("the spool can be written again");
                }
                for waiting in waiting {
                    let _ = waiting.done.send(Ok(()));
                }
            }
            Err(err) => {
                tracing::error!(
                    error = %err,
                    requests = waiting.len(),
                    "cannot write the spool; answering 503 to the waiting requests"
                );
                self.note_write_error(&err);
                self.discard_unwritten();
                for waiting in waiting {
                    self.fail(waiting.reserved, waiting.done, &err);
                }
            }
        }
    }

    /// After a failed write: the segment is cut back to its last whole record and closed to
    /// appends. What a short write left would otherwise be read as a corrupt record, and counted
    /// nowhere in the spool's size.
    fn discard_unwritten(&mut self) {
        self.buffer.clear();
        self.broken = true;
        if let Err(err) = self.file.set_len(self.written_end) {
            tracing::error!(error = %err, segment = self.position.segment, "cannot cut a failed write off the spool segment; readers will skip its tail");
        }
        self.position.offset = self.written_end;
    }

    fn note_write_error(&self, err: &std::io::Error) {
        *lock(&self.shared.write_error) = Some(err.to_string());
    }

    fn needs_new_segment(&self) -> bool {
        self.broken || self.position.offset >= self.segment_bytes
    }

    fn fail(
        &self,
        reserved: u64,
        done: oneshot::Sender<Result<(), AppendError>>,
        err: &std::io::Error,
    ) {
        self.shared.bytes.fetch_sub(reserved, Ordering::SeqCst);
        let _ = done.send(Err(AppendError::Write(err.to_string())));
    }

    fn sync(&mut self) {
        if let Err(err) = self.file.sync_data() {
            tracing::error!(error = %err, "cannot sync the spool");
        }
        self.unsynced = false;
    }

    /// Buffers one record, first starting a new segment when the current one is full. Returns
    /// where the record starts.
    fn append(
        &mut self,
        received_at: OffsetDateTime,
        protocol: Protocol,
        body: &[u8],
    ) -> std::io::Result<Position> {
        if self.needs_new_segment() {
            self.rotate()?;
        }
        let at = self.position;
        let before = self.buffer.len();
        record::encode(received_at, protocol, body, &mut self.buffer);
        self.position.offset += (self.buffer.len() - before) as u64;
        Ok(at)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.buffer);
        self.buffer.clear();
        result
    }

    /// Starts the next segment. Only called with nothing buffered: the group before was committed.
    fn rotate(&mut self) -> std::io::Result<()> {
        debug_assert!(self.buffer.is_empty());
        // Sealed segments are synced whatever the policy: readers and replay treat them as final.
        // A broken segment was cut back to what was already synced.
        if !self.broken {
            self.file.sync_data()?;
        }
        let next = self.position.segment + 1;
        let file = create_segment(&self.shared.dir, next).map_err(|err| match err {
            SpoolError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })?;
        self.file = file;
        self.broken = false;
        self.position = Position {
            segment: next,
            offset: HEADER_LEN,
        };
        self.written_end = HEADER_LEN;
        self.shared.bytes.fetch_add(HEADER_LEN, Ordering::SeqCst);
        lock(&self.shared.segments).insert(next);
        Ok(())
    }
}
