//! The numbered migrations, and the TimescaleDB statements chosen from `timescaledb.sql`.

/// `(version, name, sql)`, applied in order, each in its own transaction.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../schemas/timescaledb/0001_init.sql"),
    ),
    (
        2,
        "views",
        include_str!("../../../schemas/timescaledb/0002_views.sql"),
    ),
    (
        3,
        "dashboards",
        include_str!("../../../schemas/timescaledb/0003_dashboards.sql"),
    ),
    (
        4,
        "group_id",
        include_str!("../../../schemas/timescaledb/0004_group_id.sql"),
    ),
];

const TIMESCALEDB_SQL: &str = include_str!("../../../schemas/timescaledb/timescaledb.sql");

/// What the server offers, read from `pg_available_extensions` and `pg_extension`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionInfo {
    /// The version `CREATE EXTENSION` would install, when the server has the package.
    pub available: Option<String>,
    /// The version installed in this database.
    pub installed: Option<String>,
}

/// How rtc_stats is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    /// A hypertable with compression and retention policies.
    TimescaleDb { version: String },
    /// Plain tables; Kohaku deletes rows older than the retention itself.
    PlainPostgres,
}

impl Flavor {
    pub fn choose(extension: &ExtensionInfo) -> Self {
        match (&extension.installed, &extension.available) {
            (Some(version), _) | (None, Some(version)) => Self::TimescaleDb {
                version: version.clone(),
            },
            (None, None) => Self::PlainPostgres,
        }
    }
}

/// The TimescaleDB settings that end up in SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimescaleSettings {
    /// A PostgreSQL interval such as `1 day`; see [`valid_interval`].
    pub chunk_interval: String,
    /// 0 turns compression off.
    pub compress_after_days: u32,
    /// 0 keeps data forever.
    pub retention_days: u32,
}

/// `N unit` with unit minute(s)/hour(s)/day(s)/week(s): the only shapes accepted for
/// `chunk_interval`, which is substituted into SQL text.
pub fn valid_interval(text: &str) -> bool {
    let Some((count, unit)) = text.split_once(' ') else {
        return false;
    };
    !count.is_empty()
        && count.bytes().all(|b| b.is_ascii_digit())
        && count.parse::<u32>().is_ok_and(|n| n > 0)
        && [
            "minute", "minutes", "hour", "hours", "day", "days", "week", "weeks",
        ]
        .contains(&unit)
}

/// The `(name, sql)` statements to run on a server with TimescaleDB, in order.
pub fn timescaledb_statements(settings: &TimescaleSettings) -> Vec<(&'static str, String)> {
    sections(TIMESCALEDB_SQL)
        .into_iter()
        .filter(|(name, _)| match *name {
            "compression_settings" | "add_compression_policy" => settings.compress_after_days > 0,
            "add_retention_policy" => settings.retention_days > 0,
            _ => true,
        })
        .map(|(name, sql)| {
            let sql = sql
                .replace("{chunk_interval}", &settings.chunk_interval)
                .replace(
                    "{compress_after_days}",
                    &settings.compress_after_days.to_string(),
                )
                .replace("{retention_days}", &settings.retention_days.to_string());
            (name, sql)
        })
        .collect()
}

/// Splits the file at `-- kohaku: NAME` lines; comment lines inside a section are dropped.
fn sections(text: &'static str) -> Vec<(&'static str, String)> {
    let mut sections: Vec<(&'static str, String)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("-- kohaku: ") {
            sections.push((name.trim(), String::new()));
        } else if let Some((_, sql)) = sections.last_mut() {
            if !line.trim_start().starts_with("--") && !line.trim().is_empty() {
                sql.push_str(line);
                sql.push('\n');
            }
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TimescaleSettings {
        TimescaleSettings {
            chunk_interval: "1 day".into(),
            compress_after_days: 7,
            retention_days: 60,
        }
    }

    #[test]
    fn flavor_follows_the_extension() {
        let none = ExtensionInfo {
            available: None,
            installed: None,
        };
        assert_eq!(Flavor::choose(&none), Flavor::PlainPostgres);
        let available = ExtensionInfo {
            available: Some("2.17.2".into()),
            installed: None,
        };
        assert_eq!(
            Flavor::choose(&available),
            Flavor::TimescaleDb {
                version: "2.17.2".into()
            }
        );
        let installed = ExtensionInfo {
            available: Some("2.17.2".into()),
            installed: Some("2.14.0".into()),
        };
        assert_eq!(
            Flavor::choose(&installed),
            Flavor::TimescaleDb {
                version: "2.14.0".into()
            }
        );
    }

    #[test]
    fn timescaledb_statements_are_exact() {
        let statements = timescaledb_statements(&settings());
        let names: Vec<&str> = statements.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "extension",
                "hypertable",
                "chunk_interval",
                "compression_settings",
                "remove_compression_policy",
                "add_compression_policy",
                "remove_retention_policy",
                "add_retention_policy"
            ]
        );
        let sql = |name: &str| {
            statements
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s.trim().to_owned())
                .unwrap()
        };
        assert_eq!(
            sql("extension"),
            "CREATE EXTENSION IF NOT EXISTS timescaledb;"
        );
        assert_eq!(
            sql("hypertable"),
            "SELECT create_hypertable('rtc_stats', by_range('rtc_time', INTERVAL '1 day'),\n                         if_not_exists => TRUE, migrate_data => TRUE);"
        );
        assert_eq!(
            sql("chunk_interval"),
            "SELECT set_chunk_time_interval('rtc_stats', INTERVAL '1 day');"
        );
        assert!(sql("compression_settings")
            .contains("timescaledb.compress_segmentby = 'channel_id, connection_id'"));
        assert!(sql("compression_settings").starts_with("DO $$"));
        assert_eq!(
            sql("add_compression_policy"),
            "SELECT add_compression_policy('rtc_stats', compress_after => INTERVAL '7 days');"
        );
        assert_eq!(
            sql("add_retention_policy"),
            "SELECT add_retention_policy('rtc_stats', drop_after => INTERVAL '60 days');"
        );
        assert!(
            statements.iter().all(|(_, sql)| !sql.contains('{')),
            "every placeholder substituted"
        );
    }

    #[test]
    fn disabled_policies_are_removed_not_added() {
        let mut settings = settings();
        settings.compress_after_days = 0;
        settings.retention_days = 0;
        let names: Vec<&str> = timescaledb_statements(&settings)
            .iter()
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(
            names,
            [
                "extension",
                "hypertable",
                "chunk_interval",
                "remove_compression_policy",
                "remove_retention_policy"
            ]
        );
    }

    #[test]
    fn only_plain_intervals_are_accepted() {
        for good in ["1 day", "12 hours", "30 minutes", "2 weeks"] {
            assert!(valid_interval(good), "{good}");
        }
        for bad in [
            "",
            "1day",
            "0 days",
            "1 day'; DROP TABLE rtc_stats; --",
            "1 month",
            "-1 days",
            "1  day",
        ] {
            assert!(!valid_interval(bad), "{bad}");
        }
    }
}
