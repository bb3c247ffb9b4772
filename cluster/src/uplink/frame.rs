//! Uplink frames, version 1.
//!
//! ```text
//! +-----------------+---------+-----+----------------------+
//! | length: u32 BE  | version | tag | body: bincode 2      |
//! +-----------------+---------+-----+----------------------+
//!   length counts version, tag and body.
//! ```
//!
//! The version byte lets a cloud refuse an edge that speaks a newer protocol
//! with a clear error rather than misreading its frames. A frame longer than
//! `frame_bytes_max` is refused before its body is buffered, so a peer cannot
//! make us allocate without bound.

use bincode::{Decode, Encode};

/// 2: a stale-epoch refusal carries the log's epoch, so that an edge whose
/// outbox never sent anything can move above it (see `RefuseCode`).
pub const PROTOCOL_VERSION: u8 = 2;
/// The default bound on one frame. A segment of 1,000 small readings is about
/// 100 KiB, so this leaves room for large segments without letting one frame
/// hold much memory.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;
const HEADER_BYTES: usize = 4;

/// Every message of the uplink protocol.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Frame {
    /// Edge to cloud, first frame: who I am and where my stream stands.
    Hello {
        edge_id: String,
        epoch: u64,
        next_seq: u64,
    },
    /// Edge to cloud: one sealed outbox segment.
    Segment(SegmentFrame),
    /// Cloud to edge: the answer to Hello with the committed high-water mark.
    Welcome { hwm: Option<(u64, u64)> },
    /// Cloud to edge: every segment of `epoch` through `seq_through` is in the log.
    Ack { epoch: u64, seq_through: u64 },
    /// Cloud to edge: the stream is refused; the edge must not resend as is.
    Refuse { code: RefuseCode, reason: String },
}

/// One outbox segment as it travels: opaque bytes with a checksum.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SegmentFrame {
    pub epoch: u64,
    pub seq: u64,
    pub readings_count: u32,
    pub crc32: u32,
    pub bytes: Vec<u8>,
}

impl SegmentFrame {
    pub fn new(epoch: u64, seq: u64, readings_count: u32, bytes: Vec<u8>) -> Self {
        let crc32 = crc32fast::hash(&bytes);
        Self {
            epoch,
            seq,
            readings_count,
            crc32,
            bytes,
        }
    }

    pub fn checksum_ok(&self) -> bool {
        crc32fast::hash(&self.bytes) == self.crc32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum RefuseCode {
    /// The edge's epoch is older than the one in the log: a restored backup or
    /// a cloned disk, whose resends could write stale data; or a fresh outbox
    /// dated by a clock that was behind. An outbox that never sent a segment
    /// cannot be the former, and moves its epoch above `log_epoch`.
    StaleEpoch { log_epoch: u64 },
    /// A segment's body could not be decoded although its checksum held.
    MalformedSegment,
    /// The frame sequence broke the protocol.
    ProtocolViolation,
    /// The cloud is shutting down or cannot reach the log; try again later.
    Unavailable,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds frame_bytes_max ({max})")]
    TooLong { len: usize, max: usize },
    #[error("frame is empty")]
    Empty,
    #[error("frame has protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u8),
    #[error("frame body does not decode: {0}")]
    Body(String),
    #[error("frame body has {0} trailing bytes")]
    Trailing(usize),
}

/// The most bytes a frame body may claim, whatever `frame_bytes_max` says:
/// a length field inside a small frame cannot make the decoder allocate more.
pub const FRAME_BYTES_LIMIT: usize = 16 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_LIMIT>()
}

/// Encodes a frame with its length prefix.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_BYTES];
    out.push(PROTOCOL_VERSION);
    // Encoding into a Vec cannot fail for these plain types.
    let body = bincode::encode_to_vec(frame, config()).expect("frames always encode");
    out.extend_from_slice(&body);
    let len = (out.len() - HEADER_BYTES) as u32;
    out[..HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    out
}

/// Reassembles frames from a byte stream, holding at most one frame's bytes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    frame_bytes_max: usize,
}

impl FrameDecoder {
    pub fn new(frame_bytes_max: usize) -> Self {
        Self {
            buf: Vec::new(),
            frame_bytes_max,
        }
    }

    /// Bytes not yet consumed; the reader uses it to refuse to read more than
    /// one frame ahead.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_BYTES {
            return Ok(None);
        }
        let len =
            u32::from_be_bytes(self.buf[..HEADER_BYTES].try_into().expect("4 bytes")) as usize;
        if len > self.frame_bytes_max {
            return Err(FrameError::TooLong {
                len,
                max: self.frame_bytes_max,
            });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if self.buf.len() < HEADER_BYTES + len {
            return Ok(None);
        }
        let body = &self.buf[HEADER_BYTES..HEADER_BYTES + len];
        let result = decode_body(body);
        self.buf.drain(..HEADER_BYTES + len);
        result.map(Some)
    }

    /// How many more bytes the current frame needs; lets a reader size its reads.
    pub fn bytes_wanted(&self) -> usize {
        if self.buf.len() < HEADER_BYTES {
            return HEADER_BYTES - self.buf.len();
        }
        let len =
            u32::from_be_bytes(self.buf[..HEADER_BYTES].try_into().expect("4 bytes")) as usize;
        (HEADER_BYTES + len).saturating_sub(self.buf.len()).max(1)
    }
}

fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
    let version = body[0];
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    let (frame, used): (Frame, usize) = bincode::decode_from_slice(&body[1..], config())
        .map_err(|e| FrameError::Body(e.to_string()))?;
    if used != body.len() - 1 {
        return Err(FrameError::Trailing(body.len() - 1 - used));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Frame {
        Frame::Segment(SegmentFrame::new(7, 42, 3, vec![1, 2, 3, 4]))
    }

    #[test]
    fn round_trips_byte_by_byte() {
        let frames = vec![
            Frame::Hello {
                edge_id: "edge-1".into(),
                epoch: 7,
                next_seq: 1,
            },
            sample(),
            Frame::Ack {
                epoch: 7,
                seq_through: 42,
            },
        ];
        let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let mut out = Vec::new();
        for f in &frames {
            for b in encode(f) {
                dec.push(&[b]);
                if let Some(f) = dec.next_frame().unwrap() {
                    out.push(f);
                }
            }
        }
        assert_eq!(out, frames);
        assert_eq!(dec.buffered_bytes(), 0);
    }

    #[test]
    fn refuses_oversized_frames_before_buffering_them() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&1000u32.to_be_bytes());
        assert_eq!(
            dec.next_frame(),
            Err(FrameError::TooLong { len: 1000, max: 16 })
        );
    }

    #[test]
    fn refuses_other_versions() {
        let mut bytes = encode(&sample());
        bytes[4] = 9;
        let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        dec.push(&bytes);
        assert_eq!(dec.next_frame(), Err(FrameError::Version(9)));
    }

    #[test]
    fn detects_a_flipped_bit_in_a_segment() {
        let mut seg = SegmentFrame::new(1, 1, 1, vec![9; 64]);
        assert!(seg.checksum_ok());
        seg.bytes[10] ^= 0x04;
        assert!(!seg.checksum_ok());
    }

    #[test]
    fn a_huge_claimed_length_is_an_error_not_an_allocation() {
        // A Segment frame whose bytes field claims 2^62 bytes.
        let mut body = vec![PROTOCOL_VERSION];
        body.extend(bincode::encode_to_vec(1u32, bincode::config::standard()).unwrap()); // variant
        for v in [1u64, 1, 1] {
            body.extend(bincode::encode_to_vec(v, bincode::config::standard()).unwrap());
        }
        body.extend(bincode::encode_to_vec(7u32, bincode::config::standard()).unwrap());
        body.extend(bincode::encode_to_vec(1u64 << 62, bincode::config::standard()).unwrap());
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend(body);
        let mut dec = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        dec.push(&bytes);
        assert!(matches!(dec.next_frame(), Err(FrameError::Body(_))));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut dec = FrameDecoder::new(256);
            dec.push(&bytes);
            for _ in 0..64 {
                match dec.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
