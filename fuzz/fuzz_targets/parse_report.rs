//! Any bytes as an exporter body: the parser answers with a report or a refusal naming a field,
//! and what it accepts keeps each stats object's text exactly.
#![no_main]

use kohaku::sora::parse_report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let now = kohaku_sink::OffsetDateTime::UNIX_EPOCH;
    match parse_report(body, now) {
        Ok(report) => {
            let text = String::from_utf8_lossy(body);
            for object in &report.stats {
                assert!(text.contains(object.rtc_data.get()));
                assert!(!object.rtc_id.is_empty() && !object.rtc_type.is_empty());
            }
        }
        Err(refused) => assert!(!refused.field.is_empty()),
    }
});
