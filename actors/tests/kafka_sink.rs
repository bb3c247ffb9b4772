//! The Kafka sink against a real broker, named by TRIBUTARY_KAFKA_BOOTSTRAP
//! (scripts/kafka.sh starts one). Without it these tests fail: they never skip.
//!
//! Each test uses its own topics and transactional ids, so they may run in
//! parallel on one broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tributary_actors::reading::{Metric, Reading, Value};
use tributary_actors::sink::kafka::{
    KafkaLog, KafkaSinkConfig, HEADER_EDGE, HEADER_EPOCH, HEADER_REFUSED, HEADER_SEQ,
};
use tributary_actors::sink::{
    EdgeCommit, Hwm, LogSink, RefusedReading, SegmentBatch, ShardLogWriter, SinkError,
};

/// Bound on every read-back of a topic in these tests.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on broker round trips of the raw clients the tests use.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

fn bootstrap() -> String {
    std::env::var("TRIBUTARY_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "TRIBUTARY_KAFKA_BOOTSTRAP is not set: these tests need a real Kafka broker \
             (start one with scripts/kafka.sh and export the address it prints)"
        )
    })
}

/// A name no other test run uses.
fn unique(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{nanos:x}-{n}", std::process::id())
}

fn test_config(tag: &str) -> KafkaSinkConfig {
    let id = unique(tag);
    KafkaSinkConfig {
        readings_topic: format!("test.{id}.readings"),
        hwm_topic: format!("test.{id}.hwm"),
        refused_topic: format!("test.{id}.refused"),
        transactional_id_prefix: format!("test-{id}"),
        readings_partitions: 3,
        ..KafkaSinkConfig::new(bootstrap())
    }
}

fn reading(device: &str, i: usize) -> Reading {
    Reading {
        device_id: device.to_string(),
        device_ts_us: 1_700_000_000_000_000 + i as i64,
        edge_ts_us: 1_700_000_000_000_100 + i as i64,
        stream: None,
        metrics: vec![
            Metric {
                name: "temperature".into(),
                value: Value::F64(20.0 + i as f64 / 10.0),
                unit: Some("°C".into()),
            },
            Metric {
                name: "count".into(),
                value: Value::I64(i as i64),
                unit: None,
            },
        ],
    }
}

/// A segment of `n` readings spread over three devices named after `device`.
fn batch(seq: u64, device: &str, n: usize) -> SegmentBatch {
    let readings = (0..n)
        .map(|i| reading(&format!("{device}-{}", i % 3), seq as usize * 10_000 + i))
        .collect();
    SegmentBatch::new(seq, readings)
}

#[derive(Debug)]
struct Record {
    key: Option<String>,
    value: Option<Vec<u8>>,
    headers: BTreeMap<String, String>,
}

fn raw_consumer(isolation: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("isolation.level", isolation)
        .set("group.id", "tributary-tests")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("creating a test consumer")
}

/// (high watermark, last stable offset) of one partition.
fn end_offsets(topic: &str, partition: i32) -> (i64, i64) {
    let (_, high) = raw_consumer("read_uncommitted")
        .fetch_watermarks(topic, partition, BROKER_TIMEOUT)
        .unwrap();
    // A read_committed client is answered with the last stable offset.
    let (_, stable) = raw_consumer("read_committed")
        .fetch_watermarks(topic, partition, BROKER_TIMEOUT)
        .unwrap();
    (high, stable)
}

/// Everything a read_committed consumer sees in `topic`, read up to each
/// partition's high watermark.
fn read_committed(topic: &str) -> Vec<Record> {
    let consumer = raw_consumer("read_committed");
    let metadata = consumer
        .fetch_metadata(Some(topic), BROKER_TIMEOUT)
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut assignment = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        ends.insert(p, end_offsets(topic, p).0);
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut records = Vec::new();
    loop {
        let positions = consumer.position().unwrap();
        let done = ends.iter().all(|(&p, &end)| {
            end == 0
                || matches!(positions.find_partition(topic, p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= end)
        });
        if done {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach {ends:?} in {READ_TIMEOUT:?}"
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(Record {
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
}

fn committed_readings(config: &KafkaSinkConfig) -> Vec<Reading> {
    read_committed(&config.readings_topic)
        .iter()
        .map(|r| {
            serde_json::from_slice(r.value.as_deref().expect("a reading has a value"))
                .expect("reading JSON")
        })
        .collect()
}

enum End {
    Commit,
    Abort,
    /// Leave the transaction open and drop the producer, as a crashed process would.
    Abandon,
}

/// A transaction written with the transactional id of `edge`'s writer but
/// outside the sink, to leave it open, abort it, or commit a bad mark.
fn raw_transaction(
    config: &KafkaSinkConfig,
    edge: &str,
    readings: &[Reading],
    hwm_value: &[u8],
    end: End,
) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set(
            "transactional.id",
            format!("{}-{edge}", config.transactional_id_prefix),
        )
        .set(
            "transaction.timeout.ms",
            config.transaction_timeout_ms.to_string(),
        )
        .create()
        .unwrap();
    producer.init_transactions(BROKER_TIMEOUT).unwrap();
    producer.begin_transaction().unwrap();
    for r in readings {
        let value = r.to_json();
        producer
            .send(
                BaseRecord::to(&config.readings_topic)
                    .key(r.device_id.as_str())
                    .payload(&value),
            )
            .unwrap();
    }
    producer
        .send(
            BaseRecord::to(&config.hwm_topic)
                .partition(0)
                .key(edge)
                .payload(hwm_value),
        )
        .unwrap();
    producer.flush(BROKER_TIMEOUT).unwrap();
    match end {
        End::Commit => producer.commit_transaction(BROKER_TIMEOUT).unwrap(),
        End::Abort => producer.abort_transaction(BROKER_TIMEOUT).unwrap(),
        End::Abandon => drop(producer),
    }
}

fn hwm_json(hwm: Hwm) -> Vec<u8> {
    serde_json::to_vec(&hwm).unwrap()
}

#[test]
fn committed_records_are_visible_with_headers_and_the_mark_recovers() {
    let config = test_config("commit");
    let log = KafkaLog::new(config.clone()).unwrap();
    let mut writer = log.open_edge("edge-a").unwrap();
    assert_eq!(writer.high_water_mark().unwrap(), None);

    let first = vec![batch(1, "press", 10), batch(2, "press", 5)];
    let second = vec![batch(3, "pump", 7)];
    let hwm1 = Hwm { epoch: 4, seq: 2 };
    let hwm2 = Hwm { epoch: 4, seq: 3 };
    writer.commit("edge-a", hwm1, &first).unwrap();
    writer.commit("edge-a", hwm2, &second).unwrap();
    assert_eq!(writer.high_water_mark().unwrap(), Some(hwm2));

    let mut expected: HashMap<i64, (Reading, u64)> = HashMap::new();
    for b in first.iter().chain(&second) {
        for r in &b.readings {
            expected.insert(r.device_ts_us, (r.clone(), b.seq));
        }
    }
    let records = read_committed(&config.readings_topic);
    assert_eq!(records.len(), 22);
    for record in &records {
        let reading: Reading = serde_json::from_slice(record.value.as_deref().unwrap()).unwrap();
        let (want, seq) = expected
            .remove(&reading.device_ts_us)
            .expect("a record that was committed, once");
        assert_eq!(reading, want);
        assert_eq!(record.key.as_deref(), Some(want.device_id.as_str()));
        assert_eq!(
            record.headers.get(HEADER_EDGE).map(String::as_str),
            Some("edge-a")
        );
        assert_eq!(
            record.headers.get(HEADER_EPOCH).map(String::as_str),
            Some("4")
        );
        assert_eq!(record.headers.get(HEADER_SEQ), Some(&seq.to_string()));
    }
    assert!(
        expected.is_empty(),
        "records missing from the log: {expected:?}"
    );

    let marks = read_committed(&config.hwm_topic);
    assert_eq!(marks.len(), 2);
    assert!(marks.iter().all(|m| m.key.as_deref() == Some("edge-a")));
    assert_eq!(marks[1].value.as_deref(), Some(hwm_json(hwm2).as_slice()));

    let counters = log.counters().snapshot();
    assert_eq!(counters.records_sent, 22);
    assert_eq!(counters.transactions_committed, 2);
    assert_eq!(counters.transactions_aborted, 0);

    // A fresh writer, in this log and in another one (as another process
    // would open it, over existing topics), reads the latest mark back.
    assert_eq!(
        log.open_edge("edge-a").unwrap().high_water_mark().unwrap(),
        Some(hwm2)
    );
    let other = KafkaLog::new(config.clone()).unwrap();
    assert_eq!(
        other
            .open_edge("edge-a")
            .unwrap()
            .high_water_mark()
            .unwrap(),
        Some(hwm2)
    );
}

#[test]
fn refused_readings_go_to_the_refused_topic_in_the_same_transaction() {
    let config = KafkaSinkConfig {
        message_bytes_max: 2_000,
        ..test_config("refused")
    };
    let log = KafkaLog::new(config.clone()).unwrap();
    let mut writer = log.open_edge("edge-r").unwrap();
    let mut b = batch(1, "press", 4);
    b.refused = vec![RefusedReading {
        reading: reading("intruder", 99),
        reason: "stream \"plant-a\" is not one edge-r may send".into(),
    }];
    let hwm = Hwm { epoch: 2, seq: 1 };
    writer.commit("edge-r", hwm, &[b]).unwrap();

    let admitted = committed_readings(&config);
    assert_eq!(admitted.len(), 4);
    assert!(admitted.iter().all(|r| r.device_id != "intruder"));
    let refused = read_committed(&config.refused_topic);
    assert_eq!(refused.len(), 1, "{refused:?}");
    let r = &refused[0];
    assert_eq!(r.key.as_deref(), Some("intruder"));
    assert_eq!(
        r.headers.get(HEADER_EDGE).map(String::as_str),
        Some("edge-r")
    );
    assert_eq!(r.headers.get(HEADER_SEQ).map(String::as_str), Some("1"));
    assert!(r.headers[HEADER_REFUSED].contains("plant-a"), "{r:?}");
    assert_eq!(writer.high_water_mark().unwrap(), Some(hwm));

    // A refused reading the topic cannot take aborts the whole transaction:
    // the admitted readings sent before it are discarded with it.
    let mut big = reading("intruder", 100);
    big.metrics.push(Metric {
        name: "label".into(),
        value: Value::Str("x".repeat(4_000)),
        unit: None,
    });
    let mut b = batch(2, "press", 3);
    b.refused = vec![RefusedReading {
        reading: big,
        reason: "x".into(),
    }];
    assert!(writer
        .commit("edge-r", Hwm { epoch: 2, seq: 2 }, &[b])
        .is_err());
    assert_eq!(read_committed(&config.refused_topic).len(), 1);
    assert_eq!(committed_readings(&config).len(), 4);
    assert_eq!(
        log.open_edge("edge-r").unwrap().high_water_mark().unwrap(),
        Some(hwm)
    );
}

fn edge_commit(edge: &str, hwm: Hwm, batches: Vec<SegmentBatch>) -> EdgeCommit {
    EdgeCommit {
        edge_id: edge.to_string(),
        hwm,
        batches,
    }
}

#[test]
fn a_shard_commits_many_edges_at_once_and_a_newer_shard_writer_fences_it() {
    let config = test_config("shard");
    let log = KafkaLog::new(config.clone()).unwrap();
    let mut a: Box<dyn ShardLogWriter> = log.open_shard(2).unwrap();
    assert!(a.marks().unwrap().is_empty());

    // One transaction, three edges, each with its mark.
    let (h1, h2, h3) = (
        Hwm { epoch: 1, seq: 2 },
        Hwm { epoch: 7, seq: 1 },
        Hwm { epoch: 3, seq: 9 },
    );
    a.commit(&[
        edge_commit("edge-1", h1, vec![batch(1, "one", 3), batch(2, "one", 3)]),
        edge_commit("edge-2", h2, vec![batch(1, "two", 4)]),
        edge_commit("edge-3", h3, vec![batch(9, "three", 2)]),
    ])
    .unwrap();
    let readings = read_committed(&config.readings_topic);
    assert_eq!(readings.len(), 12);
    let by_edge = |edge: &str| {
        readings
            .iter()
            .filter(|r| r.headers.iter().any(|(k, v)| k == HEADER_EDGE && v == edge))
            .count()
    };
    assert_eq!(
        (by_edge("edge-1"), by_edge("edge-2"), by_edge("edge-3")),
        (6, 4, 2)
    );
    assert_eq!(log.counters().snapshot().transactions_committed, 1);

    // A new writer of the same shard (another cloud node, or a restart)
    // fences the first, and reads every mark back.
    let mut b = log.open_shard(2).unwrap();
    let marks = b.marks().unwrap();
    assert_eq!(marks.get("edge-1"), Some(&Ok(h1)));
    assert_eq!(marks.get("edge-2"), Some(&Ok(h2)));
    assert_eq!(marks.get("edge-3"), Some(&Ok(h3)));
    let zombie = a
        .commit(&[edge_commit(
            "edge-1",
            Hwm { epoch: 1, seq: 3 },
            vec![batch(3, "zombie", 2)],
        )])
        .unwrap_err();
    assert!(matches!(zombie, SinkError::Fenced { .. }), "{zombie:?}");
    // Another shard is not fenced by it.
    let mut other = log.open_shard(3).unwrap();
    other
        .commit(&[edge_commit(
            "edge-9",
            Hwm { epoch: 1, seq: 1 },
            vec![batch(1, "nine", 1)],
        )])
        .unwrap();
    b.commit(&[edge_commit(
        "edge-1",
        Hwm { epoch: 1, seq: 3 },
        vec![batch(3, "one-b", 1)],
    )])
    .unwrap();
    let devices: Vec<String> = committed_readings(&config)
        .into_iter()
        .map(|r| r.device_id)
        .collect();
    assert_eq!(devices.len(), 14);
    assert!(
        !devices.iter().any(|d| d.starts_with("zombie")),
        "{devices:?}"
    );
    // A writer for one edge reads the mark the shard wrote.
    assert_eq!(
        log.open_edge("edge-1").unwrap().high_water_mark().unwrap(),
        Some(Hwm { epoch: 1, seq: 3 })
    );
}

#[test]
fn a_newer_writer_fences_the_older_one() {
    let config = test_config("fence");
    let log = KafkaLog::new(config.clone()).unwrap();
    let mut a = log.open_edge("edge-f").unwrap();
    assert_eq!(a.high_water_mark().unwrap(), None);
    let mut b = log.open_edge("edge-f").unwrap();

    let from_a = [batch(1, "from-a", 6)];
    let err = a
        .commit("edge-f", Hwm { epoch: 1, seq: 1 }, &from_a)
        .unwrap_err();
    assert!(
        matches!(err, SinkError::Fenced { ref edge } if edge == "edge-f"),
        "{err:?}"
    );
    // A fenced writer refuses further work without asking the broker.
    let err = a
        .commit("edge-f", Hwm { epoch: 1, seq: 1 }, &from_a)
        .unwrap_err();
    assert!(matches!(err, SinkError::Fenced { .. }), "{err:?}");
    assert!(matches!(a.high_water_mark(), Err(SinkError::Fenced { .. })));

    let hwm_b = Hwm { epoch: 1, seq: 1 };
    b.commit("edge-f", hwm_b, &[batch(1, "from-b", 4)]).unwrap();

    let devices: Vec<String> = committed_readings(&config)
        .into_iter()
        .map(|r| r.device_id)
        .collect();
    assert_eq!(devices.len(), 4);
    assert!(
        devices.iter().all(|d| d.starts_with("from-b")),
        "{devices:?}"
    );
    let marks = read_committed(&config.hwm_topic);
    assert_eq!(marks.len(), 1);
    assert_eq!(marks[0].value.as_deref(), Some(hwm_json(hwm_b).as_slice()));
    assert_eq!(log.counters().snapshot().writers_fenced, 1);
    assert_eq!(
        log.open_edge("edge-f").unwrap().high_water_mark().unwrap(),
        Some(hwm_b)
    );
}

#[test]
fn an_abandoned_transaction_is_aborted_by_the_next_writer_and_delays_other_edges_boundedly() {
    let config = KafkaSinkConfig {
        transaction_timeout_ms: 5_000,
        commit_timeout_ms: 4_000,
        hwm_recover_timeout_ms: 40_000,
        ..test_config("abandon")
    };
    let log = KafkaLog::new(config.clone()).unwrap();
    let hwm = |seq| Hwm { epoch: 1, seq };

    // The same edge: the next writer aborts what the crashed one left open.
    let mut x = log.open_edge("edge-x").unwrap();
    x.commit("edge-x", hwm(1), &[batch(1, "x-ok", 3)]).unwrap();
    let abandoned: Vec<Reading> = (0..5).map(|i| reading("x-abandoned", i)).collect();
    raw_transaction(
        &config,
        "edge-x",
        &abandoned,
        &hwm_json(hwm(99)),
        End::Abandon,
    );
    let (high, stable) = end_offsets(&config.hwm_topic, 0);
    assert!(
        stable < high,
        "the abandoned transaction should hold the stable offset back ({stable} vs {high})"
    );

    let started = Instant::now();
    let mut x2 = log.open_edge("edge-x").unwrap();
    assert_eq!(x2.high_water_mark().unwrap(), Some(hwm(1)));
    let elapsed = started.elapsed();
    // Sooner than the broker's own timeout could have aborted it.
    assert!(
        elapsed < Duration::from_millis(config.transaction_timeout_ms),
        "took {elapsed:?}"
    );
    x2.commit("edge-x", hwm(2), &[batch(2, "x-ok", 3)]).unwrap();

    // Another edge: its mark, committed after the abandoned transaction
    // began, is only readable once the broker aborts that transaction.
    let mut y = log.open_edge("edge-y").unwrap();
    y.commit("edge-y", hwm(1), &[batch(1, "y-ok", 3)]).unwrap();
    raw_transaction(
        &config,
        "edge-x",
        &abandoned,
        &hwm_json(hwm(98)),
        End::Abandon,
    );
    let abandoned_at = Instant::now();
    y.commit("edge-y", hwm(2), &[batch(2, "y-ok", 3)]).unwrap();
    let (high, stable) = end_offsets(&config.hwm_topic, 0);
    assert!(
        stable < high,
        "the second abandoned transaction should be open ({stable} vs {high})"
    );

    let mut y2 = log.open_edge("edge-y").unwrap();
    assert_eq!(
        y2.high_water_mark().unwrap(),
        Some(hwm(2)),
        "a stale mark would let replays in twice"
    );
    let waited = abandoned_at.elapsed();
    // The transaction timeout plus the broker's abort check interval (10 s by
    // default), with slack for a loaded machine.
    let bound = Duration::from_millis(config.transaction_timeout_ms) + Duration::from_secs(15);
    assert!(
        waited < bound,
        "recovery of edge-y took {waited:?}, more than {bound:?}"
    );
    eprintln!("edge-y's recovery waited {waited:?} for the abandoned transaction to end");

    let devices: Vec<String> = committed_readings(&config)
        .into_iter()
        .map(|r| r.device_id)
        .collect();
    assert!(
        !devices.iter().any(|d| d.starts_with("x-abandoned")),
        "{devices:?}"
    );
    assert_eq!(devices.iter().filter(|d| d.starts_with("x-ok")).count(), 6);
    assert_eq!(devices.iter().filter(|d| d.starts_with("y-ok")).count(), 6);
    assert_eq!(
        log.open_edge("edge-x").unwrap().high_water_mark().unwrap(),
        Some(hwm(2))
    );
}

#[test]
fn an_unknown_edge_has_no_mark_even_behind_control_markers() {
    let config = test_config("unknown");
    let log = KafkaLog::new(config.clone()).unwrap();
    let quick = Duration::from_secs(5);

    // An empty hwm topic.
    let started = Instant::now();
    assert_eq!(
        log.open_edge("stranger")
            .unwrap()
            .high_water_mark()
            .unwrap(),
        None
    );
    assert!(started.elapsed() < quick, "took {:?}", started.elapsed());

    // A commit marker, then an aborted record and its abort marker, at the end.
    let hwm = Hwm { epoch: 2, seq: 7 };
    log.open_edge("edge-k")
        .unwrap()
        .commit("edge-k", hwm, &[batch(1, "k", 2)])
        .unwrap();
    raw_transaction(
        &config,
        "edge-k",
        &[],
        &hwm_json(Hwm { epoch: 9, seq: 9 }),
        End::Abort,
    );
    let (high, stable) = end_offsets(&config.hwm_topic, 0);
    assert_eq!(stable, high);
    assert_eq!(read_committed(&config.hwm_topic).len(), 1);
    assert!(
        high >= 4,
        "expected two records and two markers, high watermark {high}"
    );

    let started = Instant::now();
    assert_eq!(
        log.open_edge("stranger")
            .unwrap()
            .high_water_mark()
            .unwrap(),
        None
    );
    assert!(started.elapsed() < quick, "took {:?}", started.elapsed());
    let started = Instant::now();
    assert_eq!(
        log.open_edge("edge-k").unwrap().high_water_mark().unwrap(),
        Some(hwm)
    );
    assert!(started.elapsed() < quick, "took {:?}", started.elapsed());
}

#[test]
fn a_malformed_mark_is_reported_until_a_valid_one_replaces_it() {
    let config = test_config("corrupt");
    let log = KafkaLog::new(config.clone()).unwrap();
    raw_transaction(&config, "edge-c", &[], b"not json", End::Commit);
    let err = log
        .open_edge("edge-c")
        .unwrap()
        .high_water_mark()
        .unwrap_err();
    assert!(
        matches!(err, SinkError::CorruptHwm { ref edge, .. } if edge == "edge-c"),
        "{err:?}"
    );
    assert!(!err.is_retriable());

    let hwm = Hwm { epoch: 3, seq: 1 };
    log.open_edge("edge-c")
        .unwrap()
        .commit("edge-c", hwm, &[])
        .unwrap();
    assert_eq!(
        log.open_edge("edge-c").unwrap().high_water_mark().unwrap(),
        Some(hwm)
    );
}

#[test]
fn a_reading_larger_than_the_message_limit_aborts_without_retry() {
    let config = KafkaSinkConfig {
        message_bytes_max: 2_000,
        ..test_config("large")
    };
    let log = KafkaLog::new(config.clone()).unwrap();
    let mut writer = log.open_edge("edge-l").unwrap();
    let mut big = reading("big", 0);
    big.metrics.push(Metric {
        name: "label".into(),
        value: Value::Str("x".repeat(4_000)),
        unit: None,
    });
    // Records queued and in flight when the abort comes: it must discard them
    // and leave the producer's sequence numbers usable.
    let mut readings: Vec<Reading> = (0..500).map(|i| reading("small", i)).collect();
    readings.push(big);
    let batches = [SegmentBatch::new(1, readings)];
    let err = writer
        .commit("edge-l", Hwm { epoch: 1, seq: 1 }, &batches)
        .unwrap_err();
    assert!(
        matches!(err, SinkError::Config(ref reason) if reason.contains("message_bytes_max")),
        "{err:?}"
    );
    assert_eq!(log.counters().snapshot().transactions_aborted, 1);

    // The writer survives, and nothing of the failed transaction is visible.
    let hwm = Hwm { epoch: 1, seq: 2 };
    writer
        .commit(
            "edge-l",
            hwm,
            &[SegmentBatch::new(2, vec![reading("small", 1000)])],
        )
        .unwrap();
    let devices: Vec<String> = committed_readings(&config)
        .into_iter()
        .map(|r| r.device_id)
        .collect();
    assert_eq!(devices, ["small"]);
    assert_eq!(
        log.open_edge("edge-l").unwrap().high_water_mark().unwrap(),
        Some(hwm)
    );
}

#[test]
fn a_full_local_queue_makes_the_commit_wait_not_fail() {
    let mut config = test_config("queue");
    // Far fewer than one commit's records: the commit must wait for room.
    config
        .client_properties
        .insert("queue.buffering.max.messages".into(), "16".into());
    let log = KafkaLog::new(config.clone()).unwrap();
    let mut writer = log.open_edge("edge-q").unwrap();
    let hwm = Hwm { epoch: 1, seq: 2 };
    writer
        .commit("edge-q", hwm, &[batch(1, "q", 300), batch(2, "q", 300)])
        .unwrap();
    assert_eq!(committed_readings(&config).len(), 600);
    assert_eq!(log.counters().snapshot().records_sent, 600);
    assert_eq!(
        log.open_edge("edge-q").unwrap().high_water_mark().unwrap(),
        Some(hwm)
    );
}
