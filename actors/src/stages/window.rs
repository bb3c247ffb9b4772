//! Tumbling and sliding windows over one metric, per device, in event time.
//!
//! - Windows are aligned to the Unix epoch: `[k * slide, k * slide + size)`
//!   in microseconds; a tumbling window is a sliding one whose slide is its
//!   size.
//! - Each device has a watermark: the latest event time it has shown, minus
//!   `allowed_lateness` (or more, if the driver advanced it). A window closes,
//!   and its aggregates are emitted as one reading, when the watermark reaches
//!   its end. A reading older than the watermark is late: counted, not
//!   aggregated. So a reading that is not late only ever lands in open windows,
//!   and out-of-order readings within the lateness are aggregated as if they
//!   had come in order.
//! - Windows exist only once a reading falls in them: a gap emits nothing.
//! - An emitted reading has the device's id, the window's start as its
//!   `device_ts_us`, the latest `edge_ts_us` of its readings, and one metric per
//!   aggregate named `<metric>.<aggregate>` (`temperature.mean`), in the order
//!   the aggregates were asked for.
//! - p95 is exact (nearest rank) while a window holds at most
//!   `window_readings_max` values. Past that, count, mean, min and max stay
//!   exact, and p95 comes from a uniform reservoir sample of
//!   `window_readings_max` values (deterministic; the window is counted in
//!   `windows_sampled`). Values are kept only when p95 is asked for.
//! - An evicted device's open windows are emitted at once: it is the least
//!   recently seen, so its windows are the likeliest to be complete.

use std::collections::BTreeMap;
use std::time::Duration;

use super::devices::DeviceTable;
use super::{
    duration_us, nonempty, nonzero, number, Operator, Output, ParamError, StageStats,
    DEVICES_MAX_DEFAULT, DURATION_MAX,
};
use crate::reading::{Metric, Reading, Value};

/// The most windows one reading may fall in (`size / slide`, rounded up):
/// bounds the work per reading and the windows open per device.
pub const WINDOWS_PER_READING_MAX: u128 = 64;
/// Values a window keeps for its p95 unless told otherwise.
pub const WINDOW_READINGS_MAX_DEFAULT: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Mean,
    Min,
    Max,
    /// The 95th percentile, nearest rank.
    P95,
}

impl Aggregate {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::Mean => "mean",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::P95 => "p95",
        }
    }
}

/// A window spec: `Window::tumbling(secs(1)).mean("temperature")`.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    size: Duration,
    slide: Duration,
    /// (metric, aggregate) as asked; validation checks there is one metric.
    aggregates: Vec<(String, Aggregate)>,
    allowed_lateness: Duration,
    window_readings_max: usize,
    devices_max: usize,
}

impl Window {
    /// Back-to-back windows of `size`.
    pub fn tumbling(size: Duration) -> Self {
        Self::sliding(size, size)
    }

    /// Windows of `size` starting every `slide` (at most `size`).
    pub fn sliding(size: Duration, slide: Duration) -> Self {
        Self {
            size,
            slide,
            aggregates: Vec::new(),
            allowed_lateness: Duration::ZERO,
            window_readings_max: WINDOW_READINGS_MAX_DEFAULT,
            devices_max: DEVICES_MAX_DEFAULT,
        }
    }

    pub fn aggregate(mut self, metric: impl Into<String>, aggregate: Aggregate) -> Self {
        self.aggregates.push((metric.into(), aggregate));
        self
    }

    pub fn count(self, metric: impl Into<String>) -> Self {
        self.aggregate(metric, Aggregate::Count)
    }

    pub fn mean(self, metric: impl Into<String>) -> Self {
        self.aggregate(metric, Aggregate::Mean)
    }

    pub fn min(self, metric: impl Into<String>) -> Self {
        self.aggregate(metric, Aggregate::Min)
    }

    pub fn max(self, metric: impl Into<String>) -> Self {
        self.aggregate(metric, Aggregate::Max)
    }

    pub fn p95(self, metric: impl Into<String>) -> Self {
        self.aggregate(metric, Aggregate::P95)
    }

    /// Count, mean, min, max and p95 of `metric`.
    pub fn all(self, metric: impl Into<String>) -> Self {
        let metric = metric.into();
        [
            Aggregate::Count,
            Aggregate::Mean,
            Aggregate::Min,
            Aggregate::Max,
            Aggregate::P95,
        ]
        .into_iter()
        .fold(self, |w, a| w.aggregate(metric.clone(), a))
    }

    /// How far behind its device's latest reading a reading may be and still
    /// count; windows close that much later. Zero by default.
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.allowed_lateness = lateness;
        self
    }

    /// Values a window keeps for an exact p95 (see the module doc).
    pub fn window_readings_max(mut self, n: usize) -> Self {
        self.window_readings_max = n;
        self
    }

    pub fn devices_max(mut self, n: usize) -> Self {
        self.devices_max = n;
        self
    }

    pub(crate) fn validate(&self) -> Result<WindowConfig, ParamError> {
        let size_us = duration_us("window size", self.size)?;
        let slide_us = duration_us("window slide", self.slide)?;
        if slide_us > size_us {
            return Err(ParamError::SlideLongerThanSize {
                slide_ms: self.slide.as_millis(),
                size_ms: self.size.as_millis(),
            });
        }
        let per_reading = (size_us as u128).div_ceil(slide_us as u128);
        if per_reading > WINDOWS_PER_READING_MAX {
            return Err(ParamError::TooManyWindowsPerReading { got: per_reading });
        }
        if self.allowed_lateness > DURATION_MAX {
            return Err(ParamError::DurationTooLong {
                param: "allowed lateness",
                got_ms: self.allowed_lateness.as_millis(),
                max_ms: DURATION_MAX.as_millis(),
            });
        }
        nonzero("window_readings_max", self.window_readings_max)?;
        nonzero("devices_max", self.devices_max)?;
        let Some((metric, _)) = self.aggregates.first() else {
            return Err(ParamError::NoAggregates);
        };
        nonempty("window metric", metric)?;
        if let Some((other, _)) = self.aggregates.iter().find(|(m, _)| m != metric) {
            return Err(ParamError::MixedMetrics {
                first: metric.clone(),
                second: other.clone(),
            });
        }
        let aggregates: Vec<_> = self.aggregates.iter().map(|(_, a)| *a).collect();
        Ok(WindowConfig {
            size_us,
            slide_us,
            lateness_us: self.allowed_lateness.as_micros() as i64,
            names: aggregates
                .iter()
                .map(|a| format!("{metric}.{}", a.as_str()))
                .collect(),
            keep_values: aggregates.contains(&Aggregate::P95),
            aggregates,
            metric: metric.clone(),
            window_readings_max: self.window_readings_max,
        })
    }

    pub(crate) fn build(&self) -> Result<WindowStage, ParamError> {
        let cfg = self.validate()?;
        Ok(WindowStage {
            cfg,
            devices: DeviceTable::new(self.devices_max),
            stats: StageStats::default(),
        })
    }
}

/// A validated spec, in microseconds.
pub(crate) struct WindowConfig {
    size_us: i64,
    slide_us: i64,
    lateness_us: i64,
    metric: String,
    aggregates: Vec<Aggregate>,
    /// The output metric of each aggregate, made once rather than per window.
    names: Vec<String>,
    keep_values: bool,
    window_readings_max: usize,
}

pub(crate) struct WindowStage {
    cfg: WindowConfig,
    devices: DeviceTable<DeviceWindows>,
    stats: StageStats,
}

#[derive(bincode::Encode, bincode::Decode)]
struct DeviceWindows {
    watermark_us: i64,
    /// Open windows by start.
    windows: BTreeMap<i64, Acc>,
    /// The metric's unit as last seen, carried onto the aggregates.
    unit: Option<String>,
}

#[derive(bincode::Encode, bincode::Decode)]
struct Acc {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    values: Vec<f64>,
    edge_ts_us: i64,
}

impl DeviceWindows {
    fn new() -> Self {
        Self {
            watermark_us: i64::MIN,
            windows: BTreeMap::new(),
            unit: None,
        }
    }

    fn add(&mut self, cfg: &WindowConfig, t: i64, v: f64, edge_ts_us: i64) {
        let last = t.div_euclid(cfg.slide_us) * cfg.slide_us;
        let mut start = last;
        // At most WINDOWS_PER_READING_MAX turns: validation bounds size / slide.
        while start.saturating_add(cfg.size_us) > t {
            let acc = self.windows.entry(start).or_insert_with(|| Acc {
                count: 0,
                sum: 0.0,
                min: f64::INFINITY,
                max: f64::NEG_INFINITY,
                values: Vec::new(),
                edge_ts_us,
            });
            acc.count += 1;
            acc.sum += v;
            acc.min = acc.min.min(v);
            acc.max = acc.max.max(v);
            acc.edge_ts_us = acc.edge_ts_us.max(edge_ts_us);
            if cfg.keep_values {
                if acc.values.len() < cfg.window_readings_max {
                    acc.values.push(v);
                } else {
                    // Reservoir sampling (Algorithm R), with the window and
                    // the count as the seed so that a replay gives the same p95.
                    let j = splitmix64(start as u64 ^ acc.count.rotate_left(32)) % acc.count;
                    if let Some(slot) = acc.values.get_mut(j as usize) {
                        *slot = v;
                    }
                }
            }
            match start.checked_sub(cfg.slide_us) {
                Some(s) => start = s,
                None => break,
            }
        }
    }

    /// Emits, oldest first, the windows whose end the watermark has reached.
    fn close(
        &mut self,
        cfg: &WindowConfig,
        device: &str,
        stats: &mut StageStats,
        out: &mut Vec<Output>,
    ) {
        while let Some(entry) = self.windows.first_entry() {
            if entry.key().saturating_add(cfg.size_us) > self.watermark_us {
                break;
            }
            let start = *entry.key();
            let acc = entry.remove();
            out.push(Output::Reading(emit(
                cfg,
                device,
                self.unit.as_deref(),
                start,
                acc,
                stats,
            )));
        }
    }
}

fn emit(
    cfg: &WindowConfig,
    device: &str,
    unit: Option<&str>,
    start: i64,
    mut acc: Acc,
    stats: &mut StageStats,
) -> Reading {
    if cfg.keep_values && acc.count > cfg.window_readings_max as u64 {
        stats.windows_sampled += 1;
    }
    let metrics = cfg
        .aggregates
        .iter()
        .zip(&cfg.names)
        .map(|(agg, name)| {
            let value = match agg {
                Aggregate::Count => Value::I64(acc.count as i64),
                Aggregate::Mean => Value::F64(acc.sum / acc.count as f64),
                Aggregate::Min => Value::F64(acc.min),
                Aggregate::Max => Value::F64(acc.max),
                Aggregate::P95 => Value::F64(p95(&mut acc.values)),
            };
            Metric {
                name: name.clone(),
                value,
                unit: match agg {
                    Aggregate::Count => None,
                    _ => unit.map(str::to_owned),
                },
            }
        })
        .collect();
    Reading {
        device_id: device.to_owned(),
        device_ts_us: start,
        edge_ts_us: acc.edge_ts_us,
        stream: None,
        metrics,
    }
}

/// Nearest rank: the smallest value with at least 95% of values at or below it.
fn p95(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let rank = (values.len() * 95).div_ceil(100);
    let (_, v, _) = values.select_nth_unstable_by(rank - 1, f64::total_cmp);
    *v
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Operator for WindowStage {
    fn handle(&mut self, reading: Reading) -> Vec<Output> {
        let Self {
            cfg,
            devices,
            stats,
        } = self;
        stats.readings_in += 1;
        let Some(metric) = reading.metrics.iter().find(|m| m.name == cfg.metric) else {
            stats.skipped += 1;
            return Vec::new();
        };
        let Some(v) = number(&metric.value) else {
            stats.skipped += 1;
            return Vec::new();
        };
        let mut out = Vec::new();
        let (dev, evicted) = devices.touch(&reading.device_id, DeviceWindows::new);
        if let Some((id, mut gone)) = evicted {
            gone.watermark_us = i64::MAX;
            gone.close(cfg, &id, stats, &mut out);
        }
        let t = reading.device_ts_us;
        if t < dev.watermark_us {
            stats.late += 1;
        } else {
            if dev.unit.as_deref() != metric.unit.as_deref() {
                dev.unit.clone_from(&metric.unit);
            }
            dev.add(cfg, t, v, reading.edge_ts_us);
            dev.watermark_us = dev.watermark_us.max(t.saturating_sub(cfg.lateness_us));
            dev.close(cfg, &reading.device_id, stats, &mut out);
        }
        stats.count_outputs(&out);
        out
    }

    fn advance_watermark(&mut self, watermark_us: i64) -> Vec<Output> {
        let Self {
            cfg,
            devices,
            stats,
        } = self;
        let mut out = Vec::new();
        for (id, dev) in devices.iter_mut() {
            dev.watermark_us = dev.watermark_us.max(watermark_us);
            dev.close(cfg, id, stats, &mut out);
        }
        stats.count_outputs(&out);
        out
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        self.devices.encode()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.devices.decode_into(bytes, "window")
    }

    fn stats(&self) -> StageStats {
        StageStats {
            devices_evicted: self.devices.evicted(),
            ..self.stats
        }
    }
}
