//! Dev-only support shared by the end-to-end tests (`tests/common`), the library's unit tests
//! (`src/spool/tests.rs`) and the benchmarks (`examples/bench.rs`, `examples/dashboards.rs`), each including this file by
//! path: a `kohaku serve` process and the addresses it logged, its metrics, its peak memory, and a
//! really small filesystem. Standard library and `serde_json`/`tempfile` only, so that every one
//! of them can build it.
#![allow(dead_code)] // each includer uses a different subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs one SQL command with `psql` at `url` and returns its unaligned output.
pub fn psql(url: &str, command: &str) -> Result<String, String> {
    let output = Command::new("psql")
        .args([
            url,
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            command,
        ])
        .output()
        .map_err(|err| format!("psql: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "psql {command}: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Kills the process if a test ends (or fails) or a benchmark step finishes while it still runs.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `kohaku serve` process and the addresses it logged.
pub struct Served {
    pub child: ChildGuard,
    pub ingest: SocketAddr,
    pub exporter: SocketAddr,
    /// Its stdout (JSON log lines) after the "listening" line; drained on a thread so that the
    /// child never blocks on a full pipe.
    pub stdout_lines: std::sync::mpsc::Receiver<String>,
}

impl Served {
    /// Peak resident set (`VmHWM`) so far, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        peak_rss_kib(self.child.0.id()) as f64 / 1024.0
    }
}

/// `VmHWM` of a process, in KiB; 0 when it cannot be read.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Writes `config` to `dir/k.toml` and runs `kohaku serve` on it in `dir` with `command` (the
/// binary, and the environment the caller wants), returning once it logs that it listens.
pub fn serve(mut command: Command, dir: &Path, config: &str) -> Result<Served, String> {
    std::fs::write(dir.join("k.toml"), config).map_err(|err| format!("k.toml: {err}"))?;
    let mut child = ChildGuard(
        command
            .args(["serve", "--config", "k.toml"])
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| format!("kohaku serve does not start: {err}"))?,
    );
    let stdout = child.0.stdout.take().ok_or("no stdout")?;
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Once the receiver is gone the lines are read and dropped, never left in the pipe.
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| "kohaku exited or did not log that it listens within 20 s")?;
        let event: serde_json::Value =
            serde_json::from_str(&line).map_err(|err| format!("a log line is not JSON: {err}"))?;
        if event["message"] == "kohaku listening" {
            let address = |key: &str| -> Result<SocketAddr, String> {
                event[key]
                    .as_str()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| format!("no {key} in {line}"))
            };
            return Ok(Served {
                ingest: address("ingest_addr")?,
                exporter: address("exporter_addr")?,
                child,
                stdout_lines: lines,
            });
        }
    }
}

/// The value of one series in the exporter's text, e.g. `kohaku_sink_rows_written_total{sink="sqlite"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A tmpfs of `bytes`, mounted on a fresh directory and unmounted when dropped: a really full
/// filesystem for the disk-full tests. `None`, with a message, where this process may not mount
/// (it needs root; `./scripts/test` in CI runs as root).
pub struct SmallFilesystem {
    dir: tempfile::TempDir,
}

impl SmallFilesystem {
    pub fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root); the disk-full case is not tested");
            return None;
        }
        Some(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem up to `leave` free bytes with a file, whose removal frees the space.
    pub fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let chunk = [0u8; 4096];
        loop {
            let free = free_bytes(self.path());
            if free <= leave {
                break;
            }
            let size = chunk.len().min((free - leave) as usize).max(1);
            if std::io::Write::write_all(&mut file, &chunk[..size]).is_err() {
                break;
            }
            let _ = file.sync_all();
        }
        filler
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn free_bytes(path: &Path) -> u64 {
    let output = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("df runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .unwrap_or(0)
}
