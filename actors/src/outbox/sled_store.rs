//! The outbox store on sled.
//!
//! One tree holds everything, so that a segment and the "sealed through" mark
//! go in one atomic batch:
//! - `m/epoch`, `m/sealed`: u64 BE;
//! - `s/<seq u64 BE>`: a segment (see [`super::segment`]); big-endian keys
//!   make sled's order the seq order;
//! - `q/<seq u64 BE>`: a quarantined segment, kept for inspection;
//! - `k/<key>`: an entry of the state table (see [`super::store`]), written
//!   in the same batch as the segment it goes with.
//!
//! sled's background flusher is off (`flush_every_ms(None)`): the outbox
//! calls `flush` itself at group commit, so an acknowledgement always
//! follows the fsync. sled 0.34's `flush` ends in `sync_file_range`, which
//! neither persists the file's size nor flushes the disk's cache: it survives
//! a process crash, not a power cut. So `sync` also calls `fdatasync` on
//! sled's log file (`db`). Segments stay below sled's inline threshold
//! (see `OutboxConfig::segment_bytes_max`), so they never go to sled's blob
//! files, which this does not cover.
//!
//! # The guard files
//! sled recovers its log up to the last valid record and takes an empty or
//! unreadable `db` file for a new database. A damaged `db` would then open
//! as an outbox with fewer segments, or none, and the readings acknowledged
//! in the lost ones would be gone without a word. So beside sled's files the
//! store keeps a guard: the epoch and the last sealed seq, in two slots,
//! `guard.a` and `guard.b`, of 25 bytes each:
//!
//! ```text
//! "TRGD" | version u8 (1) | epoch u64 LE | sealed_through u64 LE | crc32 u32 LE of the 21 bytes before
//! ```
//!
//! After each sync the *current* slot is overwritten in place, unsynced; at
//! most once per `GUARD_SYNC_INTERVAL` it is fsynced and the slots swap
//! roles. So the other slot always holds a synced, valid guard, and a power
//! cut can at worst tear the current one: the guard may lag behind the
//! store (harmless: it only has to be *behind* it) but is never lost. This
//! costs one small write per commit and at most one fsync per second.
//!
//! On open, a store behind its guard (or with another epoch, or empty) is
//! refused with [`StoreError::Damaged`]. An operator who accepts the loss
//! opens it with [`SledStore::accept_damage`]: the epoch and the seqs carry
//! on above the guard, so new readings are never taken for replays.

use std::path::Path;

use super::store::{OutboxStore, StateChange, StoreError, StoreMeta};

const META_EPOCH: &[u8] = b"m/epoch";
const META_SEALED: &[u8] = b"m/sealed";
const SEG: u8 = b's';
const QUAR: u8 = b'q';
const STATE: &[u8] = b"k/";

fn state_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(STATE.len() + key.len());
    k.extend_from_slice(STATE);
    k.extend_from_slice(key);
    k
}

fn seg_key(prefix: u8, seq: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = prefix;
    k[1] = b'/';
    k[2..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn key_seq(k: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = k
        .get(2..10)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError::CorruptMeta(format!("segment key of {} bytes", k.len())))?;
    Ok(u64::from_be_bytes(b))
}

fn read_u64(v: &[u8], what: &str) -> Result<u64, StoreError> {
    let b: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::CorruptMeta(format!("{what} is {} bytes, not 8", v.len())))?;
    Ok(u64::from_be_bytes(b))
}

const GUARD_FILES: [&str; 2] = ["guard.a", "guard.b"];
/// How often the current guard slot is fsynced and the slots swap.
const GUARD_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
const GUARD_MAGIC: &[u8; 4] = b"TRGD";
const GUARD_BYTES: usize = 25;

pub struct SledStore {
    db: sled::Db,
    /// sled's log file, for the fdatasync that sled's flush does not do.
    log_file: std::fs::File,
    dir: std::path::PathBuf,
    guard: Option<StoreMeta>,
    /// Guard files exist but none decodes: only possible after a crash
    /// during the store's creation, or damage.
    guard_unreadable: bool,
    /// The slot written after each sync; the other holds a synced guard.
    guard_slot: usize,
    guard_synced_at: std::time::Instant,
    /// The sealed mark written since the last sync, for the guard.
    sealed: Option<StoreMeta>,
    accept_damage: bool,
}

fn encode_guard(meta: StoreMeta) -> [u8; GUARD_BYTES] {
    let mut b = [0u8; GUARD_BYTES];
    b[..4].copy_from_slice(GUARD_MAGIC);
    b[4] = 1;
    b[5..13].copy_from_slice(&meta.epoch.to_le_bytes());
    b[13..21].copy_from_slice(&meta.sealed_through.to_le_bytes());
    let crc = crc32fast::hash(&b[..21]);
    b[21..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_guard(b: &[u8]) -> Option<StoreMeta> {
    if b.len() != GUARD_BYTES || &b[..4] != GUARD_MAGIC || b[4] != 1 {
        return None;
    }
    let crc = u32::from_le_bytes(b[21..].try_into().ok()?);
    if crc != crc32fast::hash(&b[..21]) {
        return None;
    }
    Some(StoreMeta {
        epoch: u64::from_le_bytes(b[5..13].try_into().ok()?),
        sealed_through: u64::from_le_bytes(b[13..21].try_into().ok()?),
    })
}

impl SledStore {
    /// Opens or creates the store in `dir`. `cache_bytes_max` bounds sled's
    /// page cache (its default, 1 GiB, is far too much for an edge device).
    pub fn open(dir: &Path, cache_bytes_max: u64) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        // sled can panic on some kinds of on-disk damage; a damaged outbox must
        // be an error that names the path, not a crash loop.
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes_max)
            .flush_every_ms(None);
        let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()))
            .map_err(|_| open_err("sled panicked while reading the files (damaged store?)".into()))?
            .map_err(|e| open_err(e.to_string()))?;
        let mut guard: Option<StoreMeta> = None;
        let mut found = 0;
        let mut slot = 0;
        for (i, name) in GUARD_FILES.iter().enumerate() {
            match std::fs::read(dir.join(name)) {
                Ok(bytes) => {
                    found += 1;
                    match decode_guard(&bytes) {
                        Some(g) if guard.is_none_or(|b| g.sealed_through > b.sealed_through) => {
                            guard = Some(g);
                            // Keep the newest slot intact: write the other.
                            slot = 1 - i;
                        }
                        Some(_) => {}
                        None => {
                            tracing::warn!(file = %dir.join(name).display(), "an outbox guard slot is torn; the other one is used")
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(open_err(format!("reading {name}: {e}"))),
            }
        }
        let log_file = std::fs::File::open(dir.join("db"))
            .map_err(|e| open_err(format!("opening sled's log file for syncing: {e}")))?;
        Ok(Self {
            db,
            log_file,
            dir: dir.to_path_buf(),
            guard,
            guard_unreadable: found > 0 && guard.is_none(),
            guard_slot: slot,
            guard_synced_at: std::time::Instant::now(),
            sealed: None,
            accept_damage: false,
        })
    }

    /// Opens a store whose data falls short of its guard anyway, carrying the
    /// epoch and seqs on above the guard. What was lost is logged as an error.
    pub fn accept_damage(mut self, accept: bool) -> Self {
        self.accept_damage = accept;
        self
    }

    fn write_slot(&self, slot: usize, meta: StoreMeta, sync: bool) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.dir.join(GUARD_FILES[slot]))?;
        f.write_all(&encode_guard(meta))?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    }

    /// Records `meta` in the guard; see the module doc for the two slots.
    fn write_guard(&mut self, meta: StoreMeta) -> Result<(), StoreError> {
        let err = |e: std::io::Error| StoreError::Sync(format!("writing the outbox guard: {e}"));
        if self.guard.is_none() {
            // A new guard: both slots synced, so one is always valid.
            self.write_slot(0, meta, true).map_err(err)?;
            self.write_slot(1, meta, true).map_err(err)?;
            self.guard_synced_at = std::time::Instant::now();
        } else {
            let sync = self.guard_synced_at.elapsed() >= GUARD_SYNC_INTERVAL;
            self.write_slot(self.guard_slot, meta, sync).map_err(err)?;
            if sync {
                self.guard_slot = 1 - self.guard_slot;
                self.guard_synced_at = std::time::Instant::now();
            }
        }
        self.guard = Some(meta);
        Ok(())
    }

    /// Compares what sled holds with the guard; see the module doc.
    fn check_guard(&self, meta: Option<StoreMeta>) -> Result<Option<StoreMeta>, StoreError> {
        if self.guard_unreadable {
            // Both slots torn: only a crash while the store was being created
            // does that (afterwards one slot is always synced), so there is
            // nothing acknowledged to protect; the guard is written anew.
            tracing::warn!(path = %self.dir.display(), "the outbox guard is unreadable; it will be rewritten");
        }
        let Some(guard) = self.guard else {
            return Ok(meta);
        };
        let problem = match meta {
            None => format!(
                "it is empty, but its guard says it held epoch {} through seq {}",
                guard.epoch, guard.sealed_through
            ),
            Some(m) if m.epoch != guard.epoch => format!(
                "it holds epoch {}, but its guard says epoch {}: files from another outbox?",
                m.epoch, guard.epoch
            ),
            Some(m) if m.sealed_through < guard.sealed_through => format!(
                "it was sealed through seq {}, but its guard says {}: segments {}..={} are lost",
                m.sealed_through,
                guard.sealed_through,
                m.sealed_through + 1,
                guard.sealed_through
            ),
            Some(m) => return Ok(Some(m)),
        };
        let path = self.dir.display().to_string();
        if !self.accept_damage {
            return Err(StoreError::Damaged { path, problem });
        }
        tracing::error!(%path, %problem, "opening a damaged outbox as accepted: the readings of the lost segments are gone");
        Ok(Some(StoreMeta {
            epoch: guard.epoch,
            sealed_through: meta
                .map_or(0, |m| m.sealed_through)
                .max(guard.sealed_through),
        }))
    }

    /// Bytes sled's files take on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Writes bytes as a segment without any check: for tests that damage a
    /// segment the way a faulty disk or a bug would.
    pub fn put_raw_segment(&self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.db
            .insert(seg_key(SEG, seq), bytes)
            .map(|_| ())
            .map_err(|e| StoreError::Append {
                seq,
                reason: e.to_string(),
            })
    }
}

impl OutboxStore for SledStore {
    fn load_meta(&mut self) -> Result<Option<StoreMeta>, StoreError> {
        let get = |k: &[u8]| self.db.get(k).map_err(|e| StoreError::Read(e.to_string()));
        let meta = match (get(META_EPOCH)?, get(META_SEALED)?) {
            (None, _) => None,
            (Some(e), s) => Some(StoreMeta {
                epoch: read_u64(&e, "m/epoch")?,
                sealed_through: match s {
                    Some(s) => read_u64(&s, "m/sealed")?,
                    None => 0,
                },
            }),
        };
        let checked = self.check_guard(meta)?;
        if checked != meta {
            // Damage accepted: sled's own metadata carries on from the guard.
            if let Some(m) = checked {
                self.init_meta(m)?;
            }
            return Ok(checked);
        }
        let meta = checked;
        if let Some(m) = meta {
            if self.guard != Some(m) {
                // A store from before guards, or a damaged guard: write it now.
                self.sealed = Some(m);
            }
        }
        Ok(meta)
    }

    fn init_meta(&mut self, meta: StoreMeta) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        b.insert(META_EPOCH, &meta.epoch.to_be_bytes());
        b.insert(META_SEALED, &meta.sealed_through.to_be_bytes());
        self.db.apply_batch(b).map_err(|e| StoreError::Append {
            seq: 0,
            reason: e.to_string(),
        })?;
        self.sealed = Some(meta);
        Ok(())
    }

    fn write_batch(
        &mut self,
        segment: Option<(u64, &[u8])>,
        state: &[StateChange],
    ) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        if let Some((seq, bytes)) = segment {
            b.insert(&seg_key(SEG, seq), bytes);
            b.insert(META_SEALED, &seq.to_be_bytes());
        }
        for (k, v) in state {
            match v {
                Some(v) => b.insert(state_key(k), v.as_slice()),
                None => b.remove(state_key(k)),
            }
        }
        self.db.apply_batch(b).map_err(|e| match segment {
            Some((seq, _)) => StoreError::Append {
                seq,
                reason: e.to_string(),
            },
            None => StoreError::State(e.to_string()),
        })?;
        if let Some((seq, _)) = segment {
            if let Some(epoch) = self.sealed.or(self.guard).map(|m| m.epoch) {
                self.sealed = Some(StoreMeta {
                    epoch,
                    sealed_through: seq,
                });
            }
        }
        Ok(())
    }

    fn load_state(&self) -> Result<super::store::StateEntries, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(STATE) {
            let (k, v) = kv.map_err(|e| StoreError::Read(e.to_string()))?;
            out.push((k[STATE.len()..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map_err(|e| StoreError::Sync(e.to_string()))?;
        // sled's flush stops at sync_file_range: make it durable for real.
        self.log_file
            .sync_data()
            .map_err(|e| StoreError::Sync(format!("fdatasync of sled's log: {e}")))?;
        // After the data, so the guard is never ahead of what is on disk.
        if let Some(meta) = self.sealed.take() {
            self.write_guard(meta)?;
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([SEG, b'/']) {
            let (k, v) = kv.map_err(|e| StoreError::Read(e.to_string()))?;
            out.push((key_seq(&k)?, v.len() as u64));
        }
        Ok(out)
    }

    fn read_range(
        &self,
        from: u64,
        through: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self
            .db
            .range(seg_key(SEG, from)..=seg_key(SEG, through))
            .take(max)
        {
            let (k, v) = kv.map_err(|e| StoreError::Read(e.to_string()))?;
            out.push((key_seq(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    fn remove(&mut self, seq: u64) -> Result<(), StoreError> {
        self.db
            .remove(seg_key(SEG, seq))
            .map(|_| ())
            .map_err(|e| StoreError::Remove(e.to_string()))
    }

    fn quarantine(&mut self, seq: u64) -> Result<(), StoreError> {
        let Some(v) = self
            .db
            .get(seg_key(SEG, seq))
            .map_err(|e| StoreError::Read(e.to_string()))?
        else {
            return Ok(());
        };
        let mut b = sled::Batch::default();
        b.remove(&seg_key(SEG, seq));
        b.insert(&seg_key(QUAR, seq), v);
        self.db
            .apply_batch(b)
            .map_err(|e| StoreError::Remove(e.to_string()))
    }

    fn quarantined(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([QUAR, b'/']) {
            let (k, v) = kv.map_err(|e| StoreError::Read(e.to_string()))?;
            out.push((key_seq(&k)?, v.len() as u64));
        }
        Ok(out)
    }

    fn remove_quarantined(&mut self, seq: u64) -> Result<(), StoreError> {
        self.db
            .remove(seg_key(QUAR, seq))
            .map(|_| ())
            .map_err(|e| StoreError::Remove(e.to_string()))
    }
}
