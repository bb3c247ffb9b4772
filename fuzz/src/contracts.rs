//! The contracts of Tributary's decoders of outside bytes (issue #11, "trust
//! boundaries"), shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and
//! the CI smoke run (`tests/tests/decoders.rs`, which includes this file by
//! path). See FUZZING.md.
//!
//! Each `check_*` takes raw input, feeds it to one decoder through its public
//! entry point, and panics when a contract breaks: a panic of the decoder
//! itself, a hang (left to the runner's time limit), a decoded value that does
//! not survive re-encoding, or an allocation beyond the decoder's limit (see
//! [`alloc_track`]; measured only where the crate installs
//! [`alloc_track::Tracking`] as its global allocator).
//!
//! The node's `config`, `cluster::control` and `dashboard::report` modules are
//! private to `tributary-node`, so they are compiled in here from their source
//! files (`#[path]`): the same code, not a copy.
//!
//! `skip_known` makes a check pass over inputs that reach a known finding of
//! FUZZING.md, so that fuzzing can go on looking for new ones while one is
//! open; every finding so far is fixed, and CI passes `false`.

#![allow(clippy::too_many_lines)]

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tributary_actors::edge::gateway::SourceAnswer;
use tributary_actors::edge::mqtt::core::{Message, MqttCore};
use tributary_actors::edge::mqtt::{parse_message, topic_matches, valid_filter, MqttConfig};
use tributary_actors::outbox::segment::{self, decode_payload, encode_reading, verify};
use tributary_actors::pipeline::{Pipeline, StageRestarts, OUTPUTS_PER_READING_MAX};
use tributary_actors::reading::{
    Metric, Reading, Value, DEVICE_ID_BYTES_MAX, READING_ENCODED_BYTES_MAX, READING_METRICS_MAX,
};
use tributary_actors::stages::{secs, Window};
use tributary_actors::topology::{Component, Simulated, Topology};
use tributary_cluster::tls::Role;
use tributary_cluster::uplink::frame::{encode, FRAME_BYTES_LIMIT, FRAME_BYTES_MAX_DEFAULT};
use tributary_cluster::uplink::{Frame, FrameDecoder, FrameError, RefuseCode, SegmentFrame};

/// `tributary_node::config` (private), compiled from its source.
#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../../node/src/config.rs"]
pub mod node_config;

/// `tributary_node::cluster::control` (private), compiled from its source.
#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../../node/src/cluster/control.rs"]
pub mod node_control;

/// `tributary_node::dashboard::report` (private), compiled from its source.
#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../../node/src/dashboard/report.rs"]
pub mod node_report;

// ---------------------------------------------------------------------------------------
// Allocation tracking
// ---------------------------------------------------------------------------------------

/// Counts the bytes live on the current thread, so that a check can bound
/// what one decode allocates (a count field claiming four billion readings
/// must not turn into a four-billion-element buffer).
pub mod alloc_track {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn add(n: isize) {
        let _ = LIVE.try_with(|live| {
            let v = live.get().wrapping_add(n);
            live.set(v);
            let _ = PEAK.try_with(|p| {
                if v > p.get() {
                    p.set(v);
                }
            });
        });
    }

    /// The system allocator, counting. Install it with
    /// `#[global_allocator] static A: Tracking = Tracking;`.
    pub struct Tracking;

    // SAFETY: every call is forwarded to the system allocator unchanged; the
    // counters are plain thread-locals without destructors.
    unsafe impl GlobalAlloc for Tracking {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                add(layout.size() as isize);
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                add(layout.size() as isize);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            add(-(layout.size() as isize));
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                add(new_size as isize - layout.size() as isize);
            }
            p
        }
    }

    /// Runs `f` and returns how far above the starting point the bytes live
    /// on this thread rose meanwhile.
    pub fn peak_growth<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let start = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(start));
        let r = f();
        let peak = PEAK.with(Cell::get);
        (r, (peak - start).max(0) as usize)
    }
}

use alloc_track::peak_growth;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Asserts that a decode of `input_len` bytes stayed within `fixed` bytes
/// plus `per_byte` bytes per input byte.
fn assert_alloc(what: &str, peak: usize, input_len: usize, fixed: usize, per_byte: usize) {
    let bound = fixed + per_byte * input_len;
    assert!(
        peak <= bound,
        "{what}: decoding {input_len} bytes allocated {peak} bytes at peak, \
         more than its limit of {bound} ({fixed} + {per_byte} per input byte)"
    );
}

// ---------------------------------------------------------------------------------------
// Input helpers
// ---------------------------------------------------------------------------------------

/// Reads structured choices off the front of an input; past its end every
/// read is zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// An extreme or ordinary value for a length or count field.
fn extreme_u64(choice: u8, ordinary: u64) -> u64 {
    match choice % 8 {
        0 => 0,
        1 => 1,
        2 => u64::from(u32::MAX),
        3 => u64::MAX,
        4 => 1 << 62,
        5 => u64::from(u32::MAX) + 1,
        6 => ordinary.wrapping_add(1),
        _ => ordinary,
    }
}

/// A reading made of input bytes; valid or not, as the bytes fall.
fn reading_from(u: &mut Input) -> Reading {
    let id_len = (u.byte() % 12) as usize;
    let device_id = String::from_utf8_lossy(u.bytes(id_len)).into_owned();
    let metrics = (0..u.byte() % 4)
        .map(|i| Metric {
            name: format!("m{}", i + u.byte() % 2),
            value: match u.byte() % 5 {
                0 => Value::F64(f64::from_bits(u.u64())),
                1 => Value::I64(u.u64() as i64),
                2 => Value::Bool(u.byte().is_multiple_of(2)),
                3 => Value::Str(String::from_utf8_lossy(u.bytes(4)).into_owned()),
                _ => Value::F64(f64::from(u.byte()) / 4.0),
            },
            unit: (u.byte().is_multiple_of(3)).then(|| "°C".to_owned()),
        })
        .collect();
    Reading {
        device_id,
        device_ts_us: u.u64() as i64,
        edge_ts_us: i64::from(u.u32()),
        stream: (u.byte().is_multiple_of(3)).then(|| "sim".to_owned()),
        metrics,
    }
}

/// Applies one damage chosen by the input to `bytes`: a bit flip, a
/// truncation, a byte set to an extreme, an aligned 4- or 8-byte field set
/// to an extreme, or nothing.
fn damage(u: &mut Input, bytes: &mut Vec<u8>) -> bool {
    if bytes.is_empty() {
        return false;
    }
    let at = u.u16() as usize % bytes.len();
    match u.byte() % 6 {
        0 => return false,
        1 => bytes[at] ^= 1 << (u.byte() % 8),
        2 => bytes.truncate(at),
        3 => bytes[at] = [0x00, 0xff, 0x7f, 0x80, 0xfb, 0xfc, 0xfd][u.byte() as usize % 7],
        4 => {
            let v = (extreme_u64(u.byte(), 0) as u32).to_le_bytes();
            for (i, b) in v.iter().enumerate() {
                if let Some(x) = bytes.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
        _ => {
            let v = extreme_u64(u.byte(), 0).to_le_bytes();
            for (i, b) in v.iter().enumerate() {
                if let Some(x) = bytes.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
    }
    true
}

// ---------------------------------------------------------------------------------------
// 1. Uplink frames
// ---------------------------------------------------------------------------------------

/// Frames as an edge or a cloud reads them off the uplink stream, pushed in
/// chunks. Contracts: no panic; a length above `frame_bytes_max` is refused
/// before its body is waited for; `Ok(None)` consumes nothing; a decoded
/// frame re-encodes to at most the bytes it took and decodes back to itself;
/// a decode allocates at most `FRAME_BYTES_LIMIT` beyond its input.
pub fn check_frame(data: &[u8]) {
    let mut u = Input::new(data);
    let max = match u.byte() % 4 {
        0 => 64,
        1 => 4096,
        2 => MIB,
        _ => FRAME_BYTES_MAX_DEFAULT,
    };
    let chunk = (u.byte() as usize % 64) + 1;
    let stream = u.rest();
    let ((), peak) = peak_growth(|| {
        let mut dec = FrameDecoder::new(max);
        'stream: for part in stream.chunks(chunk) {
            dec.push(part);
            loop {
                let before = dec.buffered_bytes();
                let wanted = dec.bytes_wanted();
                assert!(wanted >= 1, "bytes_wanted is never zero");
                match dec.next_frame() {
                    Ok(Some(frame)) => {
                        let consumed = before - dec.buffered_bytes();
                        assert!(consumed > 5 && consumed <= 4 + max, "frame took {consumed}");
                        let again = encode(&frame);
                        assert!(
                            again.len() <= consumed,
                            "re-encoding {frame:?} took {} bytes, more than the {consumed} read",
                            again.len()
                        );
                        let mut d2 = FrameDecoder::new(again.len());
                        d2.push(&again);
                        assert_eq!(d2.next_frame(), Ok(Some(frame)));
                        assert_eq!(d2.buffered_bytes(), 0);
                    }
                    Ok(None) => {
                        assert_eq!(dec.buffered_bytes(), before, "Ok(None) consumed bytes");
                        if before >= 4 {
                            // The length was within bounds, else TooLong.
                            assert!(wanted <= 4 + max, "waits for {wanted} bytes");
                        }
                        break;
                    }
                    Err(FrameError::TooLong { len, max: m }) => {
                        assert!(len > m && m == max);
                        break 'stream;
                    }
                    // The link closes the stream on any error.
                    Err(_) => break 'stream,
                }
            }
        }
    });
    assert_alloc(
        "uplink frame",
        peak,
        data.len(),
        FRAME_BYTES_LIMIT + 64 * KIB,
        16,
    );
}

/// Valid frames of every kind, for seeds.
pub fn frame_seeds() -> Vec<Vec<u8>> {
    let frames = [
        Frame::Hello {
            edge_id: "edge-1".into(),
            epoch: 1_764_000_000_000_000,
            next_seq: 42,
        },
        Frame::Segment(SegmentFrame::new(7, 42, 2, segment_seeds()[0].clone())),
        Frame::Welcome { hwm: Some((7, 41)) },
        Frame::Welcome { hwm: None },
        Frame::Ack {
            epoch: 7,
            seq_through: 42,
        },
        Frame::Refuse {
            code: RefuseCode::MalformedSegment,
            reason: "no".into(),
        },
    ];
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        // The two leading bytes choose frame_bytes_max and the chunk size.
        let mut seed = vec![3, i as u8 * 7];
        seed.extend(encode(f));
        out.push(seed);
    }
    let mut all = vec![3, 63];
    for f in &frames {
        all.extend(encode(f));
    }
    out.push(all);
    out
}

// ---------------------------------------------------------------------------------------
// 2. Outbox segments
// ---------------------------------------------------------------------------------------

fn check_payload(payload: &[u8], count: u32) {
    let (result, peak) = peak_growth(|| decode_payload(payload, count));
    assert_alloc(
        "segment payload",
        peak,
        payload.len(),
        READING_ENCODED_BYTES_MAX + 64 * KIB,
        64,
    );
    let Ok(readings) = result else {
        return;
    };
    assert_eq!(readings.len(), count as usize);
    let mut again = Vec::new();
    for r in &readings {
        encode_reading(r, &mut again);
    }
    assert!(again.len() <= payload.len(), "re-encoding grew the payload");
    let back = decode_payload(&again, count).expect("re-encoded readings decode");
    let mut thrice = Vec::new();
    for r in &back {
        encode_reading(r, &mut thrice);
    }
    assert_eq!(again, thrice, "readings do not survive re-encoding");
}

/// A stored segment (`verify`) and its payload (`decode_payload`, which the
/// cloud also runs on a hostile edge's segment). Contracts: no panic; a
/// verified segment re-encodes to exactly its bytes; a segment `encode` made
/// verifies, and no bit flip or truncation of it does; a payload's readings
/// survive re-encoding; a count field never makes the decoder allocate
/// beyond `READING_ENCODED_BYTES_MAX` plus what the payload could hold.
pub fn check_segment(data: &[u8]) {
    let mut u = Input::new(data);
    match u.byte() % 3 {
        // Raw bytes as stored, under a key taken from the input.
        0 => {
            let key_choice = u.byte();
            let bytes = u.rest();
            let key = match (key_choice % 2, bytes.get(13..21)) {
                (0, Some(s)) => u64::from_le_bytes(s.try_into().expect("8 bytes")),
                _ => u64::from(key_choice),
            };
            if let Ok(v) = verify(bytes, key) {
                let again = segment::encode(v.epoch, v.seq, v.readings_count, v.payload);
                assert_eq!(again, bytes, "a verified segment re-encodes to itself");
                check_payload(v.payload, v.readings_count);
            }
        }
        // A payload from the input with a count field at an extreme: what a
        // hostile edge sends with a valid checksum.
        1 => {
            let epoch = u.u64();
            let seq = u.u64();
            let count = extreme_u64(u.byte(), u64::from(u.byte())) as u32;
            let flip = u.u32();
            let payload = u.rest();
            let bytes = segment::encode(epoch, seq, count, payload);
            let v = verify(&bytes, seq).expect("an encoded segment verifies");
            assert_eq!((v.epoch, v.seq, v.readings_count), (epoch, seq, count));
            assert_eq!(v.payload, payload);
            let bit = flip as usize % (bytes.len() * 8);
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                verify(&flipped, seq).is_err(),
                "bit {bit} flipped unnoticed"
            );
            let cut = flip as usize % bytes.len();
            assert!(
                verify(&bytes[..cut], seq).is_err(),
                "cut at {cut} unnoticed"
            );
            check_payload(payload, count);
        }
        // A valid segment of readings, damaged once, checksum fixed or not.
        _ => {
            let n = u.byte() % 6;
            let readings: Vec<Reading> = (0..n).map(|_| reading_from(&mut u)).collect();
            let mut payload = Vec::new();
            for r in &readings {
                encode_reading(r, &mut payload);
            }
            let count = u32::from(n);
            let mut bytes = segment::encode(1, 9, count, &payload);
            let damaged = damage(&mut u, &mut bytes);
            let fix_crc = u.byte().is_multiple_of(2);
            if fix_crc && bytes.len() >= segment::HEADER_BYTES {
                let count = u32::from_le_bytes(bytes[21..25].try_into().expect("4 bytes"));
                let p = bytes[segment::HEADER_BYTES..].to_vec();
                let seq = u64::from_le_bytes(bytes[13..21].try_into().expect("8 bytes"));
                bytes = segment::encode(1, seq, count, &p);
            }
            match verify(&bytes, 9) {
                Ok(v) => {
                    if !damaged {
                        let back = decode_payload(v.payload, v.readings_count).expect("decodes");
                        let mut again = Vec::new();
                        for r in &back {
                            encode_reading(r, &mut again);
                        }
                        assert_eq!(again, payload, "readings round-trip");
                    }
                    check_payload(v.payload, v.readings_count);
                }
                Err(_) => assert!(damaged, "an undamaged segment fails to verify"),
            }
        }
    }
}

/// Valid segments, for seeds: the first is a payload alone.
pub fn segment_seeds() -> Vec<Vec<u8>> {
    let readings = [
        Reading {
            device_id: "press-7".into(),
            device_ts_us: 1_764_000_000_000_000,
            edge_ts_us: 1_764_000_000_000_100,
            stream: Some("sim".into()),
            metrics: vec![
                Metric {
                    name: "temperature".into(),
                    value: Value::F64(21.5),
                    unit: Some("°C".into()),
                },
                Metric {
                    name: "mode".into(),
                    value: Value::Str("auto".into()),
                    unit: None,
                },
            ],
        },
        Reading {
            device_id: "d".into(),
            device_ts_us: -5,
            edge_ts_us: 0,
            stream: None,
            metrics: vec![Metric {
                name: "n".into(),
                value: Value::I64(i64::MIN),
                unit: None,
            }],
        },
    ];
    let mut payload = Vec::new();
    for r in &readings {
        encode_reading(r, &mut payload);
    }
    let stored = segment::encode(11, 7, 2, &payload);
    let mut raw = vec![0, 0];
    raw.extend(&stored);
    let mut hostile = vec![1];
    hostile.extend(11u64.to_le_bytes());
    hostile.extend(7u64.to_le_bytes());
    hostile.extend([7, 2]);
    hostile.extend(0u32.to_le_bytes());
    hostile.extend(&payload);
    vec![
        payload,
        raw,
        hostile,
        vec![2, 3, 5, b'a', b'b', 1, 2, 0, 0, 1],
    ]
}

// ---------------------------------------------------------------------------------------
// 3. MQTT: topics, payloads and the packet codec
// ---------------------------------------------------------------------------------------

/// `parse_message`, `topic_matches` and `valid_filter` on a filter, a topic
/// and a payload from the input. Contracts: no panic; a parsed message's
/// topic matches its filter, its device id is that topic level (non-empty, at
/// most `DEVICE_ID_BYTES_MAX`), it has metrics and they form a valid reading;
/// a topic name matches itself and `#` (unless it starts with `$`).
pub fn check_mqtt_parse(data: &[u8]) {
    let mut u = Input::new(data);
    let device_level = (u.byte() % 5) as usize;
    let filter_choice = u.byte();
    let topic_len = u.byte() as usize;
    let filter_len = u.byte() as usize % 64;
    let topic = String::from_utf8_lossy(u.bytes(topic_len)).into_owned();
    let raw_filter = String::from_utf8_lossy(u.bytes(filter_len)).into_owned();
    let payload = u.rest();
    let filter = match filter_choice % 4 {
        // The topic with its device level made a wildcard: the usual case.
        0 | 1 => topic
            .split('/')
            .enumerate()
            .map(|(i, l)| if i == device_level { "+" } else { l })
            .collect::<Vec<_>>()
            .join("/"),
        2 => "#".to_owned(),
        _ => raw_filter,
    };
    let _ = valid_filter(&filter);
    let name = !topic.is_empty() && !topic.contains(['+', '#', '\0']);
    if topic.starts_with('$') {
        assert!(
            !topic_matches(&filter, &topic),
            "a $ topic matched {filter:?}"
        );
    } else if name {
        assert!(
            topic_matches(&topic, &topic),
            "{topic:?} does not match itself"
        );
        assert!(topic_matches("#", &topic), "{topic:?} does not match #");
    }
    let matches = topic_matches(&filter, &topic);
    let (result, peak) = peak_growth(|| parse_message(&filter, device_level, &topic, payload));
    assert_alloc("mqtt payload", peak, data.len(), 64 * KIB, 256);
    match result {
        Ok(p) => {
            assert!(matches, "parsed although {topic:?} is outside {filter:?}");
            let level = topic
                .split('/')
                .nth(device_level)
                .expect("the device level exists");
            assert_eq!(p.device_id, level);
            assert!(!p.device_id.is_empty() && p.device_id.len() <= DEVICE_ID_BYTES_MAX);
            assert!(!p.metrics.is_empty() && p.metrics.len() <= READING_METRICS_MAX);
            if let Some(ts) = p.ts_us {
                assert!(ts >= 0 && ts % 1000 == 0, "ts_us {ts}");
            }
            let reading = Reading {
                device_id: p.device_id.clone(),
                device_ts_us: p.ts_us.unwrap_or(0),
                edge_ts_us: 0,
                stream: None,
                metrics: p.metrics.clone(),
            };
            reading
                .validate()
                .expect("a parsed message is a valid reading");
        }
        Err(e) => {
            if !matches {
                assert!(e.is_topic(), "a topic outside the filter gave {e:?}");
            }
        }
    }
}

pub fn mqtt_parse_seeds() -> Vec<Vec<u8>> {
    let seed = |level: u8, topic: &str, payload: &str| {
        let mut s = vec![level, 0, topic.len() as u8, 0];
        s.extend(topic.as_bytes());
        s.extend(payload.as_bytes());
        s
    };
    vec![
        seed(
            1,
            "plant-a/press-7/telemetry",
            r#"{"ts": 1700000000123, "temperature": 21.5, "count": 3, "running": true,
                "mode": "auto", "unit": {"temperature": "°C"}}"#,
        ),
        seed(1, "p/d/t", r#"{"v": 1}"#),
        seed(0, "d", r#"{"ts": -1, "v": 1e308, "w": -0.0}"#),
        seed(1, "a/b", r#"{"v": [1], "unit": 3}"#),
        seed(
            2,
            "x/y/z",
            r#"{"a": "\u00e9\ud83d\ude00", "b": 9223372036854775807}"#,
        ),
    ]
}

/// The MQTT codec the link reads the broker with:
/// `rumqttc::mqttbytes::v4::Packet::read(&mut BytesMut, max_size)`, packet
/// after packet. Contracts: no panic; `InsufficientBytes` leaves the buffer
/// as it was (the link reads more and tries again); a packet takes at most
/// `max_size` plus its fixed header (at most 5 bytes); a decoded packet
/// written again reads back the same; a decode allocates in proportion to
/// its input only.
pub fn check_mqtt_packet(data: &[u8]) {
    use rumqttc::mqttbytes::v4::Packet;
    use rumqttc::mqttbytes::Error;
    let mut u = Input::new(data);
    let max = match u.byte() % 4 {
        0 => 1024,
        1 => 4096,
        2 => 256 * KIB,
        _ => 16,
    };
    let mut buf = BytesMut::from(u.rest());
    let ((), peak) = peak_growth(|| {
        for _ in 0..64 {
            let before = buf.clone();
            match Packet::read(&mut buf, max) {
                Ok(packet) => {
                    let consumed = before.len() - buf.len();
                    assert!((2..=max + 5).contains(&consumed), "took {consumed} bytes");
                    let mut out = BytesMut::new();
                    if packet.write(&mut out, usize::MAX).is_ok() {
                        let mut again = out.clone();
                        let back = Packet::read(&mut again, usize::MAX)
                            .unwrap_or_else(|e| panic!("{packet:?} written as {out:?}: {e}"));
                        assert_eq!(back, packet, "written as {out:?}");
                        assert!(again.is_empty());
                    }
                }
                Err(Error::InsufficientBytes(n)) => {
                    assert!(n > 0);
                    assert_eq!(buf, before, "InsufficientBytes consumed bytes");
                    break;
                }
                Err(_) => break,
            }
        }
    });
    assert_alloc("mqtt packet", peak, data.len(), 64 * KIB, 64);
}

pub fn mqtt_packet_seeds() -> Vec<Vec<u8>> {
    use rumqttc::mqttbytes::v4::{
        ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    };
    use rumqttc::mqttbytes::QoS;
    let mut publish = Publish::new("plant-a/press-7/telemetry", QoS::AtLeastOnce, "{\"v\": 1}");
    publish.pkid = 7;
    publish.dup = true;
    let packets = [
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true)),
        Packet::Publish(publish),
        Packet::Publish(Publish::new("a", QoS::AtMostOnce, vec![0u8; 40])),
        Packet::PubAck(PubAck::new(7)),
        Packet::SubAck(SubAck::new(
            1,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
            ],
        )),
        Packet::PingResp,
        Packet::Disconnect,
    ];
    let mut out = Vec::new();
    let mut all = vec![0];
    for p in &packets {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("seed packets encode");
        let mut seed = vec![0];
        seed.extend(&b);
        out.push(seed);
        all.extend(&b);
    }
    out.push(all);
    out
}

// ---------------------------------------------------------------------------------------
// 4. The MQTT source's records, the edge stages' checkpoints, the gateway's state
// ---------------------------------------------------------------------------------------

fn mqtt_config() -> MqttConfig {
    MqttConfig::new("127.0.0.1", 1883, "edge-1", "p/+/t").expect("a valid MQTT config")
}

fn mqtt_message(pkid: u16, device: u8, v: u8, dup: bool) -> Message {
    Message {
        pkid,
        acked: true,
        dup,
        retain: false,
        topic: format!("p/d{device}/t"),
        payload: Bytes::from(format!("{{\"ts\": {v}, \"v\": {v}}}")),
    }
}

/// Whether an entry list holds a generation record of `u64::MAX`: the
/// finding F1 of FUZZING.md (fixed) (the generation overflows on a new broker
/// session).
fn hits_generation_overflow(entries: &[(Vec<u8>, Vec<u8>)]) -> bool {
    let key = b"mqtt/edge-1/gen".as_slice();
    entries
        .iter()
        .find(|(k, _)| k.as_slice() == key)
        .is_some_and(|(_, v)| v.as_slice() == u64::MAX.to_le_bytes())
}

/// `MqttCore::new(config, entries)` on the redelivery records read back from
/// the outbox's state table. Contracts: no panic, whatever the entries; at
/// most one record per packet id; a new broker session moves the generation
/// on; after a crash, each resent message (same packet id, content, DUP) is
/// either recognised as a redelivery (acked at once, not forwarded) or
/// forwarded, never both and never neither, and a redelivery is recognised
/// only through an intact record; with intact records, every one is.
pub fn check_mqtt_core(data: &[u8], skip_known: bool) {
    let mut u = Input::new(data);
    let config = mqtt_config();
    let now = Instant::now();
    if u.byte().is_multiple_of(2) {
        // Arbitrary entries.
        let n = u.byte() % 32;
        let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
            .map(|_| {
                let key = match u.byte() % 4 {
                    0 => b"mqtt/edge-1/gen".to_vec(),
                    1 | 2 => {
                        let mut k = b"mqtt/edge-1/p/".to_vec();
                        let len = [2, 2, 2, 1, 3, 0][u.byte() as usize % 6];
                        k.extend(u.bytes(len));
                        k
                    }
                    _ => {
                        let len = u.byte() as usize % 24;
                        u.bytes(len).to_vec()
                    }
                };
                let len = [8, 24, 24, 0, 23, 25, 7, 9][u.byte() as usize % 8];
                let mut value = u.bytes(len).to_vec();
                if u.byte().is_multiple_of(4) {
                    // A generation of u64::MAX or a record of it.
                    value.splice(..value.len().min(8), u64::MAX.to_le_bytes());
                }
                (key, value)
            })
            .collect();
        if skip_known && hits_generation_overflow(&entries) {
            return;
        }
        let (mut core, peak) = peak_growth(|| MqttCore::<()>::new(config, &entries));
        let input_len: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_alloc("mqtt records", peak, input_len, 64 * KIB, 256);
        let status = core.status();
        assert!(status.records <= entries.len() && status.records <= 65_536);
        core.handle_connected(1, true);
        assert!(
            core.poll_state().is_none(),
            "the same session changes nothing"
        );
        core.handle_connected(2, false);
        let change = core.poll_state().expect("a new session's generation");
        assert_eq!(change.len(), 1);
        assert_eq!(
            core.status().records,
            0,
            "a new session forgets every record"
        );
        return;
    }
    // Records made by a real core, damaged, then a crash and the resends.
    let n = (u.byte() % 12) as u16 + 1;
    let messages: Vec<(u16, u8, u8)> = (0..n)
        .map(|i| {
            // Distinct packet ids, as the broker's are while unacknowledged.
            let pkid = (u.u16() & 0xff00) | (i + 1);
            (pkid.max(1), u.byte() % 3, u.byte())
        })
        .collect();
    let mut before = MqttCore::<()>::new(config.clone(), &[]);
    before.handle_connected(1, false);
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = before
        .poll_state()
        .expect("a first session's generation")
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    for &(pkid, device, v) in &messages {
        before.handle_publish(now, 0, 1, mqtt_message(pkid, device, v, false), ());
    }
    while let Some(f) = before.poll_forward(now) {
        for item in f.items {
            entries.extend(
                item.state
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v))),
            );
        }
    }
    let original = entries.clone();
    let mut damaged = false;
    for _ in 0..u.byte() % 3 {
        if entries.is_empty() {
            break;
        }
        let i = u.byte() as usize % entries.len();
        match u.byte() % 4 {
            0 => {
                entries.remove(i);
                damaged = true;
            }
            1 => damaged |= damage(&mut u, &mut entries[i].0),
            2 => damaged |= damage(&mut u, &mut entries[i].1),
            _ => {
                let e = entries[i].clone();
                entries.insert(u.byte() as usize % entries.len(), e);
            }
        }
    }
    if skip_known && hits_generation_overflow(&entries) {
        return;
    }
    let mut after = MqttCore::<()>::new(config, &entries);
    after.handle_connected(1, true);
    assert!(
        after.poll_state().is_none(),
        "the same session changes nothing"
    );
    let mut redelivered = Vec::new();
    for &(pkid, device, v) in &messages {
        let before = after.stats().redeliveries;
        after.handle_publish(now, 0, 1, mqtt_message(pkid, device, v, true), ());
        if after.stats().redeliveries > before {
            redelivered.push(pkid);
        }
    }
    let mut forwarded = 0;
    let mut through = None;
    while let Some(f) = after.poll_forward(now) {
        forwarded += f.items.len();
        if !f.items.is_empty() {
            through = Some(f.first_n + f.items.len() as u64 - 1);
        }
    }
    assert_eq!(
        redelivered.len() + forwarded,
        messages.len(),
        "each resend is a redelivery or forwarded: {} + {forwarded} of {}",
        redelivered.len(),
        messages.len()
    );
    if let Some(through_n) = through {
        after.handle_answer(now, SourceAnswer::Durable { through_n });
    }
    let acked: Vec<u16> = std::iter::from_fn(|| after.poll_ack().map(|(_, p, ())| p)).collect();
    let mut expected: Vec<u16> = messages.iter().map(|m| m.0).collect();
    expected.sort_unstable();
    let mut got = acked.clone();
    got.sort_unstable();
    assert_eq!(got, expected, "once durable, every message is acked once");
    for pkid in &redelivered {
        // The record may have been damaged and still say the same (two
        // damages undoing each other): its content hash must be on disk.
        let key = [b"mqtt/edge-1/p/".as_slice(), &pkid.to_be_bytes()].concat();
        let (_, record) = original
            .iter()
            .find(|(k, _)| *k == key)
            .expect("an original record");
        assert!(
            entries
                .iter()
                .any(|(k, v)| *k == key && v.len() == 24 && v[8..] == record[8..]),
            "packet id {pkid} was taken as a redelivery without its record"
        );
    }
    // The broker reuses the acknowledged packet ids for new messages, on a
    // later connection, with DUP set (a resend of those): never redeliveries.
    after.handle_disconnect(1);
    after.handle_connected(2, true);
    let before = after.stats().redeliveries;
    for &(pkid, device, v) in &messages {
        let msg = mqtt_message(pkid, device, v.wrapping_add(1), true);
        after.handle_publish(now, 0, 2, msg, ());
    }
    assert_eq!(
        after.stats().redeliveries,
        before,
        "a new message under a recorded packet id was dropped as a redelivery"
    );
    if !damaged {
        assert_eq!(
            redelivered.len(),
            messages.len(),
            "intact records, yet resends forwarded"
        );
    }
}

pub fn mqtt_core_seeds() -> Vec<Vec<u8>> {
    let mut raw = vec![0, 3];
    raw.extend([0, 0]);
    raw.extend(5u64.to_le_bytes());
    raw.extend([1, 0, 0, 7, 1]);
    raw.extend(5u64.to_le_bytes());
    raw.extend([9u8; 16]);
    raw.push(1);
    raw.extend([3, 4, b'j', b'u', b'n', b'k', 0]);
    vec![
        raw,
        vec![1, 5, 0, 1, 2, 0, 2, 1],
        vec![1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 5, 1],
    ]
}

/// The topology of the stage targets, built once.
fn pipeline_topology() -> &'static Topology {
    static TOPOLOGY: std::sync::OnceLock<Topology> = std::sync::OnceLock::new();
    TOPOLOGY.get_or_init(build_pipeline_topology)
}

fn build_pipeline_topology() -> Topology {
    Topology::builder("fuzz")
        .edge("plant", |e| {
            e.source("sim", Simulated::devices(1))
                .stage(
                    "mean",
                    "sim",
                    Window::tumbling(secs(10)).mean("temperature"),
                )
                .stage(
                    "p95",
                    "sim",
                    Window::sliding(secs(10), secs(5))
                        .p95("temperature")
                        .count("temperature")
                        .window_readings_max(4)
                        .devices_max(3),
                )
                .stage(
                    "means",
                    "mean",
                    Window::tumbling(secs(60)).max("temperature.mean"),
                )
        })
        .build()
        .expect("a valid topology")
}

fn pipeline_parts(t: &Topology) -> (Vec<&Component>, Vec<&str>) {
    let part = t.part_for("plant", &[], Role::Edge);
    (part.stages.to_vec(), part.uplink.to_vec())
}

fn new_pipeline(t: &Topology) -> Pipeline {
    let (stages, uplink) = pipeline_parts(t);
    Pipeline::new(stages, uplink, StageRestarts::default()).expect("a valid pipeline")
}

fn temperature(device: u8, t_s: i64, v: f64) -> Reading {
    Reading {
        device_id: format!("d{}", device % 5),
        device_ts_us: t_s * 1_000_000,
        edge_ts_us: 0,
        stream: Some("sim".into()),
        metrics: vec![Metric {
            name: "temperature".into(),
            value: Value::F64(v),
            unit: None,
        }],
    }
}

/// Drives a restored pipeline on and checks what it does: no stage fails
/// (a restored state that makes one panic is a finding, even though the
/// pipeline would restart it), each input's outputs stay within the budget,
/// and its snapshot restores into a fresh pipeline as the same snapshot.
fn drive_restored(t: &Topology, p: &mut Pipeline, u: &mut Input) {
    let mut out = Vec::new();
    for _ in 0..3 {
        let before = out.len();
        let reading = temperature(u.byte(), i64::from(u.byte()) * 7, f64::from(u.byte()));
        p.handle(0, "sim", reading, &mut out)
            .expect("within the restart limit");
        assert!(out.len() - before <= OUTPUTS_PER_READING_MAX);
    }
    let before = out.len();
    p.advance_watermark(0, i64::from(u.u32()) * 1_000_000, &mut out)
        .expect("within the restart limit");
    assert!(out.len() - before <= OUTPUTS_PER_READING_MAX * 3);
    for r in p.reports() {
        assert_eq!(
            r.restarts, 0,
            "stage {} failed on a restored state: {:?}",
            r.name, r.last_failure
        );
    }
    let snapshot = p.snapshot();
    let mut fresh = new_pipeline(t);
    let restored = fresh.restore(&snapshot).expect("a snapshot restores");
    assert!(restored.fresh.is_empty(), "{:?}", restored.fresh);
    assert_eq!(fresh.snapshot(), snapshot, "snapshot, restore, snapshot");
}

/// `Pipeline::restore(bytes)`: the edge stages' checkpoint read back after a
/// crash. Contracts: no panic and no stage failure afterwards, whatever the
/// bytes; an undamaged checkpoint restores every stage and then behaves as
/// the pipeline it came from; a restore allocates within the readings'
/// bincode limit (`READING_ENCODED_BYTES_MAX` per decode) plus what the
/// bytes could hold.
pub fn check_pipeline_restore(data: &[u8]) {
    let t = pipeline_topology();
    let mut u = Input::new(data);
    if u.byte().is_multiple_of(2) {
        let bytes = u.rest();
        let mut p = new_pipeline(t);
        let (result, peak) = peak_growth(|| p.restore(bytes));
        assert_alloc("pipeline checkpoint", peak, bytes.len(), 4 * MIB, 256);
        if result.is_ok() {
            drive_restored(t, &mut p, &mut Input::new(bytes));
        }
        return;
    }
    let mut a = new_pipeline(t);
    let mut out = Vec::new();
    for _ in 0..u.byte() % 24 {
        let r = temperature(
            u.byte(),
            i64::from(u.byte()),
            f64::from(u.byte() as i8) / 2.0,
        );
        a.handle(0, "sim", r, &mut out).expect("a healthy pipeline");
    }
    let mut snapshot = a.snapshot();
    let damaged = damage(&mut u, &mut snapshot);
    let mut b = new_pipeline(t);
    let (result, peak) = peak_growth(|| b.restore(&snapshot));
    assert_alloc("pipeline checkpoint", peak, snapshot.len(), 4 * MIB, 256);
    match result {
        Ok(r) if !damaged => {
            assert_eq!(r.stages.len(), 3, "every stage restores: {:?}", r.fresh);
            assert_eq!(b.snapshot(), snapshot);
            let probe = temperature(1, 200, 3.0);
            let (mut x, mut y) = (Vec::new(), Vec::new());
            a.handle(0, "sim", probe.clone(), &mut x).expect("healthy");
            b.handle(0, "sim", probe, &mut y).expect("restored");
            assert_eq!(
                format!("{x:?}"),
                format!("{y:?}"),
                "restored behaves the same"
            );
        }
        Ok(_) => drive_restored(t, &mut b, &mut u),
        Err(e) => assert!(damaged, "an undamaged checkpoint fails: {e}"),
    }
}

pub fn pipeline_seeds() -> Vec<Vec<u8>> {
    let t = pipeline_topology();
    let mut p = new_pipeline(t);
    let mut out = Vec::new();
    for s in 0..15 {
        p.handle(0, "sim", temperature(s as u8, s, 60.0 + s as f64), &mut out)
            .expect("healthy");
    }
    let mut raw = vec![0];
    raw.extend(p.snapshot());
    vec![
        raw,
        vec![1, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    ]
}

/// The gateway's state entries (stages' checkpoint meta and chunks, input
/// log) as they come back from the outbox's state table after a crash.
pub fn gateway_entries(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut u = Input::new(data);
    let mut entries = Vec::new();
    for _ in 0..u.byte() % 8 {
        let key = match u.byte() % 4 {
            0 => b"stg/ckpt-meta".to_vec(),
            1 => [
                b"stg/ckpt/".as_slice(),
                &u32::from(u.byte() % 4).to_be_bytes(),
            ]
            .concat(),
            2 => {
                let seq = extreme_u64(u.byte(), u64::from(u.byte()));
                [b"stg/in/".as_slice(), &seq.to_be_bytes()].concat()
            }
            _ => {
                let len = u.byte() as usize % 16;
                [b"stg/".as_slice(), u.bytes(len)].concat()
            }
        };
        let len = u.u16() as usize % 512;
        entries.push((key, u.bytes(len).to_vec()));
    }
    entries
}

/// The checkpoint meta of `entries` as the gateway decodes it (bincode of
/// `input_through: u64, chunks: u32, bytes: u64, crc32: u32`).
pub fn checkpoint_meta(entries: &[(Vec<u8>, Vec<u8>)]) -> Option<(u64, u32, u64, u32)> {
    let (_, v) = entries
        .iter()
        .rev()
        .find(|(k, _)| k.as_slice() == b"stg/ckpt-meta")?;
    let config = tributary_actors::reading::bincode_config();
    bincode::decode_from_slice::<(u64, u32, u64, u32), _>(v, config)
        .ok()
        .map(|(m, _)| m)
}

/// Whether the entries reach finding F4 of FUZZING.md (fixed): a checkpoint
/// meta's `input_through`, or an input log key's seq, of `u64::MAX` (the
/// gateway adds one to them).
pub fn hits_input_seq_overflow(entries: &[(Vec<u8>, Vec<u8>)]) -> bool {
    let log_max = entries.iter().any(|(k, _)| {
        k.strip_prefix(b"stg/in/".as_slice())
            .is_some_and(|seq| seq == u64::MAX.to_be_bytes())
    });
    log_max || checkpoint_meta(entries).is_some_and(|(through, ..)| through == u64::MAX)
}

/// Whether the entries reach finding F2 of FUZZING.md (fixed): a checkpoint
/// meta whose `chunks` or `bytes` the gateway trusts (a loop of `chunks`
/// lookups, a buffer of `bytes` reserved).
pub fn hits_checkpoint_meta_trust(entries: &[(Vec<u8>, Vec<u8>)]) -> bool {
    checkpoint_meta(entries).is_some_and(|(_, chunks, bytes, _)| chunks > 4096 || bytes > 64 << 20)
}

/// A clock stopped at a fixed day, for the gateway.
#[derive(Debug)]
struct FixedClock;

impl tributary_actors::clock::Clock for FixedClock {
    fn now_us(&self) -> i64 {
        1_764_000_000_000_000
    }
}

/// A checkpoint and an input log as the gateway writes them, one entry
/// damaged by the input.
fn gateway_entries_real(u: &mut Input) -> Vec<(Vec<u8>, Vec<u8>)> {
    let config = tributary_actors::reading::bincode_config();
    let t = pipeline_topology();
    let mut p = new_pipeline(t);
    let mut out = Vec::new();
    for s in 0..u.byte() % 16 {
        let r = temperature(u.byte(), i64::from(s) * 3, f64::from(u.byte()));
        p.handle(0, "sim", r, &mut out).expect("healthy");
    }
    let snapshot = p.snapshot();
    let through = extreme_u64(u.byte(), u64::from(u.byte() % 4));
    let meta = (
        through,
        1u32,
        snapshot.len() as u64,
        crc32fast_hash(&snapshot),
    );
    let mut entries = vec![
        (
            b"stg/ckpt-meta".to_vec(),
            bincode::encode_to_vec(meta, config).expect("encodes"),
        ),
        (
            [b"stg/ckpt/".as_slice(), &0u32.to_be_bytes()].concat(),
            snapshot,
        ),
    ];
    for seq in 1..=u64::from(u.byte() % 6) {
        let value = if u.byte().is_multiple_of(3) {
            bincode::encode_to_vec((1u32, i64::from(u.u32()) * 1_000_000), config)
        } else {
            let r = temperature(u.byte(), i64::from(u.byte()), f64::from(u.byte()));
            bincode::encode_to_vec((0u32, r), config)
        };
        let key = [b"stg/in/".as_slice(), &seq.to_be_bytes()].concat();
        entries.push((key, value.expect("encodes")));
    }
    let i = u.byte() as usize % entries.len();
    if u.byte().is_multiple_of(2) {
        damage(u, &mut entries[i].1);
    } else {
        damage(u, &mut entries[i].0);
    }
    entries
}

/// CRC-32 (IEEE), as `crc32fast::hash` computes it, without the crate.
fn crc32fast_hash(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The gateway's recovery of its edge stages (`recover_stages`, private: it
/// runs in `Gateway::pre_start`) on state entries read back after a crash:
/// the checkpoint meta and chunks, the input log. Contracts: the gateway
/// starts and answers, whatever the entries; no stage fails on what the log
/// replays; starting allocates a bounded amount beyond the entries' size.
/// `rt` must be a current-thread runtime, so that the allocations are
/// counted on this thread.
pub fn check_gateway_recovery(rt: &tokio::runtime::Runtime, data: &[u8], skip_known: bool) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tributary_actors::edge::gateway::{
        EdgeStages, Gateway, GatewayArgs, GatewayMsg, StoreFactory,
    };
    use tributary_actors::edge::EdgeNames;
    use tributary_actors::outbox::{MemoryStore, OutboxConfig, OutboxStore, StoreMeta};
    static RUN: AtomicU64 = AtomicU64::new(0);

    let mut u = Input::new(data);
    let entries = if u.byte().is_multiple_of(2) {
        gateway_entries(u.rest())
    } else {
        gateway_entries_real(&mut u)
    };
    if skip_known && (hits_checkpoint_meta_trust(&entries) || hits_input_seq_overflow(&entries)) {
        return;
    }
    let entries_len: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    let disk = MemoryStore::new();
    let mut store = disk.clone();
    store
        .init_meta(StoreMeta {
            epoch: 1,
            sealed_through: 0,
        })
        .expect("a new store");
    let changes: Vec<_> = entries.into_iter().map(|(k, v)| (k, Some(v))).collect();
    store.write_batch(None, &changes).expect("writes");
    store.sync().expect("syncs");
    let factory: StoreFactory =
        Arc::new(move || Ok(Box::new(disk.clone()) as Box<dyn OutboxStore>));
    let t = pipeline_topology();
    let (stages, uplink) = pipeline_parts(t);
    let args = GatewayArgs {
        store: factory,
        outbox: OutboxConfig::default(),
        ack_log: None,
        stages: Some(EdgeStages {
            stages: stages.into_iter().cloned().collect(),
            uplink: uplink.into_iter().map(str::to_owned).collect(),
            restarts: StageRestarts::default(),
            checkpoint_interval_ms: 3_600_000,
        }),
        names: EdgeNames::scoped(format!("fuzz-{}/", RUN.fetch_add(1, Ordering::Relaxed))),
        clock: Arc::new(FixedClock),
        device_clock_skew_max_ms: 60_000,
    };
    let ((), peak) = peak_growth(|| {
        rt.block_on(async {
            let (gateway, handle) = ractor::Actor::spawn(None, Gateway, args)
                .await
                .expect("the gateway starts on any state");
            let status =
                ractor::call_t!(gateway, GatewayMsg::Status, 10_000).expect("the gateway answers");
            for s in &status.stages {
                assert_eq!(
                    s.restarts, 0,
                    "stage {} failed on the replayed input log: {:?}",
                    s.name, s.last_failure
                );
            }
            gateway.stop(None);
            let _ = handle.await;
        })
    });
    assert_alloc("gateway state", peak, entries_len, 16 * MIB, 1024);
}

// ---------------------------------------------------------------------------------------
// 5. Settings files
// ---------------------------------------------------------------------------------------

/// A settings file: `toml::from_str::<Settings>`, then
/// `Settings::default().resolve(file).validate()`. Contracts: no panic;
/// settings that validate validate again (the fill-ins are stable), give a
/// valid MQTT config when `mqtt_addr` is set, and their derived configs
/// build; parsing allocates in proportion to the text.
pub fn check_settings(data: &[u8]) {
    use node_config::Settings;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file, peak) = peak_growth(|| toml::from_str::<Settings>(text));
    assert_alloc("settings file", peak, data.len(), MIB, 256);
    let Ok(file) = file else {
        return;
    };
    let mut s = Settings::default().resolve(file);
    if s.validate().is_err() {
        return;
    }
    let once = format!("{s:?}");
    s.validate().expect("validated settings validate again");
    assert_eq!(format!("{s:?}"), once, "validate is idempotent");
    let mqtt = s.mqtt().expect("validated settings give their MQTT config");
    assert_eq!(mqtt.is_some(), !s.mqtt_addr.is_empty());
    if let Some(m) = mqtt {
        m.validate().expect("the MQTT config is valid");
    }
    let _ = s.outbox().validate();
    let _ = s.quic().validate();
    let _ = s.labels();
    let _ = node_config::Resolved::addr(&s.metrics_addr);
}

pub fn settings_seeds() -> Vec<Vec<u8>> {
    vec![
        b"node_id = \"edge-1\"\n".to_vec(),
        br#"node_id = "edge-1"
tls_dir = "pki"
cloud_addr = "127.0.0.1:7400"
outbox_bytes_max = 268435456
segment_readings_max = 1000
segment_bytes_max = 1048576
frame_bytes_max = 8388608
full_policy = "block"
device_rate_hz = 10.0
spike_probability = 0.001
mqtt_addr = "127.0.0.1:1883"
mqtt_topic = "plant/+/telemetry"
mqtt_device_level = 0
mqtt_inflight_max = 4096
mqtt_packet_bytes_max = 262144
dashboard_addr = "127.0.0.1:8080"
dashboard_token = "0123456789abcdef"
labels = "line-1, hall-b"
stages_checkpoint_interval_ms = 5000
"#
        .to_vec(),
        b"node_id = \"c\"\nmqtt_addr = \"[::1]:1883\"\nmqtt_device_level = 3\n".to_vec(),
        b"node_id = \"x\"\nbogus = 1\n".to_vec(),
    ]
}

// ---------------------------------------------------------------------------------------
// 6. Cluster control requests and answers, dashboard reports
// ---------------------------------------------------------------------------------------

/// Whether two f64s are within one unit in the last place: what
/// serde_json's default float parser guarantees (finding F3, fixed with `float_roundtrip`).
pub fn within_one_ulp(a: f64, b: f64) -> bool {
    a == b || (a.signum() == b.signum() && a.to_bits().abs_diff(b.to_bits()) <= 1)
}

/// Whether two JSON documents are equal but for floats one ULP apart.
pub fn json_equivalent(a: &[u8], b: &[u8]) -> bool {
    use serde_json::Value as J;
    fn eq(a: &J, b: &J) -> bool {
        match (a, b) {
            (J::Number(x), J::Number(y)) if x.is_f64() || y.is_f64() => {
                matches!((x.as_f64(), y.as_f64()), (Some(x), Some(y)) if within_one_ulp(x, y))
            }
            (J::Array(x), J::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| eq(x, y))
            }
            (J::Object(x), J::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| eq(v, w)))
            }
            _ => a == b,
        }
    }
    match (
        serde_json::from_slice::<J>(a),
        serde_json::from_slice::<J>(b),
    ) {
        (Ok(x), Ok(y)) => eq(&x, &y),
        _ => false,
    }
}

fn wire_round_trip<T>(data: &[u8], what: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    use node_control::Wire;
    use ractor::BytesConvertable;
    let (wire, peak) = peak_growth(|| Wire::<T>::from_bytes(data.to_vec()));
    assert_alloc(what, peak, data.len(), 64 * KIB, 256);
    if let Wire::Value(v) = wire {
        let bytes = Wire::Value(v).into_bytes();
        let Wire::Value(back) = Wire::<T>::from_bytes(bytes.clone()) else {
            panic!("{what}: its own encoding does not decode: {bytes:?}");
        };
        let again = Wire::Value(back).into_bytes();
        // Exact but for F3: a float may come back one ULP off.
        assert!(
            again == bytes || json_equivalent(&again, &bytes),
            "{what} does not survive re-encoding: {} then {}",
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&again)
        );
    }
}

/// `Wire::<ControlRequest>` and `Wire::<ControlAnswer>` through ractor's
/// `BytesConvertable::from_bytes`, as an edge and the cloud decode them.
/// Contracts: no panic (ractor would drop the message without a word); a
/// decoded value re-encodes and decodes to the same bytes.
pub fn check_control(data: &[u8]) {
    wire_round_trip::<node_control::ControlRequest>(data, "control request");
    wire_round_trip::<node_control::ControlAnswer>(data, "control answer");
}

pub fn control_seeds() -> Vec<Vec<u8>> {
    vec![
        br#"{"kind":"status"}"#.to_vec(),
        br#"{"kind":"set_stage_param","stage":"scale","param":"factor","value":2.5}"#.to_vec(),
        br#"{"kind":"restart_actor","name":"tributary.uplink"}"#.to_vec(),
        br#"{"kind":"set_uplink_paused","paused":true}"#.to_vec(),
        br#"{"Ok":{"kind":"status","edge_id":"edge-1","uptime_ms":12}}"#.to_vec(),
        br#"{"Ok":{"kind":"done"}}"#.to_vec(),
        br#"{"Err":"no stage"}"#.to_vec(),
    ]
}

/// A `NodeReport` as JSON: what the cloud's report stream decodes from each
/// edge's report (node/src/dashboard/reports.rs). Contracts as for [`check_control`].
pub fn check_node_report(data: &[u8]) {
    wire_round_trip::<node_report::NodeReport>(data, "node report");
}

pub fn node_report_seeds() -> Vec<Vec<u8>> {
    vec![br#"{"node_id":"edge-1","role":"edge","at_ms":1764000000000,
"actors":[{"id":"edge-1/tributary.edge","parent":null,"name":"tributary.edge","kind":"supervisor",
"status":"running","restarts":1,"last_failure":{"reason":"x","at_ms":5},"messages":10,
"mailbox":null,"restartable":false}],
"outbox":{"readings":5,"bytes":100,"oldest_unconfirmed_ms":1764000000000,
"readings_committed":9,"readings_confirmed":4,"dropped_by_policy":0,"refused_full":0},
"uplink_paused":false,"uplink_up":true,
"components":[{"component":"sim","received":1,"sent":1,"errors":0,"dropped":0}],
"links":[{"peer":"cloud-1","up":true,"rtt_ms":0.25}],
"latency_buckets":[0,1,2],"latency_sum_ms":3,"actors_complete":false,
"actors_removed":["edge-1/x"]}"#
        .to_vec()]
}

// ---------------------------------------------------------------------------------------
// 7. Readings as JSON
// ---------------------------------------------------------------------------------------

/// The JSON of a Kafka record of the readings topic, as the cloud stages read
/// it: `serde_json::from_slice::<Reading>`, then `Reading::validate`.
/// Contracts: no panic; a valid reading's JSON stays under 1 MB (a Kafka
/// record's usual limit) and decodes back to the same JSON; its bincode form
/// stays under `READING_ENCODED_BYTES_MAX` and decodes back to the same
/// bytes; parsing allocates in proportion to the input.
pub fn check_reading_json(data: &[u8]) {
    let (result, peak) = peak_growth(|| serde_json::from_slice::<Reading>(data));
    assert_alloc("reading JSON", peak, data.len(), 64 * KIB, 256);
    let Ok(reading) = result else {
        return;
    };
    if reading.validate().is_err() {
        return;
    }
    check_valid_reading(&reading);
}

/// What every valid reading must meet, however it was made.
pub fn check_valid_reading(reading: &Reading) {
    let json = reading.to_json();
    assert!(
        json.len() < 1_000_000,
        "a valid reading's JSON is {} bytes",
        json.len()
    );
    let back: Reading = serde_json::from_slice(&json).expect("a reading's JSON decodes");
    let again = back.to_json();
    // Exact but for F3: a float may come back one ULP off.
    assert!(
        again == json || json_equivalent(&again, &json),
        "the JSON does not survive re-encoding: {} then {}",
        String::from_utf8_lossy(&json),
        String::from_utf8_lossy(&again)
    );
    back.validate().expect("still valid");
    let mut bin = Vec::new();
    encode_reading(reading, &mut bin);
    assert!(bin.len() <= READING_ENCODED_BYTES_MAX);
    let decoded = decode_payload(&bin, 1).expect("a valid reading's bincode decodes");
    let mut again = Vec::new();
    encode_reading(&decoded[0], &mut again);
    assert_eq!(again, bin, "bincode does not survive re-encoding");
}

pub fn reading_json_seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = segment_seeds()
        .iter()
        .take(0)
        .cloned()
        .chain([
            br#"{"device_id":"press-7","device_ts_us":1764000000000000,"edge_ts_us":1,"stream":"sim","metrics":[{"name":"temperature","value":{"f64":21.5},"unit":"\u00b0C"},{"name":"n","value":{"i64":-3}},{"name":"b","value":{"bool":true}},{"name":"s","value":{"str":"auto"}}]}"#.to_vec(),
            br#"{"device_id":"d","device_ts_us":0,"edge_ts_us":0,"metrics":[]}"#.to_vec(),
        ])
        .collect();
    out.push(br#"{"device_id":"d","device_ts_us":-9223372036854775808,"edge_ts_us":9223372036854775807,"metrics":[{"name":"x","value":{"f64":1.7976931348623157e308}}]}"#.to_vec());
    out
}

// ---------------------------------------------------------------------------------------
// Mutation, for the smoke run and the seed corpora
// ---------------------------------------------------------------------------------------

/// A small deterministic generator (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One to four mutations of `seed`: bit flips, truncations, bytes and 4- or
/// 8-byte fields (either endianness) set to extremes, insertions, deletions,
/// duplicated runs and splices with `other`.
pub fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(b.len() + 1);
        match rng.below(9) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => b.truncate(at),
            2 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = [0, 0xff, 0x7f, 0x80, 0xfb, 0xfc, 0xfd, b'"', b'{', b'['][rng.below(10)];
            }
            3 | 4 => {
                let v = extreme_u64(rng.below(8) as u8, rng.next() % 300);
                let wide = rng.below(2) == 0;
                let field: Vec<u8> = match (wide, rng.below(2) == 0) {
                    (true, true) => v.to_le_bytes().to_vec(),
                    (true, false) => v.to_be_bytes().to_vec(),
                    (false, true) => (v as u32).to_le_bytes().to_vec(),
                    (false, false) => (v as u32).to_be_bytes().to_vec(),
                };
                for (i, x) in field.into_iter().enumerate() {
                    if let Some(y) = b.get_mut(at + i) {
                        *y = x;
                    }
                }
            }
            5 => {
                let n = 1 + rng.below(8);
                let ins = rng.bytes(n);
                b.splice(at..at, ins);
            }
            6 if at < b.len() => {
                let end = (at + 1 + rng.below(8)).min(b.len());
                b.drain(at..end);
            }
            7 if at < b.len() => {
                let end = (at + 1 + rng.below(16)).min(b.len());
                let run = b[at..end].to_vec();
                b.splice(at..at, run);
            }
            _ => {
                let from = rng.below(other.len() + 1);
                b.truncate(at);
                b.extend_from_slice(&other[from..]);
            }
        }
    }
    b
}

/// Every check, by target name, with its seeds.
pub type Check = fn(&[u8]);

pub fn targets() -> Vec<(&'static str, Check, Vec<Vec<u8>>)> {
    vec![
        ("uplink_frame", check_frame as Check, frame_seeds()),
        ("outbox_segment", check_segment, segment_seeds()),
        ("mqtt_parse", check_mqtt_parse, mqtt_parse_seeds()),
        ("mqtt_packet", check_mqtt_packet, mqtt_packet_seeds()),
        (
            "mqtt_core_records",
            |d| check_mqtt_core(d, false),
            mqtt_core_seeds(),
        ),
        ("pipeline_restore", check_pipeline_restore, pipeline_seeds()),
        ("settings_toml", check_settings, settings_seeds()),
        ("control_wire", check_control, control_seeds()),
        ("node_report", check_node_report, node_report_seeds()),
        ("reading_json", check_reading_json, reading_json_seeds()),
    ]
}

/// Runs `check` on the seeds, then on `mutations` mutated seeds and
/// `randoms` random inputs, all from `seed`.
pub fn smoke(check: Check, seeds: &[Vec<u8>], seed: u64, mutations: usize, randoms: usize) {
    let mut rng = Rng::new(seed);
    for s in seeds {
        check(s);
    }
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    for i in 0..mutations {
        let a = &pool[rng.below(pool.len())];
        let b = &pool[rng.below(pool.len())];
        let m = mutate(&mut rng, a, b);
        check(&m);
        // Mutants of mutants go deeper; the pool stays small.
        if i % 8 == 0 && pool.len() < 256 {
            pool.push(m);
        }
    }
    for _ in 0..randoms {
        let n = rng.below(256);
        let r = rng.bytes(n);
        check(&r);
    }
}
