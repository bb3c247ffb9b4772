use super::*;
use crate::reading::{Metric, Value};

fn reading(device: &str, ts: i64) -> Reading {
    Reading {
        device_id: device.into(),
        device_ts_us: ts,
        edge_ts_us: ts,
        stream: None,
        metrics: vec![Metric {
            name: "v".into(),
            value: Value::F64(ts as f64),
            unit: None,
        }],
    }
}

fn cfg(readings: usize) -> OutboxConfig {
    OutboxConfig {
        outbox_bytes_max: 64 * 1024,
        segment_readings_max: readings,
        segment_bytes_max: 4 * 1024,
        commit_interval_ms: 10,
        full_policy: FullPolicy::Block,
    }
}

fn open(store: &MemoryStore, cfg: OutboxConfig) -> (Outbox<i64>, Recovery) {
    Outbox::open(Box::new(store.clone()), cfg, 1000).unwrap()
}

fn add(o: &mut Outbox<i64>, now: Instant, ts: i64) {
    o.handle_reading(now, reading("d", ts), ts)
        .map_err(|_| "refused")
        .unwrap();
}

#[test]
fn a_commit_acknowledges_in_order_and_survives_a_crash() {
    let store = MemoryStore::new();
    let (mut o, rec) = open(&store, cfg(2));
    assert_eq!((rec.epoch, rec.sealed_through), (1000, 0));
    let now = Instant::now();
    add(&mut o, now, 1);
    assert!(!o.commit_due(now));
    add(&mut o, now, 2);
    assert!(o.commit_due(now), "full segment is due at once");
    let c = o.commit().unwrap().unwrap();
    assert_eq!((c.seq, c.tickets), (Some(1), vec![1, 2]));
    add(&mut o, now, 3); // never committed: may be lost, was never acked
    store.crash(None, false);
    let (mut o, rec) = open(&store, cfg(2));
    assert_eq!((rec.epoch, rec.sealed_through, rec.segments), (1000, 1, 1));
    let segs = o.read(1, 10, 10).unwrap();
    let readings = segment::decode_payload(&segs[0].bytes, segs[0].readings_count).unwrap();
    assert_eq!(
        readings.iter().map(|r| r.device_ts_us).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[test]
fn the_interval_seals_a_partial_segment() {
    let store = MemoryStore::new();
    let (mut o, _) = open(&store, cfg(100));
    let t0 = Instant::now();
    add(&mut o, t0, 1);
    let deadline = o.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_millis(10));
    assert!(!o.commit_due(deadline - Duration::from_millis(1)));
    assert!(o.commit_due(deadline));
}

#[test]
fn seqs_are_never_reused_after_everything_was_acked_and_a_crash() {
    let store = MemoryStore::new();
    let (mut o, _) = open(&store, cfg(1));
    let now = Instant::now();
    for ts in 1..=3 {
        add(&mut o, now, ts);
        o.commit().unwrap();
    }
    o.handle_acked(3).unwrap();
    store.crash(None, false); // the removals were not synced: they may come back
    let (mut o, rec) = open(&store, cfg(1));
    assert_eq!(rec.sealed_through, 3);
    add(&mut o, now, 4);
    assert_eq!(o.commit().unwrap().unwrap().seq, Some(4));
    o.handle_acked(4).unwrap();
    o.commit().unwrap();
    store.crash(None, false);
    let (mut o, _) = open(&store, cfg(1));
    add(&mut o, now, 5);
    assert_eq!(o.commit().unwrap().unwrap().seq, Some(5));
}

#[test]
fn block_refuses_when_full_and_an_ack_makes_room() {
    let store = MemoryStore::new();
    let mut c = cfg(10);
    c.outbox_bytes_max = 4 * (c.segment_bytes_max + segment::HEADER_BYTES) as u64;
    let (mut o, _) = open(&store, c.clone());
    let now = Instant::now();
    let mut ts = 0;
    loop {
        ts += 1;
        match o.handle_reading(now, reading("d", ts), ts) {
            Ok(()) => {
                if o.commit_due(now) {
                    o.commit().unwrap();
                }
            }
            Err(Refusal::Full(_, t)) => {
                assert_eq!(t, ts);
                break;
            }
            Err(_) => panic!("unexpected refusal"),
        }
        assert!(o.bytes_used() <= c.outbox_bytes_max);
    }
    assert_eq!(o.stats().readings_refused_full, 1);
    o.commit().unwrap();
    let freed = o.handle_acked(1).unwrap();
    assert!(freed > 0);
    add(&mut o, now, ts);
}

#[test]
fn drop_oldest_evicts_and_counts() {
    let store = MemoryStore::new();
    let mut c = cfg(10);
    c.full_policy = FullPolicy::DropOldest;
    c.outbox_bytes_max = 4 * (c.segment_bytes_max + segment::HEADER_BYTES) as u64;
    let (mut o, _) = open(&store, c.clone());
    let now = Instant::now();
    for ts in 1..=2000 {
        add(&mut o, now, ts);
        if o.commit_due(now) {
            o.commit().unwrap();
        }
        assert!(o.bytes_used() <= c.outbox_bytes_max);
    }
    let dropped = o.poll_dropped();
    assert!(!dropped.is_empty());
    assert_eq!(dropped[0].seq, 1);
    assert_eq!(dropped[0].keys.len(), 10);
    let total: u64 = dropped.iter().map(|d| d.readings as u64).sum();
    assert_eq!(o.stats().readings_dropped, total);
    // What is left starts right after the evicted segments.
    let first_left = o.read(1, o.sealed_through(), 1).unwrap()[0].seq;
    assert_eq!(first_left, dropped.last().unwrap().seq + 1);
}

#[test]
fn a_damaged_segment_is_quarantined_and_the_rest_flows() {
    let store = MemoryStore::new();
    let (mut o, _) = open(&store, cfg(1));
    let now = Instant::now();
    for ts in 1..=3 {
        add(&mut o, now, ts);
        o.commit().unwrap();
    }
    store.corrupt(2, |b| b[40] ^= 0x10);
    let segs = o.read(1, 3, 10).unwrap();
    assert_eq!(segs.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(o.stats().segments_quarantined, 1);
    assert_eq!(
        store
            .quarantined()
            .unwrap()
            .iter()
            .map(|q| q.0)
            .collect::<Vec<_>>(),
        vec![2]
    );
    store.corrupt(3, |b| b.truncate(20));
    assert_eq!(o.read(3, 3, 10).unwrap(), vec![]);
}

#[test]
fn a_torn_write_is_caught_on_read_after_a_crash() {
    let store = MemoryStore::new();
    let (mut o, _) = open(&store, cfg(1));
    let now = Instant::now();
    add(&mut o, now, 1);
    o.commit().unwrap();
    store.set_sync_failing(true);
    add(&mut o, now, 2);
    assert!(o.commit().is_err(), "a failed sync is an error, not an ack");
    store.set_sync_failing(false);
    store.crash(Some(1), true);
    let (mut o, rec) = open(&store, cfg(1));
    assert_eq!(rec.sealed_through, 2);
    let segs = o.read(1, rec.sealed_through, 10).unwrap();
    assert_eq!(segs.len(), 1);
    assert_eq!(o.stats().segments_quarantined, 1);
}

#[test]
fn invalid_readings_are_refused_with_their_reason() {
    let store = MemoryStore::new();
    let (mut o, _) = open(&store, cfg(1));
    let mut r = reading("", 1);
    r.device_id.clear();
    assert!(matches!(
        o.handle_reading(Instant::now(), r, 7),
        Err(Refusal::Invalid(_, 7))
    ));
    assert_eq!(o.stats().readings_invalid, 1);
}

#[test]
fn bad_config_names_the_key() {
    let mut c = cfg(1);
    c.commit_interval_ms = 0;
    let err = Outbox::<i64>::open(Box::new(MemoryStore::new()), c, 1)
        .err()
        .unwrap();
    assert!(err.to_string().contains("commit_interval_ms"), "{err}");
}

#[test]
fn sled_store_keeps_segments_and_epoch_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    {
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let (mut o, _) = Outbox::<i64>::open(Box::new(store), cfg(2), 77).unwrap();
        for ts in 1..=4 {
            add(&mut o, now, ts);
            if o.commit_due(now) {
                o.commit().unwrap();
            }
        }
        o.handle_acked(1).unwrap();
    }
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let (mut o, rec) = Outbox::<i64>::open(Box::new(store), cfg(2), 99).unwrap();
    assert_eq!(
        (
            rec.epoch,
            rec.sealed_through,
            rec.acked_through,
            rec.segments
        ),
        (77, 2, 1, 1)
    );
    let segs = o.read(1, 2, 10).unwrap();
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].seq, 2);
}

#[test]
fn sled_store_quarantines_a_bit_flipped_segment() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let mut good = Vec::new();
    segment::encode_reading(&reading("d", 1), &mut good);
    let mut bad = segment::encode(5, 1, 1, &good);
    bad[35] ^= 0x01;
    store.put_raw_segment(1, &bad).unwrap();
    let (mut o, rec) = Outbox::<i64>::open(Box::new(store), cfg(1), 5).unwrap();
    assert_eq!(rec.segments, 1);
    assert!(o.read(1, 1, 10).unwrap().is_empty());
    assert_eq!(o.stats().segments_quarantined, 1);
    add(&mut o, Instant::now(), 2);
    assert_eq!(o.commit().unwrap().unwrap().seq, Some(2));
    assert_eq!(o.read(1, 2, 10).unwrap().len(), 1);
}

/// Deletes sled's files, as a damaged or emptied `db` would lose them.
fn wipe_sled_keeping_the_guard(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("guard")
        {
            continue;
        }
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

fn fill_sled(dir: &std::path::Path, segments: i64) -> Recovery {
    let store = SledStore::open(dir, 1 << 20).unwrap();
    let (mut o, _) = Outbox::<i64>::open(Box::new(store), cfg(1), 42).unwrap();
    for ts in 1..=segments {
        add(&mut o, Instant::now(), ts);
        o.commit().unwrap();
    }
    drop(o);
    let store = SledStore::open(dir, 1 << 20).unwrap();
    Outbox::<i64>::open(Box::new(store), cfg(1), 99).unwrap().1
}

#[test]
fn an_emptied_sled_store_is_refused_not_taken_for_a_new_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let rec = fill_sled(dir.path(), 5);
    assert_eq!((rec.epoch, rec.sealed_through), (42, 5));
    // Lose sled's data, as a damaged or emptied `db` file would.
    wipe_sled_keeping_the_guard(dir.path());
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let err = Outbox::<i64>::open(Box::new(store), cfg(1), 99)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("damaged") && msg.contains(&dir.path().display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("through seq 5"), "{msg}");

    // Accepting the damage keeps the epoch and carries the seqs on above the guard.
    let store = SledStore::open(dir.path(), 1 << 20)
        .unwrap()
        .accept_damage(true);
    let (mut o, rec) = Outbox::<i64>::open(Box::new(store), cfg(1), 99).unwrap();
    assert_eq!((rec.epoch, rec.sealed_through, rec.segments), (42, 5, 0));
    add(&mut o, Instant::now(), 6);
    assert_eq!(o.commit().unwrap().unwrap().seq, Some(6));
    drop(o);
    // And from then on the store opens normally.
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let (_, rec) = Outbox::<i64>::open(Box::new(store), cfg(1), 99).unwrap();
    assert_eq!((rec.epoch, rec.sealed_through), (42, 6));
}

#[test]
fn another_outboxs_files_are_refused() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    fill_sled(a.path(), 2);
    let store = SledStore::open(b.path(), 1 << 20).unwrap();
    let (mut o, _) = Outbox::<i64>::open(Box::new(store), cfg(1), 7).unwrap();
    add(&mut o, Instant::now(), 1);
    o.commit().unwrap();
    drop(o);
    for slot in ["guard.a", "guard.b"] {
        std::fs::copy(b.path().join(slot), a.path().join(slot)).unwrap();
    }
    let store = SledStore::open(a.path(), 1 << 20).unwrap();
    let err = Outbox::<i64>::open(Box::new(store), cfg(1), 99)
        .err()
        .unwrap();
    assert!(err.to_string().contains("another outbox"), "{err}");
}

#[test]
fn a_torn_guard_slot_falls_back_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    fill_sled(dir.path(), 3);
    std::fs::write(dir.path().join("guard.a"), b"torn").unwrap();
    // The store itself is intact: it opens as it was.
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let (_, rec) = Outbox::<i64>::open(Box::new(store), cfg(1), 99).unwrap();
    assert_eq!((rec.epoch, rec.sealed_through), (42, 3));
    // With sled's data gone and one slot torn, the other slot still tells
    // (it may lag by up to a second of commits: it was synced last).
    wipe_sled_keeping_the_guard(dir.path());
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let err = Outbox::<i64>::open(Box::new(store), cfg(1), 99)
        .err()
        .unwrap();
    assert!(err.to_string().contains("damaged: it is empty"), "{err}");
}

#[test]
fn state_rides_with_its_segment_and_survives_a_crash_only_if_synced() {
    let store = MemoryStore::new();
    let (mut o, _) = open(&store, cfg(10));
    let now = Instant::now();
    let put = |k: &str, v: &str| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()));
    o.handle_reading_with(now, reading("d", 1), 1, vec![put("mark/d", "1")])
        .map_err(|_| "refused")
        .unwrap();
    assert_eq!(
        o.state_get(b"mark/d"),
        Some(&b"1"[..]),
        "visible before the commit"
    );
    assert!(
        o.durable_state(b"mark/").is_empty(),
        "not durable before the commit"
    );
    let c = o.commit().unwrap().unwrap();
    assert_eq!((c.seq, c.tickets.len()), (Some(1), 1));
    // A state change alone: a batch without a segment, with its own ticket.
    o.handle_state(now, vec![put("mark/e", "7")], 99)
        .map_err(|_| "refused")
        .unwrap();
    let c = o.commit().unwrap().unwrap();
    assert_eq!((c.seq, c.state_tickets), (None, vec![99]));
    assert!(c.tickets.is_empty());
    // Unsynced: lost in a crash, with the reading it came with.
    o.handle_reading_with(now, reading("d", 2), 2, vec![put("mark/d", "2")])
        .map_err(|_| "refused")
        .unwrap();
    store.crash(None, false);
    let (o, rec) = open(&store, cfg(10));
    assert_eq!(rec.sealed_through, 1);
    assert_eq!(
        o.durable_state(b"mark/"),
        vec![
            (b"mark/d".to_vec(), b"1".to_vec()),
            (b"mark/e".to_vec(), b"7".to_vec())
        ]
    );
    // The state counts against the budget.
    assert_eq!(o.state_bytes(), (6 + 1 + 6 + 1) as u64);
    assert!(o.bytes_used() >= o.state_bytes());
}

#[test]
fn state_is_refused_when_the_budget_is_spent_and_freed_by_removal() {
    let store = MemoryStore::new();
    let mut c = cfg(10);
    c.outbox_bytes_max = 4 * (4 * 1024 + segment::HEADER_BYTES as u64);
    let (mut o, _) = open(&store, c.clone());
    let now = Instant::now();
    let big = vec![0u8; 4 * 1024];
    let mut i = 0;
    loop {
        let k = format!("k{i}").into_bytes();
        match o.handle_state(now, vec![(k, Some(big.clone()))], i) {
            Ok(()) => i += 1,
            Err(StateRefusal::Full(t)) => {
                assert_eq!(t, i);
                break;
            }
            Err(StateRefusal::TooLarge(..)) => panic!("not too large"),
        }
        assert!(i < 10, "the budget must stop it");
    }
    assert!(o.bytes_used() <= c.outbox_bytes_max);
    // Removing an entry frees its bytes at once, so the next one fits.
    o.handle_state(now, vec![(b"k0".to_vec(), None)], 100)
        .map_err(|_| "refused")
        .unwrap();
    o.handle_state(now, vec![(b"again".to_vec(), Some(big.clone()))], 101)
        .map_err(|_| "refused")
        .unwrap();
    o.commit().unwrap();
    assert!(matches!(
        o.handle_state(now, vec![(vec![0u8; STATE_KEY_BYTES_MAX + 1], None)], 0),
        Err(StateRefusal::TooLarge(..))
    ));
}

#[test]
fn sled_store_keeps_state_in_the_segments_batch() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path(), 1 << 20).unwrap();
        let (mut o, _) = Outbox::<i64>::open(Box::new(store), cfg(10), 7).unwrap();
        let now = Instant::now();
        o.handle_reading_with(
            now,
            reading("d", 1),
            1,
            vec![(b"a".to_vec(), Some(b"x".to_vec()))],
        )
        .map_err(|_| "refused")
        .unwrap();
        o.commit().unwrap();
        o.handle_state(
            now,
            vec![(b"a".to_vec(), None), (b"b".to_vec(), Some(b"y".to_vec()))],
            2,
        )
        .map_err(|_| "refused")
        .unwrap();
        o.commit().unwrap();
    }
    let store = SledStore::open(dir.path(), 1 << 20).unwrap();
    let (o, rec) = Outbox::<i64>::open(Box::new(store), cfg(10), 8).unwrap();
    assert_eq!((rec.epoch, rec.sealed_through), (7, 1));
    assert_eq!(o.durable_state(b""), vec![(b"b".to_vec(), b"y".to_vec())]);
}

#[test]
fn an_outbox_that_never_sent_moves_its_epoch_above_the_logs_and_keeps_it() {
    let store = MemoryStore::new();
    let (mut o, rec) = open(&store, cfg(1));
    assert_eq!(rec.epoch, 1000);
    let now = Instant::now();
    add(&mut o, now, 1);
    o.commit().unwrap().unwrap();
    // The clock was behind when this outbox was created: the log holds 5000.
    assert_eq!(o.handle_stale_epoch(5000).unwrap(), 5001);
    assert_eq!(o.epoch(), 5001);
    // A late refusal from before the move changes nothing.
    assert_eq!(o.handle_stale_epoch(4000).unwrap(), 5001);
    // The move is durable before it is answered, and survives a crash.
    store.crash(None, false);
    let (mut o, rec) = open(&store, cfg(1));
    assert_eq!(rec.epoch, 5001);
    let frames = o.read(1, 1, 10).unwrap();
    assert_eq!(frames.len(), 1);
    assert_eq!(
        frames[0].epoch, 5001,
        "segments travel under the moved epoch"
    );
    // Once a segment was read for sending, the outbox may have readings in
    // the log: a later stale refusal means a backup or a clone, for good.
    let err = o.handle_stale_epoch(9000).unwrap_err();
    assert!(
        matches!(
            err,
            OutboxError::StaleAfterSending {
                epoch: 5001,
                log_epoch: 9000
            }
        ),
        "{err}"
    );
    store.crash(None, false);
    let (mut o, _) = open(&store, cfg(1));
    assert!(
        o.handle_stale_epoch(9000).is_err(),
        "having sent is durable"
    );
    assert_eq!(o.epoch(), 5001);
}

#[test]
fn a_damaged_moved_epoch_is_refused_by_name() {
    let store = MemoryStore::new();
    {
        let (mut o, _) = open(&store, cfg(1));
        o.write_own_state(WIRE_EPOCH_KEY, vec![1, 2, 3]).unwrap();
    }
    let err = Outbox::<i64>::open(Box::new(store.clone()), cfg(1), 1000)
        .err()
        .expect("a damaged entry is refused");
    assert!(err.to_string().contains("wire-epoch"), "{err}");
}

#[test]
fn quarantined_segments_count_against_the_budget_and_go_first_when_room_is_needed() {
    let store = MemoryStore::new();
    let mut c = cfg(100);
    c.outbox_bytes_max = 4 * (c.segment_bytes_max + segment::HEADER_BYTES) as u64;
    let (mut o, _) = open(&store, c.clone());
    let now = Instant::now();
    let mut ts = 0;
    // Fill the outbox to refusal under `block`.
    loop {
        ts += 1;
        match o.handle_reading(now, reading("d", ts), ts) {
            Ok(()) => {
                if o.commit_due(now) {
                    o.commit().unwrap();
                }
            }
            Err(Refusal::Full(..)) => break,
            Err(_) => panic!("unexpected refusal"),
        }
    }
    o.commit().unwrap();
    let used = o.bytes_used();
    // Every stored segment is damaged: all go to quarantine, and still count.
    let sealed = o.sealed_through();
    for seq in 1..=sealed {
        store.corrupt(seq, |b| b[40] ^= 0x10);
    }
    assert!(sealed as usize <= QUARANTINED_SEGMENTS_MAX);
    assert!(o.read(1, sealed, 1000).unwrap().is_empty());
    assert_eq!(o.quarantined().0 as u64, sealed);
    assert_eq!(o.bytes_used(), used, "quarantined bytes stay in the budget");
    // New readings are not held back by what can never be sent: the oldest
    // quarantined segments make room, counted.
    for _ in 0..200 {
        ts += 1;
        add(&mut o, now, ts);
        if o.commit_due(now) {
            o.commit().unwrap();
        }
        assert!(o.bytes_used() <= c.outbox_bytes_max);
    }
    let evicted = o.stats().quarantined_evicted;
    assert!(evicted > 0);
    assert_eq!(o.quarantined().0 as u64, sealed - evicted);
    assert_eq!(
        store.quarantined().unwrap().first().unwrap().0,
        evicted + 1,
        "oldest first"
    );
    // The bookkeeping survives a reopen.
    let (o, rec) = open(&store, c);
    assert_eq!(rec.quarantined as u64, sealed - evicted);
    assert_eq!(o.quarantined().0 as u64, sealed - evicted);
}

#[test]
fn at_most_quarantined_segments_max_are_kept() {
    let store = MemoryStore::new();
    let mut c = cfg(1);
    c.outbox_bytes_max = 1 << 30;
    let (mut o, _) = open(&store, c);
    let now = Instant::now();
    let n = QUARANTINED_SEGMENTS_MAX as i64 + 5;
    for ts in 1..=n {
        add(&mut o, now, ts);
        o.commit().unwrap();
        store.corrupt(ts as u64, |b| b[40] ^= 0x10);
    }
    assert!(o.read(1, n as u64, 1000).unwrap().is_empty());
    assert_eq!(o.quarantined().0, QUARANTINED_SEGMENTS_MAX);
    assert_eq!(o.stats().quarantined_evicted, 5);
    assert_eq!(store.quarantined().unwrap().len(), QUARANTINED_SEGMENTS_MAX);
}
