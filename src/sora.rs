//! What Sora sends, parsed and validated into [`Report`]s: the stats exporter's body (Sora before
//! 2025.2, [`parse_report`]), the stats webhook's body (Sora 2025.2 and later, [`parse_webhook`]) and
//! the lines of its `rtc_stats.jsonl` log ([`parse_log_line`]). `docs/protocol.md` is the contract for all
//! three.
//!
//! The body is parsed once, borrowing from the request bytes. Each stats object is read only for
//! its `id`, `type` and `timestamp`; its JSON text is kept byte for byte, so nothing a client sent
//! is lost, reordered or re-serialised.

use std::borrow::Cow;

use kohaku_sink::{Connection, OffsetDateTime, RawValue, Report, StatsObject};
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;

/// The header Sora sets on every exporter request, and the only value Kohaku stores.
pub const EXPORTER_TYPE_HEADER: &str = "x-sora-stats-exporter-type";
pub const CONNECTION_USER_AGENT: &str = "connection.user-agent";
/// The header Sora sets on every stats-webhook request: inferred from the gateway Sora's vendor
/// wrote, not documented by Sora (`docs/protocol.md` §1).
pub const WEBHOOK_TYPE_HEADER: &str = "sora-stats-webhook-type";
/// The stats webhook's type for one connection's `getStats()` result, and the `type` of the log
/// lines that carry one of its stats objects each.
pub const CONNECTION_RTC: &str = "connection.rtc";

/// How a report reached Kohaku: a label of metrics and logs, and what the spool records so that a
/// replay parses a body as it was parsed when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Sora's stats exporter (`connection.user-agent`), [`parse_report`].
    Exporter,
    /// Sora's stats webhook (`connection.rtc`), [`parse_webhook`].
    Webhook,
    /// `kohaku import` of log files, [`parse_log_line`].
    Import,
}

impl Protocol {
    pub const ALL: [Self; 3] = [Self::Exporter, Self::Webhook, Self::Import];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exporter => "exporter",
            Self::Webhook => "webhook",
            Self::Import => "import",
        }
    }
}

const SORA_ID_LEN: usize = 26;
/// Years a report's send time may fall in: what PostgreSQL's `timestamptz`, SQLite's text times
/// and Timestream all hold. A time outside would be acknowledged and then fail its batch.
const SORA_YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;
/// Largest stats-object `timestamp` (ms since the epoch) every store keeps: PostgreSQL's
/// `to_timestamp` ends in the year 294276. Some SDKs send microseconds (≈ 1.7e15), which fit.
const MAX_OBJECT_TIMESTAMP_MS: f64 = 9.0e15;
const MAX_NAME_BYTES: usize = 255;
const ROLES: [&str; 3] = ["sendrecv", "sendonly", "recvonly"];

/// Why a request was refused: the JSON body of the 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InvalidReport {
    pub error: String,
    /// The offending field as a path into the body (`stats[3].timestamp`), or the header name.
    pub field: String,
}

/// Longest error message answered and logged: messages quote what the client sent, which must not
/// come back (or reach the log) unbounded.
const MAX_ERROR_BYTES: usize = 512;

impl InvalidReport {
    fn new(field: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            error: bounded(error.into(), MAX_ERROR_BYTES),
            field: bounded(field.into(), MAX_ERROR_BYTES),
        }
    }
}

/// `text` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
pub fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl std::fmt::Display for InvalidReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.error)
    }
}

/// Checks the exporter-type header. `node.erlang-vm` (Sora's VM metrics, sent by older versions) is
/// refused like any other type: it holds no WebRTC stats.
pub fn check_exporter_type(value: Option<&[u8]>) -> Result<(), InvalidReport> {
    match value {
        None => Err(InvalidReport::new(
            EXPORTER_TYPE_HEADER,
            format!("missing header; expected `{CONNECTION_USER_AGENT}`"),
        )),
        Some(value) if value == CONNECTION_USER_AGENT.as_bytes() => Ok(()),
        Some(value) => Err(InvalidReport::new(
            EXPORTER_TYPE_HEADER,
            format!(
                "unexpected exporter type `{}`; Kohaku accepts only `{CONNECTION_USER_AGENT}`",
                String::from_utf8_lossy(value)
            ),
        )),
    }
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, rename = "type")]
    event_type: Option<Cow<'a, str>>,
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
    stats: Option<Vec<&'a RawValue>>,
}

/// The three members Kohaku reads from a stats object.
struct ObjectHead<'a> {
    id: Option<Cow<'a, str>>,
    rtc_type: Option<Cow<'a, str>>,
    timestamp: Option<f64>,
}

/// Parses and validates one exporter body. `received_at` is when Kohaku got the request.
pub fn parse_report(body: &[u8], received_at: OffsetDateTime) -> Result<Report, InvalidReport> {
    let parsed: Body<'_> = deserialize_object(body, "body", "the body")?;
    let event_type = required(parsed.event_type.as_deref(), "type")?;
    if event_type != CONNECTION_USER_AGENT {
        return Err(InvalidReport::new(
            "type",
            format!("unexpected event type `{event_type}`; expected `{CONNECTION_USER_AGENT}`"),
        ));
    }
    report_of(parsed, received_at)
}

/// What a stats-webhook request turned out to be.
#[derive(Debug)]
pub enum Webhook {
    /// A `connection.rtc` body: one connection's `getStats()` result, to be stored.
    Stats(Report),
    /// An exporter body (`connection.user-agent`) sent without either type header: parsed as
    /// [`parse_report`] would.
    Exporter(Report),
    /// A webhook type Kohaku does not store (a future Sora's), named by its type. Its body is not
    /// validated: Sora must get a 2xx for it, or it logs the send as failed.
    Ignored { kind: String },
}

/// Parses one stats-webhook body. Its type comes from the `sora-stats-webhook-type` header when
/// Sora sent one (`header_type`), else from the body's `type`; when both are there they must agree.
/// Only `connection.rtc` is validated and stored; its body is the exporter's with `group_id` and
/// the webhook's `id` added and without `multistream`, and unknown members are ignored. A body
/// without a header whose `type` is the exporter's is an exporter body.
pub fn parse_webhook(
    body: &[u8],
    header_type: Option<&str>,
    received_at: OffsetDateTime,
) -> Result<Webhook, InvalidReport> {
    let kind = match header_type {
        Some(kind) => Cow::Borrowed(kind),
        None => {
            // Only the type is read first: a body of a type Kohaku ignores need not be valid as
            // a stats body.
            let head: TypeOnly<'_> = deserialize_object(body, "body", "the body")?;
            match head.kind {
                Some(kind) => Cow::Owned(kind.into_owned()),
                None => {
                    return Err(InvalidReport::new(
                        "type",
                        format!(
                            "missing required field `type` (and no {WEBHOOK_TYPE_HEADER} header)"
                        ),
                    ))
                }
            }
        }
    };
    if header_type.is_none() && kind == CONNECTION_USER_AGENT {
        return parse_report(body, received_at).map(Webhook::Exporter);
    }
    if kind != CONNECTION_RTC {
        return Ok(Webhook::Ignored {
            kind: kind.into_owned(),
        });
    }
    let parsed: Body<'_> = deserialize_object(body, "body", "the body")?;
    if let Some(body_type) = parsed.event_type.as_deref().filter(|t| *t != kind) {
        return Err(InvalidReport::new(
            "type",
            format!(
                "the body's type `{body_type}` differs from the {WEBHOOK_TYPE_HEADER} header `{kind}`"
            ),
        ));
    }
    report_of(parsed, received_at).map(Webhook::Stats)
}

/// Parses a body the spool kept, as it was parsed when it arrived by `protocol`.
pub fn parse_spooled(
    protocol: Protocol,
    body: &[u8],
    received_at: OffsetDateTime,
) -> Result<Report, InvalidReport> {
    match protocol {
        Protocol::Exporter => parse_report(body, received_at),
        // Only stats were spooled; the header that may have named the type is not kept.
        Protocol::Webhook => match parse_webhook(body, Some(CONNECTION_RTC), received_at)? {
            Webhook::Stats(report) | Webhook::Exporter(report) => Ok(report),
            Webhook::Ignored { kind } => Err(InvalidReport::new(
                "type",
                format!("`{kind}` is not a stats type"),
            )),
        },
        Protocol::Import => Err(InvalidReport::new(
            "protocol",
            "imported log lines are never spooled",
        )),
    }
}

/// Validates a parsed exporter or webhook body whose type was checked.
fn report_of(parsed: Body<'_>, received_at: OffsetDateTime) -> Result<Report, InvalidReport> {
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

    let raw_objects = required(parsed.stats, "stats")?;
    let mut stats = Vec::with_capacity(raw_objects.len());
    for (index, raw) in raw_objects.into_iter().enumerate() {
        stats.push(parse_object(ObjectAt::Stats(index), raw)?);
    }

    Ok(Report {
        connection,
        sora_timestamp,
        received_at,
        stats,
    })
}

/// Deserializes `bytes`, which must hold exactly one JSON object. Errors name the offending field as
/// a path, or `whole` when the problem is the JSON as a whole; `what` names it in messages.
fn deserialize_object<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    whole: &str,
    what: &str,
) -> Result<T, InvalidReport> {
    // Serde would read an array as the struct's fields in order, with baffling errors.
    if bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|first| *first != b'{')
    {
        return Err(InvalidReport::new(
            whole,
            format!("invalid JSON: {what} must be one JSON object"),
        ));
    }
    // Valid UTF-8 (checked once, so no string needs its own check) takes the fast path, without
    // tracking where the parser is. Only a body that fails is parsed again, from its bytes, with
    // the path tracking that names the offending field: bad input pays for its error message.
    if let Ok(text) = std::str::from_utf8(bytes) {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        if let Ok(parsed) = T::deserialize(&mut deserializer) {
            if deserializer.end().is_ok() {
                return Ok(parsed);
            }
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let field = err.path().to_string();
        let field = if field == "." || field == "?" {
            whole.to_owned()
        } else {
            field
        };
        InvalidReport::new(field, format!("invalid JSON: {}", err.inner()))
    })?;
    deserializer
        .end()
        .map_err(|err| InvalidReport::new(whole, format!("invalid JSON: {err}")))?;
    Ok(parsed)
}

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
struct TypeOnly<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

/// Parses one line of a Sora log file (without its newline). Errors name the field as a path into
/// the line, like [`parse_report`]'s.
pub fn parse_log_line(line: &[u8]) -> Result<LogLine, InvalidReport> {
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
    let object = parse_object(ObjectAt::RtcData, required(parsed.rtc_data, "rtc_data")?)?;
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

/// The connection metadata every exporter and webhook body and every log line carries.
struct ConnectionFields<'a> {
    timestamp: Option<Cow<'a, str>>,
    label: Option<Cow<'a, str>>,
    version: Option<Cow<'a, str>>,
    node_name: Option<Cow<'a, str>>,
    multistream: Option<bool>,
    simulcast: Option<bool>,
    spotlight: Option<bool>,
    role: Option<Cow<'a, str>>,
    channel_id: Option<Cow<'a, str>>,
    session_id: Option<Cow<'a, str>>,
    client_id: Option<Cow<'a, str>>,
    connection_id: Option<Cow<'a, str>>,
    bundle_id: Option<Cow<'a, str>>,
    group_id: Option<Cow<'a, str>>,
}

impl ConnectionFields<'_> {
    /// The connection and Sora's send time, or the first field that is missing or wrong.
    fn validate(self) -> Result<(Connection, OffsetDateTime), InvalidReport> {
        let timestamp = required(self.timestamp, "timestamp")?;
        let sora_timestamp = OffsetDateTime::parse(&timestamp, &Rfc3339)
            .map_err(|err| {
                InvalidReport::new(
                    "timestamp",
                    format!("`{timestamp}` is not an RFC 3339 time such as 2025-07-25T06:06:51.592776Z: {err}"),
                )
            })?
            .checked_to_offset(time::UtcOffset::UTC)
            .filter(|at| SORA_YEARS.contains(&at.year()))
            .ok_or_else(|| {
                InvalidReport::new(
                    "timestamp",
                    format!(
                        "`{timestamp}` is outside the years {} to {} (UTC) that every store keeps",
                        SORA_YEARS.start(),
                        SORA_YEARS.end()
                    ),
                )
            })?;
        for (field, value) in [
            ("channel_id", self.channel_id.as_deref()),
            ("client_id", self.client_id.as_deref()),
            ("bundle_id", self.bundle_id.as_deref()),
            ("group_id", self.group_id.as_deref()),
            ("label", self.label.as_deref()),
            ("version", self.version.as_deref()),
            ("node_name", self.node_name.as_deref()),
        ] {
            if value.is_some_and(|value| value.contains('\0')) {
                return Err(InvalidReport::new(
                    field,
                    "contains a NUL character, which PostgreSQL text cannot store",
                ));
            }
        }

        let role = required(self.role, "role")?;
        if !ROLES.contains(&role.as_ref()) {
            return Err(InvalidReport::new(
                "role",
                format!("unexpected role `{role}`; expected one of sendrecv, sendonly, recvonly"),
            ));
        }
        let connection = Connection {
            channel_id: name(self.channel_id, "channel_id")?,
            session_id: sora_id(self.session_id, "session_id")?,
            client_id: name(self.client_id, "client_id")?,
            connection_id: sora_id(self.connection_id, "connection_id")?,
            bundle_id: self.bundle_id.map(Cow::into_owned),
            group_id: self.group_id.map(Cow::into_owned),
            label: required(self.label, "label")?.into_owned(),
            version: required(self.version, "version")?.into_owned(),
            node_name: required(self.node_name, "node_name")?.into_owned(),
            role: role.into_owned(),
            multistream: self.multistream,
            simulcast: required(self.simulcast, "simulcast")?,
            spotlight: required(self.spotlight, "spotlight")?,
        };
        Ok((connection, sora_timestamp))
    }
}

/// Where a stats object sits, for naming its fields in errors.
#[derive(Clone, Copy)]
enum ObjectAt {
    /// `stats[i]` of an exporter body.
    Stats(usize),
    /// `rtc_data` of a log line.
    RtcData,
}

/// Real stats objects nest two or three levels (`qualityLimitationDurations`). Deeper input is
/// refused here because the stores' JSON functions have depth limits of their own (SQLite's is
/// 1000): a row they cannot read would break every dashboard query that touches it.
const MAX_OBJECT_DEPTH: usize = 32;

/// Why [`scan_head`] refused an object.
enum HeadError {
    TooDeep,
    /// A member Kohaku reads has the wrong type, or appears twice.
    Invalid(String),
}

/// Reads `id`, `type` and `timestamp` from the top level of a stats object and checks its nesting
/// against `limit`, in one pass. `text` must be one JSON object that serde_json has already
/// accepted (the body parse did), so the scanner only has to find the members' boundaries:
/// strings are skipped with `memchr`, and only the three values Kohaku reads are decoded, by
/// serde_json. Two passes (a nesting scan, then serde) cost twice this (`cargo bench --bench
/// parse`).
fn scan_head(text: &str, limit: usize) -> Result<ObjectHead<'_>, HeadError> {
    let bytes = text.as_bytes();
    let mut head = ObjectHead {
        id: None,
        rtc_type: None,
        timestamp: None,
    };
    let mut seen = [false; 3];
    let mut at = skip_whitespace(bytes, 1);
    while at < bytes.len() && bytes[at] == b'"' {
        let key_end = string_end(bytes, at);
        let key = &text[at..key_end];
        at = skip_whitespace(bytes, key_end);
        // The ':'.
        at = skip_whitespace(bytes, at + 1);
        let value_end = value_end(bytes, at, limit).ok_or(HeadError::TooDeep)?;
        let value = &text[at..value_end];
        let slot = match key {
            "\"id\"" => Some(0),
            "\"type\"" => Some(1),
            "\"timestamp\"" => Some(2),
            // A key spelled with escapes (`"\u0069d"`) is still `id`.
            _ if key.contains('\\') => match serde_json::from_str::<String>(key).as_deref() {
                Ok("id") => Some(0),
                Ok("type") => Some(1),
                Ok("timestamp") => Some(2),
                _ => None,
            },
            _ => None,
        };
        if let Some(slot) = slot {
            let name = ["id", "type", "timestamp"][slot];
            if std::mem::replace(&mut seen[slot], true) {
                return Err(HeadError::Invalid(format!("duplicate field `{name}`")));
            }
            let invalid = |err: serde_json::Error| HeadError::Invalid(format!("`{name}`: {err}"));
            match slot {
                0 => head.id = string_value(value).map_err(invalid)?,
                1 => head.rtc_type = string_value(value).map_err(invalid)?,
                _ => head.timestamp = serde_json::from_str(value).map_err(invalid)?,
            }
        }
        at = skip_whitespace(bytes, value_end);
        if bytes.get(at) == Some(&b',') {
            at = skip_whitespace(bytes, at + 1);
        }
    }
    Ok(head)
}

/// A JSON string or null, borrowed when it holds no escapes.
fn string_value(value: &str) -> Result<Option<Cow<'_, str>>, serde_json::Error> {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => Ok(Some(Cow::Borrowed(inner))),
        _ => serde_json::from_str::<Option<String>>(value).map(|v| v.map(Cow::Owned)),
    }
}

fn skip_whitespace(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The index just past the string that starts at `start` (its opening quote).
fn string_end(bytes: &[u8], start: usize) -> usize {
    let mut at = start + 1;
    while let Some(found) = bytes
        .get(at..)
        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
    {
        at += found;
        if bytes[at] == b'\\' {
            at += 2;
        } else {
            return at + 1;
        }
    }
    bytes.len()
}

/// The index just past the value that starts at `start`, inside the object (depth 1); `None` when
/// arrays and objects in it nest deeper than `limit` in all.
fn value_end(bytes: &[u8], start: usize, limit: usize) -> Option<usize> {
    match bytes.get(start) {
        Some(b'"') => Some(string_end(bytes, start)),
        Some(b'{' | b'[') => {
            let mut depth = 1usize;
            let mut at = start;
            while at < bytes.len() {
                match bytes[at] {
                    b'"' => {
                        at = string_end(bytes, at);
                        continue;
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        if depth > limit {
                            return None;
                        }
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 1 {
                            return Some(at + 1);
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
            Some(bytes.len())
        }
        _ => Some(
            bytes[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
                .map_or(bytes.len(), |end| start + end),
        ),
    }
}

fn parse_object(at: ObjectAt, raw: &RawValue) -> Result<StatsObject, InvalidReport> {
    let field = |name: &str| match at {
        ObjectAt::Stats(index) => format!("stats[{index}]{name}"),
        ObjectAt::RtcData => format!("rtc_data{name}"),
    };
    if !raw.get().starts_with('{') {
        return Err(InvalidReport::new(
            field(""),
            "a stats object must be a JSON object",
        ));
    }
    let head = scan_head(raw.get(), MAX_OBJECT_DEPTH).map_err(|err| match err {
        HeadError::TooDeep => InvalidReport::new(
            field(""),
            format!("nested deeper than {MAX_OBJECT_DEPTH} levels; stats objects are flat records"),
        ),
        HeadError::Invalid(why) => {
            InvalidReport::new(field(""), format!("invalid stats object: {why}"))
        }
    })?;
    let rtc_id = head
        .id
        .filter(|id| !id.is_empty())
        .ok_or_else(|| InvalidReport::new(field(".id"), "missing or empty `id`"))?;
    let rtc_type = head
        .rtc_type
        .filter(|t| !t.is_empty())
        .ok_or_else(|| InvalidReport::new(field(".type"), "missing or empty `type`"))?;
    let rtc_timestamp = head.timestamp.filter(|t| t.is_finite()).ok_or_else(|| {
        InvalidReport::new(
            field(".timestamp"),
            "missing `timestamp` (milliseconds since the epoch)",
        )
    })?;
    if !(0.0..=MAX_OBJECT_TIMESTAMP_MS).contains(&rtc_timestamp) {
        return Err(InvalidReport::new(
            field(".timestamp"),
            format!(
                "{rtc_timestamp} is not a time every store keeps: milliseconds since the epoch, 0 to {MAX_OBJECT_TIMESTAMP_MS:e}"
            ),
        ));
    }
    if let Some(what) = unstorable_escape(raw.get()) {
        return Err(InvalidReport::new(
            field(""),
            format!("contains {what}, which PostgreSQL's jsonb cannot store"),
        ));
    }
    Ok(StatsObject {
        rtc_id: rtc_id.into_owned(),
        rtc_type: rtc_type.into_owned(),
        rtc_timestamp,
        rtc_data: raw.to_owned(),
    })
}

/// The first escape in `text` (JSON that serde_json accepted) that names a character PostgreSQL's
/// `jsonb` refuses: `\u0000`, or half of a surrogate pair. Walks from backslash to backslash, so
/// an escaped backslash followed by `u0000` is not taken for an escape.
fn unstorable_escape(text: &str) -> Option<&'static str> {
    const LONE: &str = "a lone UTF-16 surrogate escape";
    let bytes = text.as_bytes();
    let mut at = 0;
    // Where a low surrogate must follow a high one.
    let mut low_expected_at: Option<usize> = None;
    while let Some(found) = memchr::memchr(b'\\', &bytes[at..]) {
        let escape = at + found;
        if low_expected_at.is_some_and(|expected| expected != escape) {
            return Some(LONE);
        }
        if bytes.get(escape + 1) != Some(&b'u') {
            if low_expected_at.is_some() {
                return Some(LONE);
            }
            at = escape + 2;
            continue;
        }
        let code = bytes
            .get(escape + 2..escape + 6)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())?;
        match (low_expected_at.take(), code) {
            (Some(_), 0xDC00..=0xDFFF) => {}
            (Some(_), _) | (None, 0xDC00..=0xDFFF) => return Some(LONE),
            (None, 0) => return Some("the escape \\u0000 (NUL)"),
            (None, 0xD800..=0xDBFF) => low_expected_at = Some(escape + 6),
            (None, _) => {}
        }
        at = escape + 6;
    }
    low_expected_at.map(|_| LONE)
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, InvalidReport> {
    value.ok_or_else(|| InvalidReport::new(field, format!("missing required field `{field}`")))
}

fn name(value: Option<Cow<'_, str>>, field: &str) -> Result<String, InvalidReport> {
    let value = required(value, field)?;
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(InvalidReport::new(
            field,
            format!(
                "must be 1 to {MAX_NAME_BYTES} bytes long, got {}",
                value.len()
            ),
        ));
    }
    Ok(value.into_owned())
}

fn sora_id(value: Option<Cow<'_, str>>, field: &str) -> Result<String, InvalidReport> {
    let value = required(value, field)?;
    if value.len() != SORA_ID_LEN || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(InvalidReport::new(
            field,
            format!(
                "`{value}` is not a Sora id: expected {SORA_ID_LEN} characters, got {}",
                value.chars().count()
            ),
        ));
    }
    Ok(value.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn body() -> Value {
        json!({
            "type": "connection.user-agent",
            "timestamp": "2025-07-25T06:06:51.592776Z",
            "label": "WebRTC SFU Sora", "version": "2025.2.1", "node_name": "sora@127.0.0.1",
            "multistream": true, "simulcast": false, "spotlight": false, "role": "sendrecv",
            "channel_id": "sora", "session_id": "7N8FP3M0ZH2ASBCDPHRGS2HYB8",
            "client_id": "JXW8K4FG6H7TZ2F63T38ZHSJQG", "connection_id": "JXW8K4FG6H7TZ2F63T38ZHSJQG",
            "stats": [
                {"id": "P", "timestamp": 1_753_423_611_556.525, "type": "peer-connection", "dataChannelsOpened": 4},
                {"id": "OT1", "timestamp": 1_753_423_611_556.525, "type": "outbound-rtp",
                 "qualityLimitationDurations": {"none": 0.128, "cpu": 0}}
            ]
        })
    }

    fn parse(value: &Value) -> Result<Report, InvalidReport> {
        parse_report(value.to_string().as_bytes(), OffsetDateTime::now_utc())
    }

    fn field_of(value: &Value) -> String {
        parse(value).expect_err("must be refused").field
    }

    #[test]
    fn deeply_nested_objects_are_refused_by_index_and_brackets_in_strings_do_not_count() {
        let deep = format!(
            r#"{{"id":"D","type":"x","timestamp":1,"n":{}1{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let mut value = body();
        let text = value.to_string().replace(
            r#""stats":["#,
            &format!(r#""stats":[{{"id":"ok","type":"x","timestamp":1}},{deep},"#),
        );
        let refused = parse_report(text.as_bytes(), OffsetDateTime::now_utc()).unwrap_err();
        assert_eq!(refused.field, "stats[1]");
        assert!(refused.error.contains("nested deeper than 32"), "{refused}");

        value["stats"][0]["label"] = json!(
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[ \\\" {{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{"
        );
        let mut nested = json!(1);
        for _ in 0..MAX_OBJECT_DEPTH - 1 {
            nested = json!([nested]);
        }
        value["stats"][1]["limit"] = nested;
        parse(&value).expect("brackets inside strings and nesting at the limit are fine");
    }

    #[test]
    fn valid_body_keeps_object_text_exactly() {
        let text = r#"{"type":"connection.user-agent","timestamp":"2025-07-25T06:06:51.592776Z","label":"l","version":"v","node_name":"n","simulcast":false,"spotlight":true,"role":"recvonly","channel_id":"ch","session_id":"7N8FP3M0ZH2ASBCDPHRGS2HYB8","client_id":"c","connection_id":"JXW8K4FG6H7TZ2F63T38ZHSJQG","bundle_id":"b","stats":[{"timestamp":1.50,"z":1e3,"id":"\u00e9","type":"track","a":{"b":[1,2]}}]}"#;
        let report = parse_report(text.as_bytes(), OffsetDateTime::now_utc()).unwrap();
        assert_eq!(report.connection.multistream, None);
        assert_eq!(report.connection.bundle_id.as_deref(), Some("b"));
        assert!(report.connection.spotlight);
        let object = &report.stats[0];
        assert_eq!(object.rtc_id, "é");
        assert_eq!(object.rtc_type, "track");
        assert_eq!(object.rtc_timestamp, 1.5);
        assert_eq!(
            object.rtc_data.get(),
            r#"{"timestamp":1.50,"z":1e3,"id":"\u00e9","type":"track","a":{"b":[1,2]}}"#
        );
        assert_eq!(report.sora_timestamp.unix_timestamp(), 1753423611);
        assert_eq!(report.sora_timestamp.microsecond(), 592776);
    }

    #[test]
    fn each_required_field_missing_is_named() {
        for field in [
            "type",
            "timestamp",
            "label",
            "version",
            "node_name",
            "simulcast",
            "spotlight",
            "role",
            "channel_id",
            "session_id",
            "client_id",
            "connection_id",
            "stats",
        ] {
            let mut value = body();
            value.as_object_mut().unwrap().remove(field);
            let err = parse(&value).expect_err(field);
            assert_eq!(err.field, field);
            assert!(err.error.contains("missing"), "{err}");
        }
        let mut value = body();
        value.as_object_mut().unwrap().remove("multistream");
        assert_eq!(parse(&value).unwrap().connection.multistream, None);
    }

    #[test]
    fn invalid_values_are_named() {
        for (field, bad) in [
            ("simulcast", json!("false")),
            ("spotlight", json!(null)),
            ("role", json!("publisher")),
            ("type", json!("node.erlang-vm")),
            ("timestamp", json!("yesterday")),
            ("channel_id", json!("")),
            ("channel_id", json!("x".repeat(256))),
            ("client_id", json!(7)),
            ("session_id", json!("short")),
            ("connection_id", json!("ABCDEFGHIJKLMNOPQRSTUVWXYZ0")),
            ("stats", json!({"id": "P"})),
            ("bundle_id", json!(false)),
        ] {
            let mut value = body();
            value[field] = bad.clone();
            assert_eq!(field_of(&value), field, "{field} = {bad}");
        }
    }

    #[test]
    fn bad_stats_objects_are_named_by_index() {
        for (object, field) in [
            (json!({"type": "codec", "timestamp": 1.0}), "stats[1].id"),
            (
                json!({"id": "", "type": "codec", "timestamp": 1.0}),
                "stats[1].id",
            ),
            (json!({"id": "C", "timestamp": 1.0}), "stats[1].type"),
            (json!({"id": "C", "type": "codec"}), "stats[1].timestamp"),
            (
                json!({"id": "C", "type": "codec", "timestamp": "1"}),
                "stats[1]",
            ),
            (
                json!({"id": 5, "type": "codec", "timestamp": 1.0}),
                "stats[1]",
            ),
            (json!([1, 2]), "stats[1]"),
        ] {
            let mut value = body();
            value["stats"][1] = object.clone();
            assert_eq!(field_of(&value), field, "{object}");
        }
    }

    #[test]
    fn malformed_json_is_refused() {
        for text in [
            "",
            "{",
            "[]",
            "{\"type\" 1}",
            "{\"type\": \"connection.user-agent\"} {}",
            "null",
        ] {
            let err = parse_report(text.as_bytes(), OffsetDateTime::now_utc()).expect_err(text);
            assert!(err.error.starts_with("invalid JSON"), "{text}: {err}");
            assert_eq!(err.field, "body", "{text}");
        }
        // A syntax error inside a field's value names the field.
        let err = parse_report(b"{\"channel_id\": tru}", OffsetDateTime::now_utc()).unwrap_err();
        assert_eq!(err.field, "channel_id");
    }

    #[test]
    fn exporter_type_header() {
        assert!(check_exporter_type(Some(b"connection.user-agent")).is_ok());
        let err = check_exporter_type(Some(b"node.erlang-vm")).unwrap_err();
        assert_eq!(err.field, EXPORTER_TYPE_HEADER);
        assert!(err.error.contains("node.erlang-vm"));
        assert!(check_exporter_type(None).is_err());
    }

    const SORA_LOG: &str = include_str!("../tests/fixtures/sora-logs/rtc_stats.sample.jsonl");
    const WEBHOOK_LOG: &str = include_str!("../tests/fixtures/sora-logs/session_webhook.jsonl");

    fn log_line() -> Value {
        serde_json::from_str(SORA_LOG.lines().next().unwrap()).unwrap()
    }

    fn parse_line(line: &Value) -> Result<LogLine, InvalidReport> {
        parse_log_line(line.to_string().as_bytes())
    }

    #[test]
    fn every_sora_log_line_parses_with_its_object_text_intact() {
        for text in SORA_LOG.lines() {
            let line: Value = serde_json::from_str(text).unwrap();
            let LogLine::Stats(stats) = parse_log_line(text.as_bytes()).unwrap() else {
                panic!("not a stats line: {text}");
            };
            assert_eq!(stats.connection.connection_id, line["connection_id"]);
            assert_eq!(stats.connection.channel_id, line["channel_id"]);
            assert_eq!(stats.connection.multistream, None);
            assert_eq!(
                format_timestamp_of(stats.sora_timestamp),
                line["timestamp"].as_str().unwrap()
            );
            assert_eq!(stats.object.rtc_id, line["rtc_id"]);
            assert_eq!(stats.object.rtc_type, line["rtc_type"]);
            let data: Value = serde_json::from_str(stats.object.rtc_data.get()).unwrap();
            assert_eq!(data, line["rtc_data"]);
            assert!(
                text.contains(stats.object.rtc_data.get()),
                "kept byte for byte"
            );
        }
    }

    fn format_timestamp_of(at: OffsetDateTime) -> String {
        kohaku_sink::format_timestamp(at)
    }

    #[test]
    fn webhook_and_other_lines_are_named_not_refused() {
        let kinds: Vec<String> = WEBHOOK_LOG
            .lines()
            .map(|text| match parse_log_line(text.as_bytes()).unwrap() {
                LogLine::Other { kind } => kind,
                LogLine::Stats(_) => panic!("a webhook line taken for stats"),
            })
            .collect();
        assert_eq!(kinds[0], "session.created");
        assert!(kinds[1..].iter().all(|kind| kind == "session.updated"));
        let mut line = log_line();
        line["type"] = json!("connection.user-agent");
        assert!(matches!(
            parse_line(&line),
            Ok(LogLine::Other { kind }) if kind == "connection.user-agent"
        ));
    }

    #[test]
    fn broken_log_lines_name_the_field() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"channel_id": "sora"}), "type"),
            (json!({"req": {"no_type": 1}}), "type"),
            (
                {
                    let mut line = log_line();
                    line.as_object_mut().unwrap().remove("rtc_data");
                    line
                },
                "rtc_data",
            ),
            (
                {
                    let mut line = log_line();
                    line["rtc_data"]["timestamp"] = json!("soon");
                    line
                },
                "rtc_data",
            ),
            (
                {
                    let mut line = log_line();
                    line["rtc_data"] = json!([1]);
                    line
                },
                "rtc_data",
            ),
            (
                {
                    let mut line = log_line();
                    line["rtc_id"] = json!("another-id");
                    line
                },
                "rtc_id",
            ),
            (
                {
                    let mut line = log_line();
                    line["rtc_timestamp"] = json!(1.5);
                    line
                },
                "rtc_timestamp",
            ),
            (
                {
                    let mut line = log_line();
                    line["session_id"] = json!("short");
                    line
                },
                "session_id",
            ),
            (
                {
                    let mut line = log_line();
                    line["simulcast"] = json!("no");
                    line
                },
                "simulcast",
            ),
        ];
        for (line, field) in cases {
            let err = parse_line(&line).expect_err(&line.to_string());
            assert_eq!(err.field, field, "{line}: {err}");
        }
        for text in ["", "garbage", "[]", "{", "{} {}"] {
            let err = parse_log_line(text.as_bytes()).expect_err(text);
            assert_eq!(err.field, "line", "{text}: {err}");
        }
    }

    #[test]
    fn values_no_store_can_keep_are_refused_naming_the_field_not_acknowledged() {
        for (field, bad) in [
            // Parses, but is out of range once converted to UTC: used to panic.
            ("timestamp", json!("9999-12-31T23:59:59-01:00")),
            ("timestamp", json!("0000-01-01T00:00:00Z")),
            ("timestamp", json!("1969-12-31T23:59:59Z")),
            ("channel_id", json!("a\0b")),
            ("client_id", json!("\0")),
            ("group_id", json!("g\0")),
            ("node_name", json!("sora\0")),
            ("connection_id", json!("🎥".repeat(26))),
            ("session_id", json!(format!("{}\0", "A".repeat(25)))),
        ] {
            let mut value = body();
            value[field] = bad.clone();
            assert_eq!(field_of(&value), field, "{field} = {bad}");
        }
        let edge = |timestamp: &str| {
            let mut value = body();
            value["timestamp"] = json!(timestamp);
            parse(&value)
        };
        assert!(edge("9999-12-31T23:59:59.999999Z").is_ok());
        assert!(edge("1970-01-01T00:00:00Z").is_ok());
        assert!(edge("1970-01-01T08:59:59+09:00").is_err());

        for (object, field) in [
            (
                json!({"id": "C", "type": "codec", "timestamp": 1e300}),
                "stats[1].timestamp",
            ),
            (
                json!({"id": "C", "type": "codec", "timestamp": -1.0}),
                "stats[1].timestamp",
            ),
        ] {
            let mut value = body();
            value["stats"][1] = object.clone();
            assert_eq!(field_of(&value), field, "{object}");
        }
        // Microsecond timestamps of some SDKs fit every store.
        let mut value = body();
        value["stats"][1]["timestamp"] = json!(1_753_423_611_556_525.0);
        assert!(parse(&value).is_ok());
    }

    #[test]
    fn escapes_jsonb_refuses_are_found_and_others_pass() {
        for (inner, refused) in [
            (r"a\u0000b", true),
            (r"\ud83c", true),
            (r"\ud83cx", true),
            (r"\ud83c\n", true),
            (r"\udfa5", true),
            (r"\ud83c\u0041", true),
            (r"\ud83c\udfa5", false),
            (r"\\u0000", false),
            (r"\\\ud83c\udfa5\\", false),
            (r"\u00e9\n\t\u0001", false),
            ("plain", false),
        ] {
            let text = format!(r#"{{"id":"C","type":"codec","timestamp":1,"x":"{inner}"}}"#);
            assert_eq!(unstorable_escape(&text).is_some(), refused, "{inner}");
            let body_text =
                body()
                    .to_string()
                    .replacen(r#""stats":["#, &format!(r#""stats":[{text},"#), 1);
            match parse_report(body_text.as_bytes(), OffsetDateTime::now_utc()) {
                Err(err) if refused => assert_eq!(err.field, "stats[0]", "{inner}"),
                Ok(_) if !refused => {}
                other => panic!("{inner}: {other:?}"),
            }
        }
    }

    #[test]
    fn what_the_client_sent_is_quoted_back_bounded() {
        let mut value = body();
        value["role"] = json!("x".repeat(1_000_000));
        let err = parse(&value).unwrap_err();
        assert_eq!(err.field, "role");
        assert!(err.error.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert_eq!(bounded("ééé".into(), 3), "é…");
    }

    /// The webhook Sora sent for the first request of its log: the lines' envelope, with their
    /// objects as a `stats` list.
    fn webhook_body() -> Value {
        let lines: Vec<Value> = SORA_LOG
            .lines()
            .map(|text| serde_json::from_str(text).unwrap())
            .collect();
        let first = &lines[0];
        let mut body = first.clone();
        let fields = body.as_object_mut().unwrap();
        for member in ["rtc_id", "rtc_type", "rtc_timestamp", "rtc_data"] {
            fields.remove(member);
        }
        let stats: Vec<Value> = lines
            .iter()
            .filter(|line| {
                line["id"] == first["id"] && line["connection_id"] == first["connection_id"]
            })
            .map(|line| line["rtc_data"].clone())
            .collect();
        fields.insert("stats".into(), Value::Array(stats));
        body
    }

    fn parse_hook(body: &Value, header: Option<&str>) -> Result<Webhook, InvalidReport> {
        parse_webhook(
            body.to_string().as_bytes(),
            header,
            OffsetDateTime::now_utc(),
        )
    }

    #[test]
    fn a_webhook_body_gives_the_report_its_log_lines_give() {
        let body = webhook_body();
        let Webhook::Stats(report) = parse_hook(&body, Some(CONNECTION_RTC)).unwrap() else {
            panic!("not stats");
        };
        assert_eq!(
            report.connection.group_id.as_deref(),
            body["group_id"].as_str()
        );
        assert_eq!(report.connection.multistream, None);
        assert_eq!(report.stats.len(), body["stats"].as_array().unwrap().len());
        let from_lines: Vec<(String, f64)> = SORA_LOG
            .lines()
            .take(report.stats.len())
            .map(|text| match parse_log_line(text.as_bytes()).unwrap() {
                LogLine::Stats(stats) => {
                    assert_eq!(stats.connection, report.connection);
                    assert_eq!(stats.sora_timestamp, report.sora_timestamp);
                    (stats.object.rtc_id, stats.object.rtc_timestamp)
                }
                LogLine::Other { kind } => panic!("{kind}"),
            })
            .collect();
        let from_webhook: Vec<(String, f64)> = report
            .stats
            .iter()
            .map(|object| (object.rtc_id.clone(), object.rtc_timestamp))
            .collect();
        assert_eq!(from_webhook, from_lines);
    }

    #[test]
    fn a_webhook_is_typed_by_its_header_else_by_its_body() {
        let mut untyped = webhook_body();
        untyped.as_object_mut().unwrap().remove("type");
        assert!(matches!(
            parse_hook(&untyped, Some(CONNECTION_RTC)),
            Ok(Webhook::Stats(_))
        ));
        let err = parse_hook(&untyped, None).unwrap_err();
        assert_eq!(err.field, "type");
        assert!(err.error.contains(WEBHOOK_TYPE_HEADER), "{err}");

        assert!(matches!(
            parse_hook(&webhook_body(), None),
            Ok(Webhook::Stats(_))
        ));
        let err = parse_hook(&webhook_body(), Some("connection.future")).unwrap();
        assert!(matches!(err, Webhook::Ignored { kind } if kind == "connection.future"));

        let mut other = webhook_body();
        other["type"] = json!("connection.user-agent");
        let err = parse_hook(&other, Some(CONNECTION_RTC)).unwrap_err();
        assert_eq!(err.field, "type");
        // Without a header, an exporter body is parsed as one.
        assert!(matches!(
            parse_hook(&body(), None),
            Ok(Webhook::Exporter(_))
        ));
    }

    #[test]
    fn ignored_webhook_types_need_no_stats_shape_but_stats_need_every_field() {
        for text in [
            r#"{"type":"session.created","stats":"nope"}"#,
            r#"{"type":"x","simulcast":"?"}"#,
        ] {
            let parsed = parse_webhook(text.as_bytes(), None, OffsetDateTime::now_utc()).unwrap();
            assert!(matches!(parsed, Webhook::Ignored { .. }), "{text}");
        }
        let parsed = parse_webhook(
            b"not json",
            Some("anything.else"),
            OffsetDateTime::now_utc(),
        );
        assert!(matches!(parsed, Ok(Webhook::Ignored { .. })));
        for field in [
            "timestamp",
            "channel_id",
            "session_id",
            "client_id",
            "connection_id",
            "role",
            "simulcast",
            "spotlight",
            "stats",
        ] {
            let mut value = webhook_body();
            value.as_object_mut().unwrap().remove(field);
            assert_eq!(
                parse_hook(&value, Some(CONNECTION_RTC)).unwrap_err().field,
                field
            );
        }
        let mut value = webhook_body();
        value["group_id"] = json!(["g"]);
        assert_eq!(
            parse_hook(&value, Some(CONNECTION_RTC)).unwrap_err().field,
            "group_id"
        );
    }

    #[test]
    fn spooled_bodies_parse_as_they_arrived() {
        let now = OffsetDateTime::now_utc();
        let mut untyped = webhook_body();
        untyped.as_object_mut().unwrap().remove("type");
        let report = parse_spooled(Protocol::Webhook, untyped.to_string().as_bytes(), now).unwrap();
        assert!(report.connection.group_id.is_some());
        let report = parse_spooled(Protocol::Exporter, body().to_string().as_bytes(), now).unwrap();
        assert_eq!(report.connection.group_id, None);
        assert!(parse_spooled(Protocol::Exporter, untyped.to_string().as_bytes(), now).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn scalar() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter("JSON has no NaN or infinities", |f| f.is_finite())
                    .prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                "[^\\x00]{0,12}".prop_map(Value::from),
            ]
        }

        proptest! {
            /// Any well-formed stats object every store keeps (no NUL) survives parsing with its id, type and time read
            /// and its text kept byte for byte.
            #[test]
            fn valid_objects_round_trip(
                objects in proptest::collection::vec(
                    ("[^\\x00]{1,20}", "[a-z-]{1,16}", 0f64..4e12,
                     proptest::collection::btree_map("[a-zA-Z]{1,10}", scalar(), 0..6)),
                    0..6)
            ) {
                let mut value = body();
                let stats: Vec<Value> = objects.iter().map(|(id, rtc_type, timestamp, fields)| {
                    let mut object = serde_json::Map::new();
                    for (key, field) in fields {
                        object.insert(format!("x{key}"), field.clone());
                    }
                    object.insert("id".into(), json!(id));
                    object.insert("type".into(), json!(rtc_type));
                    object.insert("timestamp".into(), json!(timestamp));
                    Value::Object(object)
                }).collect();
                value["stats"] = Value::Array(stats.clone());
                let report = parse(&value).expect("valid");
                prop_assert_eq!(report.stats.len(), objects.len());
                for ((object, (id, rtc_type, timestamp, _)), sent) in report.stats.iter().zip(&objects).zip(&stats) {
                    prop_assert_eq!(&object.rtc_id, id);
                    prop_assert_eq!(&object.rtc_type, rtc_type);
                    prop_assert_eq!(object.rtc_timestamp, *timestamp);
                    prop_assert_eq!(object.rtc_data.get(), sent.to_string());
                }
            }

            /// Whatever the bytes, the parser answers: a report or an error naming a field.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Err(refused) = parse_report(&bytes, OffsetDateTime::now_utc()) {
                    prop_assert!(!refused.field.is_empty());
                }
            }

            /// Valid bodies cut or with a byte changed are refused or parsed, never a panic.
            #[test]
            fn damaged_bodies_never_panic(cut in 0usize..2000, position in 0usize..2000, byte in any::<u8>()) {
                let mut text = body().to_string().into_bytes();
                let position = position % text.len();
                text[position] = byte;
                text.truncate(cut.min(text.len()));
                let _ = parse_report(&text, OffsetDateTime::now_utc());
            }
        }
    }
}
