//! Reports from edges to the cloud on a QUIC stream of their own
//! (`tributary_cluster::reports`), so that the cloud knows who sent each:
//! the stream is on the edge's connection, whose certificate names it. A
//! report that claims another node is refused and counted by the hub.
//!
//! On the edge, [`ReportLink`] takes the reporter's reports and writes them
//! to the stream of the current connection ([`ReportLink::attach`], on each
//! new connection). Reports are lossy by design: with no stream, or one that
//! is slow, a report is dropped (the next supersedes it), never queued
//! beyond [`REPORTS_QUEUED_MAX`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tributary_cluster::reports::{ReportReader, ReportWriter};
use tributary_cluster::uplink::link::LinkHandle;

use super::report::{now_ms, NodeReport};
use super::Hub;

/// Reports waiting for the stream; a report past it is dropped.
pub const REPORTS_QUEUED_MAX: usize = 2;
/// The longest one report may take to write before the stream is given up
/// (and opened again on the next connection).
const REPORT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The edge's side: hands reports to the current connection's stream.
#[derive(Clone)]
pub struct ReportLink {
    tx: mpsc::Sender<Vec<u8>>,
    current: Arc<tokio::sync::Mutex<Option<ReportWriter>>>,
    dropped: Arc<Mutex<u64>>,
}

impl Default for ReportLink {
    fn default() -> Self {
        Self::new()
    }
}

impl ReportLink {
    /// A link with its writer task (which needs a tokio runtime).
    pub fn new() -> Self {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(REPORTS_QUEUED_MAX);
        let current: Arc<tokio::sync::Mutex<Option<ReportWriter>>> = Arc::default();
        let writer = current.clone();
        let dropped: Arc<Mutex<u64>> = Arc::default();
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                let mut slot = writer.lock().await;
                let Some(w) = slot.as_mut() else {
                    continue;
                };
                match tokio::time::timeout(REPORT_WRITE_TIMEOUT, w.send(&bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "the report stream failed; waiting for the next connection");
                        *slot = None;
                    }
                    Err(_) => {
                        tracing::debug!(
                            "a report took too long to write; waiting for the next connection"
                        );
                        *slot = None;
                    }
                }
            }
        });
        Self {
            tx,
            current,
            dropped,
        }
    }

    /// Opens the report stream on a new connection and makes it current.
    pub fn attach(&self, link: &LinkHandle) {
        let (current, link) = (self.current.clone(), link.clone());
        tokio::spawn(async move {
            match ReportWriter::open(&link).await {
                Ok(w) => *current.lock().await = Some(w),
                Err(e) => tracing::debug!(error = %e, "opening the report stream failed"),
            }
        });
    }

    /// Queues a report for the stream; false if it was dropped (the queue
    /// is full: the stream is slow or down).
    pub fn send(&self, report: &NodeReport) -> bool {
        let bytes = match serde_json::to_vec(report) {
            Ok(b) => b,
            Err(_) => return false,
        };
        let sent = self.tx.try_send(bytes).is_ok();
        if !sent {
            *self.dropped.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        }
        sent
    }

    /// Reports dropped so far.
    pub fn dropped(&self) -> u64 {
        *self.dropped.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The cloud's side: reads one edge's report stream into the hub, each
/// report as from the stream's certified peer.
pub async fn serve(mut reader: ReportReader, hub: Arc<Mutex<Hub>>) {
    let peer = reader.peer.to_string();
    loop {
        match reader.recv().await {
            Ok(Some(bytes)) => match serde_json::from_slice::<NodeReport>(&bytes) {
                Ok(report) => {
                    hub.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .put_report_from(&peer, report, now_ms());
                }
                Err(e) => {
                    hub.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .reports_undecodable += 1;
                    tracing::warn!(%peer, error = %e, "a dashboard report does not decode; dropped");
                }
            },
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "the report stream ended");
                return;
            }
        }
    }
}
