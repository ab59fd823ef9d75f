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

const SORA_LOG: &str = include_str!("../../tests/fixtures/sora-logs/rtc_stats.sample.jsonl");
const WEBHOOK_LOG: &str = include_str!("../../tests/fixtures/sora-logs/session_webhook.jsonl");

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
        .filter(|line| line["id"] == first["id"] && line["connection_id"] == first["connection_id"])
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
