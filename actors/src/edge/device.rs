//! Simulated devices: one actor per sensor, producing a configurable signal
//! (a sine with noise, plus occasional spikes) at a configured rate.
//!
//! A device sends one reading at a time to the gateway and waits for its
//! answer, so its mailbox never grows and a full outbox slows it down
//! (backpressure) instead of piling readings up in memory. A reading refused
//! as full is kept and retried: a simulated sensor that cannot deliver falls
//! behind, as a real one with a small buffer would. Each reading carries the
//! device's [`Origin`] (a nonce per incarnation and the reading's number), so
//! the gateway recognises a retry by its number, whatever its timestamp.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

use super::gateway::{GatewayMsg, Ingest, IngestReply, Origin};
use super::EdgeNames;
use crate::clock::SharedClock;
use crate::reading::{Metric, Reading, Value};

/// How long a device waits for the gateway's answer before it retries the
/// same reading (the gateway recognises the retry).
const INGEST_TIMEOUT_MS: u64 = 30_000;
/// How long a device waits before retrying after a refusal or an error.
const RETRY_MS: u64 = 50;

/// The shape of a simulated signal.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Signal {
    pub base: f64,
    pub amplitude: f64,
    pub period_s: f64,
    /// Half-width of the uniform noise added to each value.
    pub noise: f64,
    /// The chance that a reading is a spike.
    pub spike_probability: f64,
    pub spike_magnitude: f64,
    /// Makes each device's reading number N (from 1) a spike: an anomaly
    /// injected on purpose, for demos and tests. 0 for none.
    pub spike_at_reading: u64,
}

impl Default for Signal {
    fn default() -> Self {
        Self {
            base: 60.0,
            amplitude: 10.0,
            period_s: 60.0,
            noise: 0.5,
            spike_probability: 0.001,
            spike_magnitude: 40.0,
            spike_at_reading: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeviceArgs {
    pub device_id: String,
    pub interval_ms: u64,
    pub signal: Signal,
    pub seed: u64,
    /// Stops the device after this many accepted readings; 0 means never.
    /// A finite workload lets a test know when everything was sent.
    pub readings_max: u64,
    /// The topology source it belongs to, stamped on its readings.
    pub stream: Option<String>,
    /// Stops the device once its clock reaches this time (µs since the
    /// epoch), as `readings_max` stops it after a count; `None` for no end.
    pub stop_at_us: Option<i64>,
    /// Where the edge's gateway is registered.
    pub names: EdgeNames,
    /// Stamps the readings.
    pub clock: SharedClock,
}

pub enum DeviceMsg {
    Tick,
    /// Makes the device fail, to exercise its supervisor.
    Crash(String),
}

impl ractor::Message for DeviceMsg {}

#[derive(Clone, Default)]
pub struct SimulatedDevice;

pub struct DeviceState {
    args: DeviceArgs,
    rng: SmallRng,
    /// This incarnation's source nonce for the gateway.
    source: u64,
    pending: Option<Reading>,
    next_due: Instant,
    counter: i64,
    accepted: u64,
    last_ts_us: i64,
    started: Instant,
}

impl DeviceState {
    fn sample(&mut self) -> Reading {
        let s = &self.args.signal;
        let t = self.started.elapsed().as_secs_f64();
        let phase = if s.period_s > 0.0 {
            2.0 * std::f64::consts::PI * t / s.period_s
        } else {
            0.0
        };
        let mut v = s.base + s.amplitude * phase.sin();
        if s.noise > 0.0 {
            v += self.rng.random_range(-s.noise..=s.noise);
        }
        let injected = s.spike_at_reading > 0 && (self.counter + 1) as u64 == s.spike_at_reading;
        if injected || self.rng.random_bool(s.spike_probability.clamp(0.0, 1.0)) {
            v += s.spike_magnitude;
        }
        self.counter += 1;
        // Timestamps strictly grow per device, which makes (device, ts) a
        // reading's identity even across restarts.
        let ts = self.args.clock.now_us().max(self.last_ts_us + 1);
        self.last_ts_us = ts;
        Reading {
            device_id: self.args.device_id.clone(),
            device_ts_us: ts,
            edge_ts_us: 0,
            stream: self.args.stream.clone(),
            metrics: vec![
                Metric {
                    name: "temperature".into(),
                    value: Value::F64(v),
                    unit: Some("°C".into()),
                },
                Metric {
                    name: "n".into(),
                    value: Value::I64(self.counter),
                    unit: None,
                },
            ],
        }
    }
}

impl Actor for SimulatedDevice {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = DeviceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DeviceMsg>,
        args: DeviceArgs,
    ) -> Result<DeviceState, ActorProcessingErr> {
        if args.interval_ms == 0 {
            return Err("device interval_ms must be at least 1".into());
        }
        let mut rng = SmallRng::seed_from_u64(args.seed);
        // From the seeded generator, so that a simulation replays exactly.
        let source = rng.random();
        myself.send_message(DeviceMsg::Tick)?;
        Ok(DeviceState {
            args,
            rng,
            source,
            pending: None,
            next_due: Instant::now(),
            counter: 0,
            accepted: 0,
            last_ts_us: 0,
            started: Instant::now(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<DeviceMsg>,
        msg: DeviceMsg,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Crash(reason) => return Err(reason.into()),
            DeviceMsg::Tick => {}
        }
        if state.pending.is_none() {
            if let Some(stop_at) = state.args.stop_at_us {
                if state.args.clock.now_us() >= stop_at {
                    tracing::debug!(device = %state.args.device_id, "device reached its stop time");
                    myself.stop(None);
                    return Ok(());
                }
            }
            state.pending = Some(state.sample());
        }
        let ingest = Ingest {
            reading: state.pending.clone().expect("set above"),
            origin: Origin {
                source: state.source,
                n: state.counter as u64,
            },
        };
        let answer = match state.args.names.where_is_gateway() {
            Some(gateway) => {
                ractor::call_t!(gateway, GatewayMsg::Ingest, INGEST_TIMEOUT_MS, ingest).ok()
            }
            None => None,
        };
        let retry = match answer {
            Some(
                IngestReply::Committed { .. } | IngestReply::Duplicate | IngestReply::Consumed,
            ) => {
                state.accepted += 1;
                false
            }
            Some(IngestReply::Invalid(reason)) => {
                tracing::warn!(device = %state.args.device_id, %reason, "reading refused; skipped");
                false
            }
            Some(IngestReply::Full) | None => true,
        };
        if state.args.readings_max > 0 && state.accepted >= state.args.readings_max {
            tracing::debug!(device = %state.args.device_id, "device finished its readings");
            myself.stop(None);
            return Ok(());
        }
        let now = Instant::now();
        let next = if retry {
            now + Duration::from_millis(RETRY_MS.min(state.args.interval_ms))
        } else {
            state.pending = None;
            state.next_due += Duration::from_millis(state.args.interval_ms);
            // A device that fell behind does not burst to catch up.
            if state.next_due < now {
                state.next_due = now;
            }
            state.next_due
        };
        myself.send_after(next.saturating_duration_since(now), || DeviceMsg::Tick);
        Ok(())
    }
}
