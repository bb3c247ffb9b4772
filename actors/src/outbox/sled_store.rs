//! The outbox store on sled.
//!
//! One tree holds everything, so that a segment and the "sealed through" mark
//! go in one atomic batch:
//! - `m/epoch`, `m/sealed`: u64 BE;
//! - `s/<seq u64 BE>`: a segment (see [`super::segment`]); big-endian keys
//!   make sled's order the seq order;
//! - `q/<seq u64 BE>`: a quarantined segment, kept for inspection.
//!
//! sled's background flusher is off (`flush_every_ms(None)`): the outbox
//! calls `flush` itself at group commit, so an acknowledgement always
//! follows the fsync.

use std::path::Path;

use super::store::{OutboxStore, StoreError, StoreMeta};

const META_EPOCH: &[u8] = b"m/epoch";
const META_SEALED: &[u8] = b"m/sealed";
const SEG: u8 = b's';
const QUAR: u8 = b'q';

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

pub struct SledStore {
    db: sled::Db,
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
        Ok(Self { db })
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
        match (get(META_EPOCH)?, get(META_SEALED)?) {
            (None, _) => Ok(None),
            (Some(e), s) => Ok(Some(StoreMeta {
                epoch: read_u64(&e, "m/epoch")?,
                sealed_through: match s {
                    Some(s) => read_u64(&s, "m/sealed")?,
                    None => 0,
                },
            })),
        }
    }

    fn init_meta(&mut self, meta: StoreMeta) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        b.insert(META_EPOCH, &meta.epoch.to_be_bytes());
        b.insert(META_SEALED, &meta.sealed_through.to_be_bytes());
        self.db.apply_batch(b).map_err(|e| StoreError::Append {
            seq: 0,
            reason: e.to_string(),
        })
    }

    fn append(&mut self, seq: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        b.insert(&seg_key(SEG, seq), bytes);
        b.insert(META_SEALED, &seq.to_be_bytes());
        self.db.apply_batch(b).map_err(|e| StoreError::Append {
            seq,
            reason: e.to_string(),
        })
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| StoreError::Sync(e.to_string()))
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

    fn quarantined(&self) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix([QUAR, b'/']) {
            let (k, _) = kv.map_err(|e| StoreError::Read(e.to_string()))?;
            out.push(key_seq(&k)?);
        }
        Ok(out)
    }
}
