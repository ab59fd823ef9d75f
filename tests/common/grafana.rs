//! Kohaku's Grafana dashboards as files (their panels and queries), and what Grafana puts into a
//! query before it reaches the database. Shared by `tests/dashboards.rs` and the dashboard
//! benchmark (`examples/dashboards.rs`), so that both run exactly the statements Grafana would send.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana")
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

pub struct Dashboard {
    pub backend: String,
    pub file: PathBuf,
    pub json: Value,
}

impl Dashboard {
    pub fn uid(&self) -> &str {
        self.json["uid"].as_str().expect("dashboard uid")
    }

    pub fn panels(&self) -> Vec<&Value> {
        let mut panels = Vec::new();
        for panel in self.json["panels"].as_array().expect("panels") {
            panels.push(panel);
            if let Some(nested) = panel["panels"].as_array() {
                panels.extend(nested);
            }
        }
        panels
    }

    pub fn variables(&self) -> Vec<&Value> {
        self.json["templating"]["list"]
            .as_array()
            .map(|list| list.iter().collect())
            .unwrap_or_default()
    }

    /// (panel title, query text) for every panel target.
    pub fn queries(&self) -> Vec<(String, String)> {
        let mut queries = Vec::new();
        for panel in self.panels() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let sql = if self.backend == "timescaledb" {
                    target["rawSql"].as_str()
                } else {
                    assert_eq!(
                        target["rawQueryText"], target["queryText"],
                        "{}: the SQLite plugin runs queryText",
                        panel["title"]
                    );
                    target["rawQueryText"].as_str()
                };
                let sql = sql.unwrap_or_else(|| panic!("{}: no SQL", panel["title"]));
                queries.push((panel["title"].as_str().unwrap().to_owned(), sql.to_owned()));
            }
        }
        queries
    }
}

pub fn dashboards() -> Vec<Dashboard> {
    let mut dashboards = Vec::new();
    for backend in ["timescaledb", "sqlite"] {
        let dir = grafana_dir().join("dashboards").join(backend);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for file in files {
            dashboards.push(Dashboard {
                backend: backend.to_owned(),
                json: read_json(&file),
                file,
            });
        }
    }
    dashboards
}

/// What Grafana puts into a query: the time range, the interval and the variables' values.
#[derive(Clone)]
pub struct Render {
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub interval_secs: i64,
    pub variables: HashMap<String, Vec<String>>,
    /// The datasource's `timescaledb` flag: `$__timeGroup` expands to `time_bucket`.
    pub time_bucket: bool,
}

impl Render {
    pub fn new(from_ms: f64, to_ms: f64) -> Self {
        let at = |ms: f64| {
            OffsetDateTime::from_unix_timestamp_nanos((ms * 1e6) as i128).expect("time in range")
        };
        let from = at(from_ms);
        let to = at(to_ms);
        // Grafana aims at about one point per pixel: ~1000 points over the range.
        let interval_secs = ((to - from).whole_seconds() / 1000).max(1);
        Self {
            from,
            to,
            interval_secs,
            variables: HashMap::new(),
            time_bucket: false,
        }
    }

    fn ms(at: OffsetDateTime) -> i64 {
        (at.unix_timestamp_nanos() / 1_000_000) as i64
    }

    fn rfc3339(at: OffsetDateTime) -> String {
        at.format(&Rfc3339).unwrap()
    }

    /// Grafana's template service: variables and global variables.
    fn interpolate(&self, sql: &str) -> String {
        let mut out = sql
            .replace("$__interval_ms", &(self.interval_secs * 1000).to_string())
            .replace("$__interval", &format!("{}s", self.interval_secs))
            .replace("$__from", &Self::ms(self.from).to_string())
            .replace("$__to", &Self::ms(self.to).to_string());
        for (name, values) in &self.variables {
            let quoted: Vec<String> = values
                .iter()
                .map(|v| format!("'{}'", v.replace('\'', "\\'")))
                .collect();
            out = out
                .replace(&format!("${{{name}:singlequote}}"), &quoted.join(","))
                .replace(&format!("${{{name}}}"), &values.join(","))
                .replace(&format!("${name}"), &values.join(","));
        }
        out
    }

    /// The PostgreSQL datasource's macros, as its backend expands them.
    fn expand_postgres_macros(&self, sql: &str) -> String {
        let mut out = String::new();
        let mut rest = sql;
        while let Some(at) = rest.find("$__") {
            out.push_str(&rest[..at]);
            let after = &rest[at + 3..];
            let open = after.find('(').expect("macro with arguments");
            let close = after.find(')').expect("macro closed");
            let name = &after[..open];
            let args: Vec<&str> = after[open + 1..close].split(',').map(str::trim).collect();
            let from = Self::rfc3339(self.from);
            let to = Self::rfc3339(self.to);
            out.push_str(&match name {
                "timeFilter" => format!("{} BETWEEN '{from}' AND '{to}'", args[0]),
                "timeFrom" => format!("'{from}'"),
                "timeTo" => format!("'{to}'"),
                "timeGroupAlias" | "timeGroup" => {
                    let secs: i64 = args[1]
                        .strip_suffix('s')
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| panic!("interval {}", args[1]));
                    let alias = if name == "timeGroupAlias" {
                        " AS \"time\""
                    } else {
                        ""
                    };
                    // As Grafana's PostgreSQL macro engine writes it, with and without the
                    // datasource's timescaledb flag.
                    if self.time_bucket {
                        format!("time_bucket('{secs}s', {}){alias}", args[0])
                    } else {
                        format!(
                            "floor(extract(epoch from {})/{secs})*{secs}{alias}",
                            args[0]
                        )
                    }
                }
                other => panic!("macro $__{other} is not emulated by this test"),
            });
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        out
    }

    pub fn render(&self, backend: &str, sql: &str) -> String {
        let interpolated = self.interpolate(sql);
        let rendered = if backend == "timescaledb" {
            self.expand_postgres_macros(&interpolated)
        } else {
            // The SQLite plugin's own macros ($__timeFilter, $__unixEpochGroupSeconds) are not
            // used: its $__timeFilter compares whole seconds, Kohaku stores milliseconds.
            interpolated
        };
        assert!(
            !rendered.contains('$'),
            "left unexpanded: {rendered}\n(from {sql})"
        );
        rendered
    }
}
