//! `kohaku import` as an operator runs it: the real binary, real Sora log files, a real SQLite
//! (and PostgreSQL with the `timescaledb` feature) read back afterwards.

mod common;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

const SORA_LOG: &str = "sora-logs/rtc_stats.sample.jsonl";
const CHROMIUM_LOG: &str = "chromium/rtc_stats.chromium-av.jsonl";
const WEBHOOK_LOG: &str = "sora-logs/session_webhook.jsonl";

type Key = (String, String, u64);

/// The distinct stats objects of the fixtures by idempotency key, with their exact text.
fn expected_objects(files: &[&str]) -> HashMap<Key, String> {
    let mut objects = HashMap::new();
    for file in files {
        for report in fixture_reports(file) {
            for object in report.objects {
                let key = (
                    report.connection_id.clone(),
                    object.rtc_id.clone(),
                    object.rtc_timestamp.to_bits(),
                );
                objects.insert(key, object.text);
            }
        }
    }
    objects
}

fn object_lines(files: &[&str]) -> usize {
    files
        .iter()
        .map(|file| {
            fixture_reports(file)
                .iter()
                .map(|r| r.objects.len())
                .sum::<usize>()
        })
        .sum()
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn sqlite() -> Self {
        Self::with_config(&format!(
            "{STORE_EVERY_OBJECT}[sinks.sqlite]\npath = \"imported.db\"\n"
        ))
    }

    fn with_config(toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kohaku.toml"), toml).unwrap();
        Self { dir }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("imported.db")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = kohaku_command();
        command
            .current_dir(self.dir.path())
            .args(["import", "--config", "kohaku.toml"])
            .args(args);
        command
    }

    fn import(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("kohaku runs")
    }

    fn import_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kohaku runs");
        child
            .stdin
            .take()
            .expect("stdin piped")
            .write_all(input)
            .expect("stdin written");
        child.wait_with_output().expect("kohaku exits")
    }
}

fn fixture(relative: &str) -> String {
    fixture_path(relative).to_string_lossy().into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The summary line of one sink, e.g. `written 752, duplicates 18, rejected 0, not stored 0`.
fn sink_line(output: &Output, sink: &str) -> String {
    let prefix = format!("sink {sink}:");
    stdout(output)
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix(&prefix)
                .map(|rest| rest.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{}", stdout(output)))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn assert_stored_exactly(db: &Path, expected: &HashMap<Key, String>) {
    let rows = sqlite_rows(db);
    assert_eq!(rows.len(), expected.len());
    for row in rows {
        let key = row.key();
        let text = expected
            .get(&key)
            .unwrap_or_else(|| panic!("unexpected row {key:?}"));
        assert_eq!(&row.rtc_data, text, "stored text of {key:?}");
    }
}

#[test]
fn imports_the_fixture_logs_into_sqlite_with_identical_json_and_only_once() {
    let setup = Setup::sqlite();
    let files = [
        fixture(SORA_LOG),
        fixture(CHROMIUM_LOG),
        fixture(WEBHOOK_LOG),
    ];
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let expected = expected_objects(&[SORA_LOG, CHROMIUM_LOG]);
    let lines = object_lines(&[SORA_LOG, CHROMIUM_LOG]);
    let repeated = lines - expected.len();

    let first = setup.import(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_stored_exactly(&setup.db(), &expected);
    assert_eq!(
        sink_line(&first, "sqlite"),
        format!(
            "written {}, duplicates {repeated}, rejected 0, not stored 0",
            expected.len()
        )
    );
    let summary = stdout(&first);
    assert_contains(&summary, &format!("stats objects  {lines} in"));
    assert_contains(
        &summary,
        "skipped        10 (session.created 1, session.updated 9)",
    );
    assert_contains(&summary, "bad lines      0");
    // One connection row per connection, with Sora's metadata from the log.
    let connections: std::collections::HashSet<&String> = expected
        .keys()
        .map(|(connection, _, _)| connection)
        .collect();
    assert_eq!(
        sqlite_count(&setup.db(), "SELECT count(*) FROM sora_connection"),
        connections.len() as i64
    );
    assert_eq!(
        sqlite_count(
            &setup.db(),
            "SELECT count(*) FROM sora_connection WHERE version = '2025.2.1' AND label = 'WebRTC SFU Sora'"
        ),
        3,
        "the three Sora-log connections"
    );

    let again = setup.import(&args);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        sink_line(&again, "sqlite"),
        format!("written 0, duplicates {lines}, rejected 0, not stored 0")
    );
    assert_stored_exactly(&setup.db(), &expected);
}

/// The Sora fixture's lines, each with its newline.
fn sora_lines() -> Vec<String> {
    std::fs::read_to_string(fixture_path(SORA_LOG))
        .unwrap()
        .lines()
        .map(|line| format!("{line}\n"))
        .collect()
}

/// How many distinct stats objects (by idempotency key) the log lines hold.
fn distinct_objects(lines: &[String]) -> i64 {
    let keys: std::collections::HashSet<(String, String, u64)> = lines
        .iter()
        .map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                line["connection_id"].as_str().unwrap().to_owned(),
                line["rtc_data"]["id"].as_str().unwrap().to_owned(),
                line["rtc_data"]["timestamp"].as_f64().unwrap().to_bits(),
            )
        })
        .collect();
    keys.len() as i64
}

#[test]
fn bad_lines_are_reported_with_their_line_numbers_and_the_rest_is_stored() {
    let setup = Setup::sqlite();
    let lines = sora_lines();
    let mut damaged = String::new();
    damaged.push_str(&lines[..4].concat()); // lines 1-4
    damaged.push_str("garbage that is not JSON\n"); // line 5
    damaged.push_str(&lines[4..20].concat()); // lines 6-21
    damaged.push_str("{\"type\":\"connection.rtc\",\"channel_id\":\"sora\"}\n"); // line 22
    damaged.push_str(&lines[20..40].concat()); // lines 23-42
                                               // Line 43: an envelope time that parses but is out of range in UTC (it used to panic and
                                               // abort the whole import, summary and stored lines with it).
    let mut out_of_range: serde_json::Value = serde_json::from_str(&lines[40]).unwrap();
    out_of_range["timestamp"] = "9999-12-31T23:59:59-01:00".into();
    damaged.push_str(&format!("{out_of_range}\n"));
    let cut = &lines[41][..lines[41].len() / 2]; // line 44, cut off mid-write
    damaged.push_str(cut);
    std::fs::write(setup.path("damaged.jsonl"), &damaged).unwrap();

    let output = setup.import(&["damaged.jsonl"]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "bad lines make the import incomplete"
    );
    let errors = stderr(&output);
    assert_contains(&errors, "damaged.jsonl:5: line: invalid JSON");
    assert_contains(
        &errors,
        "damaged.jsonl:22: timestamp: missing required field `timestamp`",
    );
    assert_contains(
        &errors,
        "damaged.jsonl:43: timestamp: `9999-12-31T23:59:59-01:00` is outside",
    );
    assert_contains(
        &errors,
        "damaged.jsonl:44: truncated last line (no newline at the end)",
    );
    assert_contains(&stdout(&output), "bad lines      4");
    // Every good line is stored.
    assert_eq!(
        sqlite_count(&setup.db(), "SELECT count(*) FROM rtc_stats"),
        distinct_objects(&lines[..40])
    );
}

#[test]
fn strict_stops_at_the_first_bad_line() {
    let setup = Setup::sqlite();
    let lines = sora_lines();
    let mut damaged = lines[..7].concat();
    damaged.push_str("[1, 2, 3]\n"); // line 8
    damaged.push_str(&lines[7..30].concat());
    std::fs::write(setup.path("damaged.jsonl"), damaged).unwrap();

    let output = setup.import(&["--strict", "damaged.jsonl", &fixture(CHROMIUM_LOG)]);
    assert_eq!(output.status.code(), Some(1));
    assert_contains(&stderr(&output), "damaged.jsonl:8: line: invalid JSON");
    assert_contains(
        &stdout(&output),
        "stopped early: --strict: bad line damaged.jsonl:8",
    );
    // What came before the bad line is stored; nothing after it, nor the next file.
    assert_eq!(
        sqlite_count(&setup.db(), "SELECT count(*) FROM rtc_stats"),
        distinct_objects(&lines[..7])
    );
}

#[test]
fn reads_gzip_files_and_stdin() {
    let setup = Setup::sqlite();
    let sora = std::fs::read(fixture_path(SORA_LOG)).unwrap();
    let chromium = std::fs::read(fixture_path(CHROMIUM_LOG)).unwrap();
    // Two gzip members in one file, as concatenating rotated logs produces.
    let half = sora.len() / 2;
    let cut = half + sora[half..].iter().position(|b| *b == b'\n').unwrap() + 1;
    let mut members = gzip(&sora[..cut]);
    members.extend(gzip(&sora[cut..]));
    std::fs::write(setup.path("rtc_stats.jsonl.1.gz"), members).unwrap();

    let output = setup.import_stdin(&["rtc_stats.jsonl.1.gz", "-"], &gzip(&chromium));
    assert!(output.status.success(), "{}", stderr(&output));
    assert_stored_exactly(&setup.db(), &expected_objects(&[SORA_LOG, CHROMIUM_LOG]));

    // Plain text on stdin works as well.
    let plain = Setup::sqlite();
    let output = plain.import_stdin(&["-"], &sora);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_stored_exactly(&plain.db(), &expected_objects(&[SORA_LOG]));
}

#[test]
fn a_queue_smaller_than_a_report_still_imports_everything() {
    // Reports are rebuilt from lines; capped to the queue, they wait for room instead of failing.
    let setup = Setup::with_config(
        "[pipeline]\nqueue_max_rows = 5\nbatch_max_rows = 5\n\n[sinks.sqlite]\npath = \"imported.db\"\n",
    );
    let output = setup.import(&[&fixture(SORA_LOG)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_stored_exactly(&setup.db(), &expected_objects(&[SORA_LOG]));
}

#[test]
fn a_missing_file_fails_before_anything_is_imported() {
    let setup = Setup::sqlite();
    let output = setup.import(&[&fixture(SORA_LOG), "no-such-file.jsonl"]);
    assert_eq!(output.status.code(), Some(1));
    assert_contains(
        &stderr(&output),
        "no-such-file.jsonl: cannot open: No such file or directory",
    );
    assert!(!setup.db().exists(), "no database is created");
    let output = setup.import(&["-", "-"]);
    assert_eq!(output.status.code(), Some(1));
    assert_contains(
        &stderr(&output),
        "`-` (standard input) can be given only once",
    );
}

#[cfg(all(feature = "timescaledb", feature = "testkit"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_the_fixture_logs_into_postgresql_once() {
    use kohaku_timescaledb::testkit;

    let url = testkit::fresh_database("import").await;
    let setup = Setup::with_config(&format!(
        "{STORE_EVERY_OBJECT}[sinks.timescaledb]\nuri = \"{url}\"\nretention_days = 0\n"
    ));
    let files = [
        fixture(SORA_LOG),
        fixture(CHROMIUM_LOG),
        fixture(WEBHOOK_LOG),
    ];
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let expected = expected_objects(&[SORA_LOG, CHROMIUM_LOG]);

    for _ in 0..2 {
        let output = tokio::task::block_in_place(|| setup.import(&args));
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(
            !stdout(&output).contains(&url),
            "the database URL (and its password) never shows"
        );
        let rows = testkit::stored_rows(&url).await;
        assert_eq!(rows.len(), expected.len());
        for row in rows {
            let key = row.key();
            let text = expected
                .get(&key)
                .unwrap_or_else(|| panic!("unexpected row {key:?}"));
            let stored: serde_json::Value = serde_json::from_str(&row.rtc_data).unwrap();
            let sent: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(stored, sent, "jsonb of {key:?}");
        }
    }
}
