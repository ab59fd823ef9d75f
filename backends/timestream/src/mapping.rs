//! Stats objects → Timestream records, without the SDK: what `schemas/timestream.md` documents.
//!
//! Kept apart from the network code so that the mapping, Timestream's limits and the splitting into
//! requests can be tested exactly; the emulator the integration tests use enforces none of them.

use std::collections::HashSet;

use kohaku_sink::{RejectedRow, Report, StatsBatch, StatsObject};
use serde_json::Value;

/// Timestream's service limits (developer guide, "Quotas"), enforced before sending so that a
/// record Timestream would refuse is reported with a precise reason instead of a vague one.
pub mod limits {
    pub const RECORDS_PER_WRITE: usize = 100;
    pub const MEASURES_PER_RECORD: usize = 256;
    pub const MEASURE_NAME_BYTES: usize = 256;
    pub const DIMENSION_NAME_BYTES: usize = 60;
    /// Of one measure value, and of one dimension value.
    pub const VALUE_BYTES: usize = 2048;
    /// Every dimension name and value of one series together.
    pub const DIMENSIONS_BYTES: usize = 2048;
    /// Names and values of the dimensions, the measure name, the measures, plus 8 bytes of time.
    pub const RECORD_BYTES: usize = 2048;
}

/// Joins the keys of nested objects: `{"qualityLimitationDurations":{"cpu":0}}` becomes the
/// measure `qualityLimitationDurations.cpu`. `.` never occurs in W3C member names and Timestream
/// allows it in measure names (it forbids `:`).
pub const FLATTEN_SEPARATOR: &str = ".";

/// The measure name of the record that carries a report's connection metadata.
pub const CONNECTION_MEASURE: &str = "sora_connection";
/// The measure name of the per-report summary records.
pub const SUMMARY_MEASURE: &str = "report_summary";
/// Whether records of `measure_name` are stats objects (not Kohaku's connection or summary records).
pub fn is_stats_measure(measure_name: &str) -> bool {
    measure_name != CONNECTION_MEASURE && measure_name != SUMMARY_MEASURE
}
/// Measures Kohaku adds to every stats record: the report's times, in µs since the epoch.
pub const SORA_TIMESTAMP_MEASURE: &str = "sora_timestamp_us";
pub const RECEIVED_AT_MEASURE: &str = "received_at_us";

/// Dimension names, in the order records carry them.
pub const DIMENSIONS: [&str; 7] = [
    "channel_id",
    "session_id",
    "client_id",
    "connection_id",
    "bundle_id",
    "rtc_type",
    "rtc_id",
];

/// Members of the W3C stats dictionaries typed `unsigned long`, `unsigned long long` or `long
/// long`. Browsers print a `double` that happens to be whole (`"audioLevel":0`) exactly like an
/// integer, while a Timestream measure keeps the type it was first written with; so a number is a
/// BIGINT only when the spec says the member is an integer, and a DOUBLE otherwise.
const INTEGER_MEMBERS: &[&str] = &[
    "bytesDiscardedOnSend",
    "bytesReceived",
    "bytesSent",
    "channels",
    "clockRate",
    "concealedSamples",
    "concealmentEvents",
    "consentRequestsSent",
    "dataChannelIdentifier",
    "dataChannelsClosed",
    "dataChannelsOpened",
    "fecBytesReceived",
    "fecPacketsDiscarded",
    "fecPacketsReceived",
    "fecSsrc",
    "firCount",
    "frameHeight",
    "frameWidth",
    "frames",
    "framesAssembledFromMultiplePackets",
    "framesDecoded",
    "framesDropped",
    "framesEncoded",
    "framesReceived",
    "framesRendered",
    "framesSent",
    "freezeCount",
    "headerBytesReceived",
    "headerBytesSent",
    "hugeFramesSent",
    "insertedSamplesForDeceleration",
    "jitterBufferEmittedCount",
    "keyFramesDecoded",
    "keyFramesEncoded",
    "messagesReceived",
    "messagesSent",
    "nackCount",
    "packetsDiscarded",
    "packetsDiscardedOnSend",
    "packetsLost",
    "packetsReceived",
    "packetsReceivedWithCe",
    "packetsReceivedWithEct1",
    "packetsReportedAsLost",
    "packetsReportedAsLostButRecovered",
    "packetsSent",
    "pauseCount",
    "payloadType",
    "pliCount",
    "port",
    "priority",
    "qpSum",
    "removedSamplesForAcceleration",
    "reportsSent",
    "requestsReceived",
    "requestsSent",
    "responsesReceived",
    "responsesSent",
    "retransmittedBytesReceived",
    "retransmittedBytesSent",
    "retransmittedPacketsReceived",
    "retransmittedPacketsSent",
    "roundTripTimeMeasurements",
    "rtxSsrc",
    "selectedCandidatePairChanges",
    "silentConcealedSamples",
    "ssrc",
    "totalEncodedBytesTarget",
    "totalSamplesCount",
    "totalSamplesReceived",
];

/// Whether a top-level member is written as BIGINT (when its value is a whole number in range).
pub fn is_integer_member(name: &str) -> bool {
    INTEGER_MEMBERS.binary_search(&name).is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureType {
    Double,
    Bigint,
    Varchar,
    Boolean,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Measure {
    pub name: String,
    pub kind: MeasureType,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dimension {
    pub name: &'static str,
    pub value: String,
}

/// What a record stands for, to report its fate.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Stats {
        connection_id: String,
        rtc_id: String,
        rtc_timestamp: f64,
    },
    Connection {
        connection_id: String,
    },
    Summary {
        connection_id: String,
    },
}

impl Origin {
    pub fn rejected(&self, reason: String) -> Option<RejectedRow> {
        match self {
            Origin::Stats {
                connection_id,
                rtc_id,
                rtc_timestamp,
            } => Some(RejectedRow {
                connection_id: connection_id.clone(),
                rtc_id: rtc_id.clone(),
                rtc_timestamp: *rtc_timestamp,
                reason,
            }),
            Origin::Connection { .. } | Origin::Summary { .. } => None,
        }
    }

    pub fn is_stats(&self) -> bool {
        matches!(self, Origin::Stats { .. })
    }
}

/// One MULTI-measure record, with all its dimensions until [`split`] moves the shared ones out.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRecord {
    pub origin: Origin,
    pub dimensions: Vec<Dimension>,
    pub measure_name: String,
    /// Microseconds since the epoch: a stats timestamp is fractional milliseconds, and
    /// whole-millisecond time would make two samples of one object 0.5 ms apart the same record.
    pub time_us: i64,
    pub measures: Vec<Measure>,
}

/// A batch turned into records, and what could not be.
#[derive(Debug, Default)]
pub struct Plan {
    /// A report's records stay together (connection record first) so that [`split`] can keep
    /// them in one request, sharing their connection dimensions.
    pub reports: Vec<Vec<PlannedRecord>>,
    /// Stats objects that break a Timestream limit, never sent.
    pub refused: Vec<RejectedRow>,
    /// `null` members and empty strings: Timestream has no empty VARCHAR and no NULL literal, so
    /// they are stored as absent measures (which read back as NULL).
    pub omitted_values: u64,
    /// Objects that repeat an earlier one of the batch (same connection, id and timestamp; e.g.
    /// a report delivered twice). Only the first is sent: Timestream would reject the second as a
    /// conflict within the request, where the SQL backends count it as a duplicate.
    pub duplicates: u64,
}

impl Plan {
    pub fn record_count(&self) -> usize {
        self.reports.iter().map(Vec::len).sum()
    }
}

/// One WriteRecords call.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRequest {
    /// Dimensions every record of the request has; sent once, as CommonAttributes.
    pub common_dimensions: Vec<Dimension>,
    /// Records without the common dimensions.
    pub records: Vec<PlannedRecord>,
}

/// Maps every object of the batch, and one connection record per report.
pub fn plan(batch: &StatsBatch) -> Plan {
    let mut plan = Plan::default();
    let mut seen = Seen::default();
    for report in batch.reports() {
        plan_report(report, &mut plan, &mut seen);
    }
    plan
}

/// Keys already planned in this batch: objects by `(connection_id, rtc_id, timestamp bits)`,
/// connection records by `(connection_id, time)`.
#[derive(Default)]
struct Seen {
    objects: HashSet<(String, String, u64)>,
    connections: HashSet<(String, i64)>,
    summaries: HashSet<(String, i64)>,
}

fn plan_report(report: &Report, plan: &mut Plan, seen: &mut Seen) {
    let connection = &report.connection;
    let mut shared = vec![
        dimension("channel_id", &connection.channel_id),
        dimension("session_id", &connection.session_id),
        dimension("client_id", &connection.client_id),
        dimension("connection_id", &connection.connection_id),
    ];
    if let Some(bundle_id) = connection.bundle_id.as_deref().filter(|id| !id.is_empty()) {
        shared.push(dimension("bundle_id", bundle_id));
    }
    let received_at_us = micros_of_time(report.received_at);
    let sora_timestamp_us = micros_of_time(report.sora_timestamp);

    let mut records = Vec::with_capacity(report.stats.len() + 1);
    let mut connection_measures = vec![
        varchar("label", &connection.label),
        varchar("version", &connection.version),
        varchar("node_name", &connection.node_name),
        varchar("role", &connection.role),
        boolean("simulcast", connection.simulcast),
        boolean("spotlight", connection.spotlight),
        bigint(RECEIVED_AT_MEASURE, received_at_us),
    ];
    if let Some(multistream) = connection.multistream {
        connection_measures.push(boolean("multistream", multistream));
    }
    if let Some(group_id) = &connection.group_id {
        connection_measures.push(varchar("group_id", group_id));
    }
    let before = connection_measures.len();
    connection_measures.retain(|measure| !measure.value.is_empty());
    plan.omitted_values += (before - connection_measures.len()) as u64;
    let connection_record = PlannedRecord {
        origin: Origin::Connection {
            connection_id: connection.connection_id.clone(),
        },
        dimensions: shared.clone(),
        measure_name: CONNECTION_MEASURE.to_owned(),
        time_us: sora_timestamp_us,
        measures: connection_measures,
    };
    // Without its connection record the report's rows are still stored; a connection record
    // that breaks a limit (a 2 KB label) is dropped with a warning.
    let connection_key = (connection.connection_id.clone(), sora_timestamp_us);
    if seen.connections.contains(&connection_key) {
        // Same connection, same report time: an identical record is planned already.
    } else if check_record(&connection_record).is_ok() {
        seen.connections.insert(connection_key);
        records.push(connection_record);
    } else {
        tracing::warn!(
            connection_id = %connection.connection_id,
            "connection metadata exceeds Timestream's limits; its sora_connection record is not written"
        );
    }

    if let Some(record) = summary_record(report, &shared, seen) {
        records.push(record);
    }

    for object in &report.stats {
        let key = (
            connection.connection_id.clone(),
            object.rtc_id.clone(),
            object.rtc_timestamp.to_bits(),
        );
        if !seen.objects.insert(key) {
            plan.duplicates += 1;
            continue;
        }
        let origin = Origin::Stats {
            connection_id: connection.connection_id.clone(),
            rtc_id: object.rtc_id.clone(),
            rtc_timestamp: object.rtc_timestamp,
        };
        let planned = stats_record(
            object,
            origin.clone(),
            &shared,
            sora_timestamp_us,
            received_at_us,
        )
        .and_then(|(record, omitted)| check_record(&record).map(|()| (record, omitted)));
        match planned {
            Ok((record, omitted)) => {
                plan.omitted_values += omitted;
                records.push(record);
            }
            Err(reason) => plan.refused.extend(origin.rejected(reason)),
        }
    }
    if !records.is_empty() {
        plan.reports.push(records);
    }
}

/// The report's summary as one record (`report_summary`, at the summary's time): every figure
/// present as a DOUBLE or VARCHAR measure, absent ones left out (they read as NULL).
fn summary_record(report: &Report, shared: &[Dimension], seen: &mut Seen) -> Option<PlannedRecord> {
    let summary = report.summary()?;
    let time_us = micros_of_ms(summary.rtc_timestamp)?;
    let connection_id = &report.connection.connection_id;
    if !seen.summaries.insert((connection_id.clone(), time_us)) {
        return None;
    }
    let mut measures: Vec<Measure> = summary
        .numbers()
        .filter_map(|(which, value)| value.map(|value| double(which.column(), value)))
        .collect();
    measures.extend(summary.texts().filter_map(|(which, value)| {
        value
            .filter(|text| !text.is_empty())
            .map(|text| varchar(which.column(), text))
    }));
    let record = PlannedRecord {
        origin: Origin::Summary {
            connection_id: connection_id.clone(),
        },
        dimensions: shared.to_vec(),
        measure_name: SUMMARY_MEASURE.to_owned(),
        time_us,
        measures,
    };
    match check_record(&record) {
        Ok(()) => Some(record),
        Err(reason) => {
            tracing::warn!(%connection_id, %reason, "a report summary exceeds Timestream's limits; it is not written");
            None
        }
    }
}

fn stats_record(
    object: &StatsObject,
    origin: Origin,
    shared: &[Dimension],
    sora_timestamp_us: i64,
    received_at_us: i64,
) -> Result<(PlannedRecord, u64), String> {
    let data: serde_json::Map<String, Value> = serde_json::from_str(object.rtc_data.get())
        .map_err(|err| format!("rtc_data is not a JSON object: {err}"))?;
    let mut measures = Vec::with_capacity(data.len() + 2);
    let mut omitted = 0;
    for (key, value) in &data {
        // Already the record's dimensions and measure name.
        if key == "id" || key == "type" {
            continue;
        }
        flatten(key, value, true, &mut measures, &mut omitted);
    }
    measures.push(bigint(SORA_TIMESTAMP_MEASURE, sora_timestamp_us));
    measures.push(bigint(RECEIVED_AT_MEASURE, received_at_us));
    let time_us = micros_of_ms(object.rtc_timestamp)
        .ok_or_else(|| format!("timestamp {} is out of range", object.rtc_timestamp))?;
    let mut dimensions = shared.to_vec();
    dimensions.push(dimension("rtc_type", &object.rtc_type));
    dimensions.push(dimension("rtc_id", &object.rtc_id));
    Ok((
        PlannedRecord {
            origin,
            dimensions,
            measure_name: object.rtc_type.clone(),
            time_us,
            measures,
        },
        omitted,
    ))
}

fn flatten(name: &str, value: &Value, top_level: bool, out: &mut Vec<Measure>, omitted: &mut u64) {
    match value {
        Value::Null => *omitted += 1,
        Value::String(text) if text.is_empty() => *omitted += 1,
        Value::String(text) => out.push(varchar(name, text)),
        Value::Bool(flag) => out.push(boolean(name, *flag)),
        Value::Number(number) => {
            let integer = top_level && is_integer_member(name);
            match (integer, number.as_i64()) {
                (true, Some(whole)) => out.push(bigint(name, whole)),
                _ => out.push(double(name, number.as_f64().unwrap_or(f64::NAN))),
            }
        }
        // Lists have no measure type; their JSON text keeps them whole and queryable.
        Value::Array(_) => out.push(varchar(name, &value.to_string())),
        Value::Object(members) => {
            for (key, member) in members {
                let nested = format!("{name}{FLATTEN_SEPARATOR}{key}");
                flatten(&nested, member, false, out, omitted);
            }
        }
    }
}

/// Why Timestream would refuse the record, if it would.
pub fn check_record(record: &PlannedRecord) -> Result<(), String> {
    let mut dimension_bytes = 0;
    for dimension in &record.dimensions {
        if dimension.value.is_empty() {
            return Err(format!(
                "dimension {} is empty; Timestream stores no empty dimension values",
                dimension.name
            ));
        }
        if dimension.value.len() > limits::VALUE_BYTES {
            return Err(format!(
                "dimension {} is {} bytes; Timestream's limit is {} bytes",
                dimension.name,
                dimension.value.len(),
                limits::VALUE_BYTES
            ));
        }
        dimension_bytes += dimension.name.len() + dimension.value.len();
    }
    if dimension_bytes > limits::DIMENSIONS_BYTES {
        return Err(format!(
            "dimensions total {dimension_bytes} bytes; Timestream's limit per series is {} bytes",
            limits::DIMENSIONS_BYTES
        ));
    }
    check_measure_name(&record.measure_name)
        .map_err(|why| format!("measure name {:?} {why}", record.measure_name))?;
    if record.measures.is_empty() {
        return Err("the object has no value Timestream can store".to_owned());
    }
    if record.measures.len() > limits::MEASURES_PER_RECORD {
        return Err(format!(
            "{} measures; Timestream's limit per record is {}",
            record.measures.len(),
            limits::MEASURES_PER_RECORD
        ));
    }
    let mut measure_bytes = 0;
    for measure in &record.measures {
        check_measure_name(&measure.name)
            .map_err(|why| format!("member {:?} {why}", measure.name))?;
        if DIMENSIONS.contains(&measure.name.as_str()) {
            return Err(format!(
                "member {:?} has the name of a dimension",
                measure.name
            ));
        }
        if measure.value.len() > limits::VALUE_BYTES {
            return Err(format!(
                "member {:?} is {} bytes; Timestream's limit per value is {} bytes",
                measure.name,
                measure.value.len(),
                limits::VALUE_BYTES
            ));
        }
        measure_bytes += measure.name.len() + measure.value.len();
    }
    let size = dimension_bytes + record.measure_name.len() + measure_bytes + 8;
    if size > limits::RECORD_BYTES {
        return Err(format!(
            "the record is {size} bytes; Timestream's limit is {} bytes",
            limits::RECORD_BYTES
        ));
    }
    Ok(())
}

/// Timestream's naming rules for measures (and dimensions): 1–256 bytes, no `:`, not one of the
/// names its query language reserves.
fn check_measure_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if name.len() > limits::MEASURE_NAME_BYTES {
        return Err(format!(
            "is {} bytes; Timestream's limit is {}",
            name.len(),
            limits::MEASURE_NAME_BYTES
        ));
    }
    if name.contains(':') {
        return Err("contains ':', which Timestream forbids in names".to_owned());
    }
    if matches!(name, "time" | "measure_name")
        || name.starts_with("measure_value")
        || name.starts_with("ts_")
    {
        return Err("is reserved by Timestream".to_owned());
    }
    Ok(())
}

/// Packs whole reports into requests of at most `max_records` records; a larger report is split on
/// its own. Dimensions shared by every record of a request move to its common attributes.
pub fn split(plan: Plan, max_records: usize) -> Vec<PlannedRequest> {
    let max_records = max_records.clamp(1, limits::RECORDS_PER_WRITE);
    let mut chunks: Vec<Vec<PlannedRecord>> = Vec::new();
    let mut current: Vec<PlannedRecord> = Vec::new();
    for report in plan.reports {
        if current.len() + report.len() > max_records && !current.is_empty() {
            chunks.push(std::mem::take(&mut current));
        }
        if report.len() > max_records {
            let mut rest = report.into_iter().peekable();
            while rest.peek().is_some() {
                chunks.push(rest.by_ref().take(max_records).collect());
            }
        } else {
            current.extend(report);
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks.into_iter().map(share_dimensions).collect()
}

fn share_dimensions(mut records: Vec<PlannedRecord>) -> PlannedRequest {
    let common_dimensions: Vec<Dimension> = match records.first() {
        Some(first) => first
            .dimensions
            .iter()
            .filter(|dimension| {
                records
                    .iter()
                    .all(|record| record.dimensions.contains(dimension))
            })
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    for record in &mut records {
        record
            .dimensions
            .retain(|dimension| !common_dimensions.contains(dimension));
    }
    PlannedRequest {
        common_dimensions,
        records,
    }
}

fn dimension(name: &'static str, value: &str) -> Dimension {
    Dimension {
        name,
        value: value.to_owned(),
    }
}

fn varchar(name: &str, value: &str) -> Measure {
    Measure {
        name: name.to_owned(),
        kind: MeasureType::Varchar,
        value: value.to_owned(),
    }
}

fn boolean(name: &str, value: bool) -> Measure {
    Measure {
        name: name.to_owned(),
        kind: MeasureType::Boolean,
        value: value.to_string(),
    }
}

fn double(name: &str, value: f64) -> Measure {
    Measure {
        name: name.to_owned(),
        kind: MeasureType::Double,
        value: value.to_string(),
    }
}

fn bigint(name: &str, value: i64) -> Measure {
    Measure {
        name: name.to_owned(),
        kind: MeasureType::Bigint,
        value: value.to_string(),
    }
}

/// Fractional milliseconds → whole microseconds, rounded (stats timestamps are µs-precise).
pub fn micros_of_ms(ms: f64) -> Option<i64> {
    let micros = (ms * 1_000.0).round();
    (micros.is_finite() && micros.abs() < i64::MAX as f64).then_some(micros as i64)
}

pub fn micros_of_time(at: kohaku_sink::OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000) as i64
}

#[cfg(test)]
mod tests;
