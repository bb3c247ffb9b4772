//! The on-disk form of one outbox segment.
//!
//! ```text
//! offset size field
//!      0    4 magic "TRSG"
//!      4    1 format version (1)
//!      5    8 epoch            u64 LE
//!     13    8 seq              u64 LE
//!     21    4 readings_count   u32 LE
//!     25    4 payload_len      u32 LE
//!     29    4 crc32 (IEEE) of bytes 0..29 and the payload
//!     33    . payload: readings_count readings, each bincode 2 (standard config)
//! ```
//!
//! The checksum covers the header too, so a bit flip that turns one segment's
//! seq into another's is caught, not replayed.

use crate::reading::{bincode_config, Reading};

pub const MAGIC: &[u8; 4] = b"TRSG";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 33;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SegmentError {
    #[error("segment is {0} bytes, shorter than its header")]
    Truncated(usize),
    #[error("segment has no TRSG magic")]
    Magic,
    #[error("segment format version {0} is unknown")]
    Version(u8),
    #[error("segment says its payload is {said} bytes but holds {has}")]
    Length { said: usize, has: usize },
    #[error("segment checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("segment is stored under seq {key} but says seq {said}")]
    SeqMismatch { key: u64, said: u64 },
    #[error("segment payload does not decode: {0}")]
    Payload(String),
}

/// A segment whose header and checksum were verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedSegment<'a> {
    pub epoch: u64,
    pub seq: u64,
    pub readings_count: u32,
    pub payload: &'a [u8],
}

/// Appends one reading's encoding to a payload under construction.
pub fn encode_reading(reading: &Reading, out: &mut Vec<u8>) {
    // Encoding plain owned data into a Vec cannot fail.
    bincode::encode_into_std_write(reading, out, bincode_config()).expect("readings encode");
}

pub fn encode(epoch: u64, seq: u64, readings_count: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&readings_count.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks a stored segment; `key_seq` is the seq it is stored under.
pub fn verify(bytes: &[u8], key_seq: u64) -> Result<VerifiedSegment<'_>, SegmentError> {
    if bytes.len() < HEADER_BYTES {
        return Err(SegmentError::Truncated(bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return Err(SegmentError::Magic);
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(SegmentError::Version(bytes[4]));
    }
    let payload_len = u32_at(bytes, 25) as usize;
    let payload = &bytes[HEADER_BYTES..];
    if payload.len() != payload_len {
        return Err(SegmentError::Length {
            said: payload_len,
            has: payload.len(),
        });
    }
    let stored = u32_at(bytes, 29);
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..29]);
    h.update(payload);
    let computed = h.finalize();
    if stored != computed {
        return Err(SegmentError::Checksum { stored, computed });
    }
    let seq = u64_at(bytes, 13);
    if seq != key_seq {
        return Err(SegmentError::SeqMismatch {
            key: key_seq,
            said: seq,
        });
    }
    Ok(VerifiedSegment {
        epoch: u64_at(bytes, 5),
        seq,
        readings_count: u32_at(bytes, 21),
        payload,
    })
}

/// Decodes a payload of `count` readings, refusing trailing bytes.
pub fn decode_payload(payload: &[u8], count: u32) -> Result<Vec<Reading>, SegmentError> {
    // The count is not covered by the frame's checksum: pre-allocate only
    // what the bytes could hold (an encoded reading takes at least 4 bytes).
    let mut out = Vec::with_capacity((count as usize).min(payload.len() / 4));
    let mut at = 0;
    for _ in 0..count {
        let (r, used): (Reading, usize) =
            bincode::decode_from_slice(&payload[at..], bincode_config())
                .map_err(|e| SegmentError::Payload(e.to_string()))?;
        at += used;
        out.push(r);
    }
    if at != payload.len() {
        return Err(SegmentError::Payload(format!(
            "{} trailing bytes",
            payload.len() - at
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Metric, Value};

    fn reading(i: i64) -> Reading {
        Reading {
            device_id: format!("d{i}"),
            device_ts_us: i,
            edge_ts_us: i,
            stream: None,
            metrics: vec![Metric {
                name: "v".into(),
                value: Value::I64(i),
                unit: None,
            }],
        }
    }

    fn segment() -> Vec<u8> {
        let mut payload = Vec::new();
        for i in 0..3 {
            encode_reading(&reading(i), &mut payload);
        }
        encode(11, 7, 3, &payload)
    }

    #[test]
    fn round_trips() {
        let bytes = segment();
        let v = verify(&bytes, 7).unwrap();
        assert_eq!((v.epoch, v.seq, v.readings_count), (11, 7, 3));
        let readings = decode_payload(v.payload, v.readings_count).unwrap();
        assert_eq!(readings, (0..3).map(reading).collect::<Vec<_>>());
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = segment();
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(verify(&b, 7).is_err(), "bit {bit} flipped unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = segment();
        for len in 0..bytes.len() {
            assert!(
                verify(&bytes[..len], 7).is_err(),
                "truncated to {len} unnoticed"
            );
        }
    }

    #[test]
    fn a_segment_under_the_wrong_key_is_detected() {
        assert!(matches!(
            verify(&segment(), 8),
            Err(SegmentError::SeqMismatch { .. })
        ));
    }

    #[test]
    fn a_lying_count_is_an_error_not_an_allocation() {
        let bytes = segment();
        let v = verify(&bytes, 7).unwrap();
        assert!(decode_payload(v.payload, u32::MAX).is_err());
        assert!(decode_payload(v.payload, 2).is_err());
    }
}
