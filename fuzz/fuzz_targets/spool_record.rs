//! Any bytes as a spool segment's records: decoding stops cleanly at damage, and every record it
//! returns re-encodes to the same bytes.
#![no_main]

use kohaku::spool::record::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let mut at = 0;
    while let Ok(Some((record, len))) = decode(&bytes[at..]) {
        let mut again = Vec::new();
        encode(record.received_at, record.body, &mut again);
        assert_eq!(again.as_slice(), &bytes[at..at + len]);
        at += len;
    }
});
