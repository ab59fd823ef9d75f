//! The common report body read in one pass instead of two.
//!
//! The general path lets serde_json check the whole body (every stats object included) and then
//! scans each object again for its `id`, `type` and `timestamp`: two passes over most of the
//! bytes, about half of what an ingest request costs (`cargo bench --bench parse`). A body as Sora
//! sends it (compact JSON, no escapes, no control characters) is read here once: this scanner
//! checks the JSON grammar of the stats array while it reads the three members, and hands serde
//! only the body's other members, re-assembled into a small object.
//!
//! It only ever answers "here is what the general path would return" or "ask the general path":
//! anything unusual (an escape, a tab, a duplicate `stats`, an object deeper than the limit, a
//! member of the wrong type, a value Kohaku refuses) is left to the general path, which gives the
//! report or the error with its field exactly as before. A differential test holds the two to the
//! same answers.

use std::borrow::Cow;

use super::object::{member_slot, number_value, ObjectHead, MAX_OBJECT_DEPTH};

/// Nesting allowed in the body's other members before the general path takes over (serde_json's
/// own limit is 128).
const MAX_OTHER_DEPTH: usize = 64;
/// Bytes of the other members copied for serde at most: Sora's are a few hundred. A body with
/// larger ones takes the general path, which borrows them, so that no request holds a second
/// copy of itself outside the memory budget.
const MAX_OTHERS_BYTES: usize = 16 * 1024;

/// A body split into its stats objects, read, and its other members.
pub(super) struct Split<'a> {
    /// `{…}` holding every member but `stats`, for serde.
    pub(super) others: String,
    /// Each stats object's head and its text.
    pub(super) objects: Vec<(ObjectHead<'a>, &'a str)>,
}

/// `text` split, or `None` when the general path must read it.
pub(super) fn split(text: &str) -> Option<Split<'_>> {
    let bytes = text.as_bytes();
    // Without escapes and control characters a string is exactly the bytes between two quotes,
    // and the only whitespace is the space.
    let plain = bytes.chunks(64).all(|chunk| {
        !chunk
            .iter()
            .fold(false, |odd, &b| odd | (b < 0x20) | (b == b'\\'))
    });
    if !plain {
        return None;
    }
    let mut at = skip_spaces(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_spaces(bytes, at + 1);
    let mut others = String::with_capacity(1024);
    others.push('{');
    let mut objects = None;
    loop {
        let member = at;
        let (key, key_end) = string_at(text, at)?;
        at = skip_spaces(bytes, key_end);
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        at = skip_spaces(bytes, at + 1);
        if key == "stats" {
            if objects.is_some() {
                return None;
            }
            let (read, end) = stats_array(text, at)?;
            objects = Some(read);
            at = end;
        } else {
            let end = value_end(bytes, at, 0, MAX_OTHER_DEPTH)?;
            if others.len() + (end - member) >= MAX_OTHERS_BYTES {
                return None;
            }
            if others.len() > 1 {
                others.push(',');
            }
            others.push_str(&text[member..end]);
            at = end;
        }
        at = skip_spaces(bytes, at);
        match bytes.get(at) {
            Some(b',') => at = skip_spaces(bytes, at + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    if skip_spaces(bytes, at + 1) != bytes.len() {
        return None;
    }
    others.push('}');
    Some(Split {
        others,
        objects: objects?,
    })
}

/// The stats array at `at`: each object's head and text, and where the array ends.
#[allow(clippy::type_complexity)]
fn stats_array(text: &str, mut at: usize) -> Option<(Vec<(ObjectHead<'_>, &str)>, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(at) != Some(&b'[') {
        return None;
    }
    at = skip_spaces(bytes, at + 1);
    let mut objects = Vec::with_capacity(64);
    if bytes.get(at) == Some(&b']') {
        return Some((objects, at + 1));
    }
    loop {
        let (head, end) = object_head(text, at)?;
        objects.push((head, &text[at..end]));
        at = skip_spaces(bytes, end);
        match bytes.get(at) {
            Some(b',') => at = skip_spaces(bytes, at + 1),
            Some(b']') => return Some((objects, at + 1)),
            _ => return None,
        }
    }
}

/// The stats object at `at`, checked as JSON, its three members read: its head and its end.
fn object_head(text: &str, mut at: usize) -> Option<(ObjectHead<'_>, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    let mut head = ObjectHead::default();
    let mut seen = [false; 3];
    at = skip_spaces(bytes, at + 1);
    if bytes.get(at) == Some(&b'}') {
        return Some((head, at + 1));
    }
    loop {
        let (key, key_end) = string_at(text, at)?;
        at = skip_spaces(bytes, key_end);
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        at = skip_spaces(bytes, at + 1);
        // The object is level 1, as the general path counts it.
        let end = value_end(bytes, at, 1, MAX_OBJECT_DEPTH)?;
        let value = &text[at..end];
        if let Some(slot) = member_slot(key) {
            if std::mem::replace(&mut seen[slot], true) {
                return None;
            }
            match slot {
                0 => head.id = Some(plain_string(value)?),
                1 => head.rtc_type = Some(plain_string(value)?),
                _ => head.timestamp = Some(number_value(value).ok()??),
            }
        }
        at = skip_spaces(bytes, end);
        match bytes.get(at) {
            Some(b',') => at = skip_spaces(bytes, at + 1),
            Some(b'}') => return Some((head, at + 1)),
            _ => return None,
        }
    }
}

/// A string value's contents; `None` for any other value.
fn plain_string(value: &str) -> Option<Cow<'_, str>> {
    value
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .map(Cow::Borrowed)
}

/// The string at `at` (its contents) and the index just past it.
fn string_at(text: &str, at: usize) -> Option<(&str, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let close = at + 1 + memchr::memchr(b'"', &bytes[at + 1..])?;
    Some((&text[at + 1..close], close + 1))
}

fn skip_spaces(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at) == Some(&b' ') {
        at += 1;
    }
    at
}

/// The index just past the JSON value at `at`, which sits inside a container at `depth`; `None`
/// when it is not JSON or nests beyond `limit`.
fn value_end(bytes: &[u8], at: usize, depth: usize, limit: usize) -> Option<usize> {
    match *bytes.get(at)? {
        b'"' => Some(at + 2 + memchr::memchr(b'"', bytes.get(at + 1..)?)?),
        b'{' => container_end(bytes, at, depth + 1, limit, b'}', true),
        b'[' => container_end(bytes, at, depth + 1, limit, b']', false),
        b't' => literal_end(bytes, at, b"true"),
        b'f' => literal_end(bytes, at, b"false"),
        b'n' => literal_end(bytes, at, b"null"),
        b'-' | b'0'..=b'9' => number_end(bytes, at),
        _ => None,
    }
}

fn container_end(
    bytes: &[u8],
    open: usize,
    depth: usize,
    limit: usize,
    close: u8,
    keyed: bool,
) -> Option<usize> {
    if depth > limit {
        return None;
    }
    let mut at = skip_spaces(bytes, open + 1);
    if bytes.get(at) == Some(&close) {
        return Some(at + 1);
    }
    loop {
        if keyed {
            if bytes.get(at) != Some(&b'"') {
                return None;
            }
            at = skip_spaces(bytes, value_end(bytes, at, depth, limit)?);
            if bytes.get(at) != Some(&b':') {
                return None;
            }
            at = skip_spaces(bytes, at + 1);
        }
        at = skip_spaces(bytes, value_end(bytes, at, depth, limit)?);
        match bytes.get(at) {
            Some(b',') => at = skip_spaces(bytes, at + 1),
            Some(&found) if found == close => return Some(at + 1),
            _ => return None,
        }
    }
}

fn literal_end(bytes: &[u8], at: usize, literal: &[u8]) -> Option<usize> {
    bytes[at..]
        .starts_with(literal)
        .then_some(at + literal.len())
}

/// JSON's number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn number_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    let digits = |at: usize| {
        bytes[at.min(bytes.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    if bytes.get(at) == Some(&b'-') {
        at += 1;
    }
    match bytes.get(at) {
        Some(b'0') => at += 1,
        Some(b'1'..=b'9') => at += digits(at),
        _ => return None,
    }
    if bytes.get(at) == Some(&b'.') {
        let fraction = digits(at + 1);
        if fraction == 0 {
            return None;
        }
        at += 1 + fraction;
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        let exponent = digits(at);
        if exponent == 0 {
            return None;
        }
        at += exponent;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kohaku_sink::OffsetDateTime;
    use proptest::prelude::*;

    use crate::sora::parse_report;
    use crate::sora::report::parse_report_general;

    /// The one-pass reading and the general path give the same report or the same error.
    fn same_answer(body: &str) -> Result<(), TestCaseError> {
        let body = Bytes::copy_from_slice(body.as_bytes());
        let at = OffsetDateTime::UNIX_EPOCH;
        let fast = format!("{:?}", parse_report(&body, at));
        let general = format!("{:?}", parse_report_general(&body, at));
        prop_assert_eq!(fast, general, "{:?}", body);
        Ok(())
    }

    /// JSON-ish text of a value, valid or nearly so.
    fn value(depth: u32) -> BoxedStrategy<String> {
        let leaf = prop_oneof![
            4 => "-?(0|[1-9][0-9]{0,17})(\\.[0-9]{1,8})?([eE][+-]?[0-9]{1,3})?",
            1 => "(-|01|1\\.|\\.5|1e|\\+1|0x1|-0|1E\\+2|Infinity|NaN)",
            3 => "\"[a-zA-Z0-9 _.:/=-]{0,12}\"",
            1 => "\"([a-z]|\\\\[\"\\\\/bfnrtu]|\\\\u[0-9a-fA-F]{4}|\\\\x|\u{0001}|\t|é|🎥){0,4}\"",
            1 => "(true|false|null|tru|nul|True)",
        ];
        leaf.prop_recursive(depth, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec(("[a-z]{1,3}", inner), 0..4).prop_map(|members| {
                    let members: Vec<String> = members
                        .iter()
                        .map(|(k, v)| format!("\"{k}\":{v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        })
        .boxed()
    }

    /// A stats object: its three members (or a wrong or missing one) among others, in any order.
    fn object() -> impl Strategy<Value = String> {
        let id = prop_oneof![
            6 => "\"[A-Za-z0-9]{1,8}\"".prop_map(|v| format!("\"id\":{v}")),
            1 => value(1).prop_map(|v| format!("\"id\":{v}")),
            1 => Just(String::new()),
        ];
        let kind = prop_oneof![
            6 => "\"(codec|inbound-rtp|outbound-rtp)\"".prop_map(|v| format!("\"type\":{v}")),
            1 => value(1).prop_map(|v| format!("\"type\":{v}")),
            1 => Just(String::new()),
        ];
        let timestamp = prop_oneof![
            6 => (1_700_000_000_000u64..1_800_000_000_000, 0u32..1000)
                .prop_map(|(ms, frac)| format!("\"timestamp\":{ms}.{frac}")),
            1 => value(1).prop_map(|v| format!("\"timestamp\":{v}")),
            1 => Just(String::new()),
        ];
        let others = prop::collection::vec(("[a-zA-Z]{1,6}", value(3)), 0..5);
        (id, kind, timestamp, others, any::<u8>(), 0usize..3).prop_map(
            |(id, kind, timestamp, others, order, duplicate)| {
                let mut members: Vec<String> =
                    others.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                for (i, member) in [id, kind, timestamp].into_iter().enumerate() {
                    if member.is_empty() {
                        continue;
                    }
                    if i == duplicate && order % 7 == 0 {
                        members.push(member.clone());
                    }
                    members.insert(usize::from(order) % (members.len() + 1), member);
                }
                format!("{{{}}}", members.join(","))
            },
        )
    }

    fn deep(levels: usize) -> String {
        format!(
            "{{\"id\":\"d\",\"type\":\"codec\",\"timestamp\":1.5,\"x\":{}1{}}}",
            "[".repeat(levels),
            "]".repeat(levels)
        )
    }

    fn body(stats: &[String], extra: &str) -> String {
        format!(
            r#"{{"type":"connection.user-agent","timestamp":"2025-07-25T06:06:51.592776Z","label":"WebRTC SFU Sora","version":"2025.2.1","node_name":"sora@127.0.0.1","role":"sendrecv","simulcast":false,"spotlight":false,"channel_id":"sora","session_id":"7N8FP3M0ZH2ASBCDPHRGS2HYB8","client_id":"JXW8K4FG6H7TZ2F63T38ZHSJQG","connection_id":"JXW8K4FG6H7TZ2F63T38ZHSJQG"{extra},"stats":[{}]}}"#,
            stats.join(",")
        )
    }

    /// Otherwise every test above would pass with a reader that always declines.
    #[test]
    fn reads_plain_bodies_itself_and_leaves_the_rest() {
        use crate::sora::one_pass::split;
        let plain = body(
            &[
                deep(31),
                "{\"id\":\"a\",\"type\":\"codec\",\"timestamp\":1}".to_owned(),
            ],
            "",
        );
        let read = split(&plain).expect("a plain body is read in one pass");
        assert_eq!(read.objects.len(), 2);
        assert_eq!(read.objects[1].0.id.as_deref(), Some("a"));
        assert!(!read.others.contains("stats"));
        for declined in [
            body(&[deep(32)], ""),
            body(
                &["{\"id\":\"a\\n\",\"type\":\"codec\",\"timestamp\":1}".to_owned()],
                "",
            ),
            body(&[], "").replace(',', ",\n"),
            body(&[], ",\"stats\":[]"),
            body(
                &[],
                &format!(",\"large\":\"{}\"", "x".repeat(super::MAX_OTHERS_BYTES)),
            ),
        ] {
            assert!(split(&declined).is_none(), "{declined}");
        }
    }

    #[test]
    fn agrees_with_the_general_path_on_edge_cases() {
        for stats in [
            vec![],
            vec![deep(30)],
            vec![deep(31)],
            vec![deep(32)],
            vec!["{}".to_owned()],
            vec!["[]".to_owned()],
            vec!["{\"id\":\"a\",\"id\":\"a\",\"type\":\"codec\",\"timestamp\":1}".to_owned()],
            vec!["{\"id\":\"a\",\"type\":\"codec\",\"timestamp\":-0}".to_owned()],
            vec!["{\"id\":\"a\",\"type\":\"codec\",\"timestamp\":1e999}".to_owned()],
            vec!["{\"id\":\"\",\"type\":\"codec\",\"timestamp\":1}".to_owned()],
            vec!["{ \"id\" : \"a\" , \"type\" : \"codec\" , \"timestamp\" : 1 }".to_owned()],
        ] {
            for extra in [
                "",
                ",\"stats\":[]",
                ",\"x\":{\"y\":[1,2,{}]}",
                ",\"channel_id\":\"again\"",
                ",\"role\":5",
            ] {
                same_answer(&body(&stats, extra)).unwrap();
            }
        }
        for text in [
            "",
            "{}",
            "[]",
            "{\"stats\":[]}",
            "{\"stats\":[]} x",
            " {\"stats\":[]} ",
            "{\"stats\":[],}",
        ] {
            same_answer(text).unwrap();
        }
    }

    #[test]
    fn agrees_with_the_general_path_on_the_fixture_bodies() {
        for fixture in [
            "chromium/rtc_stats.chromium-av.jsonl",
            "sora-logs/rtc_stats.sample.jsonl",
        ] {
            let path = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
            let lines = std::fs::read_to_string(path).unwrap();
            let stats: Vec<String> = lines
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter_map(|line| line.get("rtc_data").map(|data| data.to_string()))
                .collect();
            for chunk in stats.chunks(30) {
                same_answer(&body(chunk, "")).unwrap();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn agrees_with_the_general_path(
            stats in prop::collection::vec(object(), 0..6),
            extra in prop::option::of(("[a-z_]{1,10}", value(2))),
        ) {
            let extra = extra.map_or(String::new(), |(k, v)| format!(",\"{k}\":{v}"));
            same_answer(&body(&stats, &extra))?;
        }

        #[test]
        fn agrees_with_the_general_path_on_damaged_bodies(
            stats in prop::collection::vec(object(), 1..4),
            at in any::<prop::sample::Index>(),
            byte in prop_oneof![Just(b' '), Just(b'"'), Just(b','), Just(b'}'), Just(b']'), Just(b'\\'), Just(b'\n'), Just(b'0'), Just(b'-'), Just(b'.')],
            delete in any::<bool>(),
        ) {
            let mut bytes = body(&stats, "").into_bytes();
            let at = at.index(bytes.len());
            if delete {
                bytes.remove(at);
            } else {
                bytes.insert(at, byte);
            }
            if let Ok(text) = String::from_utf8(bytes) {
                same_answer(&text)?;
            }
        }
    }
}
