//! The exporter's and the webhook's bodies (`docs/protocol.md` §1 and §2).

use std::borrow::Cow;

use bytes::Bytes;
use kohaku_sink::{OffsetDateTime, RawValue, Report};
use serde::Deserialize;

use super::fields::{required, ConnectionFields};
use super::log_line::TypeOnly;
use super::object::{object_of, parse_object, ObjectAt, ObjectHead};
use super::one_pass;
use super::{
    deserialize_object, Body as RequestBody, InvalidReport, Protocol, CONNECTION_RTC,
    CONNECTION_USER_AGENT, WEBHOOK_TYPE_HEADER,
};

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

/// Parses and validates one exporter body. `received_at` is when Kohaku got the request.
pub fn parse_report(
    body: impl RequestBody,
    received_at: OffsetDateTime,
) -> Result<Report, InvalidReport> {
    exporter_report(&body.shared(), received_at)
}

fn exporter_report(body: &Bytes, received_at: OffsetDateTime) -> Result<Report, InvalidReport> {
    general_or_one_pass(body, received_at, true)
}

/// [`parse_report`] without the one-pass reading: what it must agree with.
#[cfg(test)]
pub(super) fn parse_report_general(
    body: &Bytes,
    received_at: OffsetDateTime,
) -> Result<Report, InvalidReport> {
    general_or_one_pass(body, received_at, false)
}

fn general_or_one_pass(
    body: &Bytes,
    received_at: OffsetDateTime,
    one_pass: bool,
) -> Result<Report, InvalidReport> {
    let mut others = String::new();
    let (parsed, objects) = read_body(body, &mut others, one_pass)?;
    let event_type = required(parsed.event_type.as_deref(), "type")?;
    if event_type != CONNECTION_USER_AGENT {
        return Err(InvalidReport::new(
            "type",
            format!("unexpected event type `{event_type}`; expected `{CONNECTION_USER_AGENT}`"),
        ));
    }
    report_of(parsed, objects, body, received_at)
}

/// A body's stats objects, as [`read_body`] found them.
enum Objects<'a> {
    /// Checked as JSON by serde; each still to be scanned.
    Raw(Option<Vec<&'a RawValue>>),
    /// Checked and read in one pass ([`one_pass`]).
    Read(Vec<(ObjectHead<'a>, &'a str)>),
}

/// The body's members and its stats objects: in one pass when the body is plain (as Sora sends
/// it), else by serde_json (errors naming the field) and a scan per object. `others` holds what
/// the one-pass reading gives serde.
fn read_body<'a>(
    body: &'a Bytes,
    others: &'a mut String,
    one_pass: bool,
) -> Result<(Body<'a>, Objects<'a>), InvalidReport> {
    let split = one_pass
        .then(|| std::str::from_utf8(body).ok().and_then(one_pass::split))
        .flatten();
    if let Some(split) = split {
        *others = split.others;
        let others: &'a String = others;
        if let Ok(parsed) = serde_json::from_str::<Body<'a>>(others) {
            if parsed.stats.is_none() {
                return Ok((parsed, Objects::Read(split.objects)));
            }
        }
    }
    let mut parsed: Body<'_> = deserialize_object(body, "body", "the body")?;
    let objects = Objects::Raw(parsed.stats.take());
    Ok((parsed, objects))
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
    body: impl RequestBody,
    header_type: Option<&str>,
    received_at: OffsetDateTime,
) -> Result<Webhook, InvalidReport> {
    let body = &body.shared();
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
        return exporter_report(body, received_at).map(Webhook::Exporter);
    }
    if kind != CONNECTION_RTC {
        return Ok(Webhook::Ignored {
            kind: kind.into_owned(),
        });
    }
    let mut others = String::new();
    let (parsed, objects) = read_body(body, &mut others, true)?;
    if let Some(body_type) = parsed.event_type.as_deref().filter(|t| *t != kind) {
        return Err(InvalidReport::new(
            "type",
            format!(
                "the body's type `{body_type}` differs from the {WEBHOOK_TYPE_HEADER} header `{kind}`"
            ),
        ));
    }
    report_of(parsed, objects, body, received_at).map(Webhook::Stats)
}

/// Parses a body the spool kept, as it was parsed when it arrived by `protocol`.
pub fn parse_spooled(
    protocol: Protocol,
    body: impl RequestBody,
    received_at: OffsetDateTime,
) -> Result<Report, InvalidReport> {
    let body = &body.shared();
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
/// `body` is what `parsed` and `objects` borrow from; the stats objects share it.
fn report_of(
    parsed: Body<'_>,
    objects: Objects<'_>,
    body: &Bytes,
    received_at: OffsetDateTime,
) -> Result<Report, InvalidReport> {
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

    let stats = match objects {
        Objects::Raw(raw_objects) => {
            let raw_objects = required(raw_objects, "stats")?;
            let mut stats = Vec::with_capacity(raw_objects.len());
            for (index, raw) in raw_objects.into_iter().enumerate() {
                stats.push(parse_object(ObjectAt::Stats(index), raw, body)?);
            }
            stats
        }
        Objects::Read(read) => {
            let mut stats = Vec::with_capacity(read.len());
            for (index, (head, text)) in read.into_iter().enumerate() {
                stats.push(object_of(ObjectAt::Stats(index), head, text, body)?);
            }
            stats
        }
    };

    Ok(Report::new(connection, sora_timestamp, received_at, stats))
}
