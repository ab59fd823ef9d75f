//! `[sinks.timestream]`: the settings, their defaults and their checks, in one place.

use std::time::Duration;

use kohaku_sink::{InvalidSetting, SinkError};
use serde::{Deserialize, Serialize};

use crate::{mapping, TimestreamSink};

/// Amazon Timestream for LiveAnalytics. Credentials come from the standard AWS chain
/// (environment, profile, web identity, container or instance role), never from this file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unset: the region the AWS chain finds (`AWS_REGION`, the profile, instance metadata).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub database: String,
    pub table: String,
    /// Unset: Timestream's endpoint discovery, which picks the cell endpoint and a background
    /// task keeps fresh. Set (a VPC endpoint, an emulator): every request goes there, discovery
    /// off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// `kohaku migrate` (and start-up) create the database and table when missing and keep the
    /// table's retention equal to the two settings below.
    pub create_if_missing: bool,
    pub memory_store_retention_hours: u32,
    pub magnetic_store_retention_days: u32,
    /// Records per WriteRecords call, at most Timestream's 100.
    pub max_records_per_write: usize,
    /// WriteRecords calls in flight at once.
    pub max_concurrent_writes: usize,
    /// Seconds one attempt of a call may take before the SDK retries it.
    pub request_timeout_secs: u64,
    /// Not a setting: tests shorten it.
    #[serde(skip, default = "default_connect_timeout")]
    pub connect_timeout: Duration,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            region: None,
            database: "kohaku".to_owned(),
            table: "rtc_stats".to_owned(),
            endpoint_url: None,
            create_if_missing: false,
            memory_store_retention_hours: 24,
            magnetic_store_retention_days: 365,
            max_records_per_write: mapping::limits::RECORDS_PER_WRITE,
            max_concurrent_writes: 4,
            request_timeout_secs: 20,
            connect_timeout: default_connect_timeout(),
        }
    }
}

impl Config {
    /// `database.table`, every other setting at its default.
    pub fn new(database: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            database: database.into(),
            table: table.into(),
            ..Self::default()
        }
    }

    /// Checks the settings without contacting anything.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        for (key, name) in [("database", &self.database), ("table", &self.table)] {
            let valid_chars = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !(3..=256).contains(&name.len()) || !valid_chars {
                return Err(InvalidSetting::new(
                    key,
                    format!(
                        "{key} {name:?}: Timestream names are 3 to 256 characters of a-z, A-Z, 0-9, '_', '-' and '.'"
                    ),
                ));
            }
        }
        if !(1..=mapping::limits::RECORDS_PER_WRITE).contains(&self.max_records_per_write) {
            return Err(InvalidSetting::new(
                "max_records_per_write",
                format!(
                    "max_records_per_write is {}; Timestream takes 1 to {} records per WriteRecords",
                    self.max_records_per_write,
                    mapping::limits::RECORDS_PER_WRITE
                ),
            ));
        }
        if self.max_concurrent_writes == 0 {
            return Err(InvalidSetting::new(
                "max_concurrent_writes",
                "max_concurrent_writes must be at least 1",
            ));
        }
        if !(1..=8766).contains(&self.memory_store_retention_hours) {
            return Err(InvalidSetting::new(
                "memory_store_retention_hours",
                format!(
                    "memory_store_retention_hours is {}; Timestream allows 1 to 8766",
                    self.memory_store_retention_hours
                ),
            ));
        }
        if !(1..=73000).contains(&self.magnetic_store_retention_days) {
            return Err(InvalidSetting::new(
                "magnetic_store_retention_days",
                format!(
                    "magnetic_store_retention_days is {}; Timestream allows 1 to 73000",
                    self.magnetic_store_retention_days
                ),
            ));
        }
        if let Some(url) = &self.endpoint_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(InvalidSetting::new(
                    "endpoint_url",
                    format!(
                        "endpoint_url {url:?} must start with https:// (or http:// for an emulator)"
                    ),
                ));
            }
        }
        if self.region.as_deref() == Some("") {
            return Err(InvalidSetting::new(
                "region",
                "region is empty; remove it to use the AWS chain's region",
            ));
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn endpoint_mode(&self) -> EndpointMode {
        match &self.endpoint_url {
            Some(url) => EndpointMode::Fixed(url.clone()),
            None => EndpointMode::Discovery,
        }
    }

    /// Prepares the sink with the AWS chain's credentials; nothing is contacted until `migrate`.
    pub fn build(&self) -> Result<TimestreamSink, SinkError> {
        let sink = TimestreamSink::connect(self.clone())?;
        tracing::info!(
            database = %self.database,
            table = %self.table,
            region = self.region.as_deref().unwrap_or("(from the AWS chain)"),
            endpoint = self.endpoint_url.as_deref().unwrap_or("(endpoint discovery)"),
            "timestream sink prepared"
        );
        Ok(sink)
    }
}

/// How the client finds Timestream. Discovery with a fixed endpoint would replace that endpoint
/// with the cell address Timestream returns, so the two never mix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointMode {
    Fixed(String),
    Discovery,
}
