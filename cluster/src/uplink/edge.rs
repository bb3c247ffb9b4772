//! The edge side of the uplink protocol, as a sans-IO state machine.
//!
//! In the manner of quinn-proto, [`EdgeUplink`] takes inputs through
//! `handle_*` (link up or down, frames, sealed segments, segments read back
//! from the outbox, time) and produces outputs through `poll_*` (frames to
//! send, reads to make, segments to delete, the next timer). It does no I/O
//! and reads no clock, so a simulation can drive it deterministically.
//!
//! **Invariant:** `acked_through` only grows within an epoch, and a segment is
//! deleted only through a seq the cloud acknowledged.
//! **Invariant:** at most `inflight_segments_max` segments are sent and unacked.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::frame::{Frame, RefuseCode, SegmentFrame};

#[derive(Debug, Clone)]
pub struct EdgeUplinkConfig {
    /// Segments sent and not yet acknowledged. Bounds the memory the uplink
    /// holds and the work a reconnect repeats.
    pub inflight_segments_max: usize,
    /// How long the edge waits for Welcome after Hello before it gives up on
    /// the link and reconnects.
    pub welcome_timeout_ms: u64,
}

impl Default for EdgeUplinkConfig {
    fn default() -> Self {
        Self {
            inflight_segments_max: 32,
            welcome_timeout_ms: 40_000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UplinkError {
    #[error("the cloud sent {0} where the protocol does not allow it")]
    Unexpected(&'static str),
    #[error("the cloud acked seq {acked} of epoch {epoch}, beyond what was sent ({sent})")]
    AckBeyondSent { epoch: u64, acked: u64, sent: u64 },
    #[error("the cloud acked epoch {got}, but this outbox's epoch is {ours}")]
    AckWrongEpoch { got: u64, ours: u64 },
    #[error("the cloud holds seq {cloud} of this epoch, beyond the last sealed seq {sealed}: the outbox was restored or cloned")]
    CloudAhead { cloud: u64, sealed: u64 },
    #[error("the cloud refused the stream ({code:?}): {reason}")]
    Refused { code: RefuseCode, reason: String },
    #[error("no Welcome within welcome_timeout_ms ({0} ms)")]
    WelcomeTimeout(u64),
}

/// A request to read sealed segments back from the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    /// Tells a late answer from a previous link apart from a current one.
    pub link_generation: u64,
    pub from_seq: u64,
    /// The highest seq the read may return: the last sealed one.
    pub through_seq: u64,
    pub segments_max: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    AwaitingWelcome { since: Instant },
    Up,
}

#[derive(Debug)]
pub struct EdgeUplink {
    cfg: EdgeUplinkConfig,
    edge_id: String,
    epoch: u64,
    link: Link,
    link_generation: u64,
    sealed_through: u64,
    acked_through: u64,
    next_send: u64,
    inflight: VecDeque<u64>,
    read_pending: bool,
    transmit: VecDeque<Frame>,
    delete_through: Option<u64>,
    paused: bool,
}

impl EdgeUplink {
    /// `acked_through` is what the outbox knows to be in the log already (its
    /// segments were deleted); `sealed_through` the last seq it sealed.
    pub fn new(
        cfg: EdgeUplinkConfig,
        edge_id: String,
        epoch: u64,
        acked_through: u64,
        sealed_through: u64,
    ) -> Self {
        assert!(
            cfg.inflight_segments_max > 0,
            "inflight_segments_max must be positive"
        );
        assert!(acked_through <= sealed_through, "acked beyond sealed");
        Self {
            cfg,
            edge_id,
            epoch,
            link: Link::Down,
            link_generation: 0,
            sealed_through,
            acked_through,
            next_send: acked_through + 1,
            inflight: VecDeque::new(),
            read_pending: false,
            transmit: VecDeque::new(),
            delete_through: None,
            paused: false,
        }
    }

    pub fn is_up(&self) -> bool {
        self.link == Link::Up
    }

    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    pub fn sealed_through(&self) -> u64 {
        self.sealed_through
    }

    pub fn inflight_segments(&self) -> usize {
        self.inflight.len()
    }

    /// Stops sending new segments (acks still count); for drain control.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    pub fn handle_link_up(&mut self, now: Instant) {
        self.reset_link();
        self.link = Link::AwaitingWelcome { since: now };
        self.transmit.push_back(Frame::Hello {
            edge_id: self.edge_id.clone(),
            epoch: self.epoch,
            next_seq: self.acked_through + 1,
        });
    }

    pub fn handle_link_down(&mut self) {
        self.reset_link();
        self.link = Link::Down;
    }

    fn reset_link(&mut self) {
        self.link_generation += 1;
        self.inflight.clear();
        self.transmit.clear();
        self.read_pending = false;
        self.next_send = self.acked_through + 1;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The outbox moved its epoch above the log's after a stale-epoch
    /// refusal (it had never sent a segment). The next Hello carries it.
    pub fn handle_epoch_moved(&mut self, epoch: u64) {
        assert!(
            epoch > self.epoch,
            "epochs only grow: {epoch} after {}",
            self.epoch
        );
        assert!(
            self.link == Link::Down,
            "an epoch moves between links, not during one"
        );
        self.epoch = epoch;
    }

    pub fn handle_segment_sealed(&mut self, seq: u64) {
        assert!(
            seq > self.sealed_through,
            "sealed seqs only grow: {seq} after {}",
            self.sealed_through
        );
        self.sealed_through = seq;
    }

    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), UplinkError> {
        match frame {
            Frame::Welcome { hwm } => {
                if !matches!(self.link, Link::AwaitingWelcome { .. }) {
                    return Err(UplinkError::Unexpected("Welcome"));
                }
                if let Some((epoch, seq)) = hwm {
                    if epoch == self.epoch {
                        if seq > self.sealed_through {
                            return Err(UplinkError::CloudAhead {
                                cloud: seq,
                                sealed: self.sealed_through,
                            });
                        }
                        self.advance_ack(seq);
                    }
                }
                self.link = Link::Up;
                self.next_send = self.acked_through + 1;
                Ok(())
            }
            Frame::Ack { epoch, seq_through } => {
                if self.link != Link::Up {
                    return Err(UplinkError::Unexpected("Ack"));
                }
                if epoch != self.epoch {
                    return Err(UplinkError::AckWrongEpoch {
                        got: epoch,
                        ours: self.epoch,
                    });
                }
                let sent = self.next_send.saturating_sub(1);
                if seq_through > sent {
                    return Err(UplinkError::AckBeyondSent {
                        epoch,
                        acked: seq_through,
                        sent,
                    });
                }
                self.advance_ack(seq_through);
                while self.inflight.front().is_some_and(|&s| s <= seq_through) {
                    self.inflight.pop_front();
                }
                Ok(())
            }
            Frame::Refuse { code, reason } => {
                self.handle_link_down();
                Err(UplinkError::Refused { code, reason })
            }
            Frame::Hello { .. } => Err(UplinkError::Unexpected("Hello")),
            Frame::Segment(_) => Err(UplinkError::Unexpected("Segment")),
        }
    }

    fn advance_ack(&mut self, seq: u64) {
        // An ack below what we know is a stale duplicate, harmless to ignore.
        if seq > self.acked_through {
            self.acked_through = seq;
            self.delete_through = Some(seq);
        }
    }

    /// What to read from the outbox next, if anything.
    pub fn poll_read(&mut self) -> Option<ReadRequest> {
        if self.link != Link::Up || self.read_pending || self.paused {
            return None;
        }
        let room = self
            .cfg
            .inflight_segments_max
            .saturating_sub(self.inflight.len());
        if room == 0 || self.next_send > self.sealed_through {
            return None;
        }
        self.read_pending = true;
        Some(ReadRequest {
            link_generation: self.link_generation,
            from_seq: self.next_send,
            through_seq: self.sealed_through,
            segments_max: room,
        })
    }

    /// The answer to a [`ReadRequest`]: the segments found in seq order. Seqs
    /// may be missing (dropped by policy, or quarantined); they are skipped.
    pub fn handle_segments_read(&mut self, req: ReadRequest, segments: Vec<SegmentFrame>) {
        if req.link_generation != self.link_generation || self.link != Link::Up {
            return;
        }
        self.read_pending = false;
        let complete = segments.len() < req.segments_max;
        for seg in segments {
            assert!(
                seg.seq >= self.next_send && seg.seq <= req.through_seq,
                "read out of range"
            );
            self.next_send = seg.seq + 1;
            self.inflight.push_back(seg.seq);
            self.transmit.push_back(Frame::Segment(seg));
        }
        if complete {
            self.next_send = self.next_send.max(req.through_seq + 1);
        }
        debug_assert!(self.inflight.len() <= self.cfg.inflight_segments_max);
    }

    /// The read could not be made (the outbox failed or did not answer).
    /// Nothing is skipped: the same range is asked for again by the next poll.
    pub fn handle_read_failed(&mut self, req: ReadRequest) {
        if req.link_generation == self.link_generation {
            self.read_pending = false;
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    /// Segments through this seq are in the log and may leave the outbox.
    pub fn poll_delete(&mut self) -> Option<u64> {
        self.delete_through.take()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.link {
            Link::AwaitingWelcome { since } => {
                Some(since + Duration::from_millis(self.cfg.welcome_timeout_ms))
            }
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), UplinkError> {
        if let Some(deadline) = self.poll_timeout() {
            if now >= deadline {
                self.handle_link_down();
                return Err(UplinkError::WelcomeTimeout(self.cfg.welcome_timeout_ms));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u64) -> SegmentFrame {
        SegmentFrame::new(9, seq, 1, vec![seq as u8])
    }

    fn up(u: &mut EdgeUplink, hwm: Option<(u64, u64)>) {
        u.handle_link_up(Instant::now());
        assert!(matches!(u.poll_transmit(), Some(Frame::Hello { .. })));
        u.handle_frame(Frame::Welcome { hwm }).unwrap();
    }

    #[test]
    fn sends_within_the_window_and_deletes_on_ack() {
        let cfg = EdgeUplinkConfig {
            inflight_segments_max: 2,
            ..Default::default()
        };
        let mut u = EdgeUplink::new(cfg, "e".into(), 9, 0, 0);
        up(&mut u, None);
        for s in 1..=3 {
            u.handle_segment_sealed(s);
        }
        let req = u.poll_read().unwrap();
        assert_eq!((req.from_seq, req.through_seq, req.segments_max), (1, 3, 2));
        assert!(u.poll_read().is_none(), "one read at a time");
        u.handle_segments_read(req, vec![seg(1), seg(2)]);
        assert!(u.poll_read().is_none(), "window full");
        u.handle_frame(Frame::Ack {
            epoch: 9,
            seq_through: 1,
        })
        .unwrap();
        assert_eq!(u.poll_delete(), Some(1));
        let req = u.poll_read().unwrap();
        assert_eq!(req.from_seq, 3);
    }

    #[test]
    fn a_stale_epoch_refusal_then_a_moved_epoch_says_hello_with_it() {
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 2);
        u.handle_link_up(Instant::now());
        assert!(matches!(
            u.poll_transmit(),
            Some(Frame::Hello { epoch: 9, .. })
        ));
        let err = u
            .handle_frame(Frame::Refuse {
                code: RefuseCode::StaleEpoch { log_epoch: 20 },
                reason: "stale".into(),
            })
            .unwrap_err();
        assert!(matches!(
            err,
            UplinkError::Refused {
                code: RefuseCode::StaleEpoch { log_epoch: 20 },
                ..
            }
        ));
        u.handle_epoch_moved(21);
        u.handle_link_up(Instant::now());
        assert!(matches!(
            u.poll_transmit(),
            Some(Frame::Hello {
                epoch: 21,
                next_seq: 1,
                ..
            })
        ));
        // The log's mark is of another epoch: everything is sent again.
        u.handle_frame(Frame::Welcome { hwm: Some((20, 7)) })
            .unwrap();
        assert_eq!(u.poll_read().unwrap().from_seq, 1);
    }

    #[test]
    #[should_panic(expected = "epochs only grow")]
    fn an_epoch_never_moves_back() {
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 0);
        u.handle_epoch_moved(8);
    }

    #[test]
    fn welcome_drops_what_the_cloud_already_has() {
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 5);
        up(&mut u, Some((9, 3)));
        assert_eq!(u.poll_delete(), Some(3));
        assert_eq!(u.poll_read().unwrap().from_seq, 4);
    }

    #[test]
    fn a_reconnect_resends_the_unacked() {
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 2);
        up(&mut u, None);
        let req = u.poll_read().unwrap();
        u.handle_segments_read(req, vec![seg(1), seg(2)]);
        u.handle_link_down();
        up(&mut u, None);
        assert_eq!(u.poll_read().unwrap().from_seq, 1);
        // A read answered for the old link is ignored.
        u.handle_segments_read(req, vec![seg(1)]);
        assert_eq!(u.inflight_segments(), 0);
    }

    #[test]
    fn a_failed_read_skips_nothing() {
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 3);
        up(&mut u, None);
        let req = u.poll_read().unwrap();
        u.handle_read_failed(req);
        let again = u.poll_read().unwrap();
        assert_eq!((again.from_seq, again.through_seq), (1, 3));
    }

    #[test]
    fn gaps_from_dropped_segments_are_skipped() {
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 6);
        up(&mut u, None);
        let req = u.poll_read().unwrap();
        u.handle_segments_read(req, vec![seg(4), seg(6)]);
        assert!(u.poll_read().is_none());
        u.handle_segment_sealed(7);
        assert_eq!(u.poll_read().unwrap().from_seq, 7);
    }

    #[test]
    fn protocol_errors_are_errors_not_panics() {
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 2);
        assert_eq!(
            u.handle_frame(Frame::Ack {
                epoch: 9,
                seq_through: 1
            }),
            Err(UplinkError::Unexpected("Ack"))
        );
        up(&mut u, None);
        assert!(matches!(
            u.handle_frame(Frame::Ack {
                epoch: 9,
                seq_through: 2
            }),
            Err(UplinkError::AckBeyondSent { .. })
        ));
        assert!(matches!(
            u.handle_frame(Frame::Ack {
                epoch: 8,
                seq_through: 0
            }),
            Err(UplinkError::AckWrongEpoch { .. })
        ));
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 2);
        u.handle_link_up(Instant::now());
        assert!(matches!(
            u.handle_frame(Frame::Welcome { hwm: Some((9, 5)) }),
            Err(UplinkError::CloudAhead { .. })
        ));
    }

    #[test]
    fn welcome_times_out() {
        let mut u = EdgeUplink::new(EdgeUplinkConfig::default(), "e".into(), 9, 0, 0);
        let t0 = Instant::now();
        u.handle_link_up(t0);
        let deadline = u.poll_timeout().unwrap();
        assert!(u
            .handle_timeout(deadline - Duration::from_millis(1))
            .is_ok());
        assert_eq!(
            u.handle_timeout(deadline),
            Err(UplinkError::WelcomeTimeout(40_000))
        );
        assert!(!u.is_up());
    }
}
