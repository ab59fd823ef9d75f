//! The `kohaku` binary as an operator runs it: check-config, migrate, serve, signals, logs.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use http::StatusCode;

fn run(args: &[&str], cwd: &Path) -> Output {
    kohaku_command()
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("kohaku runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn version() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(&["--version"], dir.path());
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("kohaku {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_prints_the_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(&["check-config"], dir.path());
    assert!(output.status.success(), "{}", stderr(&output));
    let printed: toml::Table =
        toml::from_str(&String::from_utf8_lossy(&output.stdout)).expect("prints TOML");
    assert_eq!(printed["server"]["listen_port"].as_integer(), Some(5890));
    assert_eq!(
        printed["sinks"]["sqlite"]["path"].as_str(),
        Some("kohaku.db")
    );
    assert!(
        !dir.path().join("kohaku.db").exists(),
        "check-config touches no database"
    );

    std::fs::write(
        dir.path().join("k.toml"),
        "[sinks.sqlite]\npath = \"stats.db\"\n[pipeline]\nbatch_max_rows = 100\n",
    )
    .unwrap();
    let output = run(&["check-config", "--config", "k.toml"], dir.path());
    assert!(output.status.success(), "{}", stderr(&output));
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap();
    assert_eq!(
        printed["sinks"]["sqlite"]["path"].as_str(),
        Some("stats.db")
    );
    assert_eq!(
        printed["pipeline"]["batch_max_rows"].as_integer(),
        Some(100)
    );
}

#[test]
fn check_config_explains_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        ("[server]\nlisten_port = 5890\nlisten_adress = \"0.0.0.0\"\n", vec!["k.toml", "line 3", "listen_adress"]),
        ("[sinks.postgres]\nuri = \"x\"\n", vec!["k.toml", "unknown field `postgres`"]),
        ("[server]\nhttps = true\n", vec!["k.toml", "server.tls_fullchain_file"]),
        (
            "[server]\nhttps = true\ntls_fullchain_file = \"nope.pem\"\ntls_privkey_file = \"nope.pem\"\n",
            vec!["server.tls_fullchain_file", "nope.pem"],
        ),
        ("debug = \"yes\"\n", vec!["k.toml", "debug"]),
    ] {
        std::fs::write(dir.path().join("k.toml"), text).unwrap();
        let output = run(&["check-config", "--config", "k.toml"], dir.path());
        assert_eq!(output.status.code(), Some(1), "{text}");
        let message = stderr(&output);
        for part in expected {
            assert!(message.contains(part), "{text:?}: {message} lacks {part}");
        }
    }
    let output = run(&["check-config", "--config", "absent.toml"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("absent.toml"));

    // A backend's reason is said once, not `X: X`.
    #[cfg(feature = "timescaledb")]
    {
        std::fs::write(
            dir.path().join("k.toml"),
            "[sinks.timescaledb]\nuri = \"postgres://k@127.0.0.1:9/db\"\nchunk_interval = \"1 month\"\n",
        )
        .unwrap();
        let message = stderr(&run(&["check-config", "--config", "k.toml"], dir.path()));
        assert_eq!(
            message.matches("is not of the form").count(),
            1,
            "{message}"
        );
        // Checked with the rest of the file now, so it names the file and the whole key.
        assert!(
            message.contains("k.toml") && message.contains("sinks.timescaledb.chunk_interval"),
            "{message}"
        );
    }
}

#[test]
fn migrate_creates_the_schema_once() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let output = run(&["migrate"], dir.path());
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let db = dir.path().join("kohaku.db");
    let migrations = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/sqlite"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "sql")
        })
        .count() as i64;
    assert_eq!(
        sqlite_count(&db, "SELECT count(*) FROM kohaku_schema_migrations"),
        migrations,
        "each migration recorded once"
    );
    assert_eq!(
        sqlite_count(&db, "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('rtc_stats', 'sora_connection')"),
        2
    );
}

#[test]
fn serve_names_the_port_it_cannot_bind() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(
        dir.path().join("k.toml"),
        format!("[server]\nlisten_addr = \"127.0.0.1\"\nlisten_port = {port}\n[exporter]\nlisten_port = 0\n"),
    )
    .unwrap();
    let output = run(&["serve", "--config", "k.toml"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("server.listen_addr/listen_port") && message.contains(&port.to_string()),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_every_queued_report_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    // Batches would wait a minute: only the shutdown flush can write them.
    let mut served = serve(
        dir.path(),
        "[server]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 0\n\
         [exporter]\nlisten_port = 0\n\
         [log]\ndir = \"logs\"\nstdout = true\n\
         [pipeline]\nbatch_max_wait_ms = 60000\nbatch_max_rows = 100000\n\
         [sinks.sqlite]\npath = \"stats.db\"\n",
    );
    let client = H2::connect(served.ingest).await;
    let reports = fixture_reports("sora-logs/rtc_stats.sample.jsonl");
    let mut objects = 0;
    for report in &reports {
        assert_eq!(
            client.post_report(report.body.clone()).await.status,
            StatusCode::NO_CONTENT
        );
        objects += report.objects.len() as i64;
    }
    let db = dir.path().join("stats.db");
    assert_eq!(
        sqlite_count(&db, "SELECT count(*) FROM rtc_stats"),
        0,
        "still queued"
    );

    // SAFETY: sending a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(served.child.0.id() as i32, libc::SIGTERM) },
        0
    );
    let status = wait_exit(&mut served.child.0, Duration::from_secs(30));
    assert!(status.success(), "exit status {status}");
    assert_eq!(sqlite_count(&db, "SELECT count(*) FROM rtc_stats"), objects);

    let stdout: Vec<String> = served.stdout_lines.try_iter().collect();
    assert!(stdout.iter().any(|l| l.contains("SIGTERM")), "{stdout:?}");
    // The same events went to the log file, as JSON lines.
    let log =
        std::fs::read_to_string(dir.path().join("logs/kohaku.jsonl")).expect("log file written");
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(events.iter().any(|e| e["message"] == "kohaku listening"));
    assert!(events
        .iter()
        .any(|e| e["message"] == "shutdown finished; every accepted stats object was written"));
    assert!(events
        .iter()
        .all(|e| e["level"].is_string() && e["timestamp"].is_string()));
}

#[cfg(feature = "timescaledb")]
#[test]
fn the_database_password_never_shows() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9: migration at start-up fails, naming the sink but not the password.
    std::fs::write(
        dir.path().join("k.toml"),
        "[server]\nlisten_addr = \"127.0.0.1\"\nlisten_port = 0\n[exporter]\nlisten_port = 0\n\
         [sinks.timescaledb]\nuri = \"postgres://kohaku:hunter2@127.0.0.1:9/stats\"\n",
    )
    .unwrap();
    let output = run(&["check-config", "--config", "k.toml"], dir.path());
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("postgres://kohaku:***@127.0.0.1:9/stats"),
        "{printed}"
    );

    let output = run(&["serve", "--config", "k.toml"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("cannot migrate sink `timescaledb`"),
        "{message}"
    );
    for text in [
        message.as_str(),
        &String::from_utf8_lossy(&output.stdout),
        &printed,
    ] {
        assert!(!text.contains("hunter2"), "{text}");
    }
}
