//! `bench outbox`: the outbox on sled against raw sled on the same filesystem.
//!
//! Each repetition runs five pipelines, each in a fresh directory, in an
//! order that rotates between repetitions so that a change of load hits all
//! of them alike:
//! - the outbox: `handle_reading` + `commit` (one sled flush per segment),
//!   then, reopened, `read` + `handle_acked` until empty;
//! - raw sled, one value per segment (the very bytes the outbox stores),
//!   `flush` per segment; then a range read and a remove per segment;
//! - the same with an fdatasync of sled's log file after each flush: what a
//!   real fsync costs, since sled's flush on Linux is a `sync_file_range`;
//! - raw sled, one key per reading, `flush` per segment's worth of readings;
//!   then range reads and a remove per reading;
//! - the outbox on [`MemoryStore`], the simulated disk: the outbox's own CPU
//!   cost, the ceiling that no disk can raise.
//!
//! Between writing and draining, each store is closed and reopened (that is
//! when its size on disk is taken), as an edge restarting with a backlog would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tributary_actors::outbox::{
    segment, FullPolicy, MemoryStore, Outbox, OutboxConfig, OutboxStore, Recovery, Refusal,
    SledStore,
};
use tributary_actors::reading::Reading;

use crate::stats::{median, print_table, thousands, Series};
use crate::workload;

/// Big enough that `block` never refuses a reading in a run: the benchmark
/// measures writing, not backpressure.
const OUTBOX_BYTES_MAX: u64 = 1 << 40;
/// Long enough that only the readings count seals a segment.
const COMMIT_INTERVAL_MS: u64 = 60_000;
/// sled 0.34's log file inside its directory.
const SLED_LOG_FILE: &str = "db";
/// Segment payload bound: the outbox's largest, well above 1000 readings of
/// the workload (about 66 KB).
const SEGMENT_BYTES_MAX: usize = tributary_actors::outbox::SEGMENT_BYTES_LIMIT;

#[derive(Debug, Clone)]
pub struct OutboxOpts {
    /// Readings per run; a multiple of every segment size.
    pub readings: u64,
    pub runs: usize,
    pub warmup: usize,
    /// Where the temporary stores go (their filesystem is what is measured).
    pub dir: PathBuf,
    /// sled's page cache bound, as the node's `sled_cache_bytes_max`.
    pub cache_bytes_max: u64,
    /// Segments per `read`, as the uplink's `inflight_segments_max`.
    pub drain_segments: usize,
    pub segment_sizes: Vec<usize>,
}

/// What one pipeline measured in one repetition.
struct Pass {
    write: Duration,
    disk_bytes: u64,
    drain: Duration,
}

fn refusal<T>(r: Refusal<T>) -> anyhow::Error {
    match r {
        Refusal::Full(..) | Refusal::SegmentFull(..) => {
            anyhow::anyhow!("the outbox refused a reading: full")
        }
        Refusal::Invalid(e, _) => anyhow::anyhow!("the outbox refused a reading: {e}"),
        Refusal::TooLarge(n, _) => anyhow::anyhow!("the outbox refused a reading of {n} bytes"),
    }
}

fn outbox_config(segment_readings: usize) -> OutboxConfig {
    OutboxConfig {
        outbox_bytes_max: OUTBOX_BYTES_MAX,
        segment_readings_max: segment_readings,
        segment_bytes_max: SEGMENT_BYTES_MAX,
        commit_interval_ms: COMMIT_INTERVAL_MS,
        full_policy: FullPolicy::Block,
    }
}

fn open_outbox(
    store: Box<dyn OutboxStore>,
    segment_readings: usize,
) -> Result<(Outbox<()>, Recovery)> {
    Ok(Outbox::open(store, outbox_config(segment_readings), 1)?)
}

/// Feeds every reading, committing each segment as it fills, as the gateway
/// does. Returns how long it took.
fn fill(outbox: &mut Outbox<()>, readings: Vec<Reading>) -> Result<Duration> {
    let expected = readings.len() as u64;
    let start = Instant::now();
    for r in readings {
        let now = Instant::now();
        outbox.handle_reading(now, r, ()).map_err(refusal)?;
        if outbox.commit_due(now) {
            outbox.commit()?;
        }
    }
    outbox.commit()?;
    let took = start.elapsed();
    let committed = outbox.stats().readings_committed;
    if committed != expected {
        bail!("the outbox committed {committed} readings of {expected}");
    }
    Ok(took)
}

/// Reads and acknowledges every stored segment, `batch` segments at a time,
/// as the uplink does. Returns how long it took.
fn drain(
    outbox: &mut Outbox<()>,
    recovery: &Recovery,
    batch: usize,
    expected: u64,
) -> Result<Duration> {
    let mut next = recovery.acked_through + 1;
    let mut drained = 0u64;
    let start = Instant::now();
    loop {
        let frames = outbox.read(next, recovery.sealed_through, batch)?;
        let Some(last) = frames.last().map(|f| f.seq) else {
            break;
        };
        drained += frames
            .iter()
            .map(|f| u64::from(f.readings_count))
            .sum::<u64>();
        outbox.handle_acked(last)?;
        next = last + 1;
    }
    let took = start.elapsed();
    if drained != expected {
        bail!("the outbox drained {drained} readings of {expected}");
    }
    Ok(took)
}

fn outbox_pass(
    dir: &Path,
    o: &OutboxOpts,
    segment_readings: usize,
    readings: Vec<Reading>,
) -> Result<Pass> {
    let expected = readings.len() as u64;
    let store = SledStore::open(dir, o.cache_bytes_max)?;
    let (mut outbox, _) = open_outbox(Box::new(store), segment_readings)?;
    let write = fill(&mut outbox, readings)?;
    drop(outbox);

    let disk_bytes = SledStore::open(dir, o.cache_bytes_max)?.size_on_disk();
    let store = SledStore::open(dir, o.cache_bytes_max)?;
    let (mut outbox, recovery) = open_outbox(Box::new(store), segment_readings)?;
    let drain = drain(&mut outbox, &recovery, o.drain_segments, expected)?;
    Ok(Pass {
        write,
        disk_bytes,
        drain,
    })
}

/// The outbox on the simulated disk: its own CPU cost, without sled or fsync.
fn memory_pass(o: &OutboxOpts, segment_readings: usize, readings: Vec<Reading>) -> Result<Pass> {
    let expected = readings.len() as u64;
    // Clones share the simulated disk, so reopening finds what was written.
    let disk = MemoryStore::new();
    let (mut outbox, _) = open_outbox(Box::new(disk.clone()), segment_readings)?;
    let write = fill(&mut outbox, readings)?;
    drop(outbox);

    let (mut outbox, recovery) = open_outbox(Box::new(disk), segment_readings)?;
    let drain = drain(&mut outbox, &recovery, o.drain_segments, expected)?;
    Ok(Pass {
        write,
        disk_bytes: 0,
        drain,
    })
}

/// sled as the outbox's store configures it.
fn open_sled(dir: &Path, o: &OutboxOpts) -> Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(o.cache_bytes_max)
        .flush_every_ms(None)
        .open()
        .with_context(|| format!("opening sled in {}", dir.display()))
}

fn key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn key_index(k: &[u8]) -> Result<u64> {
    let b: [u8; 8] = k.try_into().context("a key of 8 bytes")?;
    Ok(u64::from_be_bytes(b))
}

/// Drains `db` by range reads of `chunk` keys, removing each key read.
/// Returns the number of keys removed.
fn raw_drain(db: &sled::Db, chunk: usize) -> Result<u64> {
    let mut next = 0u64;
    let mut removed = 0u64;
    loop {
        // The values stay sled's own buffers: the least a sender could do.
        let batch = db
            .range(key(next)..)
            .take(chunk)
            .collect::<Result<Vec<_>, _>>()?;
        let Some((last, _)) = batch.last() else {
            return Ok(removed);
        };
        next = key_index(last)? + 1;
        for (k, _) in &batch {
            db.remove(k)?;
            removed += 1;
        }
    }
}

/// How a raw pass writes each segment.
#[derive(Clone, Copy, PartialEq)]
enum RawWrite {
    /// `insert` and `flush`.
    Plain,
    /// `insert`, `flush`, then an fdatasync of sled's log file: on Linux,
    /// sled's flush is only a `sync_file_range`, which neither flushes the
    /// disk's write cache nor syncs the file's size.
    Fdatasync,
    /// What SledStore does: one batch of the segment and a mark key, then
    /// `flush`.
    BatchWithMark,
}

/// The key of the mark in [`RawWrite::BatchWithMark`]: like the store's, it
/// sorts before every segment key (a proper prefix of them all), so the
/// drain's range reads never see it.
const MARK_KEY: &[u8] = &[0; 7];

fn raw_segment_pass(
    dir: &Path,
    o: &OutboxOpts,
    segments: &[Vec<u8>],
    mode: RawWrite,
) -> Result<Pass> {
    let db = open_sled(dir, o)?;
    let log = std::fs::File::open(dir.join(SLED_LOG_FILE))
        .with_context(|| format!("opening sled's log file in {}", dir.display()))?;
    let start = Instant::now();
    for (i, bytes) in segments.iter().enumerate() {
        let k = key(i as u64 + 1);
        if mode == RawWrite::BatchWithMark {
            let mut batch = sled::Batch::default();
            batch.insert(&k, bytes.as_slice());
            batch.insert(MARK_KEY, &k);
            db.apply_batch(batch)?;
        } else {
            db.insert(k, bytes.as_slice())?;
        }
        db.flush()?;
        if mode == RawWrite::Fdatasync {
            log.sync_data().context("fdatasync of sled's log file")?;
        }
    }
    let write = start.elapsed();
    drop(db);

    let db = open_sled(dir, o)?;
    let disk_bytes = db.size_on_disk()?;
    let start = Instant::now();
    let removed = raw_drain(&db, o.drain_segments)?;
    let drain = start.elapsed();
    if removed != segments.len() as u64 {
        bail!("raw sled drained {removed} segments of {}", segments.len());
    }
    Ok(Pass {
        write,
        disk_bytes,
        drain,
    })
}

fn raw_key_pass(
    dir: &Path,
    o: &OutboxOpts,
    segment_readings: usize,
    values: &[Vec<u8>],
) -> Result<Pass> {
    let db = open_sled(dir, o)?;
    let start = Instant::now();
    for (i, bytes) in values.iter().enumerate() {
        db.insert(key(i as u64 + 1), bytes.as_slice())?;
        if (i + 1).is_multiple_of(segment_readings) {
            db.flush()?;
        }
    }
    db.flush()?;
    let write = start.elapsed();
    drop(db);

    let db = open_sled(dir, o)?;
    let disk_bytes = db.size_on_disk()?;
    let start = Instant::now();
    let removed = raw_drain(&db, segment_readings)?;
    let drain = start.elapsed();
    if removed != values.len() as u64 {
        bail!("raw sled drained {removed} keys of {}", values.len());
    }
    Ok(Pass {
        write,
        disk_bytes,
        drain,
    })
}

/// The series of one pipeline: writes, drains, and bytes on disk.
struct Pipeline {
    write: Series,
    drain: Series,
    disk_bytes: Vec<f64>,
}

impl Pipeline {
    fn new(name: &str, readings: u64, bytes: u64) -> Self {
        Self {
            write: Series::new(name, readings, bytes),
            drain: Series::new(name, readings, bytes),
            disk_bytes: Vec::new(),
        }
    }

    fn record(&mut self, pass: Pass) {
        self.write.push(pass.write);
        self.drain.push(pass.drain);
        self.disk_bytes.push(pass.disk_bytes as f64);
    }

    fn disk_bytes_per_reading(&self) -> f64 {
        let mut v = self.disk_bytes.clone();
        v.sort_by(f64::total_cmp);
        median(&v) / self.write.readings.max(1) as f64
    }
}

fn temp_dir(o: &OutboxOpts, what: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("tributary-bench-{what}-"))
        .tempdir_in(&o.dir)
        .with_context(|| format!("creating a directory in {}", o.dir.display()))
}

pub fn run(o: &OutboxOpts) -> Result<()> {
    let reference = workload::readings(o.readings);
    let values: Vec<Vec<u8>> = reference.iter().map(workload::encoded).collect();
    let payload_bytes: u64 = values.iter().map(|v| v.len() as u64).sum();
    println!(
        "outbox: {} readings per run ({} bytes each in bincode), {} runs after {} warm-up, \
         stores in {}, sled cache {} bytes, drain {} segments per read",
        thousands(o.readings as f64),
        payload_bytes / o.readings.max(1),
        o.runs,
        o.warmup,
        o.dir.display(),
        o.cache_bytes_max,
        o.drain_segments,
    );
    for &size in &o.segment_sizes {
        if size == 0 || !o.readings.is_multiple_of(size as u64) {
            bail!(
                "--readings ({}) must be a multiple of the segment size {size}",
                o.readings
            );
        }
        // The exact bytes the outbox stores, so the raw store writes no less.
        let segments: Vec<Vec<u8>> = values
            .chunks(size)
            .enumerate()
            .map(|(i, chunk)| segment::encode(1, i as u64 + 1, chunk.len() as u32, &chunk.concat()))
            .collect();
        let mut outbox = Pipeline::new(
            &format!("outbox on sled, segments of {size}"),
            o.readings,
            payload_bytes,
        );
        let mut memory = Pipeline::new(
            &format!("outbox on MemoryStore (CPU only), segments of {size}"),
            o.readings,
            payload_bytes,
        );
        let mut raw_seg = Pipeline::new(
            &format!("raw sled, 1 value per segment of {size}"),
            o.readings,
            payload_bytes,
        );
        let mut raw_sync = Pipeline::new(
            &format!("raw sled, 1 value per segment of {size}, flush + fdatasync"),
            o.readings,
            payload_bytes,
        );
        let mut raw_batch = Pipeline::new(
            &format!("raw sled, batch of 1 segment of {size} + a mark key"),
            o.readings,
            payload_bytes,
        );
        let mut raw_key = Pipeline::new(
            &format!("raw sled, 1 key per reading, flush per {size}"),
            o.readings,
            payload_bytes,
        );
        for rep in 0..o.warmup + o.runs {
            let timed = rep >= o.warmup;
            for turn in 0..6 {
                match (rep + turn) % 6 {
                    0 => {
                        let dir = temp_dir(o, "outbox")?;
                        let pass = outbox_pass(dir.path(), o, size, reference.clone())?;
                        if timed {
                            outbox.record(pass);
                        }
                    }
                    1 => {
                        let dir = temp_dir(o, "rawseg")?;
                        let pass = raw_segment_pass(dir.path(), o, &segments, RawWrite::Plain)?;
                        if timed {
                            raw_seg.record(pass);
                        }
                    }
                    4 => {
                        let dir = temp_dir(o, "rawsync")?;
                        let pass = raw_segment_pass(dir.path(), o, &segments, RawWrite::Fdatasync)?;
                        if timed {
                            raw_sync.record(pass);
                        }
                    }
                    5 => {
                        let dir = temp_dir(o, "rawbatch")?;
                        let pass =
                            raw_segment_pass(dir.path(), o, &segments, RawWrite::BatchWithMark)?;
                        if timed {
                            raw_batch.record(pass);
                        }
                    }
                    3 => {
                        let pass = memory_pass(o, size, reference.clone())?;
                        if timed {
                            memory.record(pass);
                        }
                    }
                    _ => {
                        let dir = temp_dir(o, "rawkey")?;
                        let pass = raw_key_pass(dir.path(), o, size, &values)?;
                        if timed {
                            raw_key.record(pass);
                        }
                    }
                }
            }
            eprintln!(
                "  segments of {size}: repetition {}/{} done",
                rep + 1,
                o.warmup + o.runs
            );
        }
        print_table(
            &format!("outbox write, segments of {size} readings (one sled flush per segment)"),
            &[
                (&raw_seg.write, None),
                (&raw_key.write, Some(&raw_seg.write)),
                (&raw_sync.write, Some(&raw_seg.write)),
                (&raw_batch.write, Some(&raw_seg.write)),
                (&outbox.write, Some(&raw_seg.write)),
                (&memory.write, Some(&raw_seg.write)),
            ],
        );
        print_table(
            &format!("outbox drain, segments of {size} readings"),
            &[
                (&raw_seg.drain, None),
                (&raw_key.drain, Some(&raw_seg.drain)),
                (&outbox.drain, Some(&raw_seg.drain)),
                (&memory.drain, Some(&raw_seg.drain)),
            ],
        );
        println!("\n| store, segments of {size} | bytes on disk per reading (median) |");
        println!("|---|---:|");
        for p in [&raw_seg, &raw_key, &outbox] {
            println!("| {} | {:.0} |", p.write.name, p.disk_bytes_per_reading());
        }
    }
    Ok(())
}
