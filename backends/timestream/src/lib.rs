//! Amazon Timestream for LiveAnalytics backend for Kohaku.
//!
//! Every stats object becomes one MULTI-measure record (see `schemas/timestream.md` and
//! [`mapping`]); each report adds one `sora_connection` record with the connection's metadata.
//! Records are sent in WriteRecords calls of at most 100, a bounded number at a time.
//!
//! Timestream is idempotent by nature: a record identical to a stored one (same dimensions, time,
//! measure name and values) is accepted and changes nothing, which is what makes the pipeline's
//! retries safe. A record with the same key but other values is refused with the stored record's
//! version; Kohaku counts it as a duplicate (the first write wins, as in the SQL backends).
//!
//! Credentials come from the standard AWS chain (environment, profile, web identity, ECS, IMDS),
//! never from Kohaku's configuration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_timestreamwrite::config::timeout::TimeoutConfig;
use aws_sdk_timestreamwrite::config::{BehaviorVersion, Region};
use aws_sdk_timestreamwrite::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{
    Dimension, DimensionValueType, MagneticStoreWriteProperties, MeasureValue, MeasureValueType,
    Record, RetentionProperties, TimeUnit,
};
use aws_sdk_timestreamwrite::Client;
use futures_util::stream::{self, StreamExt};
use kohaku_sink::{SinkCounter, SinkError, StatsBatch, StatsSink, WriteReport};
use tokio::sync::OnceCell;

pub mod mapping;
/// Test support shared by this crate's tests and Kohaku's end-to-end tests, behind the `testkit`
/// feature so that nothing test-only is in a release build.
#[cfg(feature = "testkit")]
pub mod testkit;

use mapping::{MeasureType, PlannedRequest};

/// Everything the sink needs; `[sinks.timestream]` maps onto it.
#[derive(Debug, Clone)]
pub struct TimestreamOptions {
    /// `None`: the region the AWS chain finds (`AWS_REGION`, the profile, IMDS).
    pub region: Option<String>,
    pub database: String,
    pub table: String,
    /// Set: every request goes there and endpoint discovery is off. Unset: Timestream's endpoint
    /// discovery picks the cell endpoint and a background task keeps it fresh.
    pub endpoint_url: Option<String>,
    /// `migrate` creates the database and the table when they do not exist, and keeps the table's
    /// retention equal to the settings below.
    pub create_if_missing: bool,
    pub memory_store_retention_hours: u32,
    pub magnetic_store_retention_days: u32,
    pub max_records_per_write: usize,
    pub max_concurrent_writes: usize,
    /// Per attempt; the SDK retries an attempt that timed out.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl TimestreamOptions {
    pub fn new(database: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            region: None,
            database: database.into(),
            table: table.into(),
            endpoint_url: None,
            create_if_missing: false,
            memory_store_retention_hours: 24,
            magnetic_store_retention_days: 365,
            max_records_per_write: mapping::limits::RECORDS_PER_WRITE,
            max_concurrent_writes: 4,
            request_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Checks the settings without contacting anything.
    pub fn validate(&self) -> Result<(), SinkError> {
        let invalid = |message: String| SinkError::classified(false, message);
        for (key, name) in [("database", &self.database), ("table", &self.table)] {
            let valid_chars = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !(3..=256).contains(&name.len()) || !valid_chars {
                return Err(invalid(format!(
                    "{key} {name:?}: Timestream names are 3 to 256 characters of a-z, A-Z, 0-9, '_', '-' and '.'"
                )));
            }
        }
        if !(1..=mapping::limits::RECORDS_PER_WRITE).contains(&self.max_records_per_write) {
            return Err(invalid(format!(
                "max_records_per_write is {}; Timestream takes 1 to {} records per WriteRecords",
                self.max_records_per_write,
                mapping::limits::RECORDS_PER_WRITE
            )));
        }
        if self.max_concurrent_writes == 0 {
            return Err(invalid("max_concurrent_writes must be at least 1".into()));
        }
        if !(1..=8766).contains(&self.memory_store_retention_hours) {
            return Err(invalid(format!(
                "memory_store_retention_hours is {}; Timestream allows 1 to 8766",
                self.memory_store_retention_hours
            )));
        }
        if !(1..=73000).contains(&self.magnetic_store_retention_days) {
            return Err(invalid(format!(
                "magnetic_store_retention_days is {}; Timestream allows 1 to 73000",
                self.magnetic_store_retention_days
            )));
        }
        if let Some(url) = &self.endpoint_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(format!(
                    "endpoint_url {url:?} must start with https:// (or http:// for an emulator)"
                )));
            }
        }
        if self.region.as_deref() == Some("") {
            return Err(invalid(
                "region is empty; remove it to use the AWS chain's region".into(),
            ));
        }
        Ok(())
    }

    pub fn endpoint_mode(&self) -> EndpointMode {
        match &self.endpoint_url {
            Some(url) => EndpointMode::Fixed(url.clone()),
            None => EndpointMode::Discovery,
        }
    }
}

/// How the client finds Timestream. Discovery with a fixed endpoint would replace that endpoint
/// with the cell address Timestream returns, so the two never mix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointMode {
    Fixed(String),
    Discovery,
}

#[derive(Default)]
struct Counters {
    write_requests: AtomicU64,
    refused_before_send: AtomicU64,
    rejected_by_timestream: AtomicU64,
    version_conflicts: AtomicU64,
    values_omitted: AtomicU64,
}

pub struct TimestreamSink {
    options: TimestreamOptions,
    /// Replaces the AWS chain (region, credentials) when set: tests point it at an emulator.
    base_config: Option<aws_config::SdkConfig>,
    /// Loading credentials and discovering the endpoint are network calls, so they happen on
    /// first use rather than when the sink is built.
    client: OnceCell<Client>,
    discovery_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    counters: Counters,
}

impl TimestreamSink {
    /// Builds the sink; nothing is contacted until the first call.
    pub fn connect(options: TimestreamOptions) -> Result<Self, SinkError> {
        Self::build(options, None)
    }

    /// As [`connect`](Self::connect), with this SDK configuration instead of the AWS chain.
    pub fn with_sdk_config(
        options: TimestreamOptions,
        config: aws_config::SdkConfig,
    ) -> Result<Self, SinkError> {
        Self::build(options, Some(config))
    }

    fn build(
        options: TimestreamOptions,
        base_config: Option<aws_config::SdkConfig>,
    ) -> Result<Self, SinkError> {
        options.validate()?;
        Ok(Self {
            options,
            base_config,
            client: OnceCell::new(),
            discovery_task: Mutex::new(None),
            counters: Counters::default(),
        })
    }

    pub fn options(&self) -> &TimestreamOptions {
        &self.options
    }

    async fn client(&self) -> Result<&Client, SinkError> {
        self.client.get_or_try_init(|| self.make_client()).await
    }

    async fn make_client(&self) -> Result<Client, SinkError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(self.options.connect_timeout)
            .operation_attempt_timeout(self.options.request_timeout)
            .build();
        let sdk_config = match &self.base_config {
            Some(config) => config.clone(),
            None => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest());
                if let Some(region) = &self.options.region {
                    loader = loader.region(Region::new(region.clone()));
                }
                loader.load().await
            }
        };
        let mut builder =
            aws_sdk_timestreamwrite::config::Builder::from(&sdk_config).timeout_config(timeouts);
        if let Some(region) = &self.options.region {
            builder = builder.region(Region::new(region.clone()));
        } else if sdk_config.region().is_none() {
            return Err(SinkError::classified(
                false,
                "no AWS region: set region in [sinks.timestream] or AWS_REGION",
            ));
        }
        match self.options.endpoint_mode() {
            EndpointMode::Fixed(url) => {
                tracing::info!(endpoint = %url, "timestream endpoint fixed; endpoint discovery off");
                Ok(Client::from_conf(builder.endpoint_url(url).build()))
            }
            EndpointMode::Discovery => {
                let (client, reloader) = Client::from_conf(builder.build())
                    .with_endpoint_discovery_enabled()
                    .await
                    .map_err(|err| {
                        SinkError::transient("timestream endpoint discovery failed", err)
                    })?;
                let task = tokio::spawn(reloader.reload_task());
                if let Ok(mut slot) = self.discovery_task.lock() {
                    *slot = Some(task);
                }
                Ok(client)
            }
        }
    }

    /// `database.table`, for messages.
    fn table_path(&self) -> String {
        format!("{}.{}", self.options.database, self.options.table)
    }

    async fn ensure_database(&self, client: &Client) -> Result<(), SinkError> {
        let database = &self.options.database;
        let found = client
            .describe_database()
            .database_name(database)
            .send()
            .await;
        match found {
            Ok(_) => Ok(()),
            Err(err) if is_not_found(&err) => {
                if !self.options.create_if_missing {
                    return Err(missing(format!("Timestream database {database:?}")));
                }
                match client
                    .create_database()
                    .database_name(database)
                    .send()
                    .await
                {
                    Ok(_) => {
                        tracing::info!(database = %database, "timestream database created");
                        Ok(())
                    }
                    // Another Kohaku created it meanwhile.
                    Err(err) if err.code() == Some("ConflictException") => Ok(()),
                    Err(err) => Err(admin_error(
                        format!("cannot create Timestream database {database:?}"),
                        err,
                    )),
                }
            }
            Err(err) => Err(admin_error(
                format!("cannot describe Timestream database {database:?}"),
                err,
            )),
        }
    }

    fn retention(&self) -> Result<RetentionProperties, SinkError> {
        RetentionProperties::builder()
            .memory_store_retention_period_in_hours(i64::from(
                self.options.memory_store_retention_hours,
            ))
            .magnetic_store_retention_period_in_days(i64::from(
                self.options.magnetic_store_retention_days,
            ))
            .build()
            .map_err(|err| SinkError::permanent("retention settings", err))
    }

    async fn ensure_table(&self, client: &Client) -> Result<(), SinkError> {
        let path = self.table_path();
        let found = client
            .describe_table()
            .database_name(&self.options.database)
            .table_name(&self.options.table)
            .send()
            .await;
        match found {
            Ok(described) => {
                if !self.options.create_if_missing {
                    return Ok(());
                }
                let wanted = self.retention()?;
                let current = described.table().and_then(|t| t.retention_properties());
                if current != Some(&wanted) {
                    client
                        .update_table()
                        .database_name(&self.options.database)
                        .table_name(&self.options.table)
                        .retention_properties(wanted)
                        .send()
                        .await
                        .map_err(|err| {
                            admin_error(format!("cannot update the retention of {path}"), err)
                        })?;
                    tracing::info!(table = %path, "timestream table retention updated");
                }
                Ok(())
            }
            Err(err) if is_not_found(&err) => {
                if !self.options.create_if_missing {
                    return Err(missing(format!("Timestream table {path}")));
                }
                // Late reports (a restarted Kohaku replaying its spool, `kohaku import` of an
                // old log) are older than the memory store keeps: they go to the magnetic store.
                let magnetic = MagneticStoreWriteProperties::builder()
                    .enable_magnetic_store_writes(true)
                    .build()
                    .map_err(|err| SinkError::permanent("magnetic store settings", err))?;
                let created = client
                    .create_table()
                    .database_name(&self.options.database)
                    .table_name(&self.options.table)
                    .retention_properties(self.retention()?)
                    .magnetic_store_write_properties(magnetic)
                    .send()
                    .await;
                match created {
                    Ok(_) => {
                        tracing::info!(table = %path, "timestream table created");
                        Ok(())
                    }
                    Err(err) if err.code() == Some("ConflictException") => Ok(()),
                    Err(err) => Err(admin_error(format!("cannot create table {path}"), err)),
                }
            }
            Err(err) => Err(admin_error(format!("cannot describe table {path}"), err)),
        }
    }

    async fn send_numbered(
        &self,
        client: &Client,
        index: usize,
        request: &PlannedRequest,
    ) -> (usize, RequestOutcome) {
        (index, self.send(client, request).await)
    }

    async fn send(&self, client: &Client, request: &PlannedRequest) -> RequestOutcome {
        let (common, records) = match to_sdk(request) {
            Ok(built) => built,
            Err(err) => {
                return RequestOutcome::Refused(format!("cannot build the request: {err}"));
            }
        };
        self.counters.write_requests.fetch_add(1, Ordering::Relaxed);
        let sent = client
            .write_records()
            .database_name(&self.options.database)
            .table_name(&self.options.table)
            .common_attributes(common)
            .set_records(Some(records))
            .send()
            .await;
        match sent {
            Ok(_) => RequestOutcome::Written,
            Err(err) => classify_write_error(err),
        }
    }
}

/// What became of one WriteRecords call.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestOutcome {
    Written,
    /// Timestream stored every record but these (RejectedRecordsException).
    PartlyRejected(Vec<RejectedRecord>),
    /// Timestream refused the whole request as invalid: retrying it cannot help.
    Refused(String),
    /// Throttled, unavailable, unreachable, timed out, not authorised: the same request may
    /// succeed later.
    Failed(String),
}

/// One entry of a RejectedRecordsException.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedRecord {
    pub index: usize,
    pub reason: String,
    /// Present when a record with the same key but other values is already stored.
    pub existing_version: Option<i64>,
}

/// Which errors are worth retrying. When in doubt the answer is yes: a stalled sink shows in
/// `/health` and the metrics and loses nothing, a dropped batch is gone. Only a request Timestream
/// calls invalid is not retried.
pub fn classify_write_error(err: SdkError<WriteRecordsError>) -> RequestOutcome {
    let status = err
        .raw_response()
        .map(|response| response.status().as_u16());
    let message = DisplayErrorContext(&err).to_string();
    match err {
        SdkError::ServiceError(service) => match service.into_err() {
            WriteRecordsError::RejectedRecordsException(rejected) => {
                RequestOutcome::PartlyRejected(
                    rejected
                        .rejected_records()
                        .iter()
                        .map(|record| RejectedRecord {
                            index: usize::try_from(record.record_index()).unwrap_or(usize::MAX),
                            reason: record.reason().unwrap_or("no reason given").to_owned(),
                            existing_version: record.existing_version(),
                        })
                        .collect(),
                )
            }
            WriteRecordsError::ValidationException(_) => RequestOutcome::Refused(message),
            WriteRecordsError::ThrottlingException(_)
            | WriteRecordsError::InternalServerException(_)
            | WriteRecordsError::InvalidEndpointException(_)
            | WriteRecordsError::AccessDeniedException(_)
            | WriteRecordsError::ResourceNotFoundException(_) => RequestOutcome::Failed(message),
            // Codes the model does not list (expired or invalid credentials, 5xx from a proxy):
            // a 400 that is not a validation error is still about the caller's setup, not data.
            _ => match status {
                Some(413) => RequestOutcome::Refused(message),
                _ => RequestOutcome::Failed(message),
            },
        },
        // Also where credentials could not be loaded or refreshed: not the data's fault.
        _ => RequestOutcome::Failed(message),
    }
}

/// Adds one request's fate to the batch's report; the counts feed the sink's counters, and a
/// failure worth retrying comes back in `TallyCounts::failure`.
pub fn tally(
    request: &PlannedRequest,
    outcome: RequestOutcome,
    report: &mut WriteReport,
) -> TallyCounts {
    let stats_records = request
        .records
        .iter()
        .filter(|record| record.origin.is_stats())
        .count() as u64;
    let mut counts = TallyCounts::default();
    match outcome {
        RequestOutcome::Written => report.written += stats_records,
        RequestOutcome::PartlyRejected(rejected) => {
            let mut not_written = std::collections::HashSet::new();
            for entry in rejected {
                let Some(record) = request.records.get(entry.index) else {
                    continue;
                };
                if !not_written.insert(entry.index) {
                    continue;
                }
                if entry.existing_version.is_some() {
                    counts.version_conflicts += 1;
                    if record.origin.is_stats() {
                        report.duplicates += 1;
                    }
                } else {
                    counts.rejected_by_timestream += 1;
                    match record
                        .origin
                        .rejected(format!("Timestream: {}", entry.reason))
                    {
                        Some(row) => report.rejected.push(row),
                        None => tracing::warn!(
                            reason = %entry.reason,
                            "Timestream rejected a sora_connection record"
                        ),
                    }
                }
            }
            let stats_not_written = not_written
                .iter()
                .filter(|index| request.records[**index].origin.is_stats())
                .count() as u64;
            report.written += stats_records - stats_not_written;
        }
        RequestOutcome::Refused(reason) => {
            counts.rejected_by_timestream += request.records.len() as u64;
            report
                .rejected
                .extend(request.records.iter().filter_map(|record| {
                    record
                        .origin
                        .rejected(format!("Timestream refused the request: {reason}"))
                }));
        }
        RequestOutcome::Failed(message) => counts.failure = Some(message),
    }
    counts
}

#[derive(Debug, Default, PartialEq)]
pub struct TallyCounts {
    pub rejected_by_timestream: u64,
    pub version_conflicts: u64,
    pub failure: Option<String>,
}

/// The SDK's form of a planned request: (common attributes, records).
fn to_sdk(
    request: &PlannedRequest,
) -> Result<(Record, Vec<Record>), aws_sdk_timestreamwrite::error::BuildError> {
    let dimensions = |dimensions: &[mapping::Dimension]| {
        dimensions
            .iter()
            .map(|dimension| {
                Dimension::builder()
                    .name(dimension.name)
                    .value(&dimension.value)
                    .dimension_value_type(DimensionValueType::Varchar)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let common = Record::builder()
        .set_dimensions(
            Some(dimensions(&request.common_dimensions)?).filter(|dims| !dims.is_empty()),
        )
        .time_unit(TimeUnit::Microseconds)
        .build();
    let records = request
        .records
        .iter()
        .map(|record| {
            let measures = record
                .measures
                .iter()
                .map(|measure| {
                    MeasureValue::builder()
                        .name(&measure.name)
                        .value(&measure.value)
                        .r#type(match measure.kind {
                            MeasureType::Double => MeasureValueType::Double,
                            MeasureType::Bigint => MeasureValueType::Bigint,
                            MeasureType::Varchar => MeasureValueType::Varchar,
                            MeasureType::Boolean => MeasureValueType::Boolean,
                        })
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, aws_sdk_timestreamwrite::error::BuildError>(
                Record::builder()
                    .set_dimensions(
                        Some(dimensions(&record.dimensions)?).filter(|dims| !dims.is_empty()),
                    )
                    .measure_name(&record.measure_name)
                    .measure_value_type(MeasureValueType::Multi)
                    .set_measure_values(Some(measures))
                    .time(record.time_us.to_string())
                    .build(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((common, records))
}

fn is_not_found<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    err.code() == Some("ResourceNotFoundException")
}

/// Errors of describe/create/update calls: unreachable or throttled is worth a retry, anything
/// Timestream answered otherwise is not.
fn admin_error<E>(context: String, err: SdkError<E>) -> SinkError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &err {
        SdkError::ServiceError(_) => {
            matches!(
                err.code(),
                Some("ThrottlingException" | "InternalServerException")
            ) || err
                .raw_response()
                .is_some_and(|response| response.status().is_server_error())
        }
        SdkError::ConstructionFailure(_) => false,
        _ => true,
    };
    SinkError::classified(
        transient,
        format!("{context}: {}", DisplayErrorContext(&err)),
    )
}

/// The database or table is not there and Kohaku was not asked to create it.
fn missing(what: String) -> SinkError {
    SinkError::classified(
        false,
        format!("{what} does not exist; create it, or set create_if_missing = true in [sinks.timestream]"),
    )
}

#[async_trait]
impl StatsSink for TimestreamSink {
    fn name(&self) -> &str {
        "timestream"
    }

    async fn migrate(&self) -> Result<(), SinkError> {
        let client = self.client().await?;
        self.ensure_database(client).await?;
        self.ensure_table(client).await
    }

    async fn write(&self, batch: &StatsBatch) -> Result<WriteReport, SinkError> {
        if batch.row_count() == 0 {
            return Ok(WriteReport::default());
        }
        let mut plan = mapping::plan(batch);
        let refused = plan.refused.len() as u64;
        let mut report = WriteReport {
            rejected: std::mem::take(&mut plan.refused),
            duplicates: plan.duplicates,
            ..WriteReport::default()
        };
        let omitted = plan.omitted_values;
        let requests = mapping::split(plan, self.options.max_records_per_write);
        let client = self.client().await?;
        // Collected first: a lazy iterator of borrowing futures trips the compiler's Send
        // inference inside async_trait.
        let sends: Vec<_> = requests
            .iter()
            .enumerate()
            .map(|(index, request)| self.send_numbered(client, index, request))
            .collect();
        let outcomes: Vec<(usize, RequestOutcome)> = stream::iter(sends)
            .buffer_unordered(self.options.max_concurrent_writes)
            .collect()
            .await;
        let mut failure = None;
        let mut rejected_by_timestream = 0;
        let mut version_conflicts = 0;
        for (index, outcome) in outcomes {
            let counts = tally(&requests[index], outcome, &mut report);
            rejected_by_timestream += counts.rejected_by_timestream;
            version_conflicts += counts.version_conflicts;
            failure = failure.or(counts.failure);
        }
        if let Some(message) = failure {
            // The requests that succeeded are stored; the retry rewrites them unchanged, which
            // Timestream accepts as a no-op.
            return Err(SinkError::classified(
                true,
                format!("write to {}: {message}", self.table_path()),
            ));
        }
        let counters = &self.counters;
        counters
            .refused_before_send
            .fetch_add(refused, Ordering::Relaxed);
        counters
            .rejected_by_timestream
            .fetch_add(rejected_by_timestream, Ordering::Relaxed);
        counters
            .version_conflicts
            .fetch_add(version_conflicts, Ordering::Relaxed);
        counters
            .values_omitted
            .fetch_add(omitted, Ordering::Relaxed);
        Ok(report)
    }

    async fn health(&self) -> Result<(), SinkError> {
        let client = self.client().await?;
        client
            .describe_table()
            .database_name(&self.options.database)
            .table_name(&self.options.table)
            .send()
            .await
            .map(|_| ())
            .map_err(|err| {
                SinkError::classified(
                    true,
                    format!(
                        "cannot describe {}: {}",
                        self.table_path(),
                        DisplayErrorContext(&err)
                    ),
                )
            })
    }

    async fn close(&self) -> Result<(), SinkError> {
        if let Ok(mut slot) = self.discovery_task.lock() {
            if let Some(task) = slot.take() {
                task.abort();
            }
        }
        Ok(())
    }

    fn counters(&self) -> Vec<SinkCounter> {
        let counters = &self.counters;
        vec![
            SinkCounter {
                name: "write_requests",
                help: "WriteRecords calls sent to Timestream",
                value: counters.write_requests.load(Ordering::Relaxed),
            },
            SinkCounter {
                name: "records_refused_before_send",
                help: "Stats objects not sent because they break a Timestream limit (listed as rejected rows)",
                value: counters.refused_before_send.load(Ordering::Relaxed),
            },
            SinkCounter {
                name: "records_rejected_by_timestream",
                help: "Records Timestream rejected, other than version conflicts",
                value: counters.rejected_by_timestream.load(Ordering::Relaxed),
            },
            SinkCounter {
                name: "version_conflicts",
                help: "Records Timestream already held with other values (counted as duplicates)",
                value: counters.version_conflicts.load(Ordering::Relaxed),
            },
            SinkCounter {
                name: "values_omitted",
                help: "null members and empty strings, stored as absent measures",
                value: counters.values_omitted.load(Ordering::Relaxed),
            },
        ]
    }
}

#[cfg(test)]
mod tests;
