//! The spool's on-disk format.
//!
//! A segment file starts with [`SEGMENT_MAGIC`]; records follow back to back:
//!
//! ```text
//! u32 LE  payload length
//! u32 LE  CRC-32 of the length bytes and the payload
//! payload: i64 LE received_at (ns since the Unix epoch), u8 protocol (0 exporter, 1 webhook,
//!          2 import), then the body as Sora sent it
//! ```
//!
//! The body is kept as received rather than re-encoded: replay runs it through the same parser as
//! a live request, chosen by the protocol byte, so the spool cannot drift from the protocol. A
//! crash mid-append leaves a short or mis-checksummed record at the tail, which [`decode`] reports
//! instead of returning garbage.
//!
//! Segments of the first format ([`SEGMENT_MAGIC_V1`], before the stats webhook) have no protocol
//! byte; every record in them is an exporter body. They are still read, so an upgrade replays what
//! an older Kohaku left in the spool.

use kohaku_sink::OffsetDateTime;

use crate::sora::Protocol;

/// Names the format and its version; a segment with other first bytes is not read.
pub const SEGMENT_MAGIC: &[u8; 8] = b"KHKSPL02";
/// The first format's header: records without a protocol byte, all exporter bodies.
pub const SEGMENT_MAGIC_V1: &[u8; 8] = b"KHKSPL01";
pub const HEADER_LEN: u64 = SEGMENT_MAGIC.len() as u64;
/// Length and checksum before each payload.
pub const RECORD_OVERHEAD: usize = 8;
const RECEIVED_AT_LEN: usize = 8;
const PROTOCOL_LEN: usize = 1;

/// How a segment's records are laid out, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// [`SEGMENT_MAGIC_V1`]: no protocol byte.
    V1,
    /// [`SEGMENT_MAGIC`]: what this version writes.
    V2,
}

impl Format {
    /// The format a segment's first bytes name, or `None` for a file Kohaku did not write.
    pub fn of_header(header: &[u8]) -> Option<Self> {
        match header.get(..SEGMENT_MAGIC.len())? {
            magic if magic == SEGMENT_MAGIC => Some(Self::V2),
            magic if magic == SEGMENT_MAGIC_V1 => Some(Self::V1),
            _ => None,
        }
    }

    fn min_payload(self) -> usize {
        match self {
            Self::V1 => RECEIVED_AT_LEN,
            Self::V2 => RECEIVED_AT_LEN + PROTOCOL_LEN,
        }
    }
}

fn protocol_byte(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Exporter => 0,
        Protocol::Webhook => 1,
        Protocol::Import => 2,
    }
}

fn protocol_of(byte: u8) -> Option<Protocol> {
    Protocol::ALL
        .into_iter()
        .find(|protocol| protocol_byte(*protocol) == byte)
}
/// Larger lengths are treated as corruption rather than allocated: no body Kohaku accepts comes
/// near it (`server.max_body_bytes` is validated against it).
pub const MAX_PAYLOAD_LEN: usize = 1 << 30;

/// One accepted report as the spool holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub received_at: OffsetDateTime,
    pub protocol: Protocol,
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
    /// Intact, but of a protocol this version does not know (written by a newer Kohaku).
    #[error("record of unknown protocol {0}")]
    Protocol(u8),
}

pub fn encoded_len(body_len: usize) -> usize {
    RECORD_OVERHEAD + RECEIVED_AT_LEN + PROTOCOL_LEN + body_len
}

/// Appends one record of the current format to `out`.
pub fn encode(received_at: OffsetDateTime, protocol: Protocol, body: &[u8], out: &mut Vec<u8>) {
    let payload_len = RECEIVED_AT_LEN + PROTOCOL_LEN + body.len();
    let len_bytes = u32::try_from(payload_len).unwrap_or(u32::MAX).to_le_bytes();
    let nanos = i64::try_from(received_at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
    let nanos_bytes = nanos.to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    let protocol = [protocol_byte(protocol)];
    crc.update(&nanos_bytes);
    crc.update(&protocol);
    crc.update(body);
    out.reserve(encoded_len(body.len()));
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&nanos_bytes);
    out.extend_from_slice(&protocol);
    out.extend_from_slice(body);
}

/// Decodes the record at the start of `bytes`, laid out as `format` says. `Ok(None)` when `bytes`
/// is empty (a clean end); otherwise the record and its encoded length.
pub fn decode(bytes: &[u8], format: Format) -> Result<Option<(Record<'_>, usize)>, DecodeError> {
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
    if !(format.min_payload()..=MAX_PAYLOAD_LEN).contains(&payload_len) {
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
    let (nanos_bytes, rest) = payload.split_at(RECEIVED_AT_LEN);
    let nanos = i64::from_le_bytes(nanos_bytes.try_into().unwrap_or_default());
    let received_at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let (protocol, body) = match format {
        Format::V1 => (Protocol::Exporter, rest),
        Format::V2 => {
            let (byte, body) = rest.split_at(PROTOCOL_LEN);
            let protocol = protocol_of(byte[0]).ok_or(DecodeError::Protocol(byte[0]))?;
            (protocol, body)
        }
    };
    Ok(Some((
        Record {
            received_at,
            protocol,
            body,
        },
        RECORD_OVERHEAD + payload_len,
    )))
}

/// Where each intact record of a segment's bytes (after the header) starts and ends, and the
/// reason decoding stopped early, if it did.
pub fn scan(bytes: &[u8], format: Format) -> (Vec<std::ops::Range<usize>>, Option<DecodeError>) {
    let mut spans = Vec::new();
    let mut at = 0;
    loop {
        match decode(&bytes[at..], format) {
            Ok(None) => return (spans, None),
            Ok(Some((_, len))) => {
                spans.push(at..at + len);
                at += len;
            }
            Err(err) => return (spans, Some(err)),
        }
    }
}

/// What the first format wrote, byte for byte: an upgrade must still replay it.
#[cfg(test)]
pub(crate) fn encode_v1(received_at: OffsetDateTime, body: &[u8]) -> Vec<u8> {
    let payload_len = RECEIVED_AT_LEN + body.len();
    let len_bytes = (payload_len as u32).to_le_bytes();
    let nanos_bytes = (received_at.unix_timestamp_nanos() as i64).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(&nanos_bytes);
    crc.update(body);
    [
        &len_bytes[..],
        &crc.finalize().to_le_bytes(),
        &nanos_bytes,
        body,
    ]
    .concat()
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
        assert_eq!(decode(&[], Format::V2), Ok(None));
    }

    #[test]
    fn a_record_of_garbage_length_is_refused_without_allocating() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 12]);
        assert_eq!(
            decode(&bytes, Format::V2),
            Err(DecodeError::Length(u32::MAX as usize))
        );
        // A zeroed tail (a file extended but never written) is not a record either.
        assert_eq!(decode(&[0; 32], Format::V2), Err(DecodeError::Length(0)));
    }

    #[test]
    fn first_format_records_read_as_exporter_bodies() {
        let mut bytes = encode_v1(at(5), b"{\"type\":\"connection.user-agent\"}");
        bytes.extend(encode_v1(at(6), b""));
        let (spans, stopped) = scan(&bytes, Format::V1);
        assert_eq!((spans.len(), stopped), (2, None));
        let (record, _) = decode(&bytes, Format::V1).unwrap().unwrap();
        assert_eq!(record.protocol, Protocol::Exporter);
        assert_eq!(record.received_at, at(5));
        assert_eq!(record.body, b"{\"type\":\"connection.user-agent\"}");
        assert_eq!(Format::of_header(b"KHKSPL01rest"), Some(Format::V1));
        assert_eq!(Format::of_header(SEGMENT_MAGIC), Some(Format::V2));
        assert_eq!(Format::of_header(b"KHKSPL03"), None);
        assert_eq!(Format::of_header(b"KHK"), None);
    }

    #[test]
    fn an_intact_record_of_an_unknown_protocol_is_refused() {
        let mut bytes = Vec::new();
        encode(at(1), Protocol::Webhook, b"{}", &mut bytes);
        // Rewrite the protocol byte and its checksum as a newer Kohaku would have.
        bytes[RECORD_OVERHEAD + RECEIVED_AT_LEN] = 9;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes[..4]);
        crc.update(&bytes[RECORD_OVERHEAD..]);
        bytes[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
        assert_eq!(decode(&bytes, Format::V2), Err(DecodeError::Protocol(9)));
    }

    proptest! {
        #[test]
        fn records_round_trip_back_to_back(
            records in proptest::collection::vec(
                (any::<i64>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..8)
        ) {
            let mut bytes = Vec::new();
            for (nanos, protocol, body) in &records {
                encode(at(*nanos), protocol_of(*protocol % 3).expect("0..3"), body, &mut bytes);
            }
            let (spans, stopped) = scan(&bytes, Format::V2);
            prop_assert_eq!(stopped, None);
            prop_assert_eq!(spans.len(), records.len());
            for (span, (nanos, protocol, body)) in spans.iter().zip(&records) {
                let (record, len) = decode(&bytes[span.clone()], Format::V2).expect("intact").expect("present");
                prop_assert_eq!(len, span.len());
                prop_assert_eq!(record.received_at, at(*nanos));
                prop_assert_eq!(Some(record.protocol), protocol_of(*protocol % 3));
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
                encode(at(1), Protocol::Webhook, body, &mut bytes);
                ends.push(bytes.len());
            }
            let cut = ((bytes.len() as f64) * cut_fraction) as usize;
            let (spans, stopped) = scan(&bytes[..cut], Format::V2);
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
            encode(at(7), Protocol::Exporter, &body, &mut bytes);
            let position = ((bytes.len() as f64) * position_fraction) as usize;
            bytes[position] ^= flip;
            prop_assert!(decode(&bytes, Format::V2).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = scan(&bytes, Format::V1);
            let _ = scan(&bytes, Format::V2);
        }
    }
}
