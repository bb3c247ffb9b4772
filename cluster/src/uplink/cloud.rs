//! The cloud side of the uplink protocol: one [`Ingest`] per connected edge,
//! as a sans-IO state machine.
//!
//! The driver reads the edge's high-water mark from the log and hands it to
//! [`Ingest::handle_hwm`]; from then on the core turns segment frames into
//! commit batches ([`Ingest::poll_commit`]) and commit results into acks.
//!
//! **Invariant:** a segment at or below the log's high-water mark of its epoch
//! is never committed again; it is only acknowledged.
//! **Invariant:** an Ack is sent only for a seq whose commit succeeded.

use std::collections::VecDeque;

use super::frame::{Frame, RefuseCode, SegmentFrame};

#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Segments one log transaction may hold. Larger batches amortise the
    /// commit round trips; smaller ones ack sooner.
    pub commit_segments_max: usize,
    /// Segments received and not yet committed. An edge that sends more than
    /// this breaks its window and is disconnected.
    pub pending_segments_max: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            commit_segments_max: 16,
            pending_segments_max: 64,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("edge sent {0} where the protocol does not allow it")]
    Unexpected(&'static str),
    #[error("segment {seq} has epoch {got}, but the edge said Hello with epoch {hello}")]
    EpochChanged { seq: u64, got: u64, hello: u64 },
    #[error("segment {seq} fails its checksum")]
    Checksum { seq: u64 },
    #[error("segment {seq} arrived after segment {last}: seqs must grow")]
    OutOfOrder { seq: u64, last: u64 },
    #[error("edge has {0} segments pending, more than pending_segments_max")]
    WindowExceeded(usize),
    #[error("edge epoch {edge} is older than the log's epoch {log}: a restored or cloned outbox")]
    StaleEpoch { edge: u64, log: u64 },
}

impl IngestError {
    /// The refusal the edge is told before the link closes.
    pub fn refuse_code(&self) -> RefuseCode {
        match self {
            IngestError::StaleEpoch { log, .. } => RefuseCode::StaleEpoch { log_epoch: *log },
            IngestError::Checksum { .. } => RefuseCode::MalformedSegment,
            _ => RefuseCode::ProtocolViolation,
        }
    }
}

/// One log transaction to make: these segments, and the mark they advance to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitBatch {
    pub epoch: u64,
    pub seq_through: u64,
    pub segments: Vec<SegmentFrame>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Recovering,
    Streaming,
    Closed,
}

#[derive(Debug)]
pub struct Ingest {
    cfg: IngestConfig,
    edge_id: String,
    epoch: u64,
    state: State,
    hwm: Option<(u64, u64)>,
    last_received: u64,
    pending: VecDeque<SegmentFrame>,
    committing: bool,
    transmit: VecDeque<Frame>,
    duplicates: u64,
}

impl Ingest {
    /// Starts the ingest of an edge that said Hello with `epoch`.
    pub fn new(cfg: IngestConfig, edge_id: String, epoch: u64) -> Self {
        assert!(cfg.commit_segments_max > 0 && cfg.pending_segments_max > 0);
        Self {
            cfg,
            edge_id,
            epoch,
            state: State::Recovering,
            hwm: None,
            last_received: 0,
            pending: VecDeque::new(),
            committing: false,
            transmit: VecDeque::new(),
            duplicates: 0,
        }
    }

    pub fn edge_id(&self) -> &str {
        &self.edge_id
    }

    pub fn hwm(&self) -> Option<(u64, u64)> {
        self.hwm
    }

    /// Segments received again after a reconnect and acked without a commit.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    pub fn pending_segments(&self) -> usize {
        self.pending.len()
    }

    /// The mark read from the log. Answers Welcome, or refuses a stale epoch.
    pub fn handle_hwm(&mut self, hwm: Option<(u64, u64)>) -> Result<(), IngestError> {
        if self.state != State::Recovering {
            return Err(IngestError::Unexpected("a second recovery"));
        }
        self.hwm = hwm;
        if let Some((log_epoch, _)) = hwm {
            if log_epoch > self.epoch {
                let err = IngestError::StaleEpoch {
                    edge: self.epoch,
                    log: log_epoch,
                };
                self.refuse(&err);
                return Err(err);
            }
        }
        self.state = State::Streaming;
        self.transmit.push_back(Frame::Welcome { hwm });
        Ok(())
    }

    fn refuse(&mut self, err: &IngestError) {
        self.state = State::Closed;
        self.pending.clear();
        self.transmit.push_back(Frame::Refuse {
            code: err.refuse_code(),
            reason: err.to_string(),
        });
    }

    /// A frame from the edge. On error the core has queued a Refuse; the
    /// driver sends it and closes the link.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), IngestError> {
        let result = self.on_frame(frame);
        if let Err(e) = &result {
            self.refuse(e);
        }
        result
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), IngestError> {
        let seg = match frame {
            Frame::Segment(seg) if self.state == State::Streaming => seg,
            Frame::Segment(_) => return Err(IngestError::Unexpected("Segment before Welcome")),
            Frame::Hello { .. } => return Err(IngestError::Unexpected("a second Hello")),
            Frame::Welcome { .. } => return Err(IngestError::Unexpected("Welcome")),
            Frame::Ack { .. } => return Err(IngestError::Unexpected("Ack")),
            Frame::Refuse { .. } => return Err(IngestError::Unexpected("Refuse")),
        };
        if seg.epoch != self.epoch {
            return Err(IngestError::EpochChanged {
                seq: seg.seq,
                got: seg.epoch,
                hello: self.epoch,
            });
        }
        if !seg.checksum_ok() {
            return Err(IngestError::Checksum { seq: seg.seq });
        }
        if let Some((epoch, seq)) = self.hwm {
            if epoch == seg.epoch && seg.seq <= seq {
                self.duplicates += 1;
                self.last_received = self.last_received.max(seg.seq);
                self.transmit.push_back(Frame::Ack {
                    epoch,
                    seq_through: seq,
                });
                return Ok(());
            }
        }
        if seg.seq <= self.last_received {
            return Err(IngestError::OutOfOrder {
                seq: seg.seq,
                last: self.last_received,
            });
        }
        if self.pending.len() >= self.cfg.pending_segments_max {
            return Err(IngestError::WindowExceeded(self.pending.len() + 1));
        }
        self.last_received = seg.seq;
        self.pending.push_back(seg);
        Ok(())
    }

    /// The next transaction to make, if none is under way.
    pub fn poll_commit(&mut self) -> Option<CommitBatch> {
        if self.state != State::Streaming || self.committing || self.pending.is_empty() {
            return None;
        }
        let n = self.pending.len().min(self.cfg.commit_segments_max);
        let segments: Vec<SegmentFrame> = self.pending.drain(..n).collect();
        let seq_through = segments.last().expect("n > 0").seq;
        self.committing = true;
        Some(CommitBatch {
            epoch: self.epoch,
            seq_through,
            segments,
        })
    }

    /// The batch is in the log: advance the mark and ack the edge.
    pub fn handle_commit_succeeded(&mut self, batch: &CommitBatch) {
        assert!(self.committing, "a commit result without a commit");
        if let Some((epoch, seq)) = self.hwm {
            assert!(
                epoch < batch.epoch || (epoch == batch.epoch && seq < batch.seq_through),
                "the high-water mark only grows"
            );
        }
        self.committing = false;
        self.hwm = Some((batch.epoch, batch.seq_through));
        if self.state == State::Streaming {
            self.transmit.push_back(Frame::Ack {
                epoch: batch.epoch,
                seq_through: batch.seq_through,
            });
        }
    }

    /// The transaction failed and was aborted: the batch goes back to the front
    /// so that the next commit retries it, in order.
    pub fn handle_commit_failed(&mut self, batch: CommitBatch) {
        assert!(self.committing, "a commit result without a commit");
        self.committing = false;
        for seg in batch.segments.into_iter().rev() {
            self.pending.push_front(seg);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(epoch: u64, seq: u64) -> Frame {
        Frame::Segment(SegmentFrame::new(epoch, seq, 1, vec![seq as u8; 8]))
    }

    fn streaming(hwm: Option<(u64, u64)>) -> Ingest {
        let mut i = Ingest::new(IngestConfig::default(), "edge-1".into(), 5);
        i.handle_hwm(hwm).unwrap();
        assert_eq!(i.poll_transmit(), Some(Frame::Welcome { hwm }));
        i
    }

    #[test]
    fn commits_in_order_and_acks_after_commit() {
        let mut i = streaming(None);
        i.handle_frame(seg(5, 1)).unwrap();
        i.handle_frame(seg(5, 2)).unwrap();
        let batch = i.poll_commit().unwrap();
        assert_eq!(batch.seq_through, 2);
        assert_eq!(i.poll_transmit(), None, "no ack before the commit");
        i.handle_frame(seg(5, 3)).unwrap();
        assert!(i.poll_commit().is_none(), "one transaction at a time");
        i.handle_commit_succeeded(&batch);
        assert_eq!(
            i.poll_transmit(),
            Some(Frame::Ack {
                epoch: 5,
                seq_through: 2
            })
        );
        assert_eq!(i.poll_commit().unwrap().seq_through, 3);
    }

    #[test]
    fn replays_at_or_below_the_mark_are_acked_not_committed() {
        let mut i = streaming(Some((5, 2)));
        i.handle_frame(seg(5, 1)).unwrap();
        i.handle_frame(seg(5, 2)).unwrap();
        assert!(i.poll_commit().is_none());
        assert_eq!(i.duplicates(), 2);
        assert_eq!(
            i.poll_transmit(),
            Some(Frame::Ack {
                epoch: 5,
                seq_through: 2
            })
        );
        i.handle_frame(seg(5, 3)).unwrap();
        assert_eq!(i.poll_commit().unwrap().seq_through, 3);
    }

    #[test]
    fn a_failed_commit_is_retried_in_order() {
        let mut i = streaming(None);
        i.handle_frame(seg(5, 1)).unwrap();
        let batch = i.poll_commit().unwrap();
        i.handle_frame(seg(5, 2)).unwrap();
        i.handle_commit_failed(batch);
        let retry = i.poll_commit().unwrap();
        assert_eq!(
            retry.segments.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn a_stale_epoch_is_refused() {
        let mut i = Ingest::new(IngestConfig::default(), "edge-1".into(), 5);
        assert!(matches!(
            i.handle_hwm(Some((6, 1))),
            Err(IngestError::StaleEpoch { .. })
        ));
        assert!(matches!(
            i.poll_transmit(),
            Some(Frame::Refuse {
                code: RefuseCode::StaleEpoch { log_epoch: 6 },
                ..
            })
        ));
        assert!(i.is_closed());
    }

    #[test]
    fn a_newer_epoch_starts_over() {
        let mut i = streaming(Some((4, 90)));
        i.handle_frame(seg(5, 1)).unwrap();
        assert_eq!(i.poll_commit().unwrap().seq_through, 1);
    }

    #[test]
    fn bad_segments_close_the_stream() {
        let mut i = streaming(None);
        let mut bad = SegmentFrame::new(5, 1, 1, vec![1, 2, 3]);
        bad.bytes[0] ^= 1;
        assert_eq!(
            i.handle_frame(Frame::Segment(bad)),
            Err(IngestError::Checksum { seq: 1 })
        );
        assert!(matches!(
            i.poll_transmit(),
            Some(Frame::Refuse {
                code: RefuseCode::MalformedSegment,
                ..
            })
        ));
        let mut i = streaming(None);
        i.handle_frame(seg(5, 2)).unwrap();
        assert!(matches!(
            i.handle_frame(seg(5, 2)),
            Err(IngestError::OutOfOrder { .. })
        ));
        let mut i = streaming(None);
        assert!(matches!(
            i.handle_frame(seg(4, 1)),
            Err(IngestError::EpochChanged { .. })
        ));
    }

    #[test]
    fn the_window_is_enforced() {
        let cfg = IngestConfig {
            commit_segments_max: 1,
            pending_segments_max: 2,
        };
        let mut i = Ingest::new(cfg, "e".into(), 5);
        i.handle_hwm(None).unwrap();
        i.handle_frame(seg(5, 1)).unwrap();
        i.handle_frame(seg(5, 2)).unwrap();
        assert!(matches!(
            i.handle_frame(seg(5, 3)),
            Err(IngestError::WindowExceeded(3))
        ));
    }
}
