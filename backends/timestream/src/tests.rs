use aws_sdk_timestreamwrite::config::http::HttpResponse;
use aws_sdk_timestreamwrite::error::{ConnectorError, SdkError};
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::error::{
    AccessDeniedException, InternalServerException, RejectedRecordsException, ThrottlingException,
    ValidationException,
};
use aws_sdk_timestreamwrite::types::RejectedRecord as SdkRejectedRecord;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use kohaku_sink::testkit::sample;

use super::*;
use crate::mapping::PlannedRequest;

fn service_error(err: WriteRecordsError, status: u16) -> SdkError<WriteRecordsError> {
    let status = StatusCode::try_from(status).expect("status");
    SdkError::service_error(err, HttpResponse::new(status, SdkBody::empty()))
}

#[test]
fn an_endpoint_turns_discovery_off() {
    let mut options = Config::new("kohaku", "rtc_stats");
    assert_eq!(options.endpoint_mode(), EndpointMode::Discovery);
    options.endpoint_url = Some("http://127.0.0.1:5000".into());
    assert_eq!(
        options.endpoint_mode(),
        EndpointMode::Fixed("http://127.0.0.1:5000".into())
    );
}

#[test]
fn settings_are_validated_naming_the_key() {
    type Change = fn(&mut Config);
    let cases: Vec<(Change, &str)> = vec![
        (|o| o.database = "ab".into(), "database \"ab\""),
        (|o| o.table = "has space".into(), "table \"has space\""),
        (
            |o| o.max_records_per_write = 101,
            "max_records_per_write is 101",
        ),
        (
            |o| o.max_records_per_write = 0,
            "max_records_per_write is 0",
        ),
        (|o| o.max_concurrent_writes = 0, "max_concurrent_writes"),
        (
            |o| o.memory_store_retention_hours = 0,
            "memory_store_retention_hours is 0",
        ),
        (
            |o| o.magnetic_store_retention_days = 73001,
            "magnetic_store_retention_days is 73001",
        ),
        (
            |o| o.endpoint_url = Some("127.0.0.1:5000".into()),
            "endpoint_url",
        ),
        (|o| o.region = Some(String::new()), "region is empty"),
    ];
    for (change, expected) in cases {
        let mut options = Config::new("kohaku", "rtc_stats");
        options.validate().expect("defaults are valid");
        change(&mut options);
        let err = TimestreamSink::connect(options).err().expect(expected);
        assert!(!err.is_transient());
        assert!(err.to_string().contains(expected), "{err} lacks {expected}");
    }
}

#[test]
fn write_errors_are_classified() {
    let rejected = RejectedRecordsException::builder()
        .message("some records were rejected")
        .rejected_records(
            SdkRejectedRecord::builder()
                .record_index(2)
                .reason("The record timestamp is outside the time range")
                .build(),
        )
        .rejected_records(
            SdkRejectedRecord::builder()
                .record_index(0)
                .reason("A record with the same dimensions exists")
                .existing_version(1)
                .build(),
        )
        .build();
    assert_eq!(
        classify_write_error(service_error(
            WriteRecordsError::RejectedRecordsException(rejected),
            419
        )),
        RequestOutcome::PartlyRejected(vec![
            RejectedRecord {
                index: 2,
                reason: "The record timestamp is outside the time range".into(),
                existing_version: None,
            },
            RejectedRecord {
                index: 0,
                reason: "A record with the same dimensions exists".into(),
                existing_version: Some(1),
            },
        ])
    );

    let transient = [
        service_error(
            WriteRecordsError::ThrottlingException(
                ThrottlingException::builder()
                    .message("slow down")
                    .build()
                    .unwrap(),
            ),
            429,
        ),
        service_error(
            WriteRecordsError::InternalServerException(
                InternalServerException::builder()
                    .message("oops")
                    .build()
                    .unwrap(),
            ),
            500,
        ),
        // Fixing IAM makes the same write succeed: keep the data and retry.
        service_error(
            WriteRecordsError::AccessDeniedException(
                AccessDeniedException::builder()
                    .message("no")
                    .build()
                    .unwrap(),
            ),
            403,
        ),
        SdkError::timeout_error("attempt timed out"),
        // What a missing or expired credential looks like: the request is never sent.
        SdkError::construction_failure("failed to load credentials"),
        SdkError::dispatch_failure(ConnectorError::io("connection refused".into())),
    ];
    for err in transient {
        let outcome = classify_write_error(err);
        assert!(
            matches!(outcome, RequestOutcome::Failed(_)),
            "{outcome:?} should be retried"
        );
    }

    let invalid = service_error(
        WriteRecordsError::ValidationException(
            ValidationException::builder()
                .message("Invalid time")
                .build()
                .unwrap(),
        ),
        400,
    );
    match classify_write_error(invalid) {
        RequestOutcome::Refused(message) => assert!(message.contains("Invalid time"), "{message}"),
        other => panic!("a validation error is not retried: {other:?}"),
    }
}

fn request_of(objects: usize) -> PlannedRequest {
    let report = sample::report(sample::connection(11), 1.0e12, objects);
    let mut requests = mapping::split(mapping::plan(&sample::batch([report])), 100);
    assert_eq!(requests.len(), 1);
    requests.remove(0)
}

#[test]
fn rejected_records_are_reported_and_the_rest_counted_written() {
    // Record 0 is the connection record, 1..=5 the objects.
    let request = request_of(5);
    let mut report = WriteReport::default();
    let counts = tally(
        &request,
        RequestOutcome::PartlyRejected(vec![
            RejectedRecord {
                index: 2,
                reason: "Measure value too large".into(),
                existing_version: None,
            },
            RejectedRecord {
                index: 4,
                reason: "same key, other values".into(),
                existing_version: Some(1),
            },
            RejectedRecord {
                index: 0,
                reason: "connection record refused".into(),
                existing_version: None,
            },
            // Indexes beyond the request and repeats change nothing.
            RejectedRecord {
                index: 99,
                reason: "nonsense".into(),
                existing_version: None,
            },
            RejectedRecord {
                index: 2,
                reason: "again".into(),
                existing_version: None,
            },
        ]),
        &mut report,
    );
    assert_eq!(report.written, 3);
    assert_eq!(
        report.duplicates, 1,
        "a version conflict means already stored"
    );
    assert_eq!(report.rejected.len(), 1);
    let rejected = &report.rejected[0];
    let mapping::Origin::Stats { rtc_id, .. } = &request.records[2].origin else {
        panic!("record 2 is a stats record");
    };
    assert_eq!(&rejected.rtc_id, rtc_id);
    assert_eq!(rejected.reason, "Timestream: Measure value too large");
    assert_eq!(
        counts,
        TallyCounts {
            rejected_by_timestream: 2,
            version_conflicts: 1,
            failure: None,
        }
    );
}

#[test]
fn a_refused_request_rejects_its_rows_and_a_failed_one_asks_for_a_retry() {
    let request = request_of(4);
    let mut report = WriteReport::default();
    tally(
        &request,
        RequestOutcome::Refused("Invalid time".into()),
        &mut report,
    );
    assert_eq!(report.written, 0);
    assert_eq!(report.rejected.len(), 4);
    assert!(report.rejected[0].reason.contains("Invalid time"));

    let mut report = WriteReport::default();
    let counts = tally(
        &request,
        RequestOutcome::Failed("throttled".into()),
        &mut report,
    );
    assert_eq!(counts.failure.as_deref(), Some("throttled"));
    assert_eq!(report, WriteReport::default());

    let mut report = WriteReport::default();
    tally(&request, RequestOutcome::Written, &mut report);
    assert_eq!(report.written, 4, "the connection record is not a row");
}
