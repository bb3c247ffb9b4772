//! A rolling z-score anomaly detector: `ZScore::new("vibration", secs(60), 4.0)`.
//!
//! Per device, over a trailing event-time window `(t - window, t]` of at most
//! `samples_max` samples: a reading is compared with the mean and the sample
//! standard deviation of the samples *before* it, so an anomaly does not
//! dilute its own score. It raises an alert when `|z| > threshold`, once the
//! window holds at least `min_samples`. Every reading then joins the window,
//! anomalies included, so a lasting shift in level stops alerting once the
//! window has learnt it. While the window's values are all equal the score is
//! undefined and nothing fires.
//!
//! Like [`super::Threshold`], it needs each device's readings in event-time
//! order; older ones are counted in `out_of_order` and ignored.

use std::collections::VecDeque;
use std::time::Duration;

use super::devices::DeviceTable;
use super::{
    duration_us, finite, nonempty, nonzero, numeric, Alert, AlertKind, Operator, Output,
    ParamError, StageStats, DEVICES_MAX_DEFAULT,
};
use crate::reading::Reading;

pub const MIN_SAMPLES_DEFAULT: usize = 10;
pub const SAMPLES_MAX_DEFAULT: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct ZScore {
    metric: String,
    window: Duration,
    threshold: f64,
    min_samples: usize,
    samples_max: usize,
    devices_max: usize,
}

impl ZScore {
    pub fn new(metric: impl Into<String>, window: Duration, threshold: f64) -> Self {
        Self {
            metric: metric.into(),
            window,
            threshold,
            min_samples: MIN_SAMPLES_DEFAULT,
            samples_max: SAMPLES_MAX_DEFAULT,
            devices_max: DEVICES_MAX_DEFAULT,
        }
    }

    /// Samples the window must hold before the detector may fire (at least 2).
    pub fn min_samples(mut self, n: usize) -> Self {
        self.min_samples = n;
        self
    }

    /// Samples kept per device; the oldest go first.
    pub fn samples_max(mut self, n: usize) -> Self {
        self.samples_max = n;
        self
    }

    pub fn devices_max(mut self, n: usize) -> Self {
        self.devices_max = n;
        self
    }

    pub(crate) fn validate(&self) -> Result<i64, ParamError> {
        nonempty("z-score metric", &self.metric)?;
        let window_us = duration_us("z-score window", self.window)?;
        finite("z-score threshold", self.threshold)?;
        if self.threshold <= 0.0 {
            return Err(ParamError::OutOfRange {
                param: "z-score threshold",
                got: self.threshold.to_string(),
                expected: "greater than 0",
            });
        }
        if self.min_samples < 2 {
            return Err(ParamError::OutOfRange {
                param: "min_samples",
                got: self.min_samples.to_string(),
                expected: "at least 2, for a standard deviation",
            });
        }
        if self.samples_max < self.min_samples {
            return Err(ParamError::OutOfRange {
                param: "samples_max",
                got: self.samples_max.to_string(),
                expected: "at least min_samples",
            });
        }
        nonzero("devices_max", self.devices_max)?;
        Ok(window_us)
    }

    pub(crate) fn with_param(&self, param: &str, value: f64) -> Result<Self, ParamError> {
        match param {
            "threshold" => {
                let z = Self {
                    threshold: value,
                    ..self.clone()
                };
                z.validate()?;
                Ok(z)
            }
            _ => Err(ParamError::Unknown {
                param: param.to_owned(),
                known: "threshold",
            }),
        }
    }

    pub(crate) fn build(&self, stage: &str) -> Result<ZScoreStage, ParamError> {
        let window_us = self.validate()?;
        Ok(ZScoreStage {
            spec: self.clone(),
            stage: stage.to_owned(),
            window_us,
            devices: DeviceTable::new(self.devices_max),
            stats: StageStats::default(),
        })
    }
}

pub(crate) struct ZScoreStage {
    spec: ZScore,
    stage: String,
    window_us: i64,
    devices: DeviceTable<Samples>,
    stats: StageStats,
}

/// Running sums over values minus `shift` (a value of the window), which
/// keeps the variance accurate when values are large and their spread small.
#[derive(bincode::Encode, bincode::Decode)]
struct Samples {
    latest_us: i64,
    samples: VecDeque<(i64, f64)>,
    shift: f64,
    sum: f64,
    sum_sq: f64,
    /// Pushes since the sums were recomputed: removals leave rounding error
    /// behind, so they are rebuilt every `samples_max` pushes (amortized O(1)).
    pushes: usize,
}

impl Samples {
    fn pop_front(&mut self) {
        if let Some((_, v)) = self.samples.pop_front() {
            let d = v - self.shift;
            self.sum -= d;
            self.sum_sq -= d * d;
        }
    }

    fn push(&mut self, t: i64, v: f64, samples_max: usize) {
        if self.samples.len() >= samples_max {
            self.pop_front();
        }
        self.samples.push_back((t, v));
        self.pushes += 1;
        if self.pushes >= samples_max || self.samples.len() == 1 {
            self.pushes = 0;
            self.shift = self.samples.front().map_or(v, |(_, v)| *v);
            self.sum = 0.0;
            self.sum_sq = 0.0;
            for (_, x) in &self.samples {
                let d = x - self.shift;
                self.sum += d;
                self.sum_sq += d * d;
            }
        } else {
            let d = v - self.shift;
            self.sum += d;
            self.sum_sq += d * d;
        }
    }

    /// Mean and sample standard deviation, if the score is defined.
    fn mean_stddev(&self) -> Option<(f64, f64)> {
        let n = self.samples.len() as f64;
        let mean = self.shift + self.sum / n;
        let stddev = ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0))
            .max(0.0)
            .sqrt();
        // Removals can leave a flat window with a rounding-sized spread, which
        // would make any change look infinitely anomalous: treat a spread
        // negligible next to the values as none.
        if stddev <= 1e-12 * mean.abs().max(1.0) {
            return None;
        }
        Some((mean, stddev))
    }
}

impl Operator for ZScoreStage {
    fn set_param(&mut self, param: &str, value: f64) -> Result<(), ParamError> {
        self.spec = self.spec.with_param(param, value)?;
        Ok(())
    }

    fn handle(&mut self, reading: Reading) -> Vec<Output> {
        self.stats.readings_in += 1;
        let Some(v) = numeric(&reading, &self.spec.metric) else {
            self.stats.skipped += 1;
            return Vec::new();
        };
        let t = reading.device_ts_us;
        let (s, _) = self.devices.touch(&reading.device_id, || Samples {
            latest_us: i64::MIN,
            samples: VecDeque::new(),
            shift: 0.0,
            sum: 0.0,
            sum_sq: 0.0,
            pushes: 0,
        });
        if t < s.latest_us {
            self.stats.out_of_order += 1;
            return Vec::new();
        }
        s.latest_us = t;
        let oldest_kept = t.saturating_sub(self.window_us);
        while s.samples.front().is_some_and(|(ts, _)| *ts <= oldest_kept) {
            s.pop_front();
        }
        let mut out = Vec::new();
        if s.samples.len() >= self.spec.min_samples {
            if let Some((mean, stddev)) = s.mean_stddev() {
                let z = (v - mean) / stddev;
                if z.abs() > self.spec.threshold {
                    self.stats.alerts_out += 1;
                    out.push(Output::Alert(Alert {
                        device_id: reading.device_id.clone(),
                        stage: self.stage.clone(),
                        kind: AlertKind::ZScore,
                        metric: self.spec.metric.clone(),
                        value: v,
                        device_ts_us: t,
                        message: format!(
                            "{} is {v}, z = {z:.2} against mean {mean:.3} and stddev {stddev:.3} of {} samples",
                            self.spec.metric,
                            s.samples.len()
                        ),
                    }));
                }
            }
        }
        s.push(t, v, self.spec.samples_max);
        out
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        self.devices.encode()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.devices.decode_into(bytes, "z-score")
    }

    fn stats(&self) -> StageStats {
        StageStats {
            devices_evicted: self.devices.evicted(),
            ..self.stats
        }
    }
}
