//! A threshold held for a duration:
//! `Threshold::above("temperature", 90.0).for_at_least(secs(5))`.
//!
//! Per device, in event time: the condition starts holding at the first
//! reading that meets it and keeps holding until a reading does not. Once it
//! has held for the duration (measured between readings, so it fires on the
//! first reading at least that long after the start), one alert is emitted;
//! the detector re-arms when a reading no longer meets the condition. A
//! reading without the metric neither meets nor breaks it.
//!
//! The detector needs each device's readings in event-time order: one older
//! than the device's latest is counted in `out_of_order` and ignored (put a
//! window in front to reorder a source that shuffles).

use std::time::Duration;

use super::devices::DeviceTable;
use super::{
    duration_us, finite, nonempty, nonzero, numeric, Alert, AlertKind, Operator, Output,
    ParamError, StageStats, DEVICES_MAX_DEFAULT,
};
use crate::reading::Reading;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The value is strictly greater than the threshold.
    Above,
    /// The value is strictly less than the threshold.
    Below,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    metric: String,
    direction: Direction,
    value: f64,
    held_for: Duration,
    devices_max: usize,
}

impl Threshold {
    pub fn above(metric: impl Into<String>, value: f64) -> Self {
        Self::new(metric.into(), Direction::Above, value)
    }

    pub fn below(metric: impl Into<String>, value: f64) -> Self {
        Self::new(metric.into(), Direction::Below, value)
    }

    fn new(metric: String, direction: Direction, value: f64) -> Self {
        Self {
            metric,
            direction,
            value,
            held_for: Duration::ZERO,
            devices_max: DEVICES_MAX_DEFAULT,
        }
    }

    /// How long the condition must hold before the alert; zero (the default)
    /// alerts on the first reading that meets it.
    pub fn for_at_least(mut self, held_for: Duration) -> Self {
        self.held_for = held_for;
        self
    }

    pub fn devices_max(mut self, n: usize) -> Self {
        self.devices_max = n;
        self
    }

    pub(crate) fn validate(&self) -> Result<i64, ParamError> {
        nonempty("threshold metric", &self.metric)?;
        finite("threshold value", self.value)?;
        nonzero("devices_max", self.devices_max)?;
        if self.held_for.is_zero() {
            return Ok(0);
        }
        duration_us("threshold duration", self.held_for)
    }

    pub(crate) fn with_param(&self, param: &str, value: f64) -> Result<Self, ParamError> {
        match param {
            "value" => {
                let t = Self {
                    value,
                    ..self.clone()
                };
                t.validate()?;
                Ok(t)
            }
            _ => Err(ParamError::Unknown {
                param: param.to_owned(),
                known: "value",
            }),
        }
    }

    pub(crate) fn build(&self, stage: &str) -> Result<ThresholdStage, ParamError> {
        let held_for_us = self.validate()?;
        Ok(ThresholdStage {
            spec: self.clone(),
            stage: stage.to_owned(),
            held_for_us,
            devices: DeviceTable::new(self.devices_max),
            stats: StageStats::default(),
        })
    }
}

pub(crate) struct ThresholdStage {
    spec: Threshold,
    stage: String,
    held_for_us: i64,
    devices: DeviceTable<Held>,
    stats: StageStats,
}

#[derive(bincode::Encode, bincode::Decode)]
struct Held {
    latest_us: i64,
    /// When the condition started holding, if it holds.
    since_us: Option<i64>,
    /// Whether this stretch has already raised its alert.
    fired: bool,
}

impl Operator for ThresholdStage {
    fn set_param(&mut self, param: &str, value: f64) -> Result<(), ParamError> {
        // Devices already past the old value keep their state: a crossing
        // of the new value is judged from the next reading on.
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
        let (held, _) = self.devices.touch(&reading.device_id, || Held {
            latest_us: i64::MIN,
            since_us: None,
            fired: false,
        });
        if t < held.latest_us {
            self.stats.out_of_order += 1;
            return Vec::new();
        }
        held.latest_us = t;
        let meets = match self.spec.direction {
            Direction::Above => v > self.spec.value,
            Direction::Below => v < self.spec.value,
        };
        if !meets {
            held.since_us = None;
            held.fired = false;
            return Vec::new();
        }
        let since = *held.since_us.get_or_insert(t);
        if held.fired || t.saturating_sub(since) < self.held_for_us {
            return Vec::new();
        }
        held.fired = true;
        self.stats.alerts_out += 1;
        let (kind, word) = match self.spec.direction {
            Direction::Above => (AlertKind::ThresholdAbove, "above"),
            Direction::Below => (AlertKind::ThresholdBelow, "below"),
        };
        let held_s = (t - since) as f64 / 1e6;
        vec![Output::Alert(Alert {
            device_id: reading.device_id,
            stage: self.stage.clone(),
            kind,
            metric: self.spec.metric.clone(),
            value: v,
            device_ts_us: t,
            message: format!(
                "{} is {v}, {word} {} for {held_s} s",
                self.spec.metric, self.spec.value
            ),
        })]
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        self.devices.encode()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.devices.decode_into(bytes, "threshold")
    }

    fn stats(&self) -> StageStats {
        StageStats {
            devices_evicted: self.devices.evicted(),
            ..self.stats
        }
    }
}
