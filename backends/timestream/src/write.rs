//! Sending records: WriteRecords calls, a bounded number at a time, and what Timestream's answers
//! mean for the pipeline (written, duplicate, rejected, retry).

use std::sync::atomic::Ordering;

use aws_sdk_timestreamwrite::error::{DisplayErrorContext, SdkError};
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{
    Dimension, DimensionValueType, MeasureValue, MeasureValueType, Record, TimeUnit,
};
use aws_sdk_timestreamwrite::Client;
use kohaku_sink::WriteReport;

use crate::mapping::{self, MeasureType, PlannedRequest};
use crate::TimestreamSink;

impl TimestreamSink {
    pub(crate) async fn send_numbered(
        &self,
        client: &Client,
        index: usize,
        request: &PlannedRequest,
    ) -> (usize, RequestOutcome) {
        (index, self.send(client, request).await)
    }

    pub(crate) async fn send(&self, client: &Client, request: &PlannedRequest) -> RequestOutcome {
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
pub(crate) fn to_sdk(
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
