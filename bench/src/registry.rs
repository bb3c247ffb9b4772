//! `bench registry`: what the fleet registry costs a cloud node with many
//! entries: taking the topic's records (at start, and when following it),
//! the revocation check every new connection makes, and memory per entry.
//!
//! Baselines, measured in the same run: a `HashSet<String>` of the refused
//! ids for the check (the least a lookup by id can cost), and decoding the
//! same records' JSON without keeping them for the records. Memory is the
//! process's resident set before and after the registry is built (this
//! thread builds nothing else meanwhile).

use std::collections::HashSet;
use std::hint::black_box;
use std::time::Instant;

use anyhow::Result;
use tributary_actors::registry::{Entry, Kind, Registry, Status};

use crate::devices::rss_bytes;
use crate::stats::thousands;

pub struct RegistryOpts {
    pub entries: usize,
    pub checks: usize,
}

fn entry(i: usize) -> Entry {
    Entry {
        id: format!("edge-{i:07}"),
        kind: Kind::Edge,
        // One in ten refused, as after a recall.
        status: if i.is_multiple_of(10) {
            Status::Revoked
        } else {
            Status::Active
        },
        labels: vec![format!("plant-{}", i % 50)],
        reason: (i.is_multiple_of(10)).then(|| "recalled".to_string()),
        changed_ms: 1_767_225_600_000 + i as u64,
        changed_by: "node fleet (bench)".into(),
        first_seen_ms: Some(1_767_225_600_000),
    }
}

pub fn run(o: &RegistryOpts) -> Result<()> {
    let records: Vec<(String, Vec<u8>)> = (0..o.entries)
        .map(|i| {
            let e = entry(i);
            (e.key(), serde_json::to_vec(&e).expect("an entry encodes"))
        })
        .collect();
    let record_bytes: usize = records.iter().map(|(k, v)| k.len() + v.len()).sum();

    // Baseline: decoding the records, nothing kept.
    let t = Instant::now();
    for (_, v) in &records {
        black_box(serde_json::from_slice::<Entry>(v).expect("decodes"));
    }
    let decode_s = t.elapsed().as_secs_f64();

    let rss_before = rss_bytes();
    let t = Instant::now();
    let mut registry = Registry::new();
    for (k, v) in &records {
        black_box(registry.handle_record(k, Some(v)));
    }
    let take_s = t.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    let per_entry = rss_after.saturating_sub(rss_before) as f64 / o.entries as f64;

    // The check a new connection makes, by certified id: half of them ids
    // the registry does not hold.
    let ids: Vec<String> = (0..o.checks)
        .map(|i| {
            let n = (i.wrapping_mul(2_654_435_761)) % (o.entries * 2);
            format!("edge-{n:07}")
        })
        .collect();
    let refused_set: HashSet<String> = registry
        .entries()
        .filter(|e| !e.status.admits())
        .map(|e| e.id.clone())
        .collect();
    let t = Instant::now();
    let mut hits = 0usize;
    for id in &ids {
        hits += usize::from(black_box(refused_set.contains(id.as_str())));
    }
    let raw_ns = t.elapsed().as_nanos() as f64 / o.checks as f64;
    let t = Instant::now();
    let mut refused = 0usize;
    for id in &ids {
        refused += usize::from(black_box(registry.refusal(Kind::Edge, id)).is_some());
    }
    let check_ns = t.elapsed().as_nanos() as f64 / o.checks as f64;
    assert_eq!(hits, refused, "the registry and the baseline disagree");

    println!(
        "registry: {} entries ({} bytes of records), {} checks ({} refused)",
        thousands(o.entries as f64),
        thousands(record_bytes as f64),
        thousands(o.checks as f64),
        thousands(refused as f64)
    );
    println!("| figure | registry | baseline (same run) | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| records taken per second | {} | JSON decode alone: {} | {:.2} |",
        thousands(o.entries as f64 / take_s),
        thousands(o.entries as f64 / decode_s),
        decode_s / take_s
    );
    println!(
        "| revocation check per connection | {check_ns:.0} ns | HashSet<String> of refused ids: {raw_ns:.0} ns | {:.2} |",
        check_ns / raw_ns.max(1e-9)
    );
    println!(
        "| resident memory per entry | {per_entry:.0} B | its record: {:.0} B | {:.2} |",
        record_bytes as f64 / o.entries as f64,
        per_entry / (record_bytes as f64 / o.entries as f64)
    );
    Ok(())
}
