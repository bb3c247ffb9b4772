//! `bench stages`: the throughput of each window and detector stage on one
//! core, against a hand-written loop doing the least comparable work.
//!
//! Every case is an [`Operator`] built from a `tributary_actors::stages` spec
//! with [`StageSpec::build`], fed readings by value through
//! [`Operator::handle`] on this thread, as the runtime's stage actors do. The
//! baseline keeps a running mean per device in a `HashMap` keyed by device id:
//! it reads the metric, finds the device and updates two numbers, so a ratio
//! says what the operator costs over bare per-device bookkeeping.
//!
//! The readings come from a fleet of devices (1000 by default) at 10 Hz each,
//! in event-time order per device, with a slow sine, uniform noise and rare
//! spikes, shaped like the simulated devices'. Each case keeps its operator
//! across repetitions and each repetition continues the event time, so that
//! windows, histories and device tables are in their steady state, as on a
//! node that has run for a while. The order of the cases rotates between
//! repetitions, so that a change of load hits all of them alike.
//!
//! Both the wall time and this thread's CPU time are taken: on a shared
//! machine the CPU time per reading is the steadier of the two.

use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tributary_actors::reading::{Metric, Reading, Value};
use tributary_actors::stages::{secs, Filter, Map, Operator, StageSpec, Threshold, Window, ZScore};

use crate::stats::{median, thousands, Series};

/// A fixed start instant (2026-01-01T00:00:00Z in µs), so that runs repeat.
const START_US: i64 = 1_767_225_600_000_000;
/// The metric every stage reads.
const METRIC: &str = "temperature";
/// The signal, as the simulated devices' defaults: 60 ± 10 °C over a minute.
const SIGNAL_BASE: f64 = 60.0;
const SIGNAL_AMPLITUDE: f64 = 10.0;
const SIGNAL_PERIOD_S: f64 = 60.0;
/// Half-width of the uniform noise on each value.
const SIGNAL_NOISE: f64 = 0.5;
/// One reading in this many is a spike of `SPIKE_MAGNITUDE`: what the
/// z-score is there to catch.
const SPIKE_ONE_IN: u64 = 1000;
const SPIKE_MAGNITUDE: f64 = 40.0;
/// The threshold case: above this for `THRESHOLD_HELD_S`, which the sine
/// reaches for about 8 s of each minute.
const THRESHOLD_ABOVE: f64 = 69.0;
const THRESHOLD_HELD_S: u64 = 5;
/// The filter case keeps readings above this: about a third of them.
const FILTER_ABOVE: f64 = 65.0;

#[derive(Debug, Clone)]
pub struct StagesOpts {
    /// Readings per run.
    pub readings: u64,
    /// Devices the readings are spread over.
    pub devices: u64,
    /// Each device's reading interval in event time.
    pub interval_ms: u64,
    pub runs: usize,
    pub warmup: usize,
}

/// SplitMix64: a fixed, cheap noise source, so every run sees the same values.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `i`-th reading of the whole benchmark (runs continue the event time).
fn reading(o: &StagesOpts, i: u64) -> Reading {
    let device = i % o.devices;
    let step = (i / o.devices) as i64;
    // A fixed per-device offset below the interval: devices are not in
    // lockstep, and each one's event time still only grows.
    let interval_us = (o.interval_ms * 1000) as i64;
    let offset_us = (splitmix64(device) % interval_us as u64) as i64;
    let ts = START_US + step * interval_us + offset_us;
    // Each device at its own phase, so that at any instant the fleet spans
    // the whole sine and the share above a threshold does not depend on
    // which part of the period a run covers.
    let phase = (splitmix64(device ^ 0xfa5e) % 1000) as f64 / 1000.0;
    let t_s = (ts - START_US) as f64 / 1e6 + phase * SIGNAL_PERIOD_S;
    let noise = (splitmix64(i ^ 0x5eed) % 10_001) as f64 / 10_000.0 * 2.0 - 1.0;
    let mut v = SIGNAL_BASE
        + SIGNAL_AMPLITUDE * (2.0 * std::f64::consts::PI * t_s / SIGNAL_PERIOD_S).sin()
        + SIGNAL_NOISE * noise;
    if splitmix64(i).is_multiple_of(SPIKE_ONE_IN) {
        v += SPIKE_MAGNITUDE;
    }
    Reading {
        device_id: format!("edge-1-dev-{device:04}"),
        device_ts_us: ts,
        edge_ts_us: ts + 250,
        stream: None,
        metrics: vec![
            Metric {
                name: METRIC.into(),
                value: Value::F64(v),
                unit: Some("°C".into()),
            },
            Metric {
                name: "n".into(),
                value: Value::I64(step),
                unit: None,
            },
        ],
    }
}

/// The benchmarked metric as a number, as the stages read it.
fn metric_value(r: &Reading) -> Option<f64> {
    match r
        .metrics
        .iter()
        .find(|m| m.name == METRIC)
        .map(|m| &m.value)
    {
        Some(Value::F64(v)) => Some(*v),
        Some(Value::I64(v)) => Some(*v as f64),
        _ => None,
    }
}

/// The baseline: a running mean per device, the least a stateful stage does.
#[derive(Default)]
struct RunningMeans {
    by_device: HashMap<String, (u64, f64)>,
}

impl RunningMeans {
    fn handle(&mut self, r: Reading) -> usize {
        let Some(v) = metric_value(&r) else {
            return 0;
        };
        match self.by_device.get_mut(&r.device_id) {
            Some((n, mean)) => {
                *n += 1;
                *mean += (v - *mean) / *n as f64;
            }
            None => {
                self.by_device.insert(r.device_id, (1, v));
            }
        }
        0
    }
}

/// The stages' per-device table done by hand (device id to state in an
/// ordered map, and a recency map from a logical tick to the id for LRU
/// eviction), with the baseline's running mean as the state: the share of a
/// stage's cost that is finding its device.
#[derive(Default)]
struct OrderedTable {
    by_device: BTreeMap<String, (u64, u64, f64)>,
    recency: BTreeMap<u64, String>,
    tick: u64,
}

impl OrderedTable {
    fn handle(&mut self, r: Reading) -> usize {
        let Some(v) = metric_value(&r) else {
            return 0;
        };
        self.tick += 1;
        let tick = self.tick;
        match self.by_device.get_mut(&r.device_id) {
            Some((seen, n, mean)) => {
                let id = self.recency.remove(seen).unwrap_or_default();
                *seen = tick;
                self.recency.insert(tick, id);
                *n += 1;
                *mean += (v - *mean) / *n as f64;
            }
            None => {
                self.recency.insert(tick, r.device_id.clone());
                self.by_device.insert(r.device_id, (tick, 1, v));
            }
        }
        0
    }
}

enum Subject {
    Baseline(RunningMeans),
    Ordered(OrderedTable),
    Stage(Box<dyn Operator>),
}

impl Subject {
    /// Feeds every reading; returns the outputs caused.
    fn feed(&mut self, readings: Vec<Reading>) -> u64 {
        let mut outputs = 0u64;
        match self {
            Subject::Baseline(b) => {
                for r in readings {
                    outputs += b.handle(r) as u64;
                }
            }
            Subject::Ordered(t) => {
                for r in readings {
                    outputs += t.handle(r) as u64;
                }
            }
            Subject::Stage(op) => {
                for r in readings {
                    // The outputs are dropped here, as a stage actor drops
                    // them once sent on: their cost belongs to the stage.
                    let out = black_box(op.handle(r));
                    outputs += out.len() as u64;
                }
            }
        }
        black_box(outputs)
    }
}

/// One case: its subject and what each timed run measured.
struct Case {
    subject: Subject,
    wall: Series,
    cpu_ns: Vec<f64>,
    outputs: u64,
    fed: u64,
}

impl Case {
    fn new(name: &str, subject: Subject, readings: u64) -> Self {
        Self {
            subject,
            wall: Series::new(name, readings, 0),
            cpu_ns: Vec::new(),
            outputs: 0,
            fed: 0,
        }
    }

    fn cpu_ns_median(&self) -> f64 {
        let mut v = self.cpu_ns.clone();
        v.sort_by(f64::total_cmp);
        median(&v)
    }

    fn wall_ns_median(&self) -> f64 {
        1e9 / self.wall.median_rate().max(1e-9)
    }
}

/// This thread's CPU time: unlike the wall clock, it does not count the
/// time other processes took the core.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn build(spec: impl Into<StageSpec>, name: &str) -> Result<Subject> {
    let spec: StageSpec = spec.into();
    Ok(Subject::Stage(spec.build(name)?))
}

pub fn run(o: &StagesOpts) -> Result<()> {
    if o.devices == 0 || o.interval_ms == 0 || o.readings == 0 {
        bail!("--readings, --devices and --interval-ms must be positive");
    }
    let event_s_per_run = o.readings as f64 / o.devices as f64 * o.interval_ms as f64 / 1000.0;
    println!(
        "stages: {} readings per run from {} devices, one every {} ms each ({:.0} s of event \
         time per run, continued across runs), {} runs after {} warm-up, one thread",
        thousands(o.readings as f64),
        o.devices,
        o.interval_ms,
        event_s_per_run,
        o.runs,
        o.warmup,
    );
    let n = o.readings;
    let devices_max = o.devices as usize;
    let mut cases = vec![
        Case::new(
            "baseline: HashMap<device, running mean>",
            Subject::Baseline(RunningMeans::default()),
            n,
        ),
        Case::new(
            "the same with an ordered device table and LRU recency, as the stages keep",
            Subject::Ordered(OrderedTable::default()),
            n,
        ),
        Case::new(
            "tumbling window 1 s, mean",
            build(Window::tumbling(secs(1)).mean(METRIC), "tumbling-mean")?,
            n,
        ),
        Case::new(
            "tumbling window 1 s, count+mean+min+max+p95",
            build(Window::tumbling(secs(1)).all(METRIC), "tumbling-all")?,
            n,
        ),
        Case::new(
            "sliding window 10 s / 1 s, mean",
            build(
                Window::sliding(secs(10), secs(1)).mean(METRIC),
                "sliding-mean",
            )?,
            n,
        ),
        Case::new(
            &format!("threshold above {THRESHOLD_ABOVE} held {THRESHOLD_HELD_S} s"),
            build(
                Threshold::above(METRIC, THRESHOLD_ABOVE).for_at_least(secs(THRESHOLD_HELD_S)),
                "threshold",
            )?,
            n,
        ),
        Case::new(
            "rolling z-score 60 s, alert past 4 σ",
            build(ZScore::new(METRIC, secs(60), 4.0), "zscore")?,
            n,
        ),
        Case::new(
            &format!("filter {METRIC} > {FILTER_ABOVE}"),
            build(
                Filter::new(
                    |r: &Reading| matches!(r.metric(METRIC), Some(Value::F64(v)) if *v > FILTER_ABOVE),
                ),
                "filter",
            )?,
            n,
        ),
        Case::new(
            "map °C to °F",
            build(
                Map::new(|mut r: Reading| {
                    for m in &mut r.metrics {
                        if m.name == METRIC {
                            if let Value::F64(c) = m.value {
                                m.value = Value::F64(c * 1.8 + 32.0);
                                m.unit = Some("°F".into());
                            }
                        }
                    }
                    r
                }),
                "map",
            )?,
            n,
        ),
    ];
    // Every device fits: eviction is not what is measured.
    debug_assert!(devices_max <= tributary_actors::stages::DEVICES_MAX_DEFAULT);

    let cases_n = cases.len();
    for rep in 0..o.warmup + o.runs {
        let timed = rep >= o.warmup;
        let first = rep as u64 * n;
        let reference: Vec<Reading> = (first..first + n).map(|i| reading(o, i)).collect();
        for turn in 0..cases_n {
            let case = &mut cases[(rep + turn) % cases_n];
            let readings = reference.clone();
            let cpu0 = thread_cpu();
            let start = Instant::now();
            let outputs = case.subject.feed(readings);
            let took = start.elapsed();
            let cpu = thread_cpu().saturating_sub(cpu0);
            if timed {
                case.wall.push(took);
                case.cpu_ns.push(cpu.as_nanos() as f64 / n as f64);
                case.outputs += outputs;
                case.fed += n;
            }
        }
        eprintln!("  repetition {}/{} done", rep + 1, o.warmup + o.runs);
    }
    print_stages_table(&cases);
    Ok(())
}

fn print_stages_table(cases: &[Case]) {
    let Some(base) = cases.first() else {
        return;
    };
    println!("\n### stages, one core: readings by value through Operator::handle\n");
    println!(
        "| case | readings/s (median) | min | max | ns/reading, wall (median) | \
         ns/reading, thread CPU (median) | CPU ns over baseline | outputs per 1000 readings | \
         ratio to baseline |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (i, c) in cases.iter().enumerate() {
        let ratio = if i == 0 {
            "baseline".to_string()
        } else {
            format!(
                "{:.2}",
                c.wall.median_rate() / base.wall.median_rate().max(1e-9)
            )
        };
        let over = if i == 0 {
            "–".to_string()
        } else {
            format!("{:.0}", c.cpu_ns_median() - base.cpu_ns_median())
        };
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {:.1} | {} |",
            c.wall.name,
            thousands(c.wall.median_rate()),
            thousands(c.wall.min_rate()),
            thousands(c.wall.max_rate()),
            c.wall_ns_median(),
            c.cpu_ns_median(),
            over,
            c.outputs as f64 * 1000.0 / c.fed.max(1) as f64,
            ratio,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> StagesOpts {
        StagesOpts {
            readings: 10_000,
            devices: 100,
            interval_ms: 100,
            runs: 1,
            warmup: 0,
        }
    }

    #[test]
    fn event_time_only_grows_per_device() {
        let o = opts();
        let mut last: HashMap<String, i64> = HashMap::new();
        for i in 0..o.readings {
            let r = reading(&o, i);
            assert!(r.validate().is_ok());
            if let Some(prev) = last.insert(r.device_id.clone(), r.device_ts_us) {
                assert!(r.device_ts_us > prev, "{} went back in time", r.device_id);
            }
        }
        assert_eq!(last.len(), 100);
    }

    #[test]
    fn the_signal_crosses_the_thresholds_and_spikes() {
        let o = opts();
        let values: Vec<f64> = (0..o.readings * 10)
            .map(|i| match reading(&o, i).metric(METRIC) {
                Some(Value::F64(v)) => *v,
                _ => f64::NAN,
            })
            .collect();
        let above = values.iter().filter(|v| **v > THRESHOLD_ABOVE).count();
        let spikes = values.iter().filter(|v| **v > 80.0).count();
        assert!(above > 0 && above < values.len() / 4, "{above} above");
        assert!(spikes > 0, "no spike");
    }

    #[test]
    fn a_window_emits_on_this_workload() {
        let o = opts();
        let mut case = build(Window::tumbling(secs(1)).mean(METRIC), "w").unwrap();
        let readings: Vec<Reading> = (0..o.readings).map(|i| reading(&o, i)).collect();
        // 100 devices × 100 readings at 10 Hz: about 9 closed windows each.
        let outputs = case.feed(readings);
        assert!((800..=1000).contains(&outputs), "{outputs} windows");
        let mut base = Subject::Baseline(RunningMeans::default());
        assert_eq!(base.feed((0..100).map(|i| reading(&o, i)).collect()), 0);
    }
}
