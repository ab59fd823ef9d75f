//! The durable spool: every accepted report is appended to a segment file (and, with
//! `fsync = "always"`, synced) before Sora gets its 204; each sink reads the spool at its own
//! cursor, so a sink that is down holds back only itself, and whatever a sink had not confirmed
//! when Kohaku stopped or crashed is replayed at the next start.
//!
//! Layout of `spool.dir`: `lock` (held while a Kohaku uses the directory), segment files
//! `<20-digit id>.seg` ([`record`] format), and one `cursor-<sink>` file per sink holding the
//! position up to which that sink has stored everything. A segment is deleted once every sink's
//! cursor has passed it.

mod parsed;
pub mod reader;
pub mod record;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kohaku_sink::{OffsetDateTime, Report};
use tokio::sync::{oneshot, watch};

use crate::sora::Protocol;
use crate::sync::lock;
use parsed::ParsedCache;
pub use reader::{BatchLimit, SpoolBatch, SpoolReader};
use record::{Format, HEADER_LEN, SEGMENT_MAGIC};
use writer::{create_segment, Message, Writer};

const SEGMENT_SUFFIX: &str = ".seg";
const CURSOR_PREFIX: &str = "cursor-";
/// Segments are a fraction of the spool so that space comes back in steps while sinks catch up.
const SEGMENTS_PER_SPOOL: u64 = 16;
const MIN_SEGMENT_BYTES: u64 = 4096;
const MAX_SEGMENT_BYTES: u64 = 128 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Sync before answering: an acknowledged report survives a power loss.
    Always,
    /// Sync at most this often: an acknowledged report survives a Kohaku crash (it is in the
    /// operating system's cache) but not a power loss within the interval.
    Interval(Duration),
}

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub fsync: FsyncPolicy,
}

impl SpoolOptions {
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / SEGMENTS_PER_SPOOL).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
    }
}

/// A place in the spool: the byte offset of a record within a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool.dir {dir}: {action}: {source}")]
    Io {
        dir: PathBuf,
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("spool.dir {0} is in use by another Kohaku process (its `lock` file is locked)")]
    Locked(PathBuf),
    #[error("spool segment {0} was not written by this version of Kohaku (unknown header); move it away to start")]
    Foreign(PathBuf),
}

fn io_error(dir: &Path, action: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let dir = dir.to_path_buf();
    let action = action.into();
    move |source| SpoolError::Io {
        dir,
        action,
        source,
    }
}

/// Why an append was refused. Nothing is written in either case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("the spool is full ({max_bytes} bytes, spool.max_bytes) while a sink catches up")]
    Full { max_bytes: u64 },
    #[error("cannot write the spool: {0}")]
    Write(String),
    #[error("the spool is closed")]
    Closed,
}

/// Per-sink progress, shared by the sink's reader and the metrics and health answers.
#[derive(Debug, Clone, Copy)]
struct SinkProgress {
    acked: Position,
    /// When the oldest report the sink has read but not stored was received.
    oldest_unsent: Option<OffsetDateTime>,
}

struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes on disk in segments, plus appends reserved and not yet written.
    bytes: AtomicU64,
    segments: Mutex<BTreeSet<u64>>,
    /// The end of what is written (and synced, per policy): readers read up to it.
    committed: watch::Sender<Position>,
    sinks: Mutex<BTreeMap<String, SinkProgress>>,
    /// Set by the writer when a write fails, cleared when one succeeds.
    write_error: Mutex<Option<String>>,
    parsed: Mutex<ParsedCache>,
}

impl Shared {
    fn segment_path(&self, id: u64) -> PathBuf {
        segment_path(&self.dir, id)
    }

    fn cursor_path(&self, sink: &str) -> PathBuf {
        self.dir.join(format!("{CURSOR_PREFIX}{sink}"))
    }

    /// The report the handler parsed from the record at `at`, while the spool still keeps it.
    fn parsed_at(&self, at: Position) -> Option<Arc<Report>> {
        lock(&self.parsed).get(at)
    }

    /// Deletes every segment all sinks have passed (and forgets their parsed reports). The active
    /// segment is never below a cursor.
    fn collect_garbage(&self) {
        let oldest_needed = lock(&self.sinks)
            .values()
            .map(|progress| progress.acked)
            .min();
        let Some(oldest_needed) = oldest_needed else {
            return;
        };
        lock(&self.parsed).forget_before(oldest_needed);
        let oldest_needed = oldest_needed.segment;
        // Held throughout, so that two sinks acknowledging at once do not delete the same file.
        let mut segments = lock(&self.segments);
        let done: Vec<u64> = segments.range(..oldest_needed).copied().collect();
        for id in done {
            let path = self.segment_path(id);
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    segments.remove(&id);
                    // Saturating: a miscount must show as a too-small spool, never wrap into a
                    // "full" one that refuses everything.
                    let _ = self
                        .bytes
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |bytes| {
                            Some(bytes.saturating_sub(size))
                        });
                    tracing::debug!(
                        segment = id,
                        bytes = size,
                        "spool segment delivered to every sink; deleted"
                    );
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    segments.remove(&id);
                }
                Err(err) => {
                    tracing::warn!(segment = %path.display(), error = %err, "cannot delete a delivered spool segment; will retry");
                }
            }
        }
    }

    fn next_segment_after(&self, id: u64) -> Option<u64> {
        lock(&self.segments)
            .range(id.saturating_add(1)..)
            .next()
            .copied()
    }

    fn first_segment(&self) -> Option<u64> {
        lock(&self.segments).iter().next().copied()
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SEGMENT_SUFFIX}"))
}

/// What the spool holds right now, for `/health` and `/metrics`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpoolStatus {
    pub bytes: u64,
    pub max_bytes: u64,
    pub segments: usize,
    /// Per sink: seconds since the oldest report it has not yet stored was received (0 when it
    /// has stored everything it has read).
    pub oldest_unsent_seconds: BTreeMap<String, f64>,
    /// Why the last write to the spool failed, until a write succeeds again: while set, reports
    /// are refused with 503 and `/health` is red.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
}

/// Reads the spool's state; cheap to clone.
#[derive(Clone)]
pub struct SpoolMonitor {
    shared: Arc<Shared>,
}

impl SpoolMonitor {
    pub fn status(&self) -> SpoolStatus {
        let now = OffsetDateTime::now_utc();
        let oldest_unsent_seconds = lock(&self.shared.sinks)
            .iter()
            .map(|(sink, progress)| {
                let age = progress
                    .oldest_unsent
                    .map(|at| (now - at).as_seconds_f64().max(0.0))
                    .unwrap_or(0.0);
                (sink.clone(), age)
            })
            .collect();
        SpoolStatus {
            bytes: self.shared.bytes.load(Ordering::SeqCst),
            max_bytes: self.shared.max_bytes,
            segments: lock(&self.shared.segments).len(),
            oldest_unsent_seconds,
            write_error: lock(&self.shared.write_error).clone(),
        }
    }
}

/// The handlers' side of the spool. Cheap to clone.
#[derive(Clone)]
pub struct SpoolAppender {
    shared: Arc<Shared>,
    sender: std_mpsc::Sender<Message>,
}

impl SpoolAppender {
    /// Appends one body that came by `protocol`. `Ok` means it is on disk (synced, with
    /// `fsync = "always"`).
    pub async fn append(
        &self,
        received_at: OffsetDateTime,
        protocol: Protocol,
        body: Bytes,
    ) -> Result<(), AppendError> {
        self.send(received_at, protocol, body, None).await
    }

    /// [`SpoolAppender::append`] for a body already parsed into `report`: the readers take the
    /// report instead of parsing the body again, while the spool's share of memory holds it.
    pub async fn append_parsed(
        &self,
        protocol: Protocol,
        body: Bytes,
        report: Arc<Report>,
    ) -> Result<(), AppendError> {
        self.send(report.received_at, protocol, body, Some(report))
            .await
    }

    async fn send(
        &self,
        received_at: OffsetDateTime,
        protocol: Protocol,
        body: Bytes,
        parsed: Option<Arc<Report>>,
    ) -> Result<(), AppendError> {
        let reserved = record::encoded_len(body.len()) as u64;
        let max_bytes = self.shared.max_bytes;
        self.shared
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(reserved)
                    .filter(|total| *total <= max_bytes)
            })
            .map_err(|_| AppendError::Full { max_bytes })?;
        let (done, answer) = oneshot::channel();
        let message = Message::Append {
            received_at,
            protocol,
            body,
            parsed,
            reserved,
            done,
        };
        if self.sender.send(message).is_err() {
            self.shared.bytes.fetch_sub(reserved, Ordering::SeqCst);
            return Err(AppendError::Closed);
        }
        // The writer answers every append it takes, and releases the reservation itself on error.
        answer.await.unwrap_or(Err(AppendError::Closed))
    }
}

/// An open spool directory.
pub struct Spool {
    shared: Arc<Shared>,
    sender: std_mpsc::Sender<Message>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Held for the spool's lifetime: the OS releases the lock when the process dies.
    _lock: File,
}

impl Spool {
    /// Opens (or creates) the spool: takes its lock, repairs a segment torn by a crash, and starts
    /// a fresh segment for this run's appends.
    pub fn open(options: &SpoolOptions) -> Result<Self, SpoolError> {
        let dir = options.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_error(&dir, "cannot create the directory"))?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io_error(&dir, "cannot open the lock file"))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir)),
            Err(std::fs::TryLockError::Error(err)) => {
                return Err(io_error(&dir, "cannot lock the lock file")(err))
            }
        }

        let mut segments = list_segments(&dir)?;
        if let Some(&last) = segments.last() {
            if !repair_tail(&segment_path(&dir, last))? {
                segments.pop();
            }
        }
        let mut bytes = 0;
        for id in &segments {
            bytes += std::fs::metadata(segment_path(&dir, *id))
                .map_err(io_error(&dir, format!("cannot read segment {id}")))?
                .len();
        }
        let active = segments.last().map_or(1, |last| last + 1);
        let file = create_segment(&dir, active)?;
        bytes += HEADER_LEN;
        let mut segment_set: BTreeSet<u64> = segments.iter().copied().collect();
        segment_set.insert(active);
        if segments.is_empty() {
            tracing::info!(dir = %dir.display(), max_bytes = options.max_bytes, "spool opened (empty)");
        } else {
            tracing::info!(
                dir = %dir.display(),
                segments = segments.len(),
                bytes,
                max_bytes = options.max_bytes,
                "spool opened; sinks will replay what they had not stored"
            );
        }

        let start = Position {
            segment: active,
            offset: HEADER_LEN,
        };
        let (committed, _) = watch::channel(start);
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            max_bytes: options.max_bytes,
            bytes: AtomicU64::new(bytes),
            segments: Mutex::new(segment_set),
            committed,
            sinks: Mutex::new(BTreeMap::new()),
            write_error: Mutex::new(None),
            parsed: Mutex::new(ParsedCache::default()),
        });
        let (sender, receiver) = std_mpsc::channel();
        let writer = Writer {
            shared: Arc::clone(&shared),
            fsync: options.fsync,
            segment_bytes: options.segment_bytes(),
            file,
            position: start,
            written_end: start.offset,
            unsynced: false,
            broken: false,
            buffer: Vec::new(),
        };
        let writer = std::thread::Builder::new()
            .name("kohaku-spool".into())
            .spawn(move || writer.run(receiver))
            .map_err(io_error(&dir, "cannot start the spool writer thread"))?;
        Ok(Self {
            shared,
            sender,
            writer: Some(writer),
            _lock: lock_file,
        })
    }

    pub fn appender(&self) -> SpoolAppender {
        SpoolAppender {
            shared: Arc::clone(&self.shared),
            sender: self.sender.clone(),
        }
    }

    pub fn monitor(&self) -> SpoolMonitor {
        SpoolMonitor {
            shared: Arc::clone(&self.shared),
        }
    }

    /// One reader per sink, each starting where that sink's cursor says it stopped (the oldest
    /// segment when it has none, so a sink added later receives everything still spooled).
    /// All sinks are registered together: a segment is deleted only once every one of them has
    /// passed it, so none may start late.
    pub fn readers(&self, sinks: &[&str]) -> Vec<SpoolReader> {
        sinks
            .iter()
            .map(|sink| SpoolReader::new(Arc::clone(&self.shared), sink))
            .collect()
    }

    /// Writes and syncs every append already taken, then refuses further ones. Readers keep
    /// reading up to the final end.
    pub async fn close_writer(&mut self) {
        let (done, closed) = oneshot::channel();
        if self.sender.send(Message::Close(done)).is_ok() {
            let _ = closed.await;
        }
        if let Some(writer) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }

    /// Keeps up to `max_bytes` of the reports appended with [`SpoolAppender::append_parsed`] for
    /// the readers (none until this is called).
    pub fn keep_parsed(&self, max_bytes: u64) {
        lock(&self.shared.parsed).set_max_bytes(max_bytes);
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let (done, _) = oneshot::channel();
        let _ = self.sender.send(Message::Close(done));
    }
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir, "cannot list the directory"))? {
        let entry = entry.map_err(io_error(dir, "cannot list the directory"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name
            .strip_suffix(SEGMENT_SUFFIX)
            .and_then(|stem| stem.parse::<u64>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Cuts a torn or corrupt tail off the last segment (what a crash mid-append leaves). Returns
/// false when the segment held nothing usable and was removed.
fn repair_tail(path: &Path) -> Result<bool, SpoolError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let bytes =
        std::fs::read(path).map_err(io_error(dir, format!("cannot read {}", path.display())))?;
    if bytes.len() < SEGMENT_MAGIC.len() {
        tracing::warn!(segment = %path.display(), bytes = bytes.len(), "spool segment cut short before its header (crash while creating it); removed");
        std::fs::remove_file(path)
            .map_err(io_error(dir, format!("cannot remove {}", path.display())))?;
        return Ok(false);
    }
    let Some(format) = Format::of_header(&bytes) else {
        return Err(SpoolError::Foreign(path.to_path_buf()));
    };
    let records = &bytes[SEGMENT_MAGIC.len()..];
    let (spans, stopped) = record::scan(records, format);
    if let Some(reason) = stopped {
        let valid = HEADER_LEN + spans.last().map_or(0, |span| span.end as u64);
        tracing::warn!(
            segment = %path.display(),
            intact_records = spans.len(),
            discarded_bytes = bytes.len() as u64 - valid,
            reason = %reason,
            "spool segment ends in a torn record (crash mid-write); keeping the intact records"
        );
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_error(dir, format!("cannot open {}", path.display())))?;
        file.set_len(valid)
            .and_then(|()| file.sync_all())
            .map_err(io_error(dir, format!("cannot truncate {}", path.display())))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
