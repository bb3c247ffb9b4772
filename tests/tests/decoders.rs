//! A smoke run of the decoders' fuzz contracts, cheap enough for every CI run.
//!
//! Every decoder that takes bytes from outside (uplink frames, outbox
//! segments, MQTT packets and payloads, the MQTT source's records, the edge
//! stages' checkpoints and the gateway's recovery, settings files, control
//! calls, dashboard reports, readings as JSON) gets its seeds, a few thousand
//! seeded mutations of them and a thousand random inputs, deterministic from
//! a fixed seed. The contracts themselves are in `fuzz/src/contracts.rs`,
//! shared with the cargo-fuzz targets: see FUZZING.md for the long runs.
//!
//! The four findings of FUZZING.md are fixed; the `finding_*` tests, which
//! reproduced them, guard the fixes, and nothing is passed over here.
//!
//! Seed corpora for cargo-fuzz: `TRIBUTARY_FUZZ_SEEDS=fuzz/corpus cargo test
//! -p tributary-tests --test decoders write_seed_corpora`.

#[allow(dead_code)]
#[path = "../../fuzz/src/contracts.rs"]
mod contracts;

use contracts::{alloc_track, smoke, Check};

#[global_allocator]
static ALLOC: alloc_track::Tracking = alloc_track::Tracking;

/// Mutated inputs per decoder, and random ones.
const MUTATIONS: usize = 3_000;
const RANDOMS: usize = 1_000;

fn run(name: &str) {
    run_n(name, MUTATIONS, RANDOMS);
}

fn run_n(name: &str, mutations: usize, randoms: usize) {
    let (_, check, seeds) = contracts::targets()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .expect("a known target");
    // One seed per decoder, so that adding one leaves the others' inputs be.
    let seed = name
        .bytes()
        .fold(0xdec0_de00_u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    smoke(check, &seeds, seed, mutations, randoms);
}

#[test]
fn allocation_tracking_counts_this_thread() {
    let (v, peak) = alloc_track::peak_growth(|| vec![1u8; 1 << 20]);
    assert!(
        peak >= 1 << 20,
        "the counting allocator is not installed: {peak}"
    );
    drop(v);
}

#[test]
fn uplink_frames() {
    run("uplink_frame");
}

#[test]
fn outbox_segments() {
    run("outbox_segment");
}

#[test]
fn mqtt_topics_and_payloads() {
    run("mqtt_parse");
}

#[test]
fn mqtt_packets() {
    run("mqtt_packet");
}

#[test]
fn mqtt_core_records() {
    run("mqtt_core_records");
}

/// A restore builds three stages and drives them on: a quarter of the inputs.
#[test]
fn pipeline_checkpoints() {
    run_n("pipeline_restore", MUTATIONS / 4, RANDOMS / 4);
}

#[test]
fn settings_files() {
    run("settings_toml");
}

#[test]
fn control_calls() {
    run("control_wire");
}

#[test]
fn node_reports() {
    run("node_report");
}

#[test]
fn readings_as_json() {
    run("reading_json");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Seeds for the gateway: a real checkpoint and log (leading 1), and raw
/// entries (leading 0).
fn gateway_seeds() -> Vec<Vec<u8>> {
    vec![
        vec![
            1, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 3, 0, 0,
        ],
        vec![
            1, 3, 1, 2, 3, 4, 5, 6, 0, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 5, 2, 1, 1,
        ],
        vec![
            0, 3, 0, 14, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 1, 0, 4, 0, 1,
        ],
    ]
}

/// The gateway starts an actor per input: fewer inputs, same mutations.
#[test]
fn gateway_recovery() {
    let rt = runtime();
    let mut rng = contracts::Rng::new(0x6a7e_3a11);
    let seeds = gateway_seeds();
    let mut pool = seeds.clone();
    for s in &seeds {
        contracts::check_gateway_recovery(&rt, s, false);
    }
    for i in 0..300 {
        let a = &pool[rng.below(pool.len())];
        let b = &pool[rng.below(pool.len())];
        let m = contracts::mutate(&mut rng, a, b);
        contracts::check_gateway_recovery(&rt, &m, false);
        if i % 8 == 0 {
            pool.push(m);
        }
    }
    for _ in 0..100 {
        let n = rng.below(128);
        let r = rng.bytes(n);
        contracts::check_gateway_recovery(&rt, &r, false);
    }
}

/// The largest reading `validate` accepts, every string at its bound and
/// made of a character JSON escapes to six bytes: its JSON stays under 1 MB
/// and its bincode under the decoder's limit.
#[test]
fn the_largest_valid_reading_fits_its_limits() {
    use tributary_actors::reading::*;
    let s = |n: usize| "\u{1}".repeat(n);
    let reading = Reading {
        device_id: s(DEVICE_ID_BYTES_MAX),
        device_ts_us: i64::MIN,
        edge_ts_us: i64::MAX,
        stream: Some(s(STREAM_NAME_BYTES_MAX)),
        metrics: (0..READING_METRICS_MAX)
            .map(|i| Metric {
                name: format!("{i:03}{}", s(METRIC_NAME_BYTES_MAX - 3)),
                value: Value::Str(s(METRIC_STRING_BYTES_MAX)),
                unit: Some(s(METRIC_STRING_BYTES_MAX)),
            })
            .collect(),
    };
    reading.validate().expect("at its bounds, still valid");
    contracts::check_valid_reading(&reading);
}

/// Finding F1: a generation record of `u64::MAX` in the state table
/// makes the MQTT source's core overflow when the broker starts a new
/// session (a panic with overflow checks, a wrap to 0 without).
#[test]
fn finding_f1_generation_record_overflows() {
    let entries = [(b"mqtt/edge-1/gen".to_vec(), u64::MAX.to_le_bytes().to_vec())];
    let config =
        tributary_actors::edge::mqtt::MqttConfig::new("127.0.0.1", 1883, "edge-1", "p/+/t")
            .expect("a valid config");
    let mut core = tributary_actors::edge::mqtt::core::MqttCore::<()>::new(config, &entries);
    core.handle_connected(1, false);
    let change = core.poll_state().expect("a new generation");
    let saved = change[0].1.clone().expect("a value");
    assert_ne!(
        saved,
        0u64.to_le_bytes().to_vec(),
        "the generation wrapped to 0"
    );
}

/// Finding F3: serde_json's default float parser (no `float_roundtrip`
/// feature) is not correctly rounded, so an f64 written by serde_json can
/// come back one ULP off: a control call's `SetStageParam.value`, a reading's
/// `F64` in the readings topic, a report's `rtt_ms`.
#[test]
fn finding_f3_floats_do_not_round_trip_through_json() {
    let exact: f64 = "2.2222222222222218e38".parse().expect("a float");
    let request =
        br#"{"kind":"set_stage_param","stage":"s","param":"p","value":2.2222222222222218e38}"#;
    let parsed: serde_json::Value = serde_json::from_slice(request).expect("JSON");
    let got = parsed["value"].as_f64().expect("a number");
    assert_eq!(got.to_bits(), exact.to_bits(), "{got:e} is not {exact:e}");
}

/// The input of [`contracts::check_gateway_recovery`] that stores one
/// checkpoint meta, `(input_through, chunks, bytes, crc32)`, and nothing else.
fn meta_only(meta: (u64, u32, u64, u32)) -> Vec<u8> {
    let input = meta_only_unchecked(meta);
    assert!(contracts::hits_checkpoint_meta_trust(
        &contracts::gateway_entries(&input[1..])
    ));
    input
}

fn meta_only_unchecked(meta: (u64, u32, u64, u32)) -> Vec<u8> {
    let config = tributary_actors::reading::bincode_config();
    let meta = bincode::encode_to_vec(meta, config).expect("encodes");
    // Raw entries (0), one entry (1), the meta's key (0), its length (u16 LE).
    let mut input = vec![0, 1, 0, meta.len() as u8, 0];
    input.extend(&meta);
    input
}

/// Finding F2 (a): the gateway reserves the checkpoint meta's `bytes`
/// (up to 1 GiB) before it reads a chunk: 14 bytes on disk, 1 GiB asked for.
#[test]
fn finding_f2_checkpoint_meta_bytes_are_reserved() {
    let input = meta_only((0, 0, 1 << 30, 0));
    contracts::check_gateway_recovery(&runtime(), &input, false);
}

/// Finding F2 (b): the gateway looks up the checkpoint meta's `chunks`
/// keys one by one (up to 2^32) before it starts.
#[test]
fn finding_f2_checkpoint_meta_chunks_are_looked_up() {
    let input = meta_only((0, u32::MAX, 0, 0));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        contracts::check_gateway_recovery(&runtime(), &input, false);
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("the gateway did not start within 10 s on a 10-byte checkpoint meta");
}

/// Finding F4: the gateway adds one to the checkpoint meta's
/// `input_through` (and to the input log's last seq) unchecked: a meta of
/// `u64::MAX` panics its start with overflow checks, and wraps without.
#[test]
fn finding_f4_input_through_overflows() {
    let input = meta_only_unchecked((u64::MAX, 0, 0, 0));
    assert!(contracts::hits_input_seq_overflow(
        &contracts::gateway_entries(&input[1..])
    ));
    contracts::check_gateway_recovery(&runtime(), &input, false);
}

/// Writes every target's seeds as a starting corpus for cargo-fuzz, when
/// `TRIBUTARY_FUZZ_SEEDS` names a directory; otherwise does nothing.
#[test]
fn write_seed_corpora() {
    let Some(dir) = std::env::var_os("TRIBUTARY_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let mut all: Vec<(&str, Vec<Vec<u8>>)> = contracts::targets()
        .into_iter()
        .map(|(name, _, seeds): (&str, Check, _)| (name, seeds))
        .collect();
    all.push(("gateway_recovery", gateway_seeds()));
    for (name, seeds) in all {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("creating the corpus directory");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s).expect("writing a seed");
        }
    }
}
