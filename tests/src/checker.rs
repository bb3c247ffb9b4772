//! The exactly-once checker.
//!
//! The cloud writes each reading to the readings topic with the device id as key, the
//! reading as JSON, and the headers `tributary-edge`, `tributary-epoch`, `tributary-seq`.
//! Edges may write an ack log, one line per reading:
//! `A <device_id> <device_ts_us>` once it was acknowledged to its device (after the
//! outbox fsync), `D <device_id> <device_ts_us>` when the drop-oldest policy dropped it.
//!
//! [`check`] compares what the topic holds (read with `read_committed`) with the ack
//! logs: every acknowledged reading must be there exactly once, and each device's
//! readings must be in order within their partition.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use tributary_actors::reading::Reading;

use crate::{blocking, HarnessError};

pub const EDGE_HEADER: &str = "tributary-edge";
pub const EPOCH_HEADER: &str = "tributary-epoch";
pub const SEQ_HEADER: &str = "tributary-seq";

/// The longest one consumer poll blocks, so that the deadline is checked often.
const POLL_INTERVAL_MS: u64 = 200;
/// How many examples of each problem [`Report`]'s Display prints per device.
pub const REPORT_EXAMPLES_MAX: usize = 10;

/// A reading as found in the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedReading {
    pub device_id: String,
    pub device_ts_us: i64,
    /// The `tributary-edge` header, if the record has one.
    pub edge: Option<String>,
    pub epoch: Option<u64>,
    pub seq: Option<u64>,
    pub partition: i32,
    pub offset: i64,
    /// The reading's metric `n` (an integer), where a publisher numbers its
    /// readings: the identity of readings that may share a timestamp.
    pub n: Option<i64>,
}

/// A reading's identity: its device and the device's timestamp.
pub type ReadingKey = (String, i64);

/// Reads the whole topic with `isolation.level=read_committed`: returns once it has at
/// least `expected_min` records and every partition is at its end (for `read_committed`,
/// the last stable offset).
///
/// If `timeout` passes first, it still returns what it read when every partition is at
/// its end, so that [`check`] can name what is missing; otherwise it fails with
/// [`HarnessError::Timeout`].
pub async fn consume_all(
    bootstrap: &str,
    topic: &str,
    expected_min: usize,
    timeout: Duration,
) -> Result<Vec<ConsumedReading>, HarnessError> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    blocking(move || consume_blocking(&bootstrap, &topic, expected_min, timeout, |m| decode(m)))
        .await
}

/// A record of any JSON topic (alerts, windows), read `read_committed`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumedValue {
    pub key: String,
    pub value: serde_json::Value,
    /// The `tributary-edge` header, if the record has one (readings do).
    pub edge: Option<String>,
    pub partition: i32,
    pub offset: i64,
}

/// Like [`consume_all`], for a topic of JSON records of any shape.
pub async fn consume_values(
    bootstrap: &str,
    topic: &str,
    expected_min: usize,
    timeout: Duration,
) -> Result<Vec<ConsumedValue>, HarnessError> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    blocking(move || {
        consume_blocking(&bootstrap, &topic, expected_min, timeout, |msg| {
            let (partition, offset) = (msg.partition(), msg.offset());
            let bad = |detail: String| HarnessError::RecordDecode {
                partition,
                offset,
                detail,
            };
            let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
            let value = serde_json::from_slice(msg.payload().unwrap_or_default())
                .map_err(|e| bad(format!("value is not JSON: {e}")))?;
            let edge = msg.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == EDGE_HEADER)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            Ok(ConsumedValue {
                key,
                value,
                edge,
                partition,
                offset,
            })
        })
    })
    .await
}

/// Waits until consumer group `group` has committed offsets at the end of
/// every partition of `topic`: everything written so far was processed.
pub async fn wait_group_caught_up(
    bootstrap: &str,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<(), HarnessError> {
    let (bootstrap, group, topic) = (bootstrap.to_owned(), group.to_owned(), topic.to_owned());
    blocking(move || {
        let started = Instant::now();
        let kafka = |step| move |source| HarnessError::Kafka { step, source };
        let partitions = crate::broker::topic_partitions(&bootstrap, &topic, None, timeout)?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka("creating the offsets client"))?;
        let tail: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("{group}-tail-check"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(kafka("creating the tail reader"))?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let call = Duration::from_secs(5);
        let mut detail = String::new();
        while started.elapsed() < timeout {
            let committed = consumer
                .committed_offsets(tpl.clone(), call)
                .map_err(kafka("reading the group's offsets"))?;
            let mut behind = Vec::new();
            for p in 0..partitions {
                // The high watermark, past any transaction markers.
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, call)
                    .map_err(kafka("reading the watermarks"))?;
                let at = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                // A commit marker follows the last record: a group that read
                // everything sits at most one offset below the watermark.
                // Past that, the tail may be only markers and aborted records
                // (a crashed writer's transactions, aborted after the last
                // commit): behind only if a committed record lies there.
                if at + 1 < high && committed_record_from(&tail, &topic, p, at, call)? {
                    behind.push((p, at, high));
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            detail = format!(" (partition, committed, high watermark): {behind:?}");
            std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
        }
        Err(HarnessError::Timeout {
            step: format!("group {group} catching up with {topic}"),
            waited_ms: timeout.as_millis() as u64,
            detail,
        })
    })
    .await
}

/// Whether `read_committed` finds a record of `topic` partition `p` at
/// `from` or later, before its end.
fn committed_record_from(
    tail: &BaseConsumer,
    topic: &str,
    p: i32,
    from: i64,
    timeout: Duration,
) -> Result<bool, HarnessError> {
    let kafka = |step| move |source| HarnessError::Kafka { step, source };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(from))
        .and_then(|()| tail.assign(&tpl))
        .map_err(kafka("assigning the tail reader"))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match tail.poll(Duration::from_millis(POLL_INTERVAL_MS)) {
            Some(Ok(m)) => return Ok(m.offset() >= from),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Ok(false),
            Some(Err(e)) => return Err(kafka("reading the partition's tail")(e)),
            None => {}
        }
    }
    // An open transaction holds read_committed back: not caught up yet.
    Ok(true)
}

fn consume_blocking<T>(
    bootstrap: &str,
    topic: &str,
    expected_min: usize,
    timeout: Duration,
    decode: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> Result<T, HarnessError>,
) -> Result<Vec<T>, HarnessError> {
    let started = Instant::now();
    let partitions = crate::broker::topic_partitions(bootstrap, topic, None, timeout)?;
    let kafka = |step| move |source| HarnessError::Kafka { step, source };
    let group = format!("tributary-checker-{}", crate::broker::unique_topic("g"));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &group)
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(kafka("creating the checker's consumer"))?;
    // Assigning instead of subscribing skips the group rebalance: the checker wants every
    // partition from the start, and commits nothing.
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(kafka("building the assignment"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(kafka("assigning the partitions"))?;

    let mut at_end = vec![false; partitions as usize];
    let mut out = Vec::new();
    loop {
        let all_at_end = at_end.iter().all(|e| *e);
        if all_at_end && out.len() >= expected_min {
            return Ok(out);
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            if all_at_end {
                return Ok(out);
            }
            let behind: Vec<usize> = at_end
                .iter()
                .enumerate()
                .filter(|(_, e)| !**e)
                .map(|(p, _)| p)
                .collect();
            return Err(HarnessError::Timeout {
                step: format!("consuming {topic} (read_committed)"),
                waited_ms: timeout.as_millis() as u64,
                detail: format!(
                    " (read {} of at least {expected_min}; partitions not at their end: {behind:?})",
                    out.len()
                ),
            });
        }
        match consumer.poll(left.min(Duration::from_millis(POLL_INTERVAL_MS))) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                if let Some(e) = at_end.get_mut(p as usize) {
                    *e = true;
                }
            }
            Some(Err(source)) => {
                return Err(HarnessError::Kafka {
                    step: "consuming",
                    source,
                })
            }
            Some(Ok(msg)) => {
                if let Some(e) = at_end.get_mut(msg.partition() as usize) {
                    *e = false;
                }
                out.push(decode(&msg)?);
            }
        }
    }
}

fn decode<M: Message>(msg: &M) -> Result<ConsumedReading, HarnessError> {
    let (partition, offset) = (msg.partition(), msg.offset());
    let bad = |detail: String| HarnessError::RecordDecode {
        partition,
        offset,
        detail,
    };
    let key = msg.key().ok_or_else(|| bad("no key".into()))?;
    let key = std::str::from_utf8(key).map_err(|e| bad(format!("key is not UTF-8: {e}")))?;
    let value = msg.payload().ok_or_else(|| bad("no value".into()))?;
    let reading: Reading =
        serde_json::from_slice(value).map_err(|e| bad(format!("value is not a reading: {e}")))?;
    if reading.device_id != key {
        return Err(bad(format!(
            "key {key:?} but the reading's device_id is {:?}",
            reading.device_id
        )));
    }
    let mut edge = None;
    let mut epoch = None;
    let mut seq = None;
    if let Some(headers) = msg.headers() {
        for h in headers.iter() {
            let text = || -> Result<&str, HarnessError> {
                let v = h
                    .value
                    .ok_or_else(|| bad(format!("header {} has no value", h.key)))?;
                std::str::from_utf8(v).map_err(|e| bad(format!("header {} not UTF-8: {e}", h.key)))
            };
            let number = || -> Result<u64, HarnessError> {
                let t = text()?;
                t.parse()
                    .map_err(|e| bad(format!("header {} = {t:?} is not a number: {e}", h.key)))
            };
            match h.key {
                EDGE_HEADER => edge = Some(text()?.to_owned()),
                EPOCH_HEADER => epoch = Some(number()?),
                SEQ_HEADER => seq = Some(number()?),
                _ => {}
            }
        }
    }
    let n = match reading.metric("n") {
        Some(tributary_actors::reading::Value::I64(n)) => Some(*n),
        _ => None,
    };
    Ok(ConsumedReading {
        device_id: reading.device_id,
        device_ts_us: reading.device_ts_us,
        edge,
        epoch,
        seq,
        partition,
        offset,
        n,
    })
}

/// What the edges said about readings: acknowledged to the device, or dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckLog {
    pub acked: HashSet<ReadingKey>,
    pub dropped: HashSet<ReadingKey>,
}

/// Reads and merges ack logs. A last line without its newline is an edge killed in the
/// middle of a write and is ignored; any other malformed line is an error.
pub fn read_ack_logs<I, P>(paths: I) -> Result<AckLog, HarnessError>
where
    I: IntoIterator<Item = P>,
    P: AsRef<Path>,
{
    let mut log = AckLog::default();
    for path in paths {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| HarnessError::AckLogRead {
            path: path.to_owned(),
            source,
        })?;
        parse_ack_log(path, &bytes, &mut log)?;
    }
    Ok(log)
}

fn parse_ack_log(path: &Path, bytes: &[u8], log: &mut AckLog) -> Result<(), HarnessError> {
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(last_newline) => &bytes[..=last_newline],
        None => return Ok(()),
    };
    let malformed = |line_no: usize, line: &str| HarnessError::AckLogParse {
        path: PathBuf::from(path),
        line_no,
        line: line.to_owned(),
    };
    for (i, raw) in complete.split(|b| *b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = String::from_utf8_lossy(raw);
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        // Split on the first and the last space, so that a device id may hold spaces.
        let (kind, rest) = line
            .split_once(' ')
            .ok_or_else(|| malformed(line_no, line))?;
        let (device, ts) = rest
            .rsplit_once(' ')
            .ok_or_else(|| malformed(line_no, line))?;
        let ts: i64 = ts.parse().map_err(|_| malformed(line_no, line))?;
        if device.is_empty() {
            return Err(malformed(line_no, line));
        }
        let device = unescape_device(device).ok_or_else(|| malformed(line_no, line))?;
        let key = (device, ts);
        match kind {
            "A" => log.acked.insert(key),
            "D" => log.dropped.insert(key),
            _ => return Err(malformed(line_no, line)),
        };
    }
    Ok(())
}

/// Undoes the gateway's escaping of device ids in the ack log (`%XX` for
/// whitespace, control characters and `%`).
fn unescape_device(escaped: &str) -> Option<String> {
    if !escaped.contains('%') {
        return Some(escaped.to_owned());
    }
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut it = escaped.bytes();
    while let Some(b) = it.next() {
        if b == b'%' {
            let hex = [it.next()?, it.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// A reading found more than once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub device_id: String,
    pub device_ts_us: i64,
    /// Where each copy is, as (partition, offset), in the order consumed.
    pub copies: Vec<(i32, i64)>,
}

/// A reading that comes, within its partition, after a later reading of its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfOrder {
    pub device_id: String,
    pub partition: i32,
    pub offset: i64,
    pub device_ts_us: i64,
    /// The device's timestamp of the reading just before it in the partition.
    pub previous_ts_us: i64,
}

/// Problem counts of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    pub consumed: usize,
    pub acked: usize,
    pub dropped: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
    pub dropped_present: usize,
    pub unexpected: usize,
}

impl DeviceCounts {
    fn has_problem(&self) -> bool {
        self.lost + self.duplicated + self.out_of_order + self.dropped_present + self.unexpected > 0
    }
}

/// The checker's verdict. The lists are sorted by device, then timestamp.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub consumed: usize,
    pub distinct: usize,
    pub acked: usize,
    pub dropped: usize,
    /// Acknowledged, not dropped, and absent from the topic.
    pub lost: Vec<ReadingKey>,
    pub duplicated: Vec<Duplicate>,
    pub out_of_order: Vec<OutOfOrder>,
    /// Counted as dropped by the edge yet present: possible when the drop raced the send.
    pub dropped_present: Vec<ReadingKey>,
    /// Present but neither acknowledged nor dropped: allowed after a kill -9, when the
    /// edge sent a reading but died before logging its ack.
    pub unexpected: Vec<ReadingKey>,
    pub per_device: BTreeMap<String, DeviceCounts>,
}

impl Report {
    /// No acknowledged reading lost, none duplicated, every device in order.
    pub fn is_exactly_once(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.out_of_order.is_empty()
    }
}

/// Compares the topic's contents with the ack logs.
pub fn check(consumed: &[ConsumedReading], acks: &AckLog) -> Report {
    let mut report = Report {
        consumed: consumed.len(),
        acked: acks.acked.len(),
        dropped: acks.dropped.len(),
        ..Report::default()
    };

    let mut copies: HashMap<ReadingKey, Vec<(i32, i64)>> = HashMap::new();
    let mut by_partition: BTreeMap<(String, i32), Vec<&ConsumedReading>> = BTreeMap::new();
    for r in consumed {
        copies
            .entry((r.device_id.clone(), r.device_ts_us))
            .or_default()
            .push((r.partition, r.offset));
        by_partition
            .entry((r.device_id.clone(), r.partition))
            .or_default()
            .push(r);
        counts(&mut report.per_device, &r.device_id).consumed += 1;
    }
    report.distinct = copies.len();

    for (key, at) in &copies {
        if at.len() > 1 {
            report.duplicated.push(Duplicate {
                device_id: key.0.clone(),
                device_ts_us: key.1,
                copies: at.clone(),
            });
            counts(&mut report.per_device, &key.0).duplicated += 1;
        }
        if acks.dropped.contains(key) {
            report.dropped_present.push(key.clone());
            counts(&mut report.per_device, &key.0).dropped_present += 1;
        } else if !acks.acked.contains(key) {
            report.unexpected.push(key.clone());
            counts(&mut report.per_device, &key.0).unexpected += 1;
        }
    }

    // A later copy of a reading already seen is reported as a duplicate, not also as a
    // reordering; a reading seen for the first time after a later one is a reordering.
    for ((device, partition), mut records) in by_partition {
        records.sort_by_key(|r| r.offset);
        let mut seen = HashSet::new();
        let mut previous: Option<i64> = None;
        for r in records {
            if !seen.insert(r.device_ts_us) {
                continue;
            }
            if let Some(prev) = previous {
                if r.device_ts_us <= prev {
                    report.out_of_order.push(OutOfOrder {
                        device_id: device.clone(),
                        partition,
                        offset: r.offset,
                        device_ts_us: r.device_ts_us,
                        previous_ts_us: prev,
                    });
                    counts(&mut report.per_device, &device).out_of_order += 1;
                }
            }
            previous = Some(r.device_ts_us);
        }
    }

    for key in &acks.acked {
        counts(&mut report.per_device, &key.0).acked += 1;
        if !acks.dropped.contains(key) && !copies.contains_key(key) {
            report.lost.push(key.clone());
            counts(&mut report.per_device, &key.0).lost += 1;
        }
    }
    for key in &acks.dropped {
        counts(&mut report.per_device, &key.0).dropped += 1;
    }

    report.lost.sort();
    report.dropped_present.sort();
    report.unexpected.sort();
    report
        .duplicated
        .sort_by(|a, b| (&a.device_id, a.device_ts_us).cmp(&(&b.device_id, b.device_ts_us)));
    report.out_of_order.sort_by(|a, b| {
        (&a.device_id, a.partition, a.offset).cmp(&(&b.device_id, b.partition, b.offset))
    });
    report
}

fn counts<'a>(
    per_device: &'a mut BTreeMap<String, DeviceCounts>,
    device: &str,
) -> &'a mut DeviceCounts {
    per_device.entry(device.to_owned()).or_default()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} records, {} distinct readings, {} acked, {} dropped; \
             lost {}, duplicated {}, out of order {}, dropped yet present {}, unexpected {}",
            if self.is_exactly_once() {
                "EXACTLY ONCE"
            } else {
                "NOT EXACTLY ONCE"
            },
            self.consumed,
            self.distinct,
            self.acked,
            self.dropped,
            self.lost.len(),
            self.duplicated.len(),
            self.out_of_order.len(),
            self.dropped_present.len(),
            self.unexpected.len(),
        )?;
        let troubled: Vec<_> = self
            .per_device
            .iter()
            .filter(|(_, c)| c.has_problem())
            .collect();
        if troubled.is_empty() {
            return Ok(());
        }
        writeln!(
            f,
            "{:<24} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8} {:>10}",
            "device",
            "consumed",
            "acked",
            "dropped",
            "lost",
            "dup",
            "order",
            "drop+pr",
            "unexpected"
        )?;
        for (device, c) in &troubled {
            writeln!(
                f,
                "{:<24} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>8} {:>10}",
                device,
                c.consumed,
                c.acked,
                c.dropped,
                c.lost,
                c.duplicated,
                c.out_of_order,
                c.dropped_present,
                c.unexpected
            )?;
        }
        for (device, _) in troubled {
            let lost: Vec<_> = self
                .lost
                .iter()
                .filter(|k| &k.0 == device)
                .map(|k| k.1)
                .collect();
            let dups: Vec<_> = self
                .duplicated
                .iter()
                .filter(|d| &d.device_id == device)
                .map(|d| format!("{} at {:?}", d.device_ts_us, d.copies))
                .collect();
            let order: Vec<_> = self
                .out_of_order
                .iter()
                .filter(|o| &o.device_id == device)
                .map(|o| {
                    format!(
                        "{} after {} (p{} @{})",
                        o.device_ts_us, o.previous_ts_us, o.partition, o.offset
                    )
                })
                .collect();
            for (what, items) in [
                (
                    "lost",
                    lost.iter().map(ToString::to_string).collect::<Vec<_>>(),
                ),
                ("duplicated", dups),
                ("out of order", order),
            ] {
                if !items.is_empty() {
                    writeln!(f, "  {device} {what}: {}", examples(&items))?;
                }
            }
        }
        Ok(())
    }
}

fn examples(items: &[String]) -> String {
    let shown = items
        .iter()
        .take(REPORT_EXAMPLES_MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > REPORT_EXAMPLES_MAX {
        format!("{shown}, … ({} more)", items.len() - REPORT_EXAMPLES_MAX)
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(device: &str, ts: i64, partition: i32, offset: i64) -> ConsumedReading {
        ConsumedReading {
            device_id: device.into(),
            device_ts_us: ts,
            edge: Some("edge-1".into()),
            epoch: Some(1),
            seq: Some(offset as u64),
            partition,
            offset,
            n: None,
        }
    }

    fn acks(acked: &[(&str, i64)], dropped: &[(&str, i64)]) -> AckLog {
        AckLog {
            acked: acked.iter().map(|(d, t)| (d.to_string(), *t)).collect(),
            dropped: dropped.iter().map(|(d, t)| (d.to_string(), *t)).collect(),
        }
    }

    #[test]
    fn clean_run_is_exactly_once() {
        let consumed = [
            rec("a", 1, 0, 0),
            rec("b", 1, 1, 0),
            rec("a", 2, 0, 1),
            rec("b", 5, 1, 1),
        ];
        let report = check(
            &consumed,
            &acks(&[("a", 1), ("a", 2), ("b", 1), ("b", 5)], &[]),
        );
        assert!(report.is_exactly_once(), "{report}");
        assert_eq!(report.distinct, 4);
        assert!(report.unexpected.is_empty() && report.dropped_present.is_empty());
        assert_eq!(report.per_device["a"].consumed, 2);
        assert!(report.to_string().starts_with("EXACTLY ONCE"));
    }

    #[test]
    fn acked_but_absent_is_lost_unless_dropped() {
        let consumed = [rec("a", 1, 0, 0), rec("a", 4, 0, 1)];
        let report = check(
            &consumed,
            &acks(&[("a", 1), ("a", 2), ("a", 3), ("a", 4)], &[("a", 3)]),
        );
        assert!(!report.is_exactly_once());
        assert_eq!(report.lost, vec![("a".to_string(), 2)]);
        assert_eq!(report.per_device["a"].lost, 1);
        assert!(report.to_string().contains("a lost: 2"), "{report}");
    }

    #[test]
    fn second_copy_is_a_duplicate_not_a_reordering() {
        let consumed = [
            rec("a", 1, 0, 0),
            rec("a", 2, 0, 1),
            rec("a", 2, 0, 2),
            rec("a", 3, 0, 3),
        ];
        let report = check(&consumed, &acks(&[("a", 1), ("a", 2), ("a", 3)], &[]));
        assert!(!report.is_exactly_once());
        assert_eq!(
            report.duplicated,
            vec![Duplicate {
                device_id: "a".into(),
                device_ts_us: 2,
                copies: vec![(0, 1), (0, 2)]
            }]
        );
        assert!(report.out_of_order.is_empty());
        assert!(report.lost.is_empty());
    }

    #[test]
    fn reordering_within_a_partition_is_found_by_offset() {
        // Consumed out of offset order on purpose: the order that counts is the log's.
        let consumed = [
            rec("a", 3, 0, 1),
            rec("a", 1, 0, 0),
            rec("a", 2, 0, 2),
            rec("b", 9, 1, 0),
        ];
        let report = check(
            &consumed,
            &acks(&[("a", 1), ("a", 2), ("a", 3), ("b", 9)], &[]),
        );
        assert!(!report.is_exactly_once());
        assert_eq!(
            report.out_of_order,
            vec![OutOfOrder {
                device_id: "a".into(),
                partition: 0,
                offset: 2,
                device_ts_us: 2,
                previous_ts_us: 3
            }]
        );
        assert!(report.duplicated.is_empty() && report.lost.is_empty());
    }

    #[test]
    fn dropped_present_and_unexpected_are_reported_but_allowed() {
        let consumed = [rec("a", 1, 0, 0), rec("a", 2, 0, 1), rec("a", 3, 0, 2)];
        let report = check(&consumed, &acks(&[("a", 1)], &[("a", 2)]));
        assert!(report.is_exactly_once(), "{report}");
        assert_eq!(report.dropped_present, vec![("a".to_string(), 2)]);
        assert_eq!(report.unexpected, vec![("a".to_string(), 3)]);
    }

    #[test]
    fn ack_log_ignores_a_torn_last_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("edge-1.acks");
        let two = dir.path().join("edge-2.acks");
        std::fs::write(&one, "A press 7 10\nD press 7 11\nA pump 12\nA pump 1").unwrap();
        std::fs::write(&two, "A valve 5\n\nA valve 6\n").unwrap();
        let log = read_ack_logs([&one, &two]).unwrap();
        assert_eq!(
            log,
            acks(
                &[("press 7", 10), ("pump", 12), ("valve", 5), ("valve", 6)],
                &[("press 7", 11)]
            )
        );

        std::fs::write(&two, "A valve 5\nX valve 6\n").unwrap();
        match read_ack_logs([&two]) {
            Err(HarnessError::AckLogParse { line_no: 2, .. }) => {}
            other => panic!("expected a parse error on line 2, got {other:?}"),
        }
        assert!(matches!(
            read_ack_logs([dir.path().join("missing")]),
            Err(HarnessError::AckLogRead { .. })
        ));
    }
}

/// What [`check_numbered`] found: readings identified by (device, `n`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NumberedReport {
    pub consumed: usize,
    pub expected: usize,
    /// (device, n) published and acknowledged by the broker, not in the topic.
    pub lost: Vec<(String, i64)>,
    /// (device, n) in the topic more than once, with how many times.
    pub duplicated: Vec<(String, i64, usize)>,
    /// (device, n, previous n): a first copy that came after a higher number
    /// of its device, in its partition.
    pub out_of_order: Vec<(String, i64, i64)>,
    /// In the topic without a number, or a number nobody published.
    pub unexpected: Vec<(String, Option<i64>)>,
}

impl NumberedReport {
    pub fn is_exactly_once(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.out_of_order.is_empty()
            && self.unexpected.is_empty()
    }
}

impl fmt::Display for NumberedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} records for {} expected; lost {}, duplicated {}, out of order {}, unexpected {}",
            if self.is_exactly_once() { "EXACTLY ONCE" } else { "NOT EXACTLY ONCE" },
            self.consumed,
            self.expected,
            self.lost.len(),
            self.duplicated.len(),
            self.out_of_order.len(),
            self.unexpected.len()
        )?;
        let show = |f: &mut fmt::Formatter<'_>, what: &str, items: Vec<String>| {
            if items.is_empty() {
                return Ok(());
            }
            let more = items.len().saturating_sub(REPORT_EXAMPLES_MAX);
            let shown: Vec<_> = items.into_iter().take(REPORT_EXAMPLES_MAX).collect();
            writeln!(
                f,
                "  {what}: {}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        };
        show(
            f,
            "lost",
            self.lost.iter().map(|(d, n)| format!("{d}#{n}")).collect(),
        )?;
        show(
            f,
            "duplicated",
            self.duplicated
                .iter()
                .map(|(d, n, c)| format!("{d}#{n}x{c}"))
                .collect(),
        )?;
        show(
            f,
            "out of order",
            self.out_of_order
                .iter()
                .map(|(d, n, p)| format!("{d}#{n} after #{p}"))
                .collect(),
        )?;
        show(
            f,
            "unexpected",
            self.unexpected
                .iter()
                .map(|(d, n)| format!("{d}#{n:?}"))
                .collect(),
        )
    }
}

/// Checks a topic against numbered publishes: `expected` gives, per device,
/// the numbers the broker acknowledged to the publisher (each device numbers
/// its readings `n` = 0, 1, 2, ... in the order it published them). Every one
/// must be in the topic exactly once, in that order within its partition,
/// and nothing else. Readings may share timestamps: they are told apart by `n`.
pub fn check_numbered(
    consumed: &[ConsumedReading],
    expected: &BTreeMap<String, std::collections::BTreeSet<i64>>,
) -> NumberedReport {
    let mut report = NumberedReport {
        consumed: consumed.len(),
        expected: expected.values().map(|s| s.len()).sum(),
        ..NumberedReport::default()
    };
    let mut seen: HashMap<(String, i64), usize> = HashMap::new();
    let mut by_partition: BTreeMap<(String, i32), Vec<&ConsumedReading>> = BTreeMap::new();
    for r in consumed {
        by_partition
            .entry((r.device_id.clone(), r.partition))
            .or_default()
            .push(r);
        match r.n {
            Some(n) if expected.get(&r.device_id).is_some_and(|s| s.contains(&n)) => {
                *seen.entry((r.device_id.clone(), n)).or_default() += 1;
            }
            n => report.unexpected.push((r.device_id.clone(), n)),
        }
    }
    for (device, ns) in expected {
        for n in ns {
            match seen.get(&(device.clone(), *n)) {
                None => report.lost.push((device.clone(), *n)),
                Some(&c) if c > 1 => report.duplicated.push((device.clone(), *n, c)),
                Some(_) => {}
            }
        }
    }
    for ((device, _), mut records) in by_partition {
        records.sort_by_key(|r| r.offset);
        let mut first = std::collections::HashSet::new();
        let mut previous: Option<i64> = None;
        for r in records {
            let Some(n) = r.n else { continue };
            if !first.insert(n) {
                continue;
            }
            if let Some(p) = previous {
                if n <= p {
                    report.out_of_order.push((device.clone(), n, p));
                }
            }
            previous = Some(n);
        }
    }
    report.lost.sort();
    report.duplicated.sort();
    report.out_of_order.sort();
    report
}

#[cfg(test)]
mod numbered_tests {
    use super::*;

    #[test]
    fn escaped_device_ids_read_back() {
        let mut log = AckLog::default();
        let text = "A a%20b%0AA%20x 5\nA 50%25 6\n";
        parse_ack_log(Path::new("acks"), text.as_bytes(), &mut log).unwrap();
        assert!(log.acked.contains(&("a b\nA x".to_string(), 5)));
        assert!(log.acked.contains(&("50%".to_string(), 6)));
        assert!(parse_ack_log(Path::new("acks"), b"A bad%zz 1\n", &mut log).is_err());
    }

    fn rec(device: &str, n: Option<i64>, partition: i32, offset: i64) -> ConsumedReading {
        ConsumedReading {
            device_id: device.into(),
            // Every reading in one millisecond: only `n` tells them apart.
            device_ts_us: 1_000,
            edge: None,
            epoch: None,
            seq: None,
            partition,
            offset,
            n,
        }
    }

    #[test]
    fn numbered_readings_are_told_apart_by_their_number() {
        let expected: BTreeMap<String, std::collections::BTreeSet<i64>> = [
            ("a".to_string(), (0..4).collect()),
            ("b".to_string(), (0..2).collect()),
        ]
        .into();
        let good = vec![
            rec("a", Some(0), 0, 0),
            rec("b", Some(0), 1, 0),
            rec("a", Some(1), 0, 1),
            rec("a", Some(2), 0, 2),
            rec("b", Some(1), 1, 1),
            rec("a", Some(3), 0, 3),
        ];
        assert!(check_numbered(&good, &expected).is_exactly_once());
        let bad = vec![
            rec("a", Some(0), 0, 0),
            rec("a", Some(2), 0, 1),
            rec("a", Some(1), 0, 2),
            rec("a", Some(2), 0, 3),
            rec("b", Some(0), 1, 0),
            rec("b", None, 1, 1),
            rec("c", Some(0), 2, 0),
        ];
        let r = check_numbered(&bad, &expected);
        assert_eq!(r.lost, [("a".to_string(), 3), ("b".to_string(), 1)]);
        assert_eq!(r.duplicated, [("a".to_string(), 2, 2)]);
        assert_eq!(r.out_of_order, [("a".to_string(), 1, 2)]);
        assert_eq!(r.unexpected.len(), 2);
        assert!(r.to_string().contains("NOT EXACTLY ONCE"));
    }
}
