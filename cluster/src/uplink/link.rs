//! Frames over a QUIC stream: the uplink's only I/O.
//!
//! The uplink runs on its own bi-stream of the one connection per edge and
//! cloud pair, so bulk segments never queue behind ractor's control messages.

use std::time::Duration;

use super::frame::{self, Frame, FrameDecoder, FrameError};

/// How many bytes one read takes from the stream at most. Bounds the buffer
/// between the socket and the frame decoder.
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("writing a frame failed: {0}")]
    Write(String),
    #[error("reading a frame failed: {0}")]
    Read(String),
    #[error("malformed frame: {0}")]
    Malformed(#[from] FrameError),
    #[error("the peer closed the stream in the middle of a frame")]
    Truncated,
}

pub struct FrameWriter {
    send: quinn::SendStream,
}

impl FrameWriter {
    pub fn new(send: quinn::SendStream) -> Self {
        Self { send }
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        let bytes = frame::encode(frame);
        self.send
            .write_all(&bytes)
            .await
            .map_err(|e| LinkError::Write(e.to_string()))
    }

    /// Writes raw bytes, bypassing the encoder: for tests of what a
    /// misbehaving peer could send.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|e| LinkError::Write(e.to_string()))
    }

    /// Finishes the stream so the peer reads a clean end.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, frame_bytes_max: usize) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(frame_bytes_max),
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn recv(&mut self) -> Result<Option<Frame>, LinkError> {
        let mut chunk = vec![0u8; READ_CHUNK_BYTES_MAX];
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            // Read no further than the current frame, so that at most one
            // frame (bounded by frame_bytes_max) is ever buffered.
            let want = self.decoder.bytes_wanted().min(READ_CHUNK_BYTES_MAX);
            match self.recv.read(&mut chunk[..want]).await {
                Ok(Some(n)) => self.decoder.push(&chunk[..n]),
                Ok(None) if self.decoder.buffered_bytes() == 0 => return Ok(None),
                Ok(None) => return Err(LinkError::Truncated),
                Err(e) => return Err(LinkError::Read(e.to_string())),
            }
        }
    }
}

/// A handle on the connection that carries a link.
#[derive(Clone)]
pub struct LinkHandle {
    conn: quinn::Connection,
}

impl LinkHandle {
    pub fn new(conn: quinn::Connection) -> Self {
        Self { conn }
    }

    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    pub fn close(&self, code: u32, reason: &str) {
        self.conn.close(code.into(), reason.as_bytes());
    }

    /// Resolves when the connection is gone, with the reason.
    pub async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }

    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.conn.remote_address()
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}
