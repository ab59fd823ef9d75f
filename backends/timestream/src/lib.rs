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

use async_trait::async_trait;
use aws_sdk_timestreamwrite::error::DisplayErrorContext;
use aws_sdk_timestreamwrite::Client;
use futures_util::stream::{self, StreamExt};
use kohaku_sink::{SinkCounter, SinkError, StatsBatch, StatsSink, WriteReport};
use tokio::sync::OnceCell;

mod admin;
mod config;
pub mod mapping;
pub use config::{Config, EndpointMode};
mod write;
pub use write::{classify_write_error, tally, RejectedRecord, RequestOutcome, TallyCounts};
/// Test support shared by this crate's tests and Kohaku's end-to-end tests, behind the `testkit`
/// feature so that nothing test-only is in a release build.
#[cfg(feature = "testkit")]
pub mod testkit;

#[derive(Default)]
struct Counters {
    write_requests: AtomicU64,
    refused_before_send: AtomicU64,
    rejected_by_timestream: AtomicU64,
    version_conflicts: AtomicU64,
    values_omitted: AtomicU64,
}

pub struct TimestreamSink {
    options: Config,
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
    pub fn connect(options: Config) -> Result<Self, SinkError> {
        Self::build(options, None)
    }

    /// As [`connect`](Self::connect), with this SDK configuration instead of the AWS chain.
    pub fn with_sdk_config(
        options: Config,
        config: aws_config::SdkConfig,
    ) -> Result<Self, SinkError> {
        Self::build(options, Some(config))
    }

    fn build(
        options: Config,
        base_config: Option<aws_config::SdkConfig>,
    ) -> Result<Self, SinkError> {
        options
            .validate()
            .map_err(|invalid| SinkError::classified(false, invalid.to_string()))?;
        Ok(Self {
            options,
            base_config,
            client: OnceCell::new(),
            discovery_task: Mutex::new(None),
            counters: Counters::default(),
        })
    }

    pub fn options(&self) -> &Config {
        &self.options
    }

    async fn client(&self) -> Result<&Client, SinkError> {
        self.client.get_or_try_init(|| self.make_client()).await
    }
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
