//! The spool's on-disk format.
//!
//! A segment file starts with [`SEGMENT_MAGIC`]; records follow back to back:
//!
//! ```text
//! u32 LE  payload length
//! u32 LE  CRC-32 of the length bytes and the payload
//! payload: i64 LE received_at (ns since the Unix epoch), then the exporter body as Sora sent it
//! ```
//!
//! The body is kept as received rather than re-encoded: replay runs it through the same parser as
//! a live request, so the spool cannot drift from the protocol. A crash mid-append leaves a short
//! or mis-checksummed record at the tail, which [`decode`] reports instead of returning garbage.

use kohaku_sink::OffsetDateTime;

/// Names the format and its version; a segment with other first bytes is not read.
pub const SEGMENT_MAGIC: &[u8; 8] = b"KHKSPL01";
pub const HEADER_LEN: u64 = SEGMENT_MAGIC.len() as u64;
/// Length and checksum before each payload.
pub const RECORD_OVERHEAD: usize = 8;
const RECEIVED_AT_LEN: usize = 8;
/// Larger lengths are treated as corruption rather than allocated: no body Kohaku accepts comes
/// near it (`server.max_body_bytes` is validated against it).
pub const MAX_PAYLOAD_LEN: usize = 1 << 30;

/// One accepted report as the spool holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub received_at: OffsetDateTime,
    pub body: &'a [u8],
}

/// Why the bytes at a position are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the record announces: the tail of a write cut short.
    #[error("record cut short: {needed} bytes announced, {available} present")]
    Torn { needed: usize, available: usize },
    #[error("record checksum mismatch")]
    Checksum,
    #[error("record length {0} is impossible")]
    Length(usize),
}

pub fn encoded_len(body_len: usize) -> usize {
    RECORD_OVERHEAD + RECEIVED_AT_LEN + body_len
}

/// Appends one record to `out`.
pub fn encode(received_at: OffsetDateTime, body: &[u8], out: &mut Vec<u8>) {
    let payload_len = RECEIVED_AT_LEN + body.len();
    let len_bytes = u32::try_from(payload_len).unwrap_or(u32::MAX).to_le_bytes();
    let nanos = i64::try_from(received_at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
    let nanos_bytes = nanos.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(&nanos_bytes);
    crc.update(body);
    out.reserve(encoded_len(body.len()));
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&nanos_bytes);
    out.extend_from_slice(body);
}

/// Decodes the record at the start of `bytes`. `Ok(None)` when `bytes` is empty (a clean end);
/// otherwise the record and its encoded length.
pub fn decode(bytes: &[u8]) -> Result<Option<(Record<'_>, usize)>, DecodeError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() < RECORD_OVERHEAD {
        return Err(DecodeError::Torn {
            needed: RECORD_OVERHEAD,
            available: bytes.len(),
        });
    }
    let (len_bytes, rest) = bytes.split_at(4);
    let (crc_bytes, rest) = rest.split_at(4);
    let payload_len = u32::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
    if !(RECEIVED_AT_LEN..=MAX_PAYLOAD_LEN).contains(&payload_len) {
        return Err(DecodeError::Length(payload_len));
    }
    let Some(payload) = rest.get(..payload_len) else {
        return Err(DecodeError::Torn {
            needed: RECORD_OVERHEAD + payload_len,
            available: bytes.len(),
        });
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(len_bytes);
    crc.update(payload);
    if crc.finalize().to_le_bytes() != crc_bytes {
        return Err(DecodeError::Checksum);
    }
    let (nanos_bytes, body) = payload.split_at(RECEIVED_AT_LEN);
    let nanos = i64::from_le_bytes(nanos_bytes.try_into().unwrap_or_default());
    let received_at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    Ok(Some((
        Record { received_at, body },
        RECORD_OVERHEAD + payload_len,
    )))
}

/// Where each intact record of a segment's bytes (after the header) starts and ends, and the
/// reason decoding stopped early, if it did.
pub fn scan(bytes: &[u8]) -> (Vec<std::ops::Range<usize>>, Option<DecodeError>) {
    let mut spans = Vec::new();
    let mut at = 0;
    loop {
        match decode(&bytes[at..]) {
            Ok(None) => return (spans, None),
            Ok(Some((_, len))) => {
                spans.push(at..at + len);
                at += len;
            }
            Err(err) => return (spans, Some(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(nanos: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos)).expect("in range")
    }

    #[test]
    fn empty_input_is_a_clean_end() {
        assert_eq!(decode(&[]), Ok(None));
    }

    #[test]
    fn a_record_of_garbage_length_is_refused_without_allocating() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 12]);
        assert_eq!(decode(&bytes), Err(DecodeError::Length(u32::MAX as usize)));
        // A zeroed tail (a file extended but never written) is not a record either.
        assert_eq!(decode(&[0; 32]), Err(DecodeError::Length(0)));
    }

    proptest! {
        #[test]
        fn records_round_trip_back_to_back(
            records in proptest::collection::vec(
                (any::<i64>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..8)
        ) {
            let mut bytes = Vec::new();
            for (nanos, body) in &records {
                encode(at(*nanos), body, &mut bytes);
            }
            let (spans, stopped) = scan(&bytes);
            prop_assert_eq!(stopped, None);
            prop_assert_eq!(spans.len(), records.len());
            for (span, (nanos, body)) in spans.iter().zip(&records) {
                let (record, len) = decode(&bytes[span.clone()]).expect("intact").expect("present");
                prop_assert_eq!(len, span.len());
                prop_assert_eq!(record.received_at, at(*nanos));
                prop_assert_eq!(record.body, body.as_slice());
            }
        }

        #[test]
        fn a_cut_anywhere_keeps_the_records_before_it_and_reports_the_tail(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..6),
            cut_fraction in 0.0f64..1.0,
        ) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for body in &bodies {
                encode(at(1), body, &mut bytes);
                ends.push(bytes.len());
            }
            let cut = ((bytes.len() as f64) * cut_fraction) as usize;
            let (spans, stopped) = scan(&bytes[..cut]);
            let intact = ends.iter().filter(|end| **end <= cut).count();
            prop_assert_eq!(spans.len(), intact);
            let at_boundary = cut == 0 || ends.contains(&cut);
            prop_assert_eq!(stopped.is_none(), at_boundary, "{:?}", stopped);
        }

        #[test]
        fn any_flipped_byte_is_detected(
            body in proptest::collection::vec(any::<u8>(), 0..200),
            position_fraction in 0.0f64..1.0,
            flip in 1u8..=255,
        ) {
            let mut bytes = Vec::new();
            encode(at(7), &body, &mut bytes);
            let position = ((bytes.len() as f64) * position_fraction) as usize;
            bytes[position] ^= flip;
            prop_assert!(decode(&bytes).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = scan(&bytes);
        }
    }
}
