//! From a reading to committed in Kafka: a `read_committed` consumer of the
//! readings topic, in this process, takes each record's device timestamp
//! from the time it became visible here. A record is visible to
//! `read_committed` only once its transaction committed, so this is the
//! time from the device to "durable and readable in the log", plus one
//! consumer fetch (fetch.wait.max.ms is 10: at most 10 ms more).
//!
//! The devices run on this machine, so their clock is this clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tributary_actors::reading::Reading;

/// Samples kept; past it, further readings are counted but not sampled.
const SAMPLES_MAX: usize = 4_000_000;
const POLL_MS: u64 = 50;

pub struct LatencyProbe {
    stop: Arc<AtomicBool>,
    /// While false, readings are consumed but not sampled (the warm-up).
    sampling: Arc<AtomicBool>,
    samples_us: Arc<Mutex<Vec<u32>>>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// What the probe measured over the window.
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl LatencyProbe {
    /// Starts consuming `topic` (its `partitions`, from their ends).
    pub fn start(bootstrap: &str, topic: &str, partitions: i32) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("bench-latency-{topic}"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .set("fetch.min.bytes", "1")
            .create()
            .context("creating the latency probe's consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::End)
                .context("assigning the readings topic")?;
        }
        consumer
            .assign(&tpl)
            .context("assigning the readings topic")?;
        let stop = Arc::new(AtomicBool::new(false));
        let sampling = Arc::new(AtomicBool::new(false));
        let samples_us = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let (s, on, out) = (stop.clone(), sampling.clone(), samples_us.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            while !s.load(Ordering::Relaxed) {
                let Some(msg) = consumer.poll(Duration::from_millis(POLL_MS)) else {
                    continue;
                };
                let msg = msg.context("consuming the readings topic")?;
                let seen_us = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                if !on.load(Ordering::Relaxed) {
                    continue;
                }
                let Some(payload) = msg.payload() else {
                    continue;
                };
                let Ok(reading) = serde_json::from_slice::<Reading>(payload) else {
                    continue;
                };
                let took = (seen_us - reading.device_ts_us).clamp(0, u32::MAX as i64) as u32;
                let mut v = out.lock().unwrap_or_else(|e| e.into_inner());
                if v.len() < SAMPLES_MAX {
                    v.push(took);
                }
            }
            Ok(())
        });
        Ok(Self {
            stop,
            sampling,
            samples_us,
            thread: Some(thread),
        })
    }

    /// From now on, readings count.
    pub fn begin(&self) {
        self.sampling.store(true, Ordering::Relaxed);
    }

    /// Stops the probe and returns the percentiles of what it sampled.
    pub fn finish(mut self) -> Result<Latency> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("the latency probe panicked"))??;
        }
        let mut v = std::mem::take(&mut *self.samples_us.lock().unwrap_or_else(|e| e.into_inner()));
        anyhow::ensure!(!v.is_empty(), "the latency probe saw no reading");
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Ok(Latency {
            samples: v.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
        })
    }
}

impl Drop for LatencyProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
