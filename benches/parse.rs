//! `cargo bench --bench parse`: parsing one exporter body, the work every request does before it
//! is queued. Bodies are shaped like the benchmark harness's (30 Chromium objects).

use kohaku_sink::OffsetDateTime;

fn main() {
    divan::main();
}

/// A report body of the Chromium fixture's first `objects` objects.
fn body(objects: usize) -> Vec<u8> {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/chromium/rtc_stats.chromium-av.jsonl"
    );
    let text = std::fs::read_to_string(fixture).expect("chromium fixture");
    let stats: Vec<String> = text
        .lines()
        .take(objects)
        .map(|line| {
            let line: serde_json::Value = serde_json::from_str(line).expect("fixture line");
            line["rtc_data"].to_string()
        })
        .collect();
    format!(
        r#"{{"type":"connection.user-agent","timestamp":"2025-07-25T06:06:51.592776Z","label":"WebRTC SFU Sora","version":"2025.2.1","node_name":"sora@127.0.0.1","role":"sendrecv","simulcast":false,"spotlight":false,"channel_id":"sora","session_id":"7N8FP3M0ZH2ASBCDPHRGS2HYB8","client_id":"JXW8K4FG6H7TZ2F63T38ZHSJQG","connection_id":"JXW8K4FG6H7TZ2F63T38ZHSJQG","stats":[{}]}}"#,
        stats.join(",")
    )
    .into_bytes()
}

#[divan::bench(args = [1, 30])]
fn parse_report(bencher: divan::Bencher, objects: usize) {
    // As a request's body arrives: the parsed objects share it.
    let body = bytes::Bytes::from(body(objects));
    let now = OffsetDateTime::now_utc();
    bencher
        .counter(divan::counter::BytesCount::of_slice(&body))
        .bench(|| kohaku::sora::parse_report(divan::black_box(&body), now).expect("valid body"));
}

/// The floor: serde_json checking the same bytes are JSON, keeping nothing.
#[divan::bench(args = [30])]
fn validate_json_only(bencher: divan::Bencher, objects: usize) {
    let body = body(objects);
    bencher
        .counter(divan::counter::BytesCount::of_slice(&body))
        .bench(|| {
            serde_json::from_slice::<serde::de::IgnoredAny>(divan::black_box(&body)).expect("JSON")
        });
}
