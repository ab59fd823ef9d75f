use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    let path = Path::new("kohaku.toml");
    let config = Config::parse(text, path)?;
    config.validate(&ConfigSource::File(path.to_owned()))?;
    Ok(config)
}

#[test]
#[cfg(feature = "sqlite")]
fn empty_file_gives_defaults_with_sqlite() {
    let config = parse("").expect("empty config is valid");
    assert_eq!(config, Config::default());
    assert_eq!(config.server.listen_port, 5890);
    assert_eq!(config.exporter.listen_port, 5891);
    assert_eq!(
        config.effective_sinks().sqlite.map(|s| s.path),
        Some(PathBuf::from("kohaku.db"))
    );
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let err = parse("debug = true\n[server]\nlisten_prot = 1\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("kohaku.toml"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("unknown field `listen_prot`"), "{err}");
}

#[test]
fn parse_errors_never_show_the_password() {
    for text in [
        "[sinks.timescaledb]\nuri = \"postgres://kohaku:hunter2@db/stats\n",
        "[sinks.timescaledb]\nuri = [\"postgres://kohaku:hunter2@db/stats\"]\n",
        "[sinks]\ntimescaledb = { uri = \"postgres://kohaku:hunter2@db/stats\", typo = 1 }\n",
        "[sinks.timescaledb]\nuri = 'postgres://kohaku:hunter2@db/stats'\nmax_connections = \"postgres://kohaku:hunter2@db\"\n",
        "[sinks.timescaledb]\nuri = \"postgres://kohaku:hunter2@db/stats\" x\n",
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("line "), "{err}");
    }
}

#[test]
fn unknown_sink_is_rejected() {
    let err = parse("[sinks.mysql]\nuri = 'x'\n").unwrap_err().to_string();
    assert!(err.contains("unknown field `mysql`"), "{err}");
}

#[test]
fn wrong_type_names_key() {
    let err = parse("[server]\nlisten_port = 70000\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen_port"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
#[cfg(all(feature = "sqlite", feature = "timescaledb"))]
fn validation_errors_name_the_key_and_file() {
    for (text, key) in [
        ("[server]\nhttps = true\n", "server.tls_fullchain_file"),
        (
            "[server]\ntls_verify_cacert_path = 'ca.pem'\n",
            "server.tls_verify_cacert_path",
        ),
        (
            "[server]\nhttp2_max_read_frame_size = 1024\n",
            "server.http2_max_read_frame_size",
        ),
        (
            "[server]\nhttp2_max_concurrent_streams = 0\n",
            "server.http2_max_concurrent_streams",
        ),
        ("[server]\nwebhook_path = 'stats'\n", "server.webhook_path"),
        (
            "[server]\nwebhook_path = '/stats?x=1'\n",
            "server.webhook_path",
        ),
        ("[server]\nwebhook_path = '/.ok'\n", "server.webhook_path"),
        (
            "[sinks.sqlite]\npath = 'k.db'\nbusy_timeout_ms = 3000000000\n",
            "sinks.sqlite.busy_timeout_ms",
        ),
        (
            "[pipeline]\nbatch_max_wait_ms = 100000000000000000\n",
            "pipeline.batch_max_wait_ms",
        ),
        (
            "[sinks.timescaledb]\nuri = 'postgres://k@h/d'\nstatement_timeout_secs = 9999999999\n",
            "sinks.timescaledb.statement_timeout_secs",
        ),
        (
            "[sinks.sqlite]\npath = '/nonexistent-kohaku-dir/k.db'\n",
            "sinks.sqlite.path",
        ),
        ("[sinks.sqlite]\npath = '/'\n", "sinks.sqlite.path"),
        ("[log]\ndir = '/etc/passwd'\n", "log.dir"),
        ("[spool]\ndir = '/etc/passwd'\n", "spool.dir"),
        (
            "[pipeline]\nbatch_max_rows = 10\nqueue_max_rows = 5\n",
            "pipeline.batch_max_rows",
        ),
        (
            "[pipeline]\nqueue_max_rows = 0\n",
            "pipeline.queue_max_rows",
        ),
        ("[log]\nstdout = false\n", "`log`"),
        ("[sinks]\n", "`sinks`"),
        ("[exporter]\nlisten_port = 5890\n", "exporter.listen_port"),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text:?}: {err}");
        assert!(err.contains("kohaku.toml"), "{text:?}: {err}");
    }
}

#[test]
#[cfg(feature = "timescaledb")]
fn timescaledb_sink_defaults_and_validation() {
    let config = parse("[sinks.timescaledb]\nuri = 'postgres://k:pw@db/stats'\n").unwrap();
    let sink = config.effective_sinks().timescaledb.unwrap();
    assert_eq!(
        (
            sink.max_connections,
            sink.retention_days,
            sink.compress_after_days,
            sink.chunk_interval.as_str()
        ),
        (10, 60, 7, "1 day")
    );
    assert!(
        config.effective_sinks().sqlite.is_none(),
        "an explicit [sinks] replaces the default"
    );
    for (text, key) in [
        ("[sinks.timescaledb]\n", "missing field `uri`"),
        (
            "[sinks.timescaledb]\nuri = 'mysql://db'\n",
            "sinks.timescaledb.uri",
        ),
        (
            "[sinks.timescaledb]\nuri = 'postgres://db'\nretention = 3\n",
            "unknown field `retention`",
        ),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[test]
#[cfg(feature = "timescaledb")]
fn passwords_never_print() {
    let config =
        parse("[sinks.timescaledb]\nuri = 'postgres://kohaku:hunter2@db/stats?password=hunter2'\n")
            .unwrap();
    let printed = config.to_effective_toml();
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(
        printed.contains("postgres://kohaku:***@db/stats?password=***"),
        "{printed}"
    );
    assert!(!format!("{config:?}").contains("hunter2"));
    let err = parse("[sinks.timescaledb]\nuri = 'mysql://u:hunter2@db'\n")
        .unwrap_err()
        .to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
#[cfg(feature = "sqlite")]
fn effective_toml_round_trips() {
    let config = parse("debug = true\n[sinks.sqlite]\npath = 'x.db'\n").unwrap();
    let printed = config.to_effective_toml();
    let reparsed = parse(&printed).unwrap();
    assert_eq!(reparsed, config);
}

/// Every key Kohaku accepts is documented in config.example.toml, and the file parses to the
/// defaults it claims.
#[test]
#[cfg(all(feature = "sqlite", feature = "timescaledb", feature = "timestream"))]
fn example_config_documents_every_key_with_its_default() {
    let example = include_str!("../../config.example.toml");
    let uncommented: String = example
        .lines()
        .map(|line| {
            line.strip_prefix("# ")
                .filter(|l| looks_like_key_or_table(l))
                .unwrap_or(line)
        })
        .collect::<Vec<_>>()
        .join("\n");
    // Not validated: the sample TLS paths are shown with `https = false`, its default.
    let config = Config::parse(&uncommented, Path::new("config.example.toml"))
        .expect("config.example.toml with every key uncommented parses");
    let mut expected = Config::default();
    expected.sinks = Some(expected.effective_sinks());
    // Optional keys have no default; the example shows a sample value for them.
    let mut documented = config.clone();
    documented.server.tls_fullchain_file = None;
    documented.server.tls_privkey_file = None;
    documented.server.tls_verify_cacert_path = None;
    documented.server.https = false;
    documented.exporter.https = false;
    documented.log.dir = None;
    // [spool] is off by default; the example shows it commented out with its defaults.
    assert_eq!(
        documented.spool.take(),
        Some(SpoolConfig::default()),
        "config.example.toml shows a [spool] value that is not the default"
    );
    // The example shows a commented-out [sinks.timescaledb] beside the default SQLite sink.
    let timescaledb = documented
        .sinks
        .as_mut()
        .and_then(|sinks| sinks.timescaledb.take());
    let timescaledb = timescaledb.expect("config.example.toml documents [sinks.timescaledb]");
    assert_eq!(
        (
            timescaledb.max_connections,
            timescaledb.retention_days,
            timescaledb.compress_after_days,
            timescaledb.chunk_interval.as_str(),
            timescaledb.statement_timeout_secs
        ),
        (10, 60, 7, "1 day", 60),
        "config.example.toml shows a [sinks.timescaledb] value that is not the default"
    );
    // And a commented-out [sinks.timestream], whose optional keys show sample values.
    let mut timestream = documented
        .sinks
        .as_mut()
        .and_then(|sinks| sinks.timestream.take())
        .expect("config.example.toml documents [sinks.timestream]");
    assert!(timestream.region.take().is_some() && timestream.endpoint_url.take().is_some());
    assert_eq!(
        timestream,
        TimestreamSinkConfig::default(),
        "config.example.toml shows a [sinks.timestream] value that is not the default"
    );
    assert_eq!(
        documented, expected,
        "config.example.toml shows a value that is not the default"
    );

    let printed = toml::to_string(&config).unwrap();
    let printed: toml::Table = toml::from_str(&printed).unwrap();
    for (table, value) in &printed {
        match value {
            toml::Value::Table(keys) => {
                for (key, nested) in keys {
                    if let toml::Value::Table(inner) = nested {
                        for inner_key in inner.keys() {
                            assert!(
                                example.contains(&format!("{inner_key} =")),
                                "{table}.{key}.{inner_key} undocumented"
                            );
                        }
                    } else {
                        assert!(
                            example.contains(&format!("{key} =")),
                            "{table}.{key} undocumented"
                        );
                    }
                }
            }
            _ => assert!(
                example.contains(&format!("{table} =")),
                "{table} undocumented"
            ),
        }
    }
}

#[cfg(all(feature = "sqlite", feature = "timescaledb", feature = "timestream"))]
fn looks_like_key_or_table(line: &str) -> bool {
    line.starts_with('[')
        || line
            .split_once(" = ")
            .is_some_and(|(key, _)| !key.contains(' '))
}
