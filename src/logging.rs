//! Structured JSON logs to stdout and/or a size-rotated file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::time::UtcTime;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogConfig;

/// How often rotated files are checked against `rotate_max_age`.
const AGE_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("`log.dir` ({}): cannot write the log file: {message}", dir.display())]
    File { dir: PathBuf, message: String },
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// Keeps the background writers alive; dropping it flushes them.
#[must_use = "dropping the guard stops logging"]
pub struct LogGuard {
    _writers: Vec<WorkerGuard>,
}

/// Installs the global logger. `RUST_LOG` overrides the level chosen by `debug`.
pub fn init(config: &LogConfig, debug: bool) -> Result<LogGuard, LogError> {
    // The database server's own notices (TimescaleDB's advice on segmenting columns, …) would
    // otherwise come out as Kohaku's warnings; RUST_LOG=sqlx::postgres::notice=info shows them.
    let default_level = if debug {
        "debug,h2=info,hyper=info,rustls=info,sqlx::postgres::notice=off"
    } else {
        "info,sqlx::postgres::notice=off"
    };
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let mut writers = Vec::new();
    let mut layers: Vec<Box<dyn Layer<_> + Send + Sync>> = Vec::new();

    if config.stdout {
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(false)
            .finish(std::io::stdout());
        writers.push(guard);
        layers.push(json_layer(writer).with_filter(filter()).boxed());
    }
    if let Some(dir) = &config.dir {
        let file_error = |message: String| LogError::File {
            dir: dir.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|err| file_error(err.to_string()))?;
        let roller = logroller::LogRollerBuilder::new(dir.as_path(), Path::new(&config.name))
            .rotation(logroller::Rotation::SizeBased(logroller::RotationSize::MB(
                config.rotate_max_size,
            )))
            .max_keep_files(config.rotate_max_backups)
            .build()
            .map_err(|err| file_error(err.to_string()))?;
        let (writer, guard) = NonBlockingBuilder::default().lossy(false).finish(roller);
        writers.push(guard);
        layers.push(json_layer(writer).with_filter(filter()).boxed());
        if config.rotate_max_age > 0 {
            spawn_age_pruning(
                dir.clone(),
                config.name.clone(),
                Duration::from_secs(config.rotate_max_age * 86_400),
            );
        }
    }
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|err| LogError::Install(err.to_string()))?;
    Ok(LogGuard { _writers: writers })
}

/// Human-readable log lines for interactive commands (`kohaku import`): warnings and errors only
/// unless `debug`, written through `writer` so they do not tear a progress bar. `RUST_LOG`
/// overrides the level.
pub fn init_console<W>(debug: bool, writer: W) -> Result<(), LogError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let default_level = if debug {
        "debug,h2=info,hyper=info,sqlx::postgres::notice=off"
    } else {
        "warn,sqlx::postgres::notice=off"
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter)
        .with_target(false)
        .with_timer(UtcTime::rfc_3339())
        .with_ansi(false)
        .try_init()
        .map_err(|err| LogError::Install(err.to_string()))
}

fn json_layer<S, W>(writer: W) -> impl Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_timer(UtcTime::rfc_3339())
        .with_writer(writer)
}

/// logroller limits the number of rotated files; their age is enforced here.
fn spawn_age_pruning(dir: PathBuf, name: String, max_age: Duration) {
    let spawned = std::thread::Builder::new()
        .name("log-age-pruning".into())
        .spawn(move || loop {
            for removed in prune_rotated_logs(&dir, &name, max_age, SystemTime::now()) {
                tracing::info!(file = %removed.display(), "removed rotated log older than log.rotate_max_age");
            }
            std::thread::sleep(AGE_PRUNE_INTERVAL);
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start rotated-log pruning; log.rotate_max_age is not enforced");
    }
}

/// Deletes `name.N` (and `name.N.gz`) files in `dir` last modified more than `max_age` before
/// `now`; the live file is never touched. Returns what it removed.
pub fn prune_rotated_logs(
    dir: &Path,
    name: &str,
    max_age: Duration,
    now: SystemTime,
) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{name}.");
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let index = rest.strip_suffix(".gz").unwrap_or(rest);
        if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let old_enough = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|age| age > max_age);
        if old_enough && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_only_old_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        for file in [
            "kohaku.jsonl",
            "kohaku.jsonl.1",
            "kohaku.jsonl.2.gz",
            "kohaku.jsonl.old",
            "other.log.1",
        ] {
            std::fs::write(dir.path().join(file), "{}\n").unwrap();
        }
        let day = Duration::from_secs(86_400);
        assert!(prune_rotated_logs(dir.path(), "kohaku.jsonl", day, SystemTime::now()).is_empty());
        let later = SystemTime::now() + 2 * day;
        let mut removed: Vec<String> = prune_rotated_logs(dir.path(), "kohaku.jsonl", day, later)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        removed.sort();
        assert_eq!(removed, ["kohaku.jsonl.1", "kohaku.jsonl.2.gz"]);
        assert!(dir.path().join("kohaku.jsonl").exists());
        assert!(dir.path().join("kohaku.jsonl.old").exists());
        assert!(dir.path().join("other.log.1").exists());
    }
}

/// Lets through at most `per_second` events of one kind each second and counts the rest, so that a
/// flood of bad requests or failed handshakes cannot flood the log (or fill its disk). The first
/// event after a suppressed stretch says how many were left out.
pub struct RateLimit {
    per_second: u32,
    window: std::sync::Mutex<RateWindow>,
}

struct RateWindow {
    /// `None` before the first event.
    started: Option<std::time::Instant>,
    passed: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: std::sync::Mutex::new(RateWindow {
                started: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were suppressed since the last
    /// one that was; `None` when it must be dropped.
    pub fn admit(&self) -> Option<u64> {
        let mut window = crate::sync::lock(&self.window);
        let now = std::time::Instant::now();
        if window
            .started
            .is_none_or(|started| now.duration_since(started) >= Duration::from_secs(1))
        {
            window.started = Some(now);
            window.passed = 0;
        }
        if window.passed >= self.per_second {
            window.suppressed += 1;
            return None;
        }
        window.passed += 1;
        Some(std::mem::take(&mut window.suppressed))
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::RateLimit;

    #[test]
    fn a_burst_is_cut_to_the_rate_and_the_next_admitted_event_counts_what_was_dropped() {
        let limit = RateLimit::new(3);
        let admitted: Vec<Option<u64>> = (0..10).map(|_| limit.admit()).collect();
        assert_eq!(&admitted[..3], &[Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        std::thread::sleep(std::time::Duration::from_millis(1_050));
        assert_eq!(limit.admit(), Some(7));
        assert_eq!(limit.admit(), Some(0));
    }
}
