//! `bench log`: the Kafka log sink against raw rdkafka producers.
//!
//! The subjects send the same records (each reading as JSON, keyed by
//! device, with the three tributary headers, plus one high-water mark record
//! per commit), in commits of 1, 4 or 16 segments of 1000 readings:
//! - `log`: [`EdgeLogWriter::commit`], one transaction per commit;
//! - `raw tx`, the baseline: a raw transactional producer, one transaction
//!   per commit, with the readings already encoded as JSON;
//! - `raw idempotent`: a raw idempotent producer without transactions, which
//!   waits for every record's acknowledgement per commit;
//! - `raw tx, flush waits by sleeping`: the baseline with a flush that does
//!   not spin (see [`FlushWait`]).
//!
//! The raw producers take the sink's producer settings, and the first two
//! wait for their acknowledgements the way the sink does, so that the ratio
//! measures the sink's own work: JSON encoding, header building and its
//! bookkeeping. The JSON encoding alone is timed too, to show its share, and
//! the CPU time per reading of this process (and of the broker, given its
//! pid) says what the wall-clock figures hide on two cores.
//!
//! Every subject writes to its own fresh topics, deleted at the end.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use tributary_actors::sink::kafka::{
    KafkaLog, KafkaSinkConfig, HEADER_EDGE, HEADER_EPOCH, HEADER_SEQ,
};
use tributary_actors::sink::{EdgeLogWriter, Hwm, LogSink, SegmentBatch};

use crate::stats::{print_cpu_table, print_table, process_cpu_s, thousands, CpuPerReading, Series};
use crate::workload;

const EDGE: &str = "bench-edge";
const EPOCH: u64 = 1;
/// The hwm topic's only partition.
const HWM_PARTITION: i32 = 0;
/// The sink's producer settings (actors/src/sink/kafka.rs), for the raw ones.
const PRODUCER_SETTINGS: &[(&str, &str)] = &[
    ("queue.buffering.max.kbytes", "32768"),
    ("linger.ms", "5"),
    ("compression.type", "none"),
    ("partitioner", "murmur2_random"),
    ("message.max.bytes", "1000000"),
];
/// The sink's default transaction timeout.
const TRANSACTION_TIMEOUT_MS: &str = "60000";
/// Bound on opening a producer and on one commit of a raw producer.
const KAFKA_TIMEOUT_MS: u64 = 30_000;
/// How long a raw producer waits for room in its full queue, as the sink.
const QUEUE_FULL_BACKOFF_MS: u64 = 5;
/// How long a raw producer's flush waits per poll, as the sink.
const FLUSH_POLL_MS: u64 = 1;
/// How long the sleeping flush sleeps when no report came: the latency it
/// may add per commit.
const FLUSH_SLEEP_US: u64 = 200;
/// Bound on deleting the benchmark's topics at the end.
const DELETE_TIMEOUT_MS: u64 = 30_000;

#[derive(Debug, Clone)]
pub struct LogOpts {
    pub bootstrap: String,
    /// Readings per run; a multiple of segments × every batch size.
    pub readings: u64,
    pub runs: usize,
    pub warmup: usize,
    /// Segments per commit.
    pub batch_sizes: Vec<usize>,
    pub segment_readings: usize,
    pub partitions: i32,
    /// Leave the topics in place (to inspect them).
    pub keep_topics: bool,
    /// The broker's pid, when it runs on this machine: its CPU per reading
    /// is reported too.
    pub broker_pid: Option<u32>,
}

/// Counts failed deliveries: a raw run with any is an error, not a figure.
#[derive(Default)]
struct RawContext {
    failures: AtomicU64,
}

impl ClientContext for RawContext {}

impl ProducerContext for RawContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Topics {
    readings: String,
    hwm: String,
}

/// One segment as a raw producer gets it: keys and values already encoded.
struct RawSegment {
    seq: u64,
    records: Vec<(String, Vec<u8>)>,
}

struct RawSubject {
    name: &'static str,
    producer: BaseProducer<RawContext>,
    topics: Topics,
    transactional: bool,
    wait: FlushWait,
    segments: Vec<RawSegment>,
}

/// How a raw producer waits for its acknowledgements.
#[derive(Clone, Copy, PartialEq)]
enum FlushWait {
    /// As the sink does: `poll` with a 1 ms timeout. rdkafka 0.39 passes a
    /// timeout below 1 ms as 0 to librdkafka and loops until the deadline, so
    /// this spins a core for as long as it waits.
    SinkPoll,
    /// Serve the reports without blocking, and sleep briefly when none came.
    Sleep,
}

fn sink_config(o: &LogOpts, who: &str, suffix: &str) -> KafkaSinkConfig {
    KafkaSinkConfig {
        readings_topic: format!("bench-{who}-readings-{suffix}"),
        hwm_topic: format!("bench-{who}-hwm-{suffix}"),
        transactional_id_prefix: format!("bench-{who}-{suffix}"),
        readings_partitions: o.partitions,
        ..KafkaSinkConfig::new(o.bootstrap.clone())
    }
}

fn raw_producer(
    bootstrap: &str,
    transactional_id: Option<&str>,
) -> Result<BaseProducer<RawContext>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true");
    for (k, v) in PRODUCER_SETTINGS {
        config.set(*k, *v);
    }
    if let Some(id) = transactional_id {
        config
            .set("transactional.id", id)
            .set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS);
    }
    let producer: BaseProducer<RawContext> = config
        .create_with_context(RawContext::default())
        .context("creating a raw producer")?;
    if transactional_id.is_some() {
        producer
            .init_transactions(Duration::from_millis(KAFKA_TIMEOUT_MS))
            .context("init_transactions of the raw producer")?;
    }
    Ok(producer)
}

fn send(
    producer: &BaseProducer<RawContext>,
    mut record: BaseRecord<'_, str, [u8]>,
    deadline: Instant,
) -> Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if Instant::now() < deadline =>
            {
                producer.poll(Duration::from_millis(QUEUE_FULL_BACKOFF_MS));
                record = back;
            }
            Err((e, _)) => return Err(e).context("producing a record"),
        }
    }
}

fn flush(producer: &BaseProducer<RawContext>, wait: FlushWait, deadline: Instant) -> Result<()> {
    loop {
        let before = producer.in_flight_count();
        producer.poll(Duration::ZERO);
        let after = producer.in_flight_count();
        if after == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("flushing timed out");
        }
        match wait {
            FlushWait::SinkPoll => producer.poll(Duration::from_millis(FLUSH_POLL_MS)),
            // A report was served: there may be more waiting right now.
            FlushWait::Sleep if after < before => {}
            FlushWait::Sleep => std::thread::sleep(Duration::from_micros(FLUSH_SLEEP_US)),
        }
    }
}

/// One commit of a raw subject: the same records as the sink writes.
fn raw_commit(s: &RawSubject, batch: &[RawSegment]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_millis(KAFKA_TIMEOUT_MS);
    let p = &s.producer;
    if s.transactional {
        p.begin_transaction().context("begin_transaction")?;
    }
    let epoch = EPOCH.to_string();
    for segment in batch {
        let seq = segment.seq.to_string();
        for (key, value) in &segment.records {
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: HEADER_EDGE,
                    value: Some(EDGE),
                })
                .insert(Header {
                    key: HEADER_EPOCH,
                    value: Some(&epoch),
                })
                .insert(Header {
                    key: HEADER_SEQ,
                    value: Some(&seq),
                });
            let record = BaseRecord::to(&s.topics.readings)
                .key(key.as_str())
                .payload(value.as_slice())
                .headers(headers);
            send(p, record, deadline)?;
        }
    }
    let last = batch.last().map_or(0, |b| b.seq);
    let hwm = serde_json::to_vec(&Hwm {
        epoch: EPOCH,
        seq: last,
    })?;
    let record = BaseRecord::to(&s.topics.hwm)
        .partition(HWM_PARTITION)
        .key(EDGE)
        .payload(hwm.as_slice());
    send(p, record, deadline)?;
    flush(p, s.wait, deadline)?;
    if s.transactional {
        p.commit_transaction(deadline.saturating_duration_since(Instant::now()))
            .context("commit_transaction")?;
    }
    let failures = p.context().failures.load(Ordering::Relaxed);
    if failures > 0 {
        bail!("{}: {failures} deliveries failed", s.name);
    }
    Ok(())
}

/// A raw transactional producer on fresh topics, for baselines elsewhere
/// (the end-to-end benchmark compares the nodes with it).
pub struct RawTxBaseline {
    subject: RawSubject,
    bootstrap: String,
    topics: Vec<String>,
    next_seq: u64,
}

impl RawTxBaseline {
    pub fn new(o: &LogOpts, who: &str) -> Result<Self> {
        let config = sink_config(o, who, &unique_suffix());
        KafkaLog::new(config.clone()).context("creating the baseline's topics")?;
        let segments = raw_segments(&workload::readings(o.readings), o.segment_readings);
        Ok(Self {
            subject: RawSubject {
                name: "raw tx",
                producer: raw_producer(
                    &o.bootstrap,
                    Some(&format!("{}-{EDGE}", config.transactional_id_prefix)),
                )?,
                topics: Topics {
                    readings: config.readings_topic.clone(),
                    hwm: config.hwm_topic.clone(),
                },
                transactional: true,
                wait: FlushWait::SinkPoll,
                segments,
            },
            bootstrap: o.bootstrap.clone(),
            topics: vec![config.readings_topic, config.hwm_topic],
            next_seq: 1,
        })
    }

    /// Sends every reading once, `batch` segments per transaction.
    pub fn run_once(&mut self, batch: usize) -> Result<Duration> {
        let s = &mut self.subject;
        for (i, seg) in s.segments.iter_mut().enumerate() {
            seg.seq = self.next_seq + i as u64;
        }
        self.next_seq += s.segments.len() as u64;
        let start = Instant::now();
        for chunk in s.segments.chunks(batch.max(1)) {
            raw_commit(s, chunk)?;
        }
        Ok(start.elapsed())
    }

    /// Deletes the baseline's topics.
    pub fn finish(self) {
        if let Err(e) = delete_topics(&self.bootstrap, &self.topics) {
            eprintln!("deleting the baseline's topics failed: {e:#}");
        }
    }
}

pub fn unique_suffix() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{}-{ms}", std::process::id())
}

pub fn delete_topics(bootstrap: &str, topics: &[String]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating the admin client")?;
    let timeout = Some(Duration::from_millis(DELETE_TIMEOUT_MS));
    let options = AdminOptions::new()
        .request_timeout(timeout)
        .operation_timeout(timeout);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    // The admin request carries its own timeout, which bounds this wait.
    let results = futures::executor::block_on(admin.delete_topics(&names, &options))
        .context("deleting the topics")?;
    for r in results {
        if let Err((topic, code)) = r {
            eprintln!("deleting topic {topic}: {code}");
        }
    }
    Ok(())
}

/// The raw subjects, each with its own fresh topics.
const RAW_SUBJECTS: &[RawKind] = &[
    RawKind {
        who: "rawtx",
        name: "raw tx producer",
        transactional: true,
        wait: FlushWait::SinkPoll,
    },
    RawKind {
        who: "rawidem",
        name: "raw idempotent producer",
        transactional: false,
        wait: FlushWait::SinkPoll,
    },
    RawKind {
        who: "rawtxsleep",
        name: "raw tx producer, flush waits by sleeping",
        transactional: true,
        wait: FlushWait::Sleep,
    },
];

struct RawKind {
    who: &'static str,
    name: &'static str,
    transactional: bool,
    wait: FlushWait,
}

pub fn run(o: &LogOpts) -> Result<()> {
    let per_commit_max = o.batch_sizes.iter().max().copied().unwrap_or(1) * o.segment_readings;
    for &b in &o.batch_sizes {
        let unit = (b * o.segment_readings) as u64;
        if unit == 0 || !o.readings.is_multiple_of(unit) {
            bail!(
                "--readings ({}) must be a multiple of {b} segments of {} readings",
                o.readings,
                o.segment_readings
            );
        }
    }
    let reference = workload::readings(o.readings);
    let json_bytes: u64 = reference.iter().map(|r| r.to_json().len() as u64).sum();
    println!(
        "log: {} readings per run ({} JSON bytes each), segments of {}, up to {} readings per \
         commit, {} runs after {} warm-up, {} partitions, broker {}",
        thousands(o.readings as f64),
        json_bytes / o.readings.max(1),
        o.segment_readings,
        thousands(per_commit_max as f64),
        o.runs,
        o.warmup,
        o.partitions,
        o.bootstrap
    );

    let suffix = unique_suffix();
    let configs: Vec<KafkaSinkConfig> = std::iter::once("log")
        .chain(RAW_SUBJECTS.iter().map(|k| k.who))
        .map(|who| sink_config(o, who, &suffix))
        .collect();
    let topics: Vec<String> = configs
        .iter()
        .flat_map(|c| [c.readings_topic.clone(), c.hwm_topic.clone()])
        .collect();
    let result = run_subjects(o, &reference, json_bytes, &configs);
    if o.keep_topics {
        println!("\ntopics kept: {}", topics.join(", "));
    } else if let Err(e) = delete_topics(&o.bootstrap, &topics) {
        eprintln!("deleting the benchmark's topics failed: {e:#}");
    }
    result
}

/// `configs` holds the log's config, then one per [`RAW_SUBJECTS`] entry.
fn run_subjects(
    o: &LogOpts,
    reference: &[tributary_actors::reading::Reading],
    json_bytes: u64,
    configs: &[KafkaSinkConfig],
) -> Result<()> {
    let segments_per_run = reference.len().div_ceil(o.segment_readings);
    // KafkaLog creates the topics; the raw subjects' logs only create theirs,
    // so that every subject writes to identically configured topics.
    let log = KafkaLog::new(configs[0].clone()).context("opening the log sink")?;
    let mut writer: Box<dyn EdgeLogWriter> = log.open_edge(EDGE).context("opening the writer")?;
    let mut log_segments: Vec<SegmentBatch> = reference
        .chunks(o.segment_readings)
        .map(|c| SegmentBatch {
            seq: 0,
            readings: c.to_vec(),
            refused: Vec::new(),
        })
        .collect();
    let mut raw = Vec::new();
    for (kind, config) in RAW_SUBJECTS.iter().zip(&configs[1..]) {
        KafkaLog::new(config.clone())
            .with_context(|| format!("creating the topics of the {}", kind.name))?;
        let transactional_id = format!("{}-{EDGE}", config.transactional_id_prefix);
        raw.push(RawSubject {
            name: kind.name,
            producer: raw_producer(
                &o.bootstrap,
                kind.transactional.then_some(transactional_id.as_str()),
            )?,
            topics: Topics {
                readings: config.readings_topic.clone(),
                hwm: config.hwm_topic.clone(),
            },
            transactional: kind.transactional,
            wait: kind.wait,
            segments: raw_segments(reference, o.segment_readings),
        });
    }
    let subjects = 1 + raw.len();
    let broker = o.broker_pid.map(|p| p.to_string());
    let broker_cpu_s = || broker.as_deref().map(process_cpu_s);

    // Seqs only grow, as they would from an outbox; each subject has its own.
    let mut next_seq = vec![1u64; subjects];
    for &b in &o.batch_sizes {
        let name = |what: &str| format!("{what}, {b} segment(s) per commit");
        let mut series: Vec<Series> = std::iter::once("log (EdgeLogWriter::commit)")
            .chain(raw.iter().map(|r| r.name))
            .map(|n| Series::new(name(n), o.readings, json_bytes))
            .collect();
        let mut cpu: Vec<CpuPerReading> = series
            .iter()
            .map(|s| CpuPerReading::new(s.name.clone()))
            .collect();
        let mut json_series = Series::new("JSON encoding only (to_json)", o.readings, json_bytes);
        for rep in 0..o.warmup + o.runs {
            let timed = rep >= o.warmup;
            for turn in 0..subjects {
                let subject = (rep + turn) % subjects;
                let base = next_seq[subject];
                next_seq[subject] += segments_per_run as u64;
                let (own0, broker0) = (process_cpu_s("self"), broker_cpu_s());
                let start = Instant::now();
                if subject == 0 {
                    for (i, s) in log_segments.iter_mut().enumerate() {
                        s.seq = base + i as u64;
                    }
                    for batch in log_segments.chunks(b) {
                        let last = batch.last().map_or(0, |s| s.seq);
                        let hwm = Hwm {
                            epoch: EPOCH,
                            seq: last,
                        };
                        writer.commit(EDGE, hwm, batch).context("log commit")?;
                    }
                } else {
                    let s = &mut raw[subject - 1];
                    for (i, seg) in s.segments.iter_mut().enumerate() {
                        seg.seq = base + i as u64;
                    }
                    for batch in s.segments.chunks(b) {
                        raw_commit(s, batch)?;
                    }
                }
                let took = start.elapsed();
                let (own1, broker1) = (process_cpu_s("self"), broker_cpu_s());
                if timed {
                    let broker_s = broker0.zip(broker1).map(|(a, b)| b - a);
                    cpu[subject].push(own1 - own0, broker_s, o.readings);
                    series[subject].push(took);
                }
            }
            if timed {
                let start = Instant::now();
                for r in reference {
                    black_box(r.to_json());
                }
                json_series.push(start.elapsed());
            }
            eprintln!(
                "  {b} segment(s) per commit: repetition {}/{} done",
                rep + 1,
                o.warmup + o.runs
            );
        }
        // The raw tx producer (subject 1) is the baseline of every row.
        let baseline = &series[1];
        let mut rows = vec![(baseline, None)];
        rows.extend(series[2..].iter().map(|s| (s, Some(baseline))));
        rows.push((&series[0], Some(baseline)));
        rows.push((&json_series, Some(baseline)));
        print_table(
            &format!(
                "log, {b} segment(s) of {} readings per commit",
                o.segment_readings
            ),
            &rows,
        );
        let mut cpu_rows: Vec<&CpuPerReading> = cpu[1..].iter().collect();
        cpu_rows.push(&cpu[0]);
        print_cpu_table(&cpu_rows);
    }
    let counters = log.counters().snapshot();
    println!(
        "\nthe sink's counters: {} readings in {} transactions, {} aborted",
        thousands(counters.records_sent as f64),
        counters.transactions_committed,
        counters.transactions_aborted
    );
    Ok(())
}

fn raw_segments(
    reference: &[tributary_actors::reading::Reading],
    segment_readings: usize,
) -> Vec<RawSegment> {
    reference
        .chunks(segment_readings)
        .map(|c| RawSegment {
            seq: 0,
            records: c
                .iter()
                .map(|r| (r.device_id.clone(), r.to_json()))
                .collect(),
        })
        .collect()
}
