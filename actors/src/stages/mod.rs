//! Hot-path stages: filters, maps, event-time windows and detectors, as
//! sans-IO operators.
//!
//! # Design
//! - **Specs and operators.** A spec ([`Window`], [`Threshold`], [`ZScore`],
//!   [`Filter`], [`Map`], [`Custom`]) is a cheap, cloneable description that a
//!   topology carries; [`StageSpec::build`] validates it and makes a fresh
//!   [`Operator`] holding the state. A restarted stage starts from a fresh
//!   operator, and one topology value can be instantiated on many nodes.
//! - **Sans-IO.** No clock, no I/O, no tasks. Time is the readings' event
//!   time (`device_ts_us`); a driver whose devices fall silent moves time on
//!   with [`Operator::advance_watermark`]. Outputs are returned, so the same
//!   input always gives the same output, in the same order.
//! - **Per device.** Windows and detectors keep state per device, at most
//!   `devices_max` devices per stage; a new device past that evicts the least
//!   recently seen one (counted in [`StageStats::devices_evicted`]).
//! - **Bounded.** Every buffer has a named limit: samples per z-score device,
//!   values per window, windows per reading (see [`WINDOWS_PER_READING_MAX`]).
//! - **Numbers.** Windows and detectors read one metric, `F64` or `I64`
//!   (as `f64`); a reading without it, or with another type, is skipped and
//!   counted.

mod custom;
mod devices;
mod filter;
mod threshold;
mod window;
mod zscore;

use std::time::Duration;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

use crate::reading::{Reading, Value};
pub use custom::{Custom, CustomStage};
pub use filter::{Filter, Map};
pub use threshold::{Direction, Threshold};
pub use window::{Aggregate, Window, WINDOWS_PER_READING_MAX};
pub use zscore::ZScore;

/// Devices a stage keeps state for unless told otherwise: the edge's goal is
/// 100k devices per node.
pub const DEVICES_MAX_DEFAULT: usize = 100_000;

/// `Duration::from_secs`, short enough to read well in a topology.
pub const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `Duration::from_millis`, short enough to read well in a topology.
pub const fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// What a detector noticed.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct Alert {
    pub device_id: String,
    /// The topology's name for the stage that raised it.
    pub stage: String,
    pub kind: AlertKind,
    pub metric: String,
    /// The value that raised it.
    pub value: f64,
    /// The event time of the reading that raised it, in microseconds since the Unix epoch.
    pub device_ts_us: i64,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertKind {
    ThresholdAbove,
    ThresholdBelow,
    ZScore,
    /// Raised by a user's [`CustomStage`].
    Custom(String),
}

impl Alert {
    /// The JSON form written into the alerts topic.
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys always serializes.
        serde_json::to_vec(self).expect("an alert always serializes to JSON")
    }
}

/// What a stage emits.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Reading(Reading),
    Alert(Alert),
}

impl Output {
    pub fn as_reading(&self) -> Option<&Reading> {
        match self {
            Output::Reading(r) => Some(r),
            Output::Alert(_) => None,
        }
    }

    pub fn as_alert(&self) -> Option<&Alert> {
        match self {
            Output::Alert(a) => Some(a),
            Output::Reading(_) => None,
        }
    }
}

/// What a stage's output carries; a topology checks that stages read readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Readings,
    Alerts,
    /// Either; what a custom stage may emit.
    Mixed,
}

/// What an operator has seen, for the dashboard and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageStats {
    pub readings_in: u64,
    pub readings_out: u64,
    pub alerts_out: u64,
    /// Readings older than their device's watermark: counted, not aggregated.
    pub late: u64,
    /// Readings without the stage's metric, or with a non-numeric value.
    pub skipped: u64,
    /// Detector readings older than their device's latest: counted, ignored.
    pub out_of_order: u64,
    pub devices_evicted: u64,
    /// Windows that held more than `window_readings_max` values, whose p95
    /// therefore came from a uniform sample rather than every value.
    pub windows_sampled: u64,
}

impl StageStats {
    fn count_outputs(&mut self, outputs: &[Output]) {
        for o in outputs {
            match o {
                Output::Reading(_) => self.readings_out += 1,
                Output::Alert(_) => self.alerts_out += 1,
            }
        }
    }
}

/// A running stage: the state behind one spec on one node.
pub trait Operator: Send {
    /// Takes one reading and returns what it caused, in order.
    fn handle(&mut self, reading: Reading) -> Vec<Output>;

    /// Moves every device's watermark to at least `watermark_us`, closing the
    /// windows it passes. The driver calls it when input is quiet (say, wall
    /// time minus a grace period), so that a silent device's last window is
    /// emitted; readings older than it become late.
    fn advance_watermark(&mut self, watermark_us: i64) -> Vec<Output> {
        let _ = watermark_us;
        Vec::new()
    }

    fn stats(&self) -> StageStats;

    /// The operator's state as bytes, for checkpoints (the edge gateway's,
    /// and the cloud stages' per partition); `None` when the operator cannot
    /// save it. Stateless operators save an empty state.
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }

    /// Takes back a state [`Operator::snapshot`] made, from a fresh
    /// operator of the same spec.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let _ = bytes;
        Err("this stage cannot restore a checkpoint".into())
    }

    /// Changes a parameter while running (a control call), keeping the
    /// stage's state. Stages that have none to change refuse.
    fn set_param(&mut self, param: &str, value: f64) -> Result<(), ParamError> {
        let _ = value;
        Err(ParamError::Unknown {
            param: param.to_owned(),
            known: "none",
        })
    }
}

/// Parameters a spec refuses, found before anything runs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("{param} is empty")]
    Empty { param: &'static str },
    #[error("{param} is zero")]
    Zero { param: &'static str },
    #[error("{param} is {got_ms} ms, more than the {max_ms} ms allowed")]
    DurationTooLong {
        param: &'static str,
        got_ms: u128,
        max_ms: u128,
    },
    #[error("{param} is {got}, which is not a finite number")]
    NotFinite { param: &'static str, got: f64 },
    #[error("{param} is {got}, but must be {expected}")]
    OutOfRange {
        param: &'static str,
        got: String,
        expected: &'static str,
    },
    #[error("the window's slide ({slide_ms} ms) is longer than its size ({size_ms} ms): readings between windows would be lost")]
    SlideLongerThanSize { slide_ms: u128, size_ms: u128 },
    #[error("each reading would fall in {got} sliding windows, more than the {WINDOWS_PER_READING_MAX} allowed: lengthen the slide")]
    TooManyWindowsPerReading { got: u128 },
    #[error("the window computes no aggregate: add count, mean, min, max or p95")]
    NoAggregates,
    #[error("this stage has no parameter {param:?} to change (it has: {known})")]
    Unknown { param: String, known: &'static str },
    #[error("a window aggregates one metric, but this one names {first:?} and {second:?}")]
    MixedMetrics { first: String, second: String },
}

/// The longest duration a stage accepts, so that microsecond arithmetic on
/// event times never overflows: about 292 years is what fits, a year is plenty.
const DURATION_MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// A duration in microseconds, refused if zero or too long.
fn duration_us(param: &'static str, d: Duration) -> Result<i64, ParamError> {
    if d > DURATION_MAX {
        return Err(ParamError::DurationTooLong {
            param,
            got_ms: d.as_millis(),
            max_ms: DURATION_MAX.as_millis(),
        });
    }
    let us = d.as_micros() as i64;
    if us == 0 {
        return Err(ParamError::Zero { param });
    }
    Ok(us)
}

fn nonzero(param: &'static str, n: usize) -> Result<(), ParamError> {
    if n == 0 {
        return Err(ParamError::Zero { param });
    }
    Ok(())
}

fn nonempty(param: &'static str, s: &str) -> Result<(), ParamError> {
    if s.is_empty() {
        return Err(ParamError::Empty { param });
    }
    Ok(())
}

fn finite(param: &'static str, v: f64) -> Result<(), ParamError> {
    if !v.is_finite() {
        return Err(ParamError::NotFinite { param, got: v });
    }
    Ok(())
}

/// The metric as a number, if the reading has it as one.
fn numeric(reading: &Reading, metric: &str) -> Option<f64> {
    number(reading.metric(metric)?)
}

/// Non-finite values are refused at the edge, but a cloud stage may read
/// data that never passed one.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::F64(v) if v.is_finite() => Some(*v),
        Value::I64(v) => Some(*v as f64),
        _ => None,
    }
}

/// Any stage, as a topology holds it.
#[derive(Clone)]
pub enum StageSpec {
    Filter(Filter),
    Map(Map),
    Window(Window),
    Threshold(Threshold),
    ZScore(ZScore),
    Custom(Custom),
}

impl StageSpec {
    pub fn validate(&self) -> Result<(), ParamError> {
        match self {
            StageSpec::Filter(_) | StageSpec::Map(_) | StageSpec::Custom(_) => Ok(()),
            StageSpec::Window(w) => w.validate().map(|_| ()),
            StageSpec::Threshold(t) => t.validate().map(|_| ()),
            StageSpec::ZScore(z) => z.validate().map(|_| ()),
        }
    }

    /// A fresh operator for the stage named `stage` (the name goes into its alerts).
    pub fn build(&self, stage: &str) -> Result<Box<dyn Operator>, ParamError> {
        Ok(match self {
            StageSpec::Filter(f) => Box::new(f.build()),
            StageSpec::Map(m) => Box::new(m.build()),
            StageSpec::Window(w) => Box::new(w.build()?),
            StageSpec::Threshold(t) => Box::new(t.build(stage)?),
            StageSpec::ZScore(z) => Box::new(z.build(stage)?),
            StageSpec::Custom(c) => Box::new(c.build()),
        })
    }

    /// The spec with one parameter changed, validated: what a control call
    /// applies, so that a restarted stage keeps the change.
    pub fn with_param(&self, param: &str, value: f64) -> Result<StageSpec, ParamError> {
        let spec = match self {
            StageSpec::Threshold(t) => StageSpec::Threshold(t.with_param(param, value)?),
            StageSpec::ZScore(z) => StageSpec::ZScore(z.with_param(param, value)?),
            _ => {
                return Err(ParamError::Unknown {
                    param: param.to_owned(),
                    known: "none",
                })
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn output(&self) -> StreamKind {
        match self {
            StageSpec::Filter(_) | StageSpec::Map(_) | StageSpec::Window(_) => StreamKind::Readings,
            StageSpec::Threshold(_) | StageSpec::ZScore(_) => StreamKind::Alerts,
            StageSpec::Custom(_) => StreamKind::Mixed,
        }
    }
}

impl std::fmt::Debug for StageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StageSpec::Filter(s) => s.fmt(f),
            StageSpec::Map(s) => s.fmt(f),
            StageSpec::Window(s) => s.fmt(f),
            StageSpec::Threshold(s) => s.fmt(f),
            StageSpec::ZScore(s) => s.fmt(f),
            StageSpec::Custom(s) => s.fmt(f),
        }
    }
}

macro_rules! into_spec {
    ($($t:ident),*) => {$(
        impl From<$t> for StageSpec {
            fn from(s: $t) -> Self {
                StageSpec::$t(s)
            }
        }
    )*};
}
into_spec!(Filter, Map, Window, Threshold, ZScore, Custom);
