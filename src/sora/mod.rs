//! What Sora sends, parsed and validated into [`Report`]s: the stats exporter's body (Sora before
//! 2025.2, [`parse_report`]), the stats webhook's body (Sora 2025.2 and later, [`parse_webhook`]) and
//! the lines of its `rtc_stats.jsonl` log ([`parse_log_line`]). `docs/protocol.md` is the contract for all
//! three.
//!
//! The body is parsed once, borrowing from the request bytes. Each stats object is read only for
//! its `id`, `type` and `timestamp`; its JSON text is kept byte for byte, so nothing a client sent
//! is lost, reordered or re-serialised.

pub(crate) use summary::summarize;
mod fields;
mod log_line;
mod object;
mod one_pass;
mod report;
mod summary;

use bytes::Bytes;
use serde::Deserialize;

pub use log_line::{parse_log_line, LogLine, LogStats};
pub use object::timestamp_span;
pub use report::{parse_report, parse_spooled, parse_webhook, Webhook};

#[cfg(test)]
use kohaku_sink::{OffsetDateTime, Report};
#[cfg(test)]
use object::{unstorable_escape, MAX_OBJECT_DEPTH};

/// A body to parse. The stats objects of a [`Report`] share the body when it is [`Bytes`] (a
/// request's); a plain slice is copied once, whole, for them to share.
pub trait Body {
    fn shared(self) -> Bytes;
}

impl Body for &Bytes {
    fn shared(self) -> Bytes {
        self.clone()
    }
}

impl Body for &[u8] {
    fn shared(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

impl Body for &Vec<u8> {
    fn shared(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

impl<const N: usize> Body for &[u8; N] {
    fn shared(self) -> Bytes {
        Bytes::copy_from_slice(self)
    }
}

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

/// Why a request was refused: the JSON body of the 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InvalidReport {
    pub error: String,
    /// The offending field as a path into the body (`stats[3].timestamp`), or the header name.
    pub field: String,
}

/// Longest error message answered and logged: messages quote what the client sent, which must not
/// come back (or reach the log) unbounded.
pub(crate) const MAX_ERROR_BYTES: usize = 512;

impl InvalidReport {
    pub(super) fn new(field: impl Into<String>, error: impl Into<String>) -> Self {
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

/// Deserializes `bytes`, which must hold exactly one JSON object. Errors name the offending field as
/// a path, or `whole` when the problem is the JSON as a whole; `what` names it in messages.
pub(super) fn deserialize_object<'a, T: Deserialize<'a>>(
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

#[cfg(test)]
mod tests;
