//! Lines of Sora's `rtc_stats.jsonl` log (`docs/protocol.md` §3).

use std::borrow::Cow;

use kohaku_sink::{Connection, OffsetDateTime, RawValue, StatsObject};
use serde::Deserialize;

use super::fields::{required, ConnectionFields};
use super::object::{parse_object, ObjectAt};
use super::{deserialize_object, InvalidReport, CONNECTION_RTC};

/// One line of a Sora log file.
#[derive(Debug)]
// Returned once per line and consumed at once; boxing would add an allocation per line for nothing.
#[allow(clippy::large_enum_variant)]
pub enum LogLine {
    Stats(LogStats),
    /// A line of another kind (a webhook event, …), named by its `type` or `req.type`.
    Other {
        kind: String,
    },
}

/// A `connection.rtc` line: one stats object and the connection it belongs to.
#[derive(Debug)]
pub struct LogStats {
    pub connection: Connection,
    /// The `timestamp` of the exporter report the object came in; lines of one report share it.
    pub sora_timestamp: OffsetDateTime,
    pub object: StatsObject,
}

/// Repeats `Body`'s connection fields: sharing them through `#[serde(flatten)]` would buffer the
/// line into serde's intermediate form, which neither borrows strings nor can hold a `RawValue`.
#[derive(Deserialize)]
struct LogLineBody<'a> {
    #[serde(borrow, rename = "type")]
    line_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    req: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    label: Option<Cow<'a, str>>,
    #[serde(borrow)]
    version: Option<Cow<'a, str>>,
    #[serde(borrow)]
    node_name: Option<Cow<'a, str>>,
    multistream: Option<bool>,
    simulcast: Option<bool>,
    spotlight: Option<bool>,
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    client_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    connection_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    bundle_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    group_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    rtc_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    rtc_type: Option<Cow<'a, str>>,
    rtc_timestamp: Option<f64>,
    #[serde(borrow)]
    rtc_data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
pub(super) struct TypeOnly<'a> {
    #[serde(borrow, rename = "type")]
    pub(super) kind: Option<Cow<'a, str>>,
}

/// Parses one line of a Sora log file (without its newline). Errors name the field as a path into
/// the line, like [`parse_report`]'s.
pub fn parse_log_line(line: impl super::Body) -> Result<LogLine, InvalidReport> {
    let line = &line.shared();
    let parsed: LogLineBody<'_> = deserialize_object(line, "line", "a log line")?;

    let line_type = match parsed.line_type {
        Some(line_type) => line_type,
        // Sora's webhook log names its event inside `req`.
        None => match parsed
            .req
            .and_then(|req| serde_json::from_str::<TypeOnly<'_>>(req.get()).ok())
            .and_then(|req| req.kind)
        {
            Some(kind) => {
                return Ok(LogLine::Other {
                    kind: kind.into_owned(),
                })
            }
            None => return Err(InvalidReport::new("type", "missing required field `type`")),
        },
    };
    if line_type != CONNECTION_RTC {
        return Ok(LogLine::Other {
            kind: line_type.into_owned(),
        });
    }
    let (connection, sora_timestamp) = ConnectionFields {
        timestamp: parsed.timestamp,
        label: parsed.label,
        version: parsed.version,
        node_name: parsed.node_name,
        multistream: parsed.multistream,
        simulcast: parsed.simulcast,
        spotlight: parsed.spotlight,
        role: parsed.role,
        channel_id: parsed.channel_id,
        session_id: parsed.session_id,
        client_id: parsed.client_id,
        connection_id: parsed.connection_id,
        bundle_id: parsed.bundle_id,
        group_id: parsed.group_id,
    }
    .validate()?;
    let object = parse_object(
        ObjectAt::RtcData,
        required(parsed.rtc_data, "rtc_data")?,
        line,
    )?;
    // The copies Sora writes next to `rtc_data` must agree with it; if not, the line is damaged.
    let disagrees = |field: &str, copy: String, inside: String| {
        InvalidReport::new(
            field,
            format!("`{copy}` differs from the stats object's own value `{inside}`"),
        )
    };
    if let Some(rtc_id) = parsed.rtc_id.filter(|id| *id != object.rtc_id) {
        return Err(disagrees("rtc_id", rtc_id.into_owned(), object.rtc_id));
    }
    if let Some(rtc_type) = parsed.rtc_type.filter(|t| *t != object.rtc_type) {
        return Err(disagrees(
            "rtc_type",
            rtc_type.into_owned(),
            object.rtc_type,
        ));
    }
    if let Some(rtc_timestamp) = parsed.rtc_timestamp.filter(|t| *t != object.rtc_timestamp) {
        return Err(disagrees(
            "rtc_timestamp",
            rtc_timestamp.to_string(),
            object.rtc_timestamp.to_string(),
        ));
    }
    Ok(LogLine::Stats(LogStats {
        connection,
        sora_timestamp,
        object,
    }))
}
