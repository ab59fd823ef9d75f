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
    (
        5,
        "summaries",
        include_str!("../../../schemas/timescaledb/0005_summaries.sql"),
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

/// Whether the sink uses the timescaledb extension (`[sinks.timescaledb] extension`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtensionMode {
    /// Every feature the server gives, else plain PostgreSQL, saying what was given up and why.
    #[default]
    Auto,
    /// Refuse to start unless the extension can be used, saying what to preload or grant.
    Required,
    /// Plain PostgreSQL tables, even where the extension is available.
    Off,
}

/// How rtc_stats is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavor {
    /// A hypertable with compression and retention policies (TimescaleDB under the Timescale
    /// License).
    TimescaleDb { version: String },
    /// A hypertable; Apache-only TimescaleDB has no compression and no policies, so Kohaku drops
    /// expired chunks itself.
    ApacheOnly { version: String },
    /// Plain tables; Kohaku deletes rows older than the retention itself.
    PlainPostgres,
}

impl Flavor {
    /// The extension's version, for a hypertable.
    pub fn version(&self) -> Option<&str> {
        match self {
            Self::TimescaleDb { version } | Self::ApacheOnly { version } => Some(version),
            Self::PlainPostgres => None,
        }
    }
}

/// TimescaleDB 2.18 renamed compression to the columnstore (`add_columnstore_policy`,
/// `timescaledb.enable_columnstore`, `timescaledb.segmentby`); the older names are deprecated.
pub fn has_columnstore_api(version: &str) -> bool {
    let mut parts = version
        .split('.')
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (2, 18)
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

/// The statement named `name` in `timescaledb.sql`, with the settings substituted.
pub fn statement(name: &str, settings: &TimescaleSettings) -> String {
    sections(TIMESCALEDB_SQL)
        .into_iter()
        .find(|(section, _)| *section == name)
        .map(|(_, sql)| {
            sql.replace("{chunk_interval}", &settings.chunk_interval)
                .replace(
                    "{compress_after_days}",
                    &settings.compress_after_days.to_string(),
                )
                .replace("{retention_days}", &settings.retention_days.to_string())
        })
        .unwrap_or_default()
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

/// What to do about one policy, from what the config wants and what the database has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyChange {
    Keep,
    Add,
    /// The configured age changed: remove the job and add it anew.
    Replace,
    Remove,
}

/// `wanted`: the config asks for the policy; `existing`: the database has it, and whether its age
/// matches the config. A matching job is kept as it is (id, schedule, an operator's tuning).
pub fn policy_change(wanted: bool, existing: Option<bool>) -> PolicyChange {
    match (wanted, existing) {
        (true, None) => PolicyChange::Add,
        (true, Some(false)) => PolicyChange::Replace,
        (false, Some(_)) => PolicyChange::Remove,
        (true, Some(true)) | (false, None) => PolicyChange::Keep,
    }
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
    fn statements_are_substituted() {
        let sql = |name: &str| statement(name, &settings()).trim().to_owned();
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
        assert!(sql("columnstore_settings")
            .contains("timescaledb.segmentby = 'channel_id, connection_id'"));
        assert!(sql("compression_settings_before_2_18")
            .contains("timescaledb.compress_segmentby = 'channel_id, connection_id'"));
        assert_eq!(
            sql("add_columnstore_policy"),
            "CALL add_columnstore_policy('rtc_stats', after => INTERVAL '7 days');"
        );
        assert_eq!(
            sql("add_retention_policy"),
            "SELECT add_retention_policy('rtc_stats', drop_after => INTERVAL '60 days');"
        );
        assert!(sql("existing_policies").contains("INTERVAL '7 days'"));
        assert!(sql("drop_expired_chunks").contains("INTERVAL '60 days'"));
        for name in [
            "extension",
            "hypertable",
            "chunk_interval",
            "columnstore_settings",
            "compression_settings_before_2_18",
            "existing_policies",
            "add_columnstore_policy",
            "remove_columnstore_policy",
            "add_compression_policy_before_2_18",
            "remove_compression_policy_before_2_18",
            "add_retention_policy",
            "remove_retention_policy",
            "drop_expired_chunks",
            "failed_jobs",
        ] {
            let sql = statement(name, &settings());
            assert!(!sql.trim().is_empty(), "{name} is in timescaledb.sql");
            assert!(!sql.contains('{'), "{name}: every placeholder substituted");
        }
        assert_eq!(statement("no such section", &settings()), "");
    }

    #[test]
    fn policies_change_only_when_the_config_does() {
        assert_eq!(policy_change(true, None), PolicyChange::Add);
        assert_eq!(policy_change(true, Some(true)), PolicyChange::Keep);
        assert_eq!(policy_change(true, Some(false)), PolicyChange::Replace);
        assert_eq!(policy_change(false, Some(true)), PolicyChange::Remove);
        assert_eq!(policy_change(false, Some(false)), PolicyChange::Remove);
        assert_eq!(policy_change(false, None), PolicyChange::Keep);
    }

    #[test]
    fn the_columnstore_api_is_used_from_2_18() {
        assert!(has_columnstore_api("2.28.3"));
        assert!(has_columnstore_api("2.18.0"));
        assert!(!has_columnstore_api("2.17.2"));
        assert!(!has_columnstore_api("2.14.0-dev"));
        assert!(has_columnstore_api("3.0.0"));
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
