//! The edge's store-and-forward outbox.
//!
//! # Design constraints
//! - **Nothing acknowledged is lost.** A reading is acknowledged to its source
//!   only after the segment holding it is written and synced.
//! - **Segments, not readings.** Readings are grouped into append-only
//!   segments (one store write and one fsync per segment), because an fsync
//!   per reading caps an edge at a few thousand readings per second.
//! - **Group commit.** A segment is sealed at `segment_readings_max`
//!   readings, `segment_bytes_max` bytes or `commit_interval_ms` after its
//!   first reading, whichever comes first.
//! - **Identity.** A sealed segment gets the next `seq` of this outbox's
//!   `epoch`. Seqs only grow and are never reused, even across crashes.
//! - **Deletion only on ack.** A segment leaves the outbox only when the
//!   cloud confirms it is in the log, or when `drop-oldest` evicts it (counted).
//! - **Bounded.** Stored and open bytes stay within `outbox_bytes_max`; when
//!   full, `block` refuses new readings (the source waits) and `drop-oldest`
//!   evicts the oldest segments.
//! - **Damage is contained.** Every segment carries a checksum verified when
//!   read. A damaged segment is quarantined and counted; the rest keeps flowing.
//!
//! # On-disk format
//! See [`segment`] for the bytes of one segment and [`sled_store`] for the keys.
//!
//! [`Outbox`] is a sans-IO core: the caller passes the time and decides when
//! to commit; the only side effects go through the [`OutboxStore`] trait.

pub mod segment;
pub mod sled_store;
pub mod store;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tributary_cluster::uplink::SegmentFrame;

use crate::reading::{Reading, ReadingError};
pub use sled_store::SledStore;
pub use store::{MemoryStore, OutboxStore, StoreError, StoreMeta};

/// What to do when a reading would take the outbox past `outbox_bytes_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Refuse the reading; its source waits and retries (backpressure).
    #[default]
    Block,
    /// Evict the oldest segments to make room, counting what was dropped.
    DropOldest,
}

impl std::str::FromStr for FullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "block" => Ok(FullPolicy::Block),
            "drop-oldest" => Ok(FullPolicy::DropOldest),
            other => Err(format!(
                "unknown policy {other:?}: expected block or drop-oldest"
            )),
        }
    }
}

/// The largest `segment_bytes_max`: sled 0.34 keeps values up to 2 MB inline
/// in its log (with its default 8 MB segments) and moves larger ones to blob
/// files that its flush does not sync. A segment must stay inline.
pub const SEGMENT_BYTES_LIMIT: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxConfig {
    /// The most bytes the outbox may hold, sealed and open segments together.
    pub outbox_bytes_max: u64,
    /// A segment is sealed when it holds this many readings.
    pub segment_readings_max: usize,
    /// A segment is sealed when its payload reaches this many bytes.
    pub segment_bytes_max: usize,
    /// A segment is sealed at most this long after its first reading: the
    /// bound on how long a source waits for its acknowledgement.
    pub commit_interval_ms: u64,
    pub full_policy: FullPolicy,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            outbox_bytes_max: 256 * 1024 * 1024,
            segment_readings_max: 1000,
            segment_bytes_max: 1024 * 1024,
            commit_interval_ms: 50,
            full_policy: FullPolicy::Block,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OutboxConfigError {
    #[error("segment_readings_max must be between 1 and 1000000, not {0}")]
    SegmentReadings(usize),
    #[error("segment_bytes_max must be between 1 KiB and 1 MiB, not {0}")]
    SegmentBytes(usize),
    #[error("commit_interval_ms must be between 1 and 60000, not {0}")]
    CommitInterval(u64),
    #[error("outbox_bytes_max ({0}) must hold at least 4 segments of segment_bytes_max ({1}), each with its 33-byte header")]
    OutboxBytes(u64, usize),
}

impl OutboxConfig {
    pub fn validate(&self) -> Result<(), OutboxConfigError> {
        if !(1..=1_000_000).contains(&self.segment_readings_max) {
            return Err(OutboxConfigError::SegmentReadings(
                self.segment_readings_max,
            ));
        }
        if !(1024..=SEGMENT_BYTES_LIMIT).contains(&self.segment_bytes_max) {
            return Err(OutboxConfigError::SegmentBytes(self.segment_bytes_max));
        }
        if !(1..=60_000).contains(&self.commit_interval_ms) {
            return Err(OutboxConfigError::CommitInterval(self.commit_interval_ms));
        }
        if self.outbox_bytes_max < 4 * (self.segment_bytes_max + segment::HEADER_BYTES) as u64 {
            return Err(OutboxConfigError::OutboxBytes(
                self.outbox_bytes_max,
                self.segment_bytes_max,
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid outbox config: {0}")]
    Config(#[from] OutboxConfigError),
}

/// Why a reading was not admitted. The ticket comes back so the caller can
/// answer the source.
#[derive(Debug)]
pub enum Refusal<T> {
    /// The outbox is full under `block`: retry after space is freed.
    Full(Reading, T),
    /// The reading breaks a bound; it will never be admitted.
    Invalid(ReadingError, T),
    /// The reading alone is larger than a segment may be.
    TooLarge(usize, T),
    /// The open segment is full and its commit has not succeeded yet (the
    /// disk is failing): retry after the next commit.
    SegmentFull(Reading, T),
}

/// A segment made durable: its readings' tickets may now be acknowledged.
#[derive(Debug)]
pub struct Committed<T> {
    pub seq: u64,
    pub tickets: Vec<T>,
    /// (device id, device timestamp) of each reading, for audit trails.
    pub keys: Vec<(String, i64)>,
}

/// A segment evicted by `drop-oldest`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub seq: u64,
    pub readings: u32,
    /// (device id, device timestamp) of each dropped reading, where the
    /// segment could still be decoded.
    pub keys: Vec<(String, i64)>,
}

/// What the outbox found when it opened.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    pub epoch: u64,
    pub sealed_through: u64,
    /// Everything at or below this seq has left the outbox.
    pub acked_through: u64,
    pub segments: usize,
    pub bytes: u64,
    pub quarantined: usize,
}

/// Counters; they only grow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxStats {
    pub readings_received: u64,
    pub readings_committed: u64,
    pub readings_refused_full: u64,
    pub readings_invalid: u64,
    pub segments_committed: u64,
    pub segments_acked: u64,
    pub segments_dropped: u64,
    pub readings_dropped: u64,
    pub segments_quarantined: u64,
    pub commit_errors: u64,
}

pub struct Outbox<T> {
    store: Box<dyn OutboxStore>,
    cfg: OutboxConfig,
    epoch: u64,
    sealed_through: u64,
    acked_through: u64,
    /// Durable, unacknowledged segments: seq to stored bytes.
    segments: BTreeMap<u64, u64>,
    stored_bytes: u64,
    open_payload: Vec<u8>,
    open_tickets: Vec<T>,
    open_keys: Vec<(String, i64)>,
    open_since: Option<Instant>,
    dropped: Vec<Dropped>,
    stats: OutboxStats,
}

impl<T> Outbox<T> {
    /// Opens the outbox on `store`. A new store takes `new_epoch`; callers
    /// pass a value that grows over time (the creation time in microseconds),
    /// so that the cloud can tell a newer outbox from a restored older one.
    pub fn open(
        mut store: Box<dyn OutboxStore>,
        cfg: OutboxConfig,
        new_epoch: u64,
    ) -> Result<(Self, Recovery), OutboxError> {
        cfg.validate()?;
        let meta = match store.load_meta()? {
            Some(meta) => meta,
            None => {
                let meta = StoreMeta {
                    epoch: new_epoch,
                    sealed_through: 0,
                };
                store.init_meta(meta)?;
                store.sync()?;
                meta
            }
        };
        let mut segments = BTreeMap::new();
        let mut stored_bytes = 0;
        for (seq, bytes) in store.list()? {
            segments.insert(seq, bytes);
            stored_bytes += bytes;
        }
        // A segment above the mark would mean the batch was not atomic.
        let last = segments.keys().next_back().copied().unwrap_or(0);
        let sealed_through = meta.sealed_through.max(last);
        let acked_through = segments
            .keys()
            .next()
            .map_or(sealed_through, |first| first - 1);
        let quarantined = store.quarantined()?.len();
        let recovery = Recovery {
            epoch: meta.epoch,
            sealed_through,
            acked_through,
            segments: segments.len(),
            bytes: stored_bytes,
            quarantined,
        };
        let outbox = Self {
            store,
            cfg,
            epoch: meta.epoch,
            sealed_through,
            acked_through,
            segments,
            stored_bytes,
            open_payload: Vec::new(),
            open_tickets: Vec::new(),
            open_keys: Vec::new(),
            open_since: None,
            dropped: Vec::new(),
            stats: OutboxStats::default(),
        };
        Ok((outbox, recovery))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn config(&self) -> &OutboxConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &OutboxStats {
        &self.stats
    }

    pub fn sealed_through(&self) -> u64 {
        self.sealed_through
    }

    /// Stored plus open bytes, the figure bounded by `outbox_bytes_max`.
    pub fn bytes_used(&self) -> u64 {
        self.stored_bytes + self.open_bytes()
    }

    pub fn segments_stored(&self) -> usize {
        self.segments.len()
    }

    pub fn readings_open(&self) -> usize {
        self.open_tickets.len()
    }

    fn open_bytes(&self) -> u64 {
        if self.open_tickets.is_empty() {
            0
        } else {
            (self.open_payload.len() + segment::HEADER_BYTES) as u64
        }
    }

    /// Adds a reading to the open segment.
    pub fn handle_reading(
        &mut self,
        now: Instant,
        reading: Reading,
        ticket: T,
    ) -> Result<(), Refusal<T>> {
        self.stats.readings_received += 1;
        if let Err(e) = reading.validate() {
            self.stats.readings_invalid += 1;
            return Err(Refusal::Invalid(e, ticket));
        }
        let mut encoded = Vec::new();
        segment::encode_reading(&reading, &mut encoded);
        if encoded.len() > self.cfg.segment_bytes_max {
            self.stats.readings_invalid += 1;
            return Err(Refusal::TooLarge(encoded.len(), ticket));
        }
        // A segment never grows past its bounds, even while commits fail, so
        // that it always fits in a frame.
        let open = self.open_tickets.len();
        if open > 0
            && (open >= self.cfg.segment_readings_max
                || self.open_payload.len() + encoded.len() > self.cfg.segment_bytes_max)
        {
            return Err(Refusal::SegmentFull(reading, ticket));
        }
        let extra = encoded.len() as u64
            + if self.open_tickets.is_empty() {
                segment::HEADER_BYTES as u64
            } else {
                0
            };
        while self.bytes_used() + extra > self.cfg.outbox_bytes_max {
            match self.cfg.full_policy {
                FullPolicy::Block => {
                    self.stats.readings_refused_full += 1;
                    return Err(Refusal::Full(reading, ticket));
                }
                FullPolicy::DropOldest => {
                    if !self.drop_oldest() {
                        // Only the open segment is left; validate() makes the
                        // budget hold four segments, so this cannot happen.
                        self.stats.readings_refused_full += 1;
                        return Err(Refusal::Full(reading, ticket));
                    }
                }
            }
        }
        self.open_payload.extend_from_slice(&encoded);
        self.open_tickets.push(ticket);
        self.open_keys
            .push((reading.device_id, reading.device_ts_us));
        self.open_since.get_or_insert(now);
        debug_assert!(
            self.bytes_used() <= self.cfg.outbox_bytes_max,
            "outbox over budget"
        );
        Ok(())
    }

    fn drop_oldest(&mut self) -> bool {
        let Some((&seq, &bytes)) = self.segments.iter().next() else {
            return false;
        };
        let (readings, keys) = match self.store.read_range(seq, seq, 1) {
            Ok(v) => match v.first().map(|(_, b)| segment::verify(b, seq)) {
                Some(Ok(s)) => {
                    let keys = segment::decode_payload(s.payload, s.readings_count)
                        .map(|rs| {
                            rs.into_iter()
                                .map(|r| (r.device_id, r.device_ts_us))
                                .collect()
                        })
                        .unwrap_or_default();
                    (s.readings_count, keys)
                }
                _ => (0, Vec::new()),
            },
            Err(_) => (0, Vec::new()),
        };
        if self.store.remove(seq).is_err() {
            return false;
        }
        self.segments.remove(&seq);
        self.stored_bytes -= bytes;
        self.acked_through = self.acked_through.max(seq);
        self.stats.segments_dropped += 1;
        self.stats.readings_dropped += readings as u64;
        self.dropped.push(Dropped {
            seq,
            readings,
            keys,
        });
        true
    }

    /// Segments evicted by `drop-oldest` since the last call.
    pub fn poll_dropped(&mut self) -> Vec<Dropped> {
        std::mem::take(&mut self.dropped)
    }

    /// When the open segment must be committed, if it holds anything.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.open_since
            .map(|t| t + Duration::from_millis(self.cfg.commit_interval_ms))
    }

    /// Whether the open segment should be committed now.
    pub fn commit_due(&self, now: Instant) -> bool {
        !self.open_tickets.is_empty()
            && (self.open_tickets.len() >= self.cfg.segment_readings_max
                // Nearly full: the next reading would likely not fit.
                || self.open_payload.len() + 256 >= self.cfg.segment_bytes_max
                || self.poll_timeout().is_some_and(|t| now >= t))
    }

    /// Seals the open segment, writes it and syncs. On error nothing is
    /// acknowledged and the readings stay open, to be retried.
    pub fn commit(&mut self) -> Result<Option<Committed<T>>, OutboxError> {
        if self.open_tickets.is_empty() {
            return Ok(None);
        }
        let seq = self.sealed_through + 1;
        let count = self.open_tickets.len() as u32;
        let bytes = segment::encode(self.epoch, seq, count, &self.open_payload);
        let written = self
            .store
            .append(seq, &bytes)
            .and_then(|_| self.store.sync());
        if let Err(e) = written {
            self.stats.commit_errors += 1;
            // The write may have reached the store without its sync; removing
            // it keeps seq `seq` unused until a commit fully succeeds.
            let _ = self.store.remove(seq);
            return Err(e.into());
        }
        assert!(seq > self.sealed_through, "seqs only grow");
        self.sealed_through = seq;
        self.segments.insert(seq, bytes.len() as u64);
        self.stored_bytes += bytes.len() as u64;
        self.open_payload.clear();
        self.open_since = None;
        self.stats.segments_committed += 1;
        self.stats.readings_committed += count as u64;
        Ok(Some(Committed {
            seq,
            tickets: std::mem::take(&mut self.open_tickets),
            keys: std::mem::take(&mut self.open_keys),
        }))
    }

    /// Up to `max` verified segments with `from <= seq <= through`. Damaged
    /// segments are quarantined, counted and skipped.
    pub fn read(
        &mut self,
        from: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<SegmentFrame>, OutboxError> {
        let mut out = Vec::new();
        let mut from = from;
        while out.len() < max && from <= through {
            let batch = self.store.read_range(from, through, max - out.len())?;
            if batch.is_empty() {
                break;
            }
            for (seq, bytes) in batch {
                from = seq + 1;
                match segment::verify(&bytes, seq) {
                    Ok(s) if s.epoch == self.epoch => out.push(SegmentFrame::new(
                        s.epoch,
                        s.seq,
                        s.readings_count,
                        s.payload.to_vec(),
                    )),
                    Ok(s) => {
                        let reason =
                            format!("epoch {} in an outbox of epoch {}", s.epoch, self.epoch);
                        self.quarantine(seq, &reason)?;
                    }
                    Err(e) => self.quarantine(seq, &e.to_string())?,
                }
            }
        }
        Ok(out)
    }

    fn quarantine(&mut self, seq: u64, reason: &str) -> Result<(), OutboxError> {
        tracing::error!(
            seq,
            reason,
            "outbox segment is damaged; quarantined, the rest keeps flowing"
        );
        self.store.quarantine(seq)?;
        if let Some(bytes) = self.segments.remove(&seq) {
            self.stored_bytes -= bytes;
        }
        self.stats.segments_quarantined += 1;
        Ok(())
    }

    /// The cloud has every segment through `seq`: delete them. Returns the
    /// bytes freed. Not synced: a lost deletion only causes a resend that the
    /// cloud recognises as a replay.
    pub fn handle_acked(&mut self, seq: u64) -> Result<u64, OutboxError> {
        assert!(
            seq <= self.sealed_through,
            "ack of seq {seq} beyond sealed {}",
            self.sealed_through
        );
        let acked: Vec<u64> = self.segments.range(..=seq).map(|(s, _)| *s).collect();
        let mut freed = 0;
        for s in acked {
            self.store.remove(s)?;
            // Per segment, so a failure partway keeps the accounting exact.
            let bytes = self.segments.remove(&s).unwrap_or(0);
            self.stored_bytes -= bytes;
            freed += bytes;
            self.stats.segments_acked += 1;
        }
        self.acked_through = self.acked_through.max(seq);
        Ok(freed)
    }

    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }
}

#[cfg(test)]
mod tests;
