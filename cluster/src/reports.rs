//! A node's status reports on a stream of their own, so that the cloud knows
//! who sent each one: the stream is on the peer's QUIC connection, whose
//! certificate names it. (A report sent as a ractor message would carry no
//! sender, and any edge could speak for any other.)
//!
//! The stream is one-way, edge to cloud: each report is a `u32` big-endian
//! length, then that many bytes, which this module does not interpret.
//! Reports are lossy by design: a report lost with its connection is
//! superseded by the next one.

use crate::quic::{self, QuicError, StreamKind};
use crate::tls::NodeId;
use crate::uplink::link::LinkHandle;

/// The largest report accepted; a larger one ends the stream.
pub const REPORT_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("open the report stream: {0}")]
    Open(#[from] QuicError),
    #[error("write a report: {0}")]
    Write(String),
    #[error("read a report: {0}")]
    Read(String),
    #[error("a report of {len} bytes, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },
}

/// The sending end, on an edge.
pub struct ReportWriter {
    send: quinn::SendStream,
}

impl ReportWriter {
    /// Opens the report stream on `link`'s connection.
    pub async fn open(link: &LinkHandle) -> Result<Self, ReportError> {
        let (send, _recv) = quic::open_stream(link.connection(), StreamKind::Report).await?;
        Ok(Self { send })
    }

    pub async fn send(&mut self, report: &[u8]) -> Result<(), ReportError> {
        if report.len() > REPORT_BYTES_MAX {
            return Err(ReportError::TooLarge {
                len: report.len(),
                max: REPORT_BYTES_MAX,
            });
        }
        let len = u32::try_from(report.len()).unwrap_or(u32::MAX);
        self.send
            .write_all(&len.to_be_bytes())
            .await
            .map_err(|e| ReportError::Write(e.to_string()))?;
        self.send
            .write_all(report)
            .await
            .map_err(|e| ReportError::Write(e.to_string()))
    }
}

/// The receiving end, on the cloud: who sent it, from the certificate.
pub struct ReportReader {
    pub peer: NodeId,
    recv: quinn::RecvStream,
    bytes_max: usize,
}

impl ReportReader {
    pub(crate) fn new(peer: NodeId, recv: quinn::RecvStream) -> Self {
        Self {
            peer,
            recv,
            bytes_max: REPORT_BYTES_MAX,
        }
    }

    /// The next report, or `None` at the end of the stream.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, ReportError> {
        let mut len = [0u8; 4];
        match self.recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(ReportError::Read(e.to_string())),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > self.bytes_max {
            return Err(ReportError::TooLarge {
                len,
                max: self.bytes_max,
            });
        }
        let mut report = vec![0u8; len];
        self.recv
            .read_exact(&mut report)
            .await
            .map_err(|e| ReportError::Read(e.to_string()))?;
        Ok(Some(report))
    }
}
