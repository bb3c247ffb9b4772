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
//! - **Epochs that the clock cannot strand.** A new outbox is dated by the
//!   edge's clock, which may be behind (a device whose clock reset). The
//!   cloud refuses an epoch below the log's, as it would a restored backup.
//!   An outbox that has never sent a segment cannot be a backup whose data
//!   is in the log, so it moves its epoch above the log's
//!   ([`Outbox::handle_stale_epoch`]). Whether it ever sent is durable: the
//!   first read for sending records it, with one fsync per outbox. The epoch
//!   written in segment headers stays the one the outbox was created with;
//!   segments travel under the moved one.
//! - **Deletion only on ack.** A segment leaves the outbox only when the
//!   cloud confirms it is in the log, or when `drop-oldest` evicts it (counted).
//! - **Bounded.** Stored and open bytes stay within `outbox_bytes_max`; when
//!   full, `block` refuses new readings (the source waits) and `drop-oldest`
//!   evicts the oldest segments.
//! - **Damage is contained.** Every segment carries a checksum verified when
//!   read. A damaged segment is quarantined and counted; the rest keeps flowing.
//!   Quarantined segments are kept for inspection within the budget: they
//!   count against `outbox_bytes_max`, at most [`QUARANTINED_SEGMENTS_MAX`]
//!   are kept, and they are the first to go (oldest first, counted as
//!   `quarantined_evicted`) when room is needed, before any policy applies:
//!   they can never be sent, and must not hold back readings that can.
//! - **State rides with the data.** A small state table (key to value) is
//!   changed only in the same atomic batch as the segment it describes (or in
//!   a batch of its own), and made durable by the same fsync. Sources keep
//!   there what they must know after a crash (which of their messages are
//!   durable), the edge's stages their input log and checkpoints. State
//!   counts against `outbox_bytes_max` like segments do.
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
pub use store::{MemoryStore, OutboxStore, StateChange, StateEntries, StoreError, StoreMeta};

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
/// The largest state value: it must stay inline in sled's log, as segments do.
pub const STATE_VALUE_BYTES_MAX: usize = SEGMENT_BYTES_LIMIT;
/// The longest state key.
pub const STATE_KEY_BYTES_MAX: usize = 1024;
/// Quarantined segments kept at most; past it, the oldest is deleted.
pub const QUARANTINED_SEGMENTS_MAX: usize = 64;
/// State keys under this prefix are the outbox's own; callers' keys never
/// start with a zero byte.
pub const RESERVED_STATE_PREFIX: &[u8] = b"\0outbox/";
/// The epoch the outbox's segments travel under, when it moved (u64 LE).
const WIRE_EPOCH_KEY: &[u8] = b"\0outbox/wire-epoch";
/// Present once a segment was read for sending under the current epoch.
const SENT_KEY: &[u8] = b"\0outbox/sent";

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
    #[error("the log holds epoch {log_epoch} of this edge, above this outbox's {epoch}, and this outbox has sent segments under its epoch: it is a restored backup or a cloned disk, and resending could write stale readings twice. Move its outbox_dir aside (it holds the unsent readings) and start with an empty one")]
    StaleAfterSending { epoch: u64, log_epoch: u64 },
    #[error("the outbox's state entry {key} is damaged: {reason}")]
    ReservedState { key: &'static str, reason: String },
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

/// Why a change to the state table was not admitted.
#[derive(Debug)]
pub enum StateRefusal<T> {
    /// The outbox is full under `block`: retry after space is freed.
    Full(T),
    /// A key or value is larger than the state table allows.
    TooLarge(usize, T),
}

/// A batch made durable: its tickets may now be acknowledged.
#[derive(Debug)]
pub struct Committed<T> {
    /// The segment written, if the batch held readings (a batch may hold
    /// only state changes).
    pub seq: Option<u64>,
    /// The tickets of the segment's readings, in order.
    pub tickets: Vec<T>,
    /// (device id, device timestamp) of each reading, for audit trails.
    pub keys: Vec<(String, i64)>,
    /// The tickets that came with state changes alone.
    pub state_tickets: Vec<T>,
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
    /// Quarantined segments deleted to make room or past the bound.
    pub quarantined_evicted: u64,
    pub commit_errors: u64,
}

pub struct Outbox<T> {
    store: Box<dyn OutboxStore>,
    cfg: OutboxConfig,
    /// The epoch in segment headers: the one the store was created with.
    header_epoch: u64,
    /// The epoch segments travel under; above `epoch` once it moved.
    wire_epoch: u64,
    /// Whether a segment was read for sending under `wire_epoch` (durable).
    sent: bool,
    sealed_through: u64,
    acked_through: u64,
    /// Durable, unacknowledged segments: seq to stored bytes.
    segments: BTreeMap<u64, u64>,
    stored_bytes: u64,
    /// Quarantined segments kept: seq to stored bytes.
    quarantined: BTreeMap<u64, u64>,
    quarantined_bytes: u64,
    open_payload: Vec<u8>,
    open_tickets: Vec<T>,
    open_keys: Vec<(String, i64)>,
    open_since: Option<Instant>,
    dropped: Vec<Dropped>,
    stats: OutboxStats,
    /// The state table as durable on disk.
    state: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Changes for the next commit (the last one per key).
    pending_state: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Bytes (keys and values) of the state table with the pending changes.
    state_bytes: u64,
    state_tickets: Vec<T>,
}

fn entry_bytes(key: &[u8], value: Option<&[u8]>) -> u64 {
    value.map_or(0, |v| (key.len() + v.len()) as u64)
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
        let quarantined_list: BTreeMap<u64, u64> = store.quarantined()?.into_iter().collect();
        let quarantined_bytes = quarantined_list.values().sum();
        let quarantined = quarantined_list.len();
        let state: BTreeMap<Vec<u8>, Vec<u8>> = store.load_state()?.into_iter().collect();
        let state_bytes = state.iter().map(|(k, v)| entry_bytes(k, Some(v))).sum();
        let wire_epoch = match state.get(WIRE_EPOCH_KEY) {
            None => meta.epoch,
            Some(v) => match <[u8; 8]>::try_from(v.as_slice()).map(u64::from_le_bytes) {
                Ok(e) if e > meta.epoch => e,
                _ => {
                    return Err(OutboxError::ReservedState {
                        key: "wire-epoch",
                        reason: format!("{} bytes, not an epoch above {}", v.len(), meta.epoch),
                    })
                }
            },
        };
        let sent = state.contains_key(SENT_KEY);
        let recovery = Recovery {
            epoch: wire_epoch,
            sealed_through,
            acked_through,
            segments: segments.len(),
            bytes: stored_bytes,
            quarantined,
        };
        let outbox = Self {
            store,
            cfg,
            header_epoch: meta.epoch,
            wire_epoch,
            sent,
            sealed_through,
            acked_through,
            segments,
            stored_bytes,
            quarantined: quarantined_list,
            quarantined_bytes,
            open_payload: Vec::new(),
            open_tickets: Vec::new(),
            open_keys: Vec::new(),
            open_since: None,
            dropped: Vec::new(),
            stats: OutboxStats::default(),
            state,
            pending_state: BTreeMap::new(),
            state_bytes,
            state_tickets: Vec::new(),
        };
        Ok((outbox, recovery))
    }

    /// The epoch this outbox's segments travel under.
    pub fn epoch(&self) -> u64 {
        self.wire_epoch
    }

    /// The cloud refused this outbox's epoch: the log holds `log_epoch`,
    /// above it. An outbox that never sent a segment moves its epoch above
    /// the log's (durably, before answering) and returns the new one; one
    /// that did is a backup or a clone, and stays refused.
    pub fn handle_stale_epoch(&mut self, log_epoch: u64) -> Result<u64, OutboxError> {
        if log_epoch < self.wire_epoch {
            // A refusal from before an earlier move: nothing to do.
            return Ok(self.wire_epoch);
        }
        if self.sent {
            return Err(OutboxError::StaleAfterSending {
                epoch: self.wire_epoch,
                log_epoch,
            });
        }
        let moved = log_epoch
            .checked_add(1)
            .ok_or_else(|| OutboxError::ReservedState {
                key: "wire-epoch",
                reason: format!("the log's epoch {log_epoch} leaves no room above it"),
            })?;
        self.write_own_state(WIRE_EPOCH_KEY, moved.to_le_bytes().to_vec())?;
        tracing::warn!(
            created = self.header_epoch,
            was = self.wire_epoch,
            log_epoch,
            now = moved,
            "the outbox's epoch was below the log's (the clock was behind when it was created); it never sent anything, so it moves above"
        );
        self.wire_epoch = moved;
        Ok(moved)
    }

    /// Writes one of the outbox's own state entries at once, durably.
    fn write_own_state(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), OutboxError> {
        debug_assert!(key.starts_with(RESERVED_STATE_PREFIX));
        self.store
            .write_batch(None, &[(key.to_vec(), Some(value.clone()))])?;
        self.store.sync()?;
        let before = entry_bytes(key, self.state.get(key).map(Vec::as_slice));
        self.state_bytes = self.state_bytes + entry_bytes(key, Some(&value)) - before;
        self.state.insert(key.to_vec(), value);
        Ok(())
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

    /// Stored plus open bytes and the state table, the figure bounded by
    /// `outbox_bytes_max`.
    pub fn bytes_used(&self) -> u64 {
        self.stored_bytes + self.open_bytes() + self.state_bytes + self.quarantined_bytes
    }

    /// Quarantined segments kept, and their bytes.
    pub fn quarantined(&self) -> (usize, u64) {
        (self.quarantined.len(), self.quarantined_bytes)
    }

    /// Deletes the oldest quarantined segment; false when none is left or
    /// the store failed.
    fn evict_quarantined(&mut self, why: &str) -> bool {
        let Some((&seq, &bytes)) = self.quarantined.iter().next() else {
            return false;
        };
        if let Err(e) = self.store.remove_quarantined(seq) {
            tracing::error!(seq, error = %e, "deleting a quarantined segment failed");
            return false;
        }
        tracing::warn!(seq, bytes, why, "a quarantined segment was deleted");
        self.quarantined.remove(&seq);
        self.quarantined_bytes -= bytes;
        self.stats.quarantined_evicted += 1;
        true
    }

    /// Bytes of the state table (keys and values), pending changes included.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes
    }

    /// A state entry as the next commit will leave it.
    pub fn state_get(&self, key: &[u8]) -> Option<&[u8]> {
        match self.pending_state.get(key) {
            Some(v) => v.as_deref(),
            None => self.state.get(key).map(Vec::as_slice),
        }
    }

    /// The durable state entries whose keys start with `prefix`, in key order
    /// (pending changes not included).
    pub fn durable_state(&self, prefix: &[u8]) -> StateEntries {
        self.state
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Whether anything waits for the next commit.
    pub fn has_open(&self) -> bool {
        !self.open_tickets.is_empty()
            || !self.pending_state.is_empty()
            || !self.state_tickets.is_empty()
    }

    /// How many bytes `changes` would add to the state table (negative when
    /// they free some).
    fn state_delta(&self, changes: &[StateChange]) -> i64 {
        let mut delta = 0i64;
        let mut seen: std::collections::HashMap<&[u8], Option<&[u8]>> = Default::default();
        for (k, v) in changes {
            let before = seen
                .get(k.as_slice())
                .copied()
                .unwrap_or_else(|| self.state_get(k));
            delta += entry_bytes(k, v.as_deref()) as i64 - entry_bytes(k, before) as i64;
            seen.insert(k.as_slice(), v.as_deref());
        }
        delta
    }

    fn apply_state(&mut self, changes: Vec<StateChange>) {
        for (k, v) in changes {
            let before = entry_bytes(&k, self.state_get(&k));
            self.state_bytes = self.state_bytes + entry_bytes(&k, v.as_deref()) - before;
            self.pending_state.insert(k, v);
        }
    }

    fn state_too_large(changes: &[StateChange]) -> Option<usize> {
        changes.iter().find_map(|(k, v)| {
            let len = v.as_ref().map_or(0, Vec::len);
            (k.len() > STATE_KEY_BYTES_MAX || len > STATE_VALUE_BYTES_MAX)
                .then_some(k.len().max(len))
        })
    }

    /// Makes room for `extra` bytes under the full policy; false when the
    /// outbox cannot (`block`, or nothing left to evict).
    fn make_room(&mut self, extra: u64) -> bool {
        while self.bytes_used() + extra > self.cfg.outbox_bytes_max {
            if self.evict_quarantined("room was needed for new readings") {
                continue;
            }
            match self.cfg.full_policy {
                FullPolicy::Block => return false,
                FullPolicy::DropOldest => {
                    if !self.drop_oldest() {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Changes the state table with the next commit, and returns `ticket`
    /// from that commit (in [`Committed::state_tickets`]), once the changes
    /// are durable.
    pub fn handle_state(
        &mut self,
        now: Instant,
        changes: Vec<StateChange>,
        ticket: T,
    ) -> Result<(), StateRefusal<T>> {
        if let Some(n) = Self::state_too_large(&changes) {
            return Err(StateRefusal::TooLarge(n, ticket));
        }
        let delta = self.state_delta(&changes);
        if delta > 0 && !self.make_room(delta as u64) {
            self.stats.readings_refused_full += 1;
            return Err(StateRefusal::Full(ticket));
        }
        self.apply_state(changes);
        self.state_tickets.push(ticket);
        self.open_since.get_or_insert(now);
        debug_assert!(
            self.bytes_used() <= self.cfg.outbox_bytes_max || delta <= 0,
            "outbox over budget"
        );
        Ok(())
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
        self.handle_reading_with(now, reading, ticket, Vec::new())
    }

    /// Adds a reading to the open segment, and `changes` to the state table
    /// in the same batch: both are durable, or neither.
    pub fn handle_reading_with(
        &mut self,
        now: Instant,
        reading: Reading,
        ticket: T,
        changes: Vec<StateChange>,
    ) -> Result<(), Refusal<T>> {
        self.stats.readings_received += 1;
        if let Some(n) = Self::state_too_large(&changes) {
            self.stats.readings_invalid += 1;
            return Err(Refusal::TooLarge(n, ticket));
        }
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
        let extra = (encoded.len() as u64
            + if self.open_tickets.is_empty() {
                segment::HEADER_BYTES as u64
            } else {
                0
            }) as i64
            + self.state_delta(&changes);
        // Under drop-oldest, only the open segment and the state left means
        // full too; validate() makes the budget hold four segments.
        if extra > 0 && !self.make_room(extra as u64) {
            self.stats.readings_refused_full += 1;
            return Err(Refusal::Full(reading, ticket));
        }
        self.apply_state(changes);
        self.open_payload.extend_from_slice(&encoded);
        self.open_tickets.push(ticket);
        self.open_keys
            .push((reading.device_id, reading.device_ts_us));
        self.open_since.get_or_insert(now);
        debug_assert!(
            self.bytes_used() <= self.cfg.outbox_bytes_max || extra <= 0,
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

    /// Whether the open segment is full: it must be committed before it can
    /// take more.
    pub fn segment_full(&self) -> bool {
        !self.open_tickets.is_empty()
            && (self.open_tickets.len() >= self.cfg.segment_readings_max
                // Nearly full: the next reading would likely not fit.
                || self.open_payload.len() + 256 >= self.cfg.segment_bytes_max)
    }

    /// Whether the open batch should be committed now: its segment is full,
    /// or it has waited `commit_interval_ms`.
    pub fn commit_due(&self, now: Instant) -> bool {
        self.has_open() && (self.segment_full() || self.poll_timeout().is_some_and(|t| now >= t))
    }

    /// Seals the open segment (if it holds readings), writes it with the
    /// pending state changes and syncs. On error nothing is acknowledged and
    /// everything stays open, to be retried.
    pub fn commit(&mut self) -> Result<Option<Committed<T>>, OutboxError> {
        if !self.has_open() {
            return Ok(None);
        }
        let count = self.open_tickets.len() as u32;
        let seq = self.sealed_through + 1;
        let bytes =
            (count > 0).then(|| segment::encode(self.header_epoch, seq, count, &self.open_payload));
        let changes: Vec<StateChange> = self
            .pending_state
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let written = self
            .store
            .write_batch(bytes.as_deref().map(|b| (seq, b)), &changes)
            .and_then(|_| self.store.sync());
        if let Err(e) = written {
            self.stats.commit_errors += 1;
            if bytes.is_some() {
                // The write may have reached the store without its sync;
                // removing it keeps seq `seq` unused until a commit fully
                // succeeds. (The state changes stay pending and are written
                // again.)
                let _ = self.store.remove(seq);
            }
            return Err(e.into());
        }
        for (k, v) in std::mem::take(&mut self.pending_state) {
            match v {
                Some(v) => self.state.insert(k, v),
                None => self.state.remove(&k),
            };
        }
        self.open_since = None;
        let committed_seq = match bytes {
            Some(bytes) => {
                assert!(seq > self.sealed_through, "seqs only grow");
                self.sealed_through = seq;
                self.segments.insert(seq, bytes.len() as u64);
                self.stored_bytes += bytes.len() as u64;
                self.open_payload.clear();
                self.stats.segments_committed += 1;
                self.stats.readings_committed += count as u64;
                Some(seq)
            }
            None => None,
        };
        Ok(Some(Committed {
            seq: committed_seq,
            tickets: std::mem::take(&mut self.open_tickets),
            keys: std::mem::take(&mut self.open_keys),
            state_tickets: std::mem::take(&mut self.state_tickets),
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
                    Ok(s) if s.epoch == self.header_epoch => out.push(SegmentFrame::new(
                        self.wire_epoch,
                        s.seq,
                        s.readings_count,
                        s.payload.to_vec(),
                    )),
                    Ok(s) => {
                        let reason = format!(
                            "epoch {} in an outbox of epoch {}",
                            s.epoch, self.header_epoch
                        );
                        self.quarantine(seq, &reason)?;
                    }
                    Err(e) => self.quarantine(seq, &e.to_string())?,
                }
            }
        }
        if !out.is_empty() && !self.sent {
            // Before the first segment leaves: from now on this outbox may
            // have readings in the log, and its epoch must not move.
            self.write_own_state(SENT_KEY, vec![1])?;
            self.sent = true;
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
            self.quarantined.insert(seq, bytes);
            self.quarantined_bytes += bytes;
        }
        self.stats.segments_quarantined += 1;
        while self.quarantined.len() > QUARANTINED_SEGMENTS_MAX {
            if !self.evict_quarantined("more than QUARANTINED_SEGMENTS_MAX are kept") {
                break;
            }
        }
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
