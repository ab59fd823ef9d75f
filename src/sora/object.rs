//! One stats object: its `id`, `type` and `timestamp` read in one pass, its nesting and escapes
//! checked, its text kept byte for byte.

use std::borrow::Cow;

use bytes::Bytes;
use kohaku_sink::{RawJson, RawValue, StatsObject};

use super::InvalidReport;

/// Largest stats-object `timestamp` (ms since the epoch) every store keeps: PostgreSQL's
/// `to_timestamp` ends in the year 294276. Some SDKs send microseconds (≈ 1.7e15), which fit.
const MAX_OBJECT_TIMESTAMP_MS: f64 = 9.0e15;

/// The three members Kohaku reads from a stats object.
#[derive(Default)]
pub(super) struct ObjectHead<'a> {
    pub(super) id: Option<Cow<'a, str>>,
    pub(super) rtc_type: Option<Cow<'a, str>>,
    pub(super) timestamp: Option<f64>,
    /// Some string in the object holds a `\` escape: only then can it hold one a store refuses.
    pub(super) escapes: bool,
}

/// Where a stats object sits, for naming its fields in errors.
#[derive(Clone, Copy)]
pub(super) enum ObjectAt {
    /// `stats[i]` of an exporter body.
    Stats(usize),
    /// `rtc_data` of a log line.
    RtcData,
}

/// Real stats objects nest two or three levels (`qualityLimitationDurations`). Deeper input is
/// refused here because the stores' JSON functions have depth limits of their own (SQLite's is
/// 1000): a row they cannot read would break every dashboard query that touches it.
pub(super) const MAX_OBJECT_DEPTH: usize = 32;

/// Why [`scan_head`] refused an object.
enum HeadError {
    TooDeep,
    /// A member Kohaku reads has the wrong type, or appears twice.
    Invalid(String),
}

/// A stats object's top-level members, walked without decoding: each one's place among the three
/// Kohaku reads ([`member_slot`]) and the span of its value. `text` must be one JSON object that
/// serde_json has already accepted, so only the members' boundaries need finding: strings are
/// skipped with `memchr`.
struct Members<'a> {
    text: &'a str,
    at: usize,
    /// How deep values may nest ([`value_end`]); deeper ends the walk with [`HeadError::TooDeep`].
    limit: usize,
    /// Some key or string walked so far holds a `\` escape.
    escapes: bool,
}

impl<'a> Members<'a> {
    fn new(text: &'a str, limit: usize) -> Self {
        Self {
            text,
            at: skip_whitespace(text.as_bytes(), 1),
            limit,
            escapes: false,
        }
    }
}

/// One top-level member of a stats object, as [`Members`] finds it.
pub(super) struct Member<'a> {
    /// The key between its quotes, as written (escapes not decoded).
    key: &'a str,
    key_escaped: bool,
    /// Where the member's value sits in the object's text.
    pub(super) value: std::ops::Range<usize>,
}

impl<'a> Member<'a> {
    /// The key as JSON reads it: a key spelled with escapes (`"\u0069d"`) is still `id`.
    pub(super) fn name(&self) -> Option<Cow<'a, str>> {
        if self.key_escaped {
            serde_json::from_str::<String>(&format!("\"{}\"", self.key))
                .ok()
                .map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(self.key))
        }
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = Result<Member<'a>, HeadError>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.text.as_bytes();
        if bytes.get(self.at) != Some(&b'"') {
            return None;
        }
        let mut key_escaped = false;
        let key_end = string_end(bytes, self.at, &mut key_escaped);
        self.escapes |= key_escaped;
        let key = &self.text[self.at + 1..key_end.saturating_sub(1).max(self.at + 1)];
        // Past the ':'.
        let start = skip_whitespace(bytes, skip_whitespace(bytes, key_end) + 1);
        let Some(end) = value_end(bytes, start, self.limit, &mut self.escapes) else {
            self.at = bytes.len();
            return Some(Err(HeadError::TooDeep));
        };
        self.at = skip_whitespace(bytes, end);
        if bytes.get(self.at) == Some(&b',') {
            self.at = skip_whitespace(bytes, self.at + 1);
        }
        Some(Ok(Member {
            key,
            key_escaped,
            value: start..end,
        }))
    }
}

/// The top-level members of `text` (one stats object Kohaku accepted, so valid JSON), each with
/// its value's text.
pub(super) fn members(text: &str) -> impl Iterator<Item = (Cow<'_, str>, &str)> {
    Members::new(text, usize::MAX)
        .map_while(Result::ok)
        .filter_map(move |member| Some((member.name()?, &text[member.value])))
}

/// Reads `id`, `type` and `timestamp` from the top level of a stats object and checks its nesting
/// against `limit`, in one pass over [`Members`]: only the three values Kohaku reads are decoded.
/// Two passes (a nesting scan, then serde) cost twice this (`cargo bench --bench parse`).
fn scan_head(text: &str, limit: usize) -> Result<ObjectHead<'_>, HeadError> {
    let mut head = ObjectHead::default();
    let mut seen = [false; 3];
    let mut members = Members::new(text, limit);
    for member in &mut members {
        let member = member?;
        let Some(slot) = member.name().as_deref().and_then(member_slot) else {
            continue;
        };
        let value = &text[member.value];
        let name = ["id", "type", "timestamp"][slot];
        if std::mem::replace(&mut seen[slot], true) {
            return Err(HeadError::Invalid(format!("duplicate field `{name}`")));
        }
        let invalid = |err: serde_json::Error| HeadError::Invalid(format!("`{name}`: {err}"));
        match slot {
            0 => head.id = string_value(value).map_err(invalid)?,
            1 => head.rtc_type = string_value(value).map_err(invalid)?,
            _ => head.timestamp = number_value(value).map_err(invalid)?,
        }
    }
    head.escapes = members.escapes;
    Ok(head)
}

/// Where the top-level `timestamp` member's value sits in a stats object's text (one Kohaku
/// accepted, so valid JSON); `None` when it has none.
pub fn timestamp_span(text: &str) -> Option<std::ops::Range<usize>> {
    Members::new(text, usize::MAX)
        .map_while(Result::ok)
        .find_map(|member| (member.name().as_deref() == Some("timestamp")).then_some(member.value))
}

/// Which of the three members Kohaku reads `name` (unquoted, unescaped) is: 0 `id`, 1 `type`,
/// 2 `timestamp`.
pub(super) fn member_slot(name: &str) -> Option<usize> {
    match name {
        "id" => Some(0),
        "type" => Some(1),
        "timestamp" => Some(2),
        _ => None,
    }
}

/// A JSON number, or null, as serde_json reads it into an `f64`, without a deserializer for the
/// common case. serde_json accepted the object, so a value that starts like a number is a JSON
/// number: an integer literal serde_json reads as an `i64`/`u64` and converts (`-0` stays negative zero), a
/// fractional or exponent literal it rounds correctly, as Rust's `f64` parser does. Anything else
/// (null, a string, an integer beyond 64 bits) gets serde_json's own answer and error.
pub(super) fn number_value(value: &str) -> Result<Option<f64>, serde_json::Error> {
    if value.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        let fast = if value.contains(['.', 'e', 'E']) {
            value
                .parse::<f64>()
                .ok()
                .filter(|number| number.is_finite())
        } else if value.starts_with('-') {
            // `-0` is negative zero to serde_json too.
            value
                .parse::<i64>()
                .ok()
                .map(|number| if number == 0 { -0.0 } else { number as f64 })
        } else {
            value.parse::<u64>().ok().map(|number| number as f64)
        };
        if fast.is_some() {
            return Ok(fast);
        }
    }
    serde_json::from_str(value)
}

/// A JSON string or null, borrowed when it holds no escapes.
pub(super) fn string_value(value: &str) -> Result<Option<Cow<'_, str>>, serde_json::Error> {
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

/// The index just past the string that starts at `start` (its opening quote); sets `escapes`
/// when the string holds a `\`.
fn string_end(bytes: &[u8], start: usize, escapes: &mut bool) -> usize {
    let mut at = start + 1;
    while let Some(found) = bytes
        .get(at..)
        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
    {
        at += found;
        if bytes[at] == b'\\' {
            *escapes = true;
            at += 2;
        } else {
            return at + 1;
        }
    }
    bytes.len()
}

/// The index just past the value that starts at `start`, inside the object (depth 1); `None` when
/// arrays and objects in it nest deeper than `limit` in all. Sets `escapes` as [`string_end`].
fn value_end(bytes: &[u8], start: usize, limit: usize, escapes: &mut bool) -> Option<usize> {
    match bytes.get(start) {
        Some(b'"') => Some(string_end(bytes, start, escapes)),
        Some(b'{' | b'[') => {
            let mut depth = 1usize;
            let mut at = start;
            while at < bytes.len() {
                match bytes[at] {
                    b'"' => {
                        at = string_end(bytes, at, escapes);
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

/// `body` is the buffer `raw` borrows from: the object keeps its text as a slice of it.
pub(super) fn parse_object(
    at: ObjectAt,
    raw: &RawValue,
    body: &Bytes,
) -> Result<StatsObject, InvalidReport> {
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
    object_of(at, head, raw.get(), body)
}

/// The stats object whose `head` was read from `text` (a slice of `body`), once its members pass
/// Kohaku's rules.
pub(super) fn object_of(
    at: ObjectAt,
    head: ObjectHead<'_>,
    text: &str,
    body: &Bytes,
) -> Result<StatsObject, InvalidReport> {
    let field = |name: &str| match at {
        ObjectAt::Stats(index) => format!("stats[{index}]{name}"),
        ObjectAt::RtcData => format!("rtc_data{name}"),
    };
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
    if let Some(what) = head.escapes.then(|| unstorable_escape(text)).flatten() {
        return Err(InvalidReport::new(
            field(""),
            format!("contains {what}, which PostgreSQL's jsonb cannot store"),
        ));
    }
    Ok(StatsObject {
        rtc_id: rtc_id.into_owned(),
        rtc_type: rtc_type.into_owned(),
        rtc_timestamp,
        rtc_data: RawJson::slice_of(body, text),
    })
}

/// The first escape in `text` (JSON that serde_json accepted) that names a character PostgreSQL's
/// `jsonb` refuses: `\u0000`, or half of a surrogate pair. Walks from backslash to backslash, so
/// an escaped backslash followed by `u0000` is not taken for an escape.
pub(super) fn unstorable_escape(text: &str) -> Option<&'static str> {
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::number_value;

    /// What serde_json makes of the value, bit for bit (NaN never occurs: JSON has none).
    fn serde_bits(text: &str) -> Option<Option<u64>> {
        serde_json::from_str::<Option<f64>>(text)
            .ok()
            .map(|number| number.map(f64::to_bits))
    }

    fn fast_bits(text: &str) -> Option<Option<u64>> {
        number_value(text)
            .ok()
            .map(|number| number.map(f64::to_bits))
    }

    #[test]
    fn reads_numbers_exactly_as_serde_json() {
        for text in [
            "0",
            "-0",
            "-0.0",
            "1753423611592.776",
            "1753423611592",
            "1.7534236115927761e12",
            "1E5",
            "1e+5",
            "2.5e-3",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1e400",
            "-1e400",
            "4.9e-324",
            "null",
            "\"12\"",
            "true",
        ] {
            assert_eq!(fast_bits(text), serde_bits(text), "{text}");
        }
    }

    proptest! {
        #[test]
        fn any_number_reads_as_serde_json_reads_it(
            number in any::<f64>().prop_filter("finite", |n| n.is_finite()),
            integer in any::<i64>(),
            digits in "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?",
        ) {
            for text in [number.to_string(), format!("{number:e}"), integer.to_string(), digits] {
                prop_assert_eq!(fast_bits(&text), serde_bits(&text), "{}", text);
            }
        }
    }
}
