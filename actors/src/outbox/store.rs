//! The outbox's storage boundary: a small ordered key-value interface that
//! sled implements for real and [`MemoryStore`] implements as a simulated disk.
//!
//! The store knows nothing of readings or segments' contents. It offers what
//! the outbox needs to be crash-safe:
//! - `append` writes a segment *and* the "sealed through" mark in one atomic
//!   batch, so that after any crash the next seq is above every seq ever
//!   acknowledged to a source (no seq is reused, which would make the cloud
//!   take new data for a replay);
//! - nothing is durable before `sync` returns;
//! - removals need not be synced: a removal lost in a crash only means a
//!   segment is sent again, and the cloud drops it as a replay;
//! - a small *state table* (key to value) is written in the same atomic batch
//!   as a segment (or on its own), so that what a source or a stage needs to
//!   know after a crash (which messages are durable, what a window held) is
//!   durable exactly when the readings it describes are.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the outbox store at {path} failed: {reason}")]
    Open { path: String, reason: String },
    #[error("writing segment {seq} to the outbox store failed: {reason}")]
    Append { seq: u64, reason: String },
    #[error("syncing the outbox store to disk failed: {0}")]
    Sync(String),
    #[error("reading the outbox store failed: {0}")]
    Read(String),
    #[error("removing segments from the outbox store failed: {0}")]
    Remove(String),
    #[error("writing the outbox's state table failed: {0}")]
    State(String),
    #[error("the outbox store's metadata is corrupt: {0}")]
    CorruptMeta(String),
    #[error("the outbox store at {path} is damaged: {problem}. It is left untouched: move it aside to start a new outbox, or set outbox_accept_damage to carry on with what is left")]
    Damaged { path: String, problem: String },
}

/// The metadata kept beside the segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreMeta {
    pub epoch: u64,
    pub sealed_through: u64,
}

/// One change to the state table: a key and its new value (`None` removes it).
pub type StateChange = (Vec<u8>, Option<Vec<u8>>);
/// Entries of the state table: (key, value), in key order.
pub type StateEntries = Vec<(Vec<u8>, Vec<u8>)>;

pub trait OutboxStore: Send + 'static {
    /// The metadata, or `None` for a store never written.
    fn load_meta(&mut self) -> Result<Option<StoreMeta>, StoreError>;
    /// Records the epoch of a new store (made durable by the next `sync`).
    fn init_meta(&mut self, meta: StoreMeta) -> Result<(), StoreError>;
    /// Writes a segment (if any) and advances `sealed_through` to its seq,
    /// together with `state`'s changes to the state table, atomically.
    fn write_batch(
        &mut self,
        segment: Option<(u64, &[u8])>,
        state: &[StateChange],
    ) -> Result<(), StoreError>;
    /// Writes a segment and advances `sealed_through` to its seq, atomically.
    fn append(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_batch(Some((seq, bytes)), &[])
    }
    /// Every entry of the state table, in key order.
    fn load_state(&self) -> Result<StateEntries, StoreError>;
    /// Makes every earlier write durable.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Seqs and sizes of the stored segments, in seq order.
    fn list(&self) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Up to `max` segments with `from <= seq <= through`, in seq order.
    fn read_range(
        &self,
        from: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Removes one segment; no-op when absent.
    fn remove(&mut self, seq: u64) -> Result<(), StoreError>;
    /// Moves a segment aside so that it is kept for inspection but never sent.
    fn quarantine(&mut self, seq: u64) -> Result<(), StoreError>;
    /// Seqs and sizes of the segments in quarantine, in seq order.
    fn quarantined(&self) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Deletes a quarantined segment; no-op when absent.
    fn remove_quarantined(&mut self, seq: u64) -> Result<(), StoreError>;
}

#[derive(Debug, Clone)]
enum Op {
    Meta(StoreMeta),
    /// A segment (if any) and state changes, as one atomic write.
    Batch(Option<(u64, Vec<u8>)>, Vec<StateChange>),
    Remove(u64),
    Quarantine(u64),
    RemoveQuarantined(u64),
}

#[derive(Debug, Default)]
struct Disk {
    meta: Option<StoreMeta>,
    segments: BTreeMap<u64, Vec<u8>>,
    quarantine: BTreeMap<u64, Vec<u8>>,
    state: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Disk {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Meta(m) => self.meta = Some(*m),
            Op::Batch(segment, state) => {
                if let Some((seq, bytes)) = segment {
                    self.segments.insert(*seq, bytes.clone());
                    if let Some(m) = &mut self.meta {
                        m.sealed_through = m.sealed_through.max(*seq);
                    }
                }
                for (k, v) in state {
                    match v {
                        Some(v) => self.state.insert(k.clone(), v.clone()),
                        None => self.state.remove(k),
                    };
                }
            }
            Op::Remove(seq) => {
                self.segments.remove(seq);
            }
            Op::Quarantine(seq) => {
                if let Some(b) = self.segments.remove(seq) {
                    self.quarantine.insert(*seq, b);
                }
            }
            Op::RemoveQuarantined(seq) => {
                self.quarantine.remove(seq);
            }
        }
    }
}

#[derive(Debug, Default)]
struct SimState {
    durable: Disk,
    /// What the process sees: durable state plus writes not yet synced.
    visible: Disk,
    unsynced: Vec<Op>,
    fail_syncs: bool,
}

/// A simulated disk. Writes are visible at once but durable only after
/// `sync`; [`MemoryStore::crash`] throws away what was not synced (or, with
/// `torn`, keeps a prefix of it and damages the last write kept), as a power
/// cut would. Clones share the same disk, so a test can crash and reopen.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<SimState>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loses every write since the last sync. With `keep` = Some(n), the
    /// first n unsynced writes survive, and with `tear` the last survivor's
    /// bytes are cut in half, as a torn write would leave them.
    pub fn crash(&self, keep: Option<usize>, tear: bool) {
        let mut s = self.state.lock().expect("sim disk lock");
        let ops = std::mem::take(&mut s.unsynced);
        let kept = keep.unwrap_or(0).min(ops.len());
        for (i, op) in ops.into_iter().take(kept).enumerate() {
            let op = match op {
                // A torn batch keeps its state changes (the atomic unit is
                // the batch) but its segment is cut: the checksum finds it.
                Op::Batch(Some((seq, bytes)), state) if tear && i + 1 == kept => {
                    Op::Batch(Some((seq, bytes[..bytes.len() / 2].to_vec())), state)
                }
                other => other,
            };
            s.durable.apply(&op);
        }
        s.visible = Disk {
            meta: s.durable.meta,
            segments: s.durable.segments.clone(),
            quarantine: s.durable.quarantine.clone(),
            state: s.durable.state.clone(),
        };
    }

    /// Makes `sync` fail, as a full or failing disk would.
    pub fn set_sync_failing(&self, failing: bool) {
        self.state.lock().expect("sim disk lock").fail_syncs = failing;
    }

    /// Overwrites a stored segment's bytes, as on-disk corruption would.
    pub fn corrupt(&self, seq: u64, f: impl FnOnce(&mut Vec<u8>)) {
        let mut s = self.state.lock().expect("sim disk lock");
        let Some(b) = s.visible.segments.get_mut(&seq) else {
            return;
        };
        f(b);
        let damaged = b.clone();
        if let Some(d) = s.durable.segments.get_mut(&seq) {
            *d = damaged;
        }
    }

    fn write(&self, op: Op) {
        let mut s = self.state.lock().expect("sim disk lock");
        s.visible.apply(&op);
        s.unsynced.push(op);
    }
}

impl OutboxStore for MemoryStore {
    fn load_meta(&mut self) -> Result<Option<StoreMeta>, StoreError> {
        Ok(self.state.lock().expect("sim disk lock").visible.meta)
    }

    fn init_meta(&mut self, meta: StoreMeta) -> Result<(), StoreError> {
        self.write(Op::Meta(meta));
        Ok(())
    }

    fn write_batch(
        &mut self,
        segment: Option<(u64, &[u8])>,
        state: &[StateChange],
    ) -> Result<(), StoreError> {
        self.write(Op::Batch(
            segment.map(|(seq, b)| (seq, b.to_vec())),
            state.to_vec(),
        ));
        Ok(())
    }

    fn load_state(&self) -> Result<StateEntries, StoreError> {
        let s = self.state.lock().expect("sim disk lock");
        Ok(s.visible
            .state
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        let mut s = self.state.lock().expect("sim disk lock");
        if s.fail_syncs {
            return Err(StoreError::Sync("simulated disk failure".into()));
        }
        let ops = std::mem::take(&mut s.unsynced);
        for op in &ops {
            s.durable.apply(op);
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        let s = self.state.lock().expect("sim disk lock");
        Ok(s.visible
            .segments
            .iter()
            .map(|(k, v)| (*k, v.len() as u64))
            .collect())
    }

    fn read_range(
        &self,
        from: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let s = self.state.lock().expect("sim disk lock");
        Ok(s.visible
            .segments
            .range(from..=through)
            .take(max)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn remove(&mut self, seq: u64) -> Result<(), StoreError> {
        self.write(Op::Remove(seq));
        Ok(())
    }

    fn quarantine(&mut self, seq: u64) -> Result<(), StoreError> {
        self.write(Op::Quarantine(seq));
        Ok(())
    }

    fn quarantined(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        Ok(self
            .state
            .lock()
            .expect("sim disk lock")
            .visible
            .quarantine
            .iter()
            .map(|(&seq, b)| (seq, b.len() as u64))
            .collect())
    }

    fn remove_quarantined(&mut self, seq: u64) -> Result<(), StoreError> {
        self.write(Op::RemoveQuarantined(seq));
        Ok(())
    }
}
