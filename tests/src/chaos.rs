//! Real-process chaos: a cloud `node` and edge `node`s against a real Kafka, each edge
//! behind a seeded UDP fault proxy. One seed draws the fault schedule: partitions, loss,
//! delay, SIGKILL and restart, SIGSTOP and SIGCONT, of the edges and the cloud. After the
//! fault phase everything is healed, the devices finish, and the checker reads the
//! readings topic back `read_committed` and compares it with the edges' ack logs.
//!
//! The schedule is a pure function of the configuration ([`schedule`]), so a seed replays
//! the same faults at the same offsets; the system's timing around them still varies.

use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

use crate::checker::{check, consume_all, read_ack_logs, Report};
use crate::fixture::{Fixture, Workload};
use crate::proxy::UdpProxy;
use crate::HarnessError;

/// Pause before a fault, after the previous one was healed.
const GAP_MS: (u64, u64) = (500, 2_000);
/// How long a partition lasts: long enough, at its top, for QUIC's idle timeout.
const PARTITION_MS: (u64, u64) = (1_000, 6_000);
const LOSS_MS: (u64, u64) = (2_000, 6_000);
const LOSS_PERCENT: (u32, u32) = (5, 30);
const DELAY_MS: (u64, u64) = (2_000, 6_000);
/// Extra latency each way while a delay fault holds.
const DELAY_ADDED_MS: (u64, u64) = (50, 400);
/// How long a killed node stays down before its restart.
const DOWN_MS: (u64, u64) = (200, 3_000);
const STOP_MS: (u64, u64) = (1_000, 5_000);
/// A fault that would hold shorter than this before the phase ends is not drawn.
const HOLD_MS_MIN: u64 = 200;
/// Relative weights of the fault kinds, in the order of [`FaultKind::ALL_NAMES`].
const WEIGHTS: [u32; 7] = [3, 2, 2, 2, 1, 1, 1];

/// How often the ack logs are read while waiting for the devices.
const ACK_POLL_MS: u64 = 100;
/// Pause between two full reads of the topic while it drains.
const DRAIN_RETRY_MS: u64 = 500;
/// The last read of the topic, once the drain budget is spent, may take this long.
const FINAL_READ_MS: u64 = 15_000;

/// Bounds on the configuration, so that a typo cannot start a day-long run.
pub const EDGES_MAX: usize = 16;
pub const DEVICES_PER_EDGE_MAX: usize = 256;
pub const DURATION_S_MAX: u64 = 3_600;
pub const DRAIN_TIMEOUT_S_MAX: u64 = 3_600;
/// A simulated device waits for its reading's group commit (the fixture's 20 ms commit
/// interval plus the fsync, about 28 ms measured) before it sends the next, so it cannot
/// keep a shorter interval; its readings would then outlast the fault phase by far.
pub const INTERVAL_MS_MIN: u64 = 40;

/// One chaos run. [`Default`] is the CLI's default; `bootstrap` has no default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosConfig {
    /// Decides the whole fault schedule.
    pub seed: u64,
    /// Length of the fault phase.
    pub duration_s: u64,
    pub edges: usize,
    pub devices_per_edge: usize,
    /// Each simulated device sends one reading per interval.
    pub interval_ms: u64,
    /// After the heal, how long the devices may take to finish and Kafka to hold every
    /// acknowledged reading.
    pub drain_timeout_s: u64,
    /// Keep the nodes' logs, ack logs and outboxes even when the run passes.
    pub keep_logs: bool,
    /// Kafka bootstrap servers.
    pub bootstrap: String,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            duration_s: 60,
            edges: 2,
            devices_per_edge: 8,
            interval_ms: 50,
            drain_timeout_s: 60,
            keep_logs: false,
            bootstrap: String::new(),
        }
    }
}

impl ChaosConfig {
    /// The defaults against the broker at `bootstrap`.
    pub fn with_bootstrap(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), ChaosError> {
        let bad = |setting, problem: String| Err(ChaosError::Config { setting, problem });
        if self.duration_s == 0 || self.duration_s > DURATION_S_MAX {
            return bad("duration_s", format!("must be 1..={DURATION_S_MAX}"));
        }
        if self.edges == 0 || self.edges > EDGES_MAX {
            return bad("edges", format!("must be 1..={EDGES_MAX}"));
        }
        if self.devices_per_edge == 0 || self.devices_per_edge > DEVICES_PER_EDGE_MAX {
            return bad(
                "devices_per_edge",
                format!("must be 1..={DEVICES_PER_EDGE_MAX}"),
            );
        }
        if self.interval_ms < INTERVAL_MS_MIN {
            return bad(
                "interval_ms",
                format!("must be at least {INTERVAL_MS_MIN}: a device waits for its commit"),
            );
        }
        if self.drain_timeout_s == 0 || self.drain_timeout_s > DRAIN_TIMEOUT_S_MAX {
            return bad(
                "drain_timeout_s",
                format!("must be 1..={DRAIN_TIMEOUT_S_MAX}"),
            );
        }
        if self.bootstrap.trim().is_empty() {
            return bad(
                "bootstrap",
                format!("is empty: set {}", crate::broker::BOOTSTRAP_ENV),
            );
        }
        Ok(())
    }

    /// The command that replays this run: the seed and every flag not at its default.
    pub fn replay_command(&self) -> String {
        let d = Self::default();
        let mut cmd = format!(
            "cargo run -p tributary-tests --bin chaos -- --seed {}",
            self.seed
        );
        let flags: [(&str, u64, u64); 5] = [
            ("duration-s", self.duration_s, d.duration_s),
            ("edges", self.edges as u64, d.edges as u64),
            (
                "devices-per-edge",
                self.devices_per_edge as u64,
                d.devices_per_edge as u64,
            ),
            ("interval-ms", self.interval_ms, d.interval_ms),
            ("drain-timeout-s", self.drain_timeout_s, d.drain_timeout_s),
        ];
        for (flag, value, default) in flags {
            if value != default {
                cmd.push_str(&format!(" --{flag} {value}"));
            }
        }
        cmd
    }

    fn readings_per_device(&self, ms: u64) -> u64 {
        // 0 would mean "no end" to the node: a device sends at least one reading.
        (ms / self.interval_ms).max(1)
    }
}

/// The id of edge `i` (0-based) in a chaos run.
pub fn edge_id(i: usize) -> String {
    format!("edge-{}", i + 1)
}

/// What a fault does; `edge` indexes the run's edges from 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// The edge's proxy drops every datagram, both ways.
    Partition { edge: usize },
    /// The edge's proxy drops each datagram with this chance, drawn from `seed`.
    Loss {
        edge: usize,
        percent: u32,
        seed: u64,
    },
    /// The edge's proxy delays each datagram this much, each way.
    Delay { edge: usize, added_ms: u64 },
    /// SIGKILL of the edge; it restarts on the same outbox and ack log after the hold.
    KillEdge { edge: usize },
    /// SIGKILL of the cloud; it restarts after the hold.
    KillCloud,
    /// SIGSTOP of the edge; SIGCONT after the hold.
    StopEdge { edge: usize },
    /// SIGSTOP of the cloud; SIGCONT after the hold.
    StopCloud,
}

impl FaultKind {
    /// The kinds' names, in the order of the weights.
    pub const ALL_NAMES: [&'static str; 7] = [
        "partition",
        "loss",
        "delay",
        "kill-edge",
        "kill-cloud",
        "stop-edge",
        "stop-cloud",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Partition { .. } => "partition",
            FaultKind::Loss { .. } => "loss",
            FaultKind::Delay { .. } => "delay",
            FaultKind::KillEdge { .. } => "kill-edge",
            FaultKind::KillCloud => "kill-cloud",
            FaultKind::StopEdge { .. } => "stop-edge",
            FaultKind::StopCloud => "stop-cloud",
        }
    }

    pub fn is_kill(&self) -> bool {
        matches!(self, FaultKind::KillEdge { .. } | FaultKind::KillCloud)
    }

    pub fn is_stop(&self) -> bool {
        matches!(self, FaultKind::StopEdge { .. } | FaultKind::StopCloud)
    }
}

/// A fault of the schedule: applied `at_ms` after the fault phase starts, undone (healed,
/// restarted, continued) `hold_ms` after it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub at_ms: u64,
    pub hold_ms: u64,
    pub kind: FaultKind,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::Partition { edge } => write!(f, "partition {}", edge_id(*edge)),
            FaultKind::Loss {
                edge,
                percent,
                seed,
            } => write!(f, "{percent}% loss on {} (seed {seed})", edge_id(*edge)),
            FaultKind::Delay { edge, added_ms } => {
                write!(f, "{added_ms} ms delay each way on {}", edge_id(*edge))
            }
            FaultKind::KillEdge { edge } => write!(f, "SIGKILL {}", edge_id(*edge)),
            FaultKind::KillCloud => write!(f, "SIGKILL the cloud"),
            FaultKind::StopEdge { edge } => write!(f, "SIGSTOP {}", edge_id(*edge)),
            FaultKind::StopCloud => write!(f, "SIGSTOP the cloud"),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (at, hold) = (secs(self.at_ms), secs(self.hold_ms));
        if self.kind.is_kill() {
            write!(
                f,
                "at {at:.1} s: {}, restarted after {hold:.1} s",
                self.kind
            )
        } else if self.kind.is_stop() {
            write!(f, "at {at:.1} s: {}, SIGCONT after {hold:.1} s", self.kind)
        } else {
            write!(f, "at {at:.1} s: {} for {hold:.1} s", self.kind)
        }
    }
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn draw(rng: &mut SmallRng, (low, high): (u64, u64)) -> u64 {
    rng.random_range(low..=high)
}

/// The fault schedule of `cfg`: faults one after another over the fault phase, each
/// healed before the next starts, all drawn from `cfg.seed`.
pub fn schedule(cfg: &ChaosConfig) -> Vec<Fault> {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let phase_ms = cfg.duration_s.saturating_mul(1000);
    let edges = cfg.edges.max(1);
    let weight_total: u32 = WEIGHTS.iter().sum();
    let mut faults = Vec::new();
    let mut t = 0u64;
    loop {
        let at = t + draw(&mut rng, GAP_MS);
        let edge = rng.random_range(0..edges);
        let mut roll = rng.random_range(0..weight_total);
        let mut pick = 0;
        while roll >= WEIGHTS[pick] {
            roll -= WEIGHTS[pick];
            pick += 1;
        }
        let (kind, hold) = match pick {
            0 => (FaultKind::Partition { edge }, draw(&mut rng, PARTITION_MS)),
            1 => (
                FaultKind::Loss {
                    edge,
                    percent: rng.random_range(LOSS_PERCENT.0..=LOSS_PERCENT.1),
                    seed: rng.random(),
                },
                draw(&mut rng, LOSS_MS),
            ),
            2 => (
                FaultKind::Delay {
                    edge,
                    added_ms: draw(&mut rng, DELAY_ADDED_MS),
                },
                draw(&mut rng, DELAY_MS),
            ),
            3 => (FaultKind::KillEdge { edge }, draw(&mut rng, DOWN_MS)),
            4 => (FaultKind::KillCloud, draw(&mut rng, DOWN_MS)),
            5 => (FaultKind::StopEdge { edge }, draw(&mut rng, STOP_MS)),
            _ => (FaultKind::StopCloud, draw(&mut rng, STOP_MS)),
        };
        if at + HOLD_MS_MIN > phase_ms {
            return faults;
        }
        let hold_ms = hold.min(phase_ms - at);
        faults.push(Fault {
            at_ms: at,
            hold_ms,
            kind,
        });
        t = at + hold_ms;
    }
}

/// A fault as it was carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedFault {
    pub fault: Fault,
    /// When it was applied and undone, from the start of the fault phase.
    pub applied_ms: u64,
    pub undone_ms: u64,
    /// What happened: datagrams dropped, pids killed and started.
    pub detail: String,
}

/// Why a run failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Duplicated or reordered readings in the topic (see the report).
    NotExactlyOnce { duplicates: usize, reordered: usize },
    /// Acknowledged readings still not in the topic when the drain budget ran out.
    NotDrained { missing: usize, waited_ms: u64 },
    /// Kafka held every acknowledged reading, but only after the drain budget.
    DrainedLate { drain_ms: u64, budget_ms: u64 },
    /// An edge's devices had not finished their readings when the drain budget ran out.
    DevicesUnfinished {
        edge: String,
        acked: usize,
        expected: usize,
    },
    /// A node exited without being killed; it was restarted.
    Crashed {
        node: String,
        at_ms: u64,
        status: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotExactlyOnce {
                duplicates,
                reordered,
            } => write!(
                f,
                "not exactly once: {duplicates} duplicated, {reordered} out of order"
            ),
            Violation::NotDrained { missing, waited_ms } => write!(
                f,
                "{missing} acknowledged readings still missing from Kafka {:.1} s after the heal",
                secs(*waited_ms)
            ),
            Violation::DrainedLate {
                drain_ms,
                budget_ms,
            } => write!(
                f,
                "drained {:.1} s after the heal, over the budget of {:.1} s",
                secs(*drain_ms),
                secs(*budget_ms)
            ),
            Violation::DevicesUnfinished {
                edge,
                acked,
                expected,
            } => write!(
                f,
                "{edge}'s devices did not finish: {acked} of {expected} readings acknowledged"
            ),
            Violation::Crashed {
                node,
                at_ms,
                status,
            } => write!(
                f,
                "{node} exited on its own ({status}) at {:.1} s; restarted",
                secs(*at_ms)
            ),
        }
    }
}

/// The result of a chaos run that the harness completed.
#[derive(Debug, Clone)]
pub struct ChaosOutcome {
    pub config: ChaosConfig,
    pub faults: Vec<AppliedFault>,
    /// Readings the edges acknowledged to their devices (ack log lines `A`).
    pub acked: usize,
    /// Records in the readings topic (read_committed), and distinct readings among them.
    pub in_log: usize,
    pub distinct: usize,
    pub duplicates: usize,
    /// Acknowledged readings absent from the topic.
    pub missing: usize,
    pub reordered: usize,
    /// In the topic but never acknowledged: allowed, an edge killed before its ack.
    pub unacknowledged: usize,
    /// From the heal until every edge's devices had finished.
    pub devices_done_ms: Option<u64>,
    /// From the heal until the topic held every acknowledged reading.
    pub drain_ms: Option<u64>,
    /// Datagrams the proxies dropped over the run.
    pub datagrams_dropped: u64,
    pub report: Report,
    pub violations: Vec<Violation>,
    /// The run's directory (logs, ack logs, outboxes), kept when the run failed or
    /// `keep_logs` was set.
    pub logs_dir: Option<PathBuf>,
}

impl ChaosOutcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn replay_command(&self) -> String {
        self.config.replay_command()
    }

    /// How many faults of this kind (a [`FaultKind::ALL_NAMES`] entry) were carried out.
    pub fn count(&self, kind: &str) -> usize {
        self.faults
            .iter()
            .filter(|f| f.fault.kind.name() == kind)
            .count()
    }
}

impl fmt::Display for ChaosOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "chaos seed {}: {} ({} s of faults, {} edges x {} devices every {} ms)",
            c.seed,
            if self.passed() { "PASSED" } else { "FAILED" },
            c.duration_s,
            c.edges,
            c.devices_per_edge,
            c.interval_ms
        )?;
        let kinds: Vec<String> = FaultKind::ALL_NAMES
            .iter()
            .map(|k| format!("{k} {}", self.count(k)))
            .collect();
        writeln!(f, "  faults: {} ({})", self.faults.len(), kinds.join(", "))?;
        writeln!(
            f,
            "  readings: acked {}, in the log {} ({} distinct), duplicates {}, missing {}, \
             reordered {}, unacknowledged yet present {}",
            self.acked,
            self.in_log,
            self.distinct,
            self.duplicates,
            self.missing,
            self.reordered,
            self.unacknowledged
        )?;
        let after = |ms: Option<u64>| match ms {
            Some(ms) => format!("{:.1} s", secs(ms)),
            None => "never".into(),
        };
        let tail = match (self.devices_done_ms, self.drain_ms) {
            (Some(done), Some(drained)) => format!(
                ", {:.1} s after the devices finished",
                secs(drained.saturating_sub(done))
            ),
            _ => String::new(),
        };
        writeln!(
            f,
            "  after the heal: devices done in {}, drained in {}{tail} (budget {} s)",
            after(self.devices_done_ms),
            after(self.drain_ms),
            c.drain_timeout_s
        )?;
        writeln!(f, "  proxies dropped {} datagrams", self.datagrams_dropped)?;
        for v in &self.violations {
            writeln!(f, "  VIOLATION: {v}")?;
        }
        if !self.report.is_exactly_once() {
            write!(f, "{}", self.report)?;
        }
        if !self.passed() {
            writeln!(f, "  replay: {}", self.replay_command())?;
        }
        if let Some(dir) = &self.logs_dir {
            writeln!(f, "  logs: {}", dir.display())?;
        }
        Ok(())
    }
}

/// The harness could not complete the run: nothing was concluded about the system.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("invalid chaos setting {setting}: {problem}")]
    Config {
        setting: &'static str,
        problem: String,
    },
    #[error("harness failure while {step}: {source}\n  replay: {replay}{}", logs_note(.logs))]
    Harness {
        step: String,
        #[source]
        source: Box<HarnessError>,
        replay: String,
        logs: Option<PathBuf>,
    },
    #[error("the harness panicked while {step}: {message}\n  replay: {replay}{}", logs_note(.logs))]
    HarnessPanicked {
        step: String,
        message: String,
        replay: String,
        logs: Option<PathBuf>,
    },
}

fn logs_note(logs: &Option<PathBuf>) -> String {
    logs.as_ref()
        .map(|d| format!("\n  logs: {}", d.display()))
        .unwrap_or_default()
}

/// What the run is doing, for the error when the fixture panics.
#[derive(Default)]
struct Tracker {
    step: String,
    logs: Option<PathBuf>,
}

type Shared = Arc<Mutex<Tracker>>;

fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Tracker> {
    // A poisoned lock only means the run panicked; the tracker is still readable.
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Aborts the run's task when the caller stops waiting for it, which drops the fixture
/// and so kills the nodes.
struct AbortOnDrop(tokio::task::JoinHandle<Result<ChaosOutcome, ChaosError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the chaos scenario of `cfg`. `progress` receives a line per step and per fault
/// as it happens. An invariant violation is a [`ChaosOutcome`] that did not pass; an
/// error means the harness itself failed.
///
/// The fixture panics on harness failures; the run is a task of its own so that such a
/// panic becomes [`ChaosError::HarnessPanicked`] and the nodes are killed.
pub async fn run_chaos<P>(cfg: ChaosConfig, progress: P) -> Result<ChaosOutcome, ChaosError>
where
    P: FnMut(&str) + Send + 'static,
{
    cfg.validate()?;
    let tracker: Shared = Arc::default();
    let mut task = AbortOnDrop(tokio::spawn(run(cfg.clone(), progress, tracker.clone())));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) => {
            let message = if e.is_panic() {
                panic_message(e.into_panic())
            } else {
                e.to_string()
            };
            let t = lock(&tracker);
            Err(ChaosError::HarnessPanicked {
                step: t.step.clone(),
                message,
                replay: cfg.replay_command(),
                logs: t.logs.clone(),
            })
        }
    }
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "a panic without a message".into()),
    }
}

/// The current process of an edge: acknowledged readings before it started, and what
/// its devices send, so that the run knows when they are done.
#[derive(Debug, Clone, Copy)]
struct EdgeRun {
    acked_before: usize,
    readings_per_device: u64,
}

struct Run<P> {
    cfg: ChaosConfig,
    f: Fixture,
    progress: P,
    tracker: Shared,
    /// Start and end of the fault phase.
    t0: Instant,
    phase_end: Instant,
    runs: Vec<EdgeRun>,
    violations: Vec<Violation>,
    /// Datagrams dropped by the proxies of edge processes that were replaced.
    retired_dropped: u64,
}

async fn run<P>(cfg: ChaosConfig, progress: P, tracker: Shared) -> Result<ChaosOutcome, ChaosError>
where
    P: FnMut(&str) + Send + 'static,
{
    let plan = schedule(&cfg);
    lock(&tracker).step = "creating the certificates".into();
    let ids: Vec<String> = (0..cfg.edges).map(edge_id).collect();
    let bootstrap = cfg.bootstrap.clone();
    // Fixture::new runs `node certs` synchronously.
    let mut f = match tokio::task::spawn_blocking(move || {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        Fixture::new("chaos", &bootstrap, &ids)
    })
    .await
    {
        Ok(f) => f,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => {
            return Err(ChaosError::HarnessPanicked {
                step: "creating the certificates".into(),
                message: e.to_string(),
                replay: cfg.replay_command(),
                logs: None,
            })
        }
    };
    // Kept until the run is known to have passed, so a panic leaves the logs behind.
    f.dir.disable_cleanup(true);
    lock(&tracker).logs = Some(f.dir.path().to_owned());
    let now = Instant::now();
    let mut r = Run {
        runs: vec![
            EdgeRun {
                acked_before: 0,
                readings_per_device: cfg.readings_per_device(cfg.duration_s * 1000),
            };
            cfg.edges
        ],
        cfg,
        f,
        progress,
        tracker,
        t0: now,
        phase_end: now,
        violations: Vec::new(),
        retired_dropped: 0,
    };
    r.say(&format!(
        "chaos seed {}: {} faults planned over {} s; topic {}; files in {}",
        r.cfg.seed,
        plan.len(),
        r.cfg.duration_s,
        r.f.topic,
        r.f.dir.path().display()
    ));
    r.start().await?;
    let mut applied = Vec::with_capacity(plan.len());
    for fault in &plan {
        applied.push(r.carry_out(fault).await?);
    }
    tokio::time::sleep_until(r.phase_end).await;
    r.reap_crashes().await?;
    r.finish(applied).await
}

impl<P: FnMut(&str)> Run<P> {
    fn ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.t0)
            .as_millis() as u64
    }

    fn say(&mut self, line: &str) {
        let at = secs(self.ms());
        (self.progress)(&format!("[{at:>7.2} s] {line}"));
    }

    fn step(&self, step: impl Into<String>) {
        lock(&self.tracker).step = step.into();
    }

    fn harness(&self, step: &str) -> impl FnOnce(HarnessError) -> ChaosError {
        let (step, replay, logs) = (
            step.to_owned(),
            self.cfg.replay_command(),
            Some(self.f.dir.path().to_owned()),
        );
        move |source| ChaosError::Harness {
            step,
            source: Box::new(source),
            replay,
            logs,
        }
    }

    fn proxy(&self, edge: usize) -> &UdpProxy {
        self.f.edges[edge]
            .proxy
            .as_ref()
            .expect("every chaos edge is proxied at its start")
    }

    async fn start(&mut self) -> Result<(), ChaosError> {
        let setup_started = Instant::now();
        self.step("starting the cloud");
        self.f.start_cloud().await;
        let workload = Workload {
            devices: self.cfg.devices_per_edge,
            rate_hz: 1000.0 / self.cfg.interval_ms as f64,
            readings: self.runs[0].readings_per_device,
        };
        for i in 0..self.cfg.edges {
            self.step(format!("starting {}", edge_id(i)));
            self.f.proxy_edge(i).await;
            self.f.workload(i, &workload);
            self.f.edges[i].start();
        }
        for i in 0..self.cfg.edges {
            self.step(format!("waiting for {} to stream", edge_id(i)));
            self.f.edges[i].wait_log("uplink streaming").await;
        }
        self.t0 = Instant::now();
        self.phase_end = self.t0 + Duration::from_secs(self.cfg.duration_s);
        let setup = self.t0.saturating_duration_since(setup_started);
        self.say(&format!(
            "cloud and {} edges streaming after {:.1} s of setup; fault phase starts",
            self.cfg.edges,
            setup.as_secs_f64()
        ));
        Ok(())
    }

    /// Applies a fault at its time, holds it, undoes it.
    async fn carry_out(&mut self, fault: &Fault) -> Result<AppliedFault, ChaosError> {
        tokio::time::sleep_until(self.t0 + Duration::from_millis(fault.at_ms)).await;
        self.reap_crashes().await?;
        self.step(format!("applying {fault}"));
        let applied_ms = self.ms();
        let hold = Duration::from_millis(fault.hold_ms);
        let detail = match &fault.kind {
            FaultKind::Partition { edge } => {
                self.hold_on_proxy(fault, *edge, UdpProxy::cut, UdpProxy::heal)
                    .await
            }
            FaultKind::Loss {
                edge,
                percent,
                seed,
            } => {
                let (p, seed) = (f64::from(*percent) / 100.0, *seed);
                let apply = move |x: &UdpProxy| x.set_loss(p, seed);
                self.hold_on_proxy(fault, *edge, apply, |x| x.set_loss(0.0, 0))
                    .await
            }
            FaultKind::Delay { edge, added_ms } => {
                let ms = *added_ms;
                let apply = move |x: &UdpProxy| x.set_delay(ms);
                self.hold_on_proxy(fault, *edge, apply, |x| x.set_delay(0))
                    .await
            }
            FaultKind::KillEdge { edge } => {
                let edge = *edge;
                let pid = self.kill_edge(edge)?;
                self.say(&format!(
                    "{} (pid {pid}); restart in {:.1} s",
                    fault.kind,
                    secs(fault.hold_ms)
                ));
                tokio::time::sleep(hold).await;
                let new_pid = self.restart_edge(edge).await?;
                format!("pid {pid} killed, restarted as pid {new_pid}")
            }
            FaultKind::KillCloud => {
                let pid = self.f.cloud().pid();
                self.f
                    .cloud()
                    .kill9()
                    .map_err(self.harness("killing the cloud"))?;
                self.say(&format!(
                    "{} (pid {pid}); restart in {:.1} s",
                    fault.kind,
                    secs(fault.hold_ms)
                ));
                tokio::time::sleep(hold).await;
                self.step("restarting the cloud");
                self.f.start_cloud().await;
                format!(
                    "pid {pid} killed, restarted as pid {}",
                    self.f.cloud().pid()
                )
            }
            FaultKind::StopEdge { edge } => {
                let edge = *edge;
                let pid = self.f.edges[edge].process().pid();
                let step = format!("freezing {}", edge_id(edge));
                self.f.edges[edge]
                    .process()
                    .sigstop()
                    .map_err(self.harness(&step))?;
                self.say(&format!(
                    "{} (pid {pid}) for {:.1} s",
                    fault.kind,
                    secs(fault.hold_ms)
                ));
                tokio::time::sleep(hold).await;
                let step = format!("thawing {}", edge_id(edge));
                self.f.edges[edge]
                    .process()
                    .sigcont()
                    .map_err(self.harness(&step))?;
                format!("pid {pid} stopped and continued")
            }
            FaultKind::StopCloud => {
                let pid = self.f.cloud().pid();
                self.f
                    .cloud()
                    .sigstop()
                    .map_err(self.harness("freezing the cloud"))?;
                self.say(&format!(
                    "{} (pid {pid}) for {:.1} s",
                    fault.kind,
                    secs(fault.hold_ms)
                ));
                tokio::time::sleep(hold).await;
                self.f
                    .cloud()
                    .sigcont()
                    .map_err(self.harness("thawing the cloud"))?;
                format!("pid {pid} stopped and continued")
            }
        };
        let undone_ms = self.ms();
        self.say(&format!("  undone: {detail}"));
        Ok(AppliedFault {
            fault: fault.clone(),
            applied_ms,
            undone_ms,
            detail,
        })
    }

    /// Applies a proxy fault to an edge's path, holds it, undoes it; says what it dropped.
    async fn hold_on_proxy(
        &mut self,
        fault: &Fault,
        edge: usize,
        apply: impl FnOnce(&UdpProxy),
        undo: impl FnOnce(&UdpProxy),
    ) -> String {
        let dropped_before = self.proxy(edge).stats().dropped;
        apply(self.proxy(edge));
        self.say(&format!("{} for {:.1} s", fault.kind, secs(fault.hold_ms)));
        tokio::time::sleep(Duration::from_millis(fault.hold_ms)).await;
        undo(self.proxy(edge));
        let dropped = self.proxy(edge).stats().dropped - dropped_before;
        format!("{dropped} datagrams dropped")
    }

    fn datagrams_dropped(&self) -> u64 {
        let current: u64 = self
            .f
            .edges
            .iter()
            .filter_map(|e| e.proxy.as_ref())
            .map(|p| p.stats().dropped)
            .sum();
        self.retired_dropped + current
    }

    /// SIGKILLs an edge and returns its pid.
    fn kill_edge(&mut self, edge: usize) -> Result<u32, ChaosError> {
        let step = format!("killing {}", edge_id(edge));
        let process = self.f.edges[edge].process();
        let pid = process.pid();
        process.kill9().map_err(self.harness(&step))?;
        Ok(pid)
    }

    /// Starts an edge again on its outbox and ack log, its devices sending until the end
    /// of the fault phase; returns its pid.
    ///
    /// The edge gets a fresh proxy: a proxy serves at most `CLIENTS_MAX` client addresses
    /// and each edge process is one more, which a long run would exhaust.
    async fn restart_edge(&mut self, edge: usize) -> Result<u32, ChaosError> {
        let step = format!("restarting {}", edge_id(edge));
        self.step(step.clone());
        let ack_log = self.f.edges[edge].ack_log.clone();
        repair_torn_ack_log(&ack_log).map_err(self.harness(&step))?;
        let acked_before = acked_in(&ack_log).map_err(self.harness(&step))?;
        let (proxy, addr) = UdpProxy::start(self.f.cloud_addr)
            .await
            .map_err(self.harness(&step))?;
        let e = &mut self.f.edges[edge];
        if let Some(old) = e.proxy.replace(proxy) {
            self.retired_dropped += old.stats().dropped;
        }
        e.set("cloud-addr", &addr.to_string());
        let left_ms = self
            .phase_end
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let readings_per_device = self.cfg.readings_per_device(left_ms);
        self.f.edges[edge].set("device-readings-max", &readings_per_device.to_string());
        self.f.edges[edge].start();
        self.runs[edge] = EdgeRun {
            acked_before,
            readings_per_device,
        };
        Ok(self.f.edges[edge].process().pid())
    }

    /// Restarts any node that exited without being killed, and records it.
    async fn reap_crashes(&mut self) -> Result<(), ChaosError> {
        let status = match self.f.cloud.as_mut() {
            Some(c) => c.exited().map_err(self.harness("checking the cloud"))?,
            None => None,
        };
        if let Some(status) = status {
            let at_ms = self.ms();
            self.violations.push(Violation::Crashed {
                node: "cloud-1".into(),
                at_ms,
                status: status.to_string(),
            });
            self.say(&format!("cloud-1 exited on its own ({status}); restarting"));
            self.step("restarting the cloud after its crash");
            self.f.start_cloud().await;
        }
        for i in 0..self.cfg.edges {
            let step = format!("checking {}", edge_id(i));
            let status = match self.f.edges[i].process.as_mut() {
                Some(p) => p.exited().map_err(self.harness(&step))?,
                None => None,
            };
            if let Some(status) = status {
                let at_ms = self.ms();
                self.violations.push(Violation::Crashed {
                    node: edge_id(i),
                    at_ms,
                    status: status.to_string(),
                });
                self.say(&format!(
                    "{} exited on its own ({status}); restarting",
                    edge_id(i)
                ));
                self.restart_edge(i).await?;
            }
        }
        Ok(())
    }

    /// The liveness phase and the check: heal, wait for the devices and the drain, read
    /// the topic back.
    async fn finish(mut self, faults: Vec<AppliedFault>) -> Result<ChaosOutcome, ChaosError> {
        for i in 0..self.cfg.edges {
            let p = self.proxy(i);
            p.heal();
            p.set_loss(0.0, 0);
            p.set_delay(0);
        }
        let healed = Instant::now();
        let budget = Duration::from_secs(self.cfg.drain_timeout_s);
        let deadline = healed + budget;
        self.say("fault phase over, all healed; waiting for the devices to finish");

        self.step("waiting for the devices to finish");
        let mut devices_done_ms = Some(0);
        for i in 0..self.cfg.edges {
            loop {
                self.reap_crashes().await?;
                let run = self.runs[i];
                let expected =
                    run.acked_before + self.cfg.devices_per_edge * run.readings_per_device as usize;
                let step = format!("reading {}'s ack log", edge_id(i));
                let acked = acked_in(&self.f.edges[i].ack_log).map_err(self.harness(&step))?;
                if acked >= expected {
                    break;
                }
                if Instant::now() >= deadline {
                    self.violations.push(Violation::DevicesUnfinished {
                        edge: edge_id(i),
                        acked,
                        expected,
                    });
                    devices_done_ms = None;
                    break;
                }
                // The ack log is a file another process appends to: poll it.
                tokio::time::sleep(Duration::from_millis(ACK_POLL_MS)).await;
            }
        }
        let devices_done_ms = devices_done_ms.map(|_| healed.elapsed().as_millis() as u64);
        if let Some(ms) = devices_done_ms {
            self.say(&format!(
                "devices done {:.1} s after the heal; waiting for Kafka to hold every acknowledged reading",
                secs(ms)
            ));
        }

        self.step("reading the topic back (read_committed)");
        let (report, drain_ms) = self.drain(deadline).await?;
        let drain_ms = drain_ms.map(|at| at.saturating_duration_since(healed).as_millis() as u64);
        match drain_ms {
            None => self.violations.push(Violation::NotDrained {
                missing: report.lost.len(),
                waited_ms: healed.elapsed().as_millis() as u64,
            }),
            // The final read may find the topic complete after the budget ran out.
            Some(ms) if ms > budget.as_millis() as u64 => {
                self.violations.push(Violation::DrainedLate {
                    drain_ms: ms,
                    budget_ms: budget.as_millis() as u64,
                })
            }
            Some(_) => {}
        }
        if !report.duplicated.is_empty() || !report.out_of_order.is_empty() {
            self.violations.push(Violation::NotExactlyOnce {
                duplicates: report.duplicated.len(),
                reordered: report.out_of_order.len(),
            });
        }

        let datagrams_dropped = self.datagrams_dropped();
        // Stop the nodes before deciding what happens to their directory.
        self.f.cloud = None;
        for e in &mut self.f.edges {
            e.process = None;
        }
        let passed = self.violations.is_empty();
        let logs_dir = if passed && !self.cfg.keep_logs {
            self.f.dir.disable_cleanup(false);
            None
        } else {
            Some(self.f.dir.path().to_owned())
        };
        let outcome = ChaosOutcome {
            faults,
            acked: report.acked,
            in_log: report.consumed,
            distinct: report.distinct,
            duplicates: report.duplicated.len(),
            missing: report.lost.len(),
            reordered: report.out_of_order.len(),
            unacknowledged: report.unexpected.len(),
            devices_done_ms,
            drain_ms,
            datagrams_dropped,
            report,
            violations: self.violations.clone(),
            logs_dir,
            config: self.cfg.clone(),
        };
        if !passed {
            self.say(&format!(
                "FAILED (seed {}); replay: {}",
                self.cfg.seed,
                self.cfg.replay_command()
            ));
        }
        Ok(outcome)
    }

    /// Reads the topic until it holds every acknowledged reading or `deadline` passes;
    /// returns the last report and when the topic was complete.
    async fn drain(&mut self, deadline: Instant) -> Result<(Report, Option<Instant>), ChaosError> {
        let paths: Vec<PathBuf> = self.f.edges.iter().map(|e| e.ack_log.clone()).collect();
        loop {
            let acks = read_ack_logs(&paths).map_err(self.harness("reading the ack logs"))?;
            let expected = acks.acked.len() - acks.dropped.intersection(&acks.acked).count();
            let now = Instant::now();
            let past_deadline = now >= deadline;
            let wait = if past_deadline {
                Duration::from_millis(FINAL_READ_MS)
            } else {
                deadline - now
            };
            let consumed = match consume_all(&self.f.bootstrap, &self.f.topic, expected, wait).await
            {
                Ok(c) => c,
                // Partitions that never reached their end (a transaction left open): the
                // topic is not complete, which the next round or the verdict reports.
                Err(HarnessError::Timeout { .. }) if !past_deadline => continue,
                Err(HarnessError::Timeout { .. }) => {
                    let report = check(&[], &acks);
                    return Ok((report, None));
                }
                Err(e) => return Err(self.harness("reading the topic back")(e)),
            };
            let report = check(&consumed, &acks);
            if report.lost.is_empty() {
                return Ok((report, Some(Instant::now())));
            }
            if past_deadline || Instant::now() >= deadline {
                return Ok((report, None));
            }
            tokio::time::sleep(Duration::from_millis(DRAIN_RETRY_MS)).await;
        }
    }
}

/// Acknowledged readings in an ack log; none if the edge has not created it yet.
fn acked_in(path: &Path) -> Result<usize, HarnessError> {
    if !path.exists() {
        return Ok(0);
    }
    Ok(read_ack_logs([path])?.acked.len())
}

/// Cuts an ack log back to its last complete line. A SIGKILL can land between two writes
/// of one line; the restarted edge would append to the torn line and garble both. The
/// torn reading was never acknowledged to its device (the ack follows the log write).
fn repair_torn_ack_log(path: &Path) -> Result<(), HarnessError> {
    let err = |source| HarnessError::AckLogRead {
        path: path.to_owned(),
        source,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(err)?;
        file.set_len(complete as u64).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: u64, duration_s: u64) -> ChaosConfig {
        ChaosConfig {
            seed,
            duration_s,
            ..ChaosConfig::with_bootstrap("127.0.0.1:9092")
        }
    }

    #[test]
    fn a_seed_decides_the_schedule() {
        let a = schedule(&cfg(7, 60));
        assert_eq!(a, schedule(&cfg(7, 60)));
        assert_ne!(a, schedule(&cfg(8, 60)));
        assert!(a.len() >= 5, "{a:?}");
    }

    #[test]
    fn faults_fit_the_phase_one_after_another() {
        for seed in 0..200 {
            let c = cfg(seed, 25);
            let faults = schedule(&c);
            let mut end = 0;
            for f in &faults {
                assert!(f.at_ms >= end + GAP_MS.0, "seed {seed}: {f} overlaps");
                assert!(f.hold_ms >= HOLD_MS_MIN);
                end = f.at_ms + f.hold_ms;
                assert!(end <= 25_000, "seed {seed}: {f} outlasts the phase");
                match f.kind {
                    FaultKind::Partition { edge }
                    | FaultKind::Loss { edge, .. }
                    | FaultKind::Delay { edge, .. }
                    | FaultKind::KillEdge { edge }
                    | FaultKind::StopEdge { edge } => assert!(edge < c.edges),
                    FaultKind::KillCloud | FaultKind::StopCloud => {}
                }
            }
        }
    }

    #[test]
    fn every_kind_is_drawn() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..50 {
            seen.extend(schedule(&cfg(seed, 60)).iter().map(|f| f.kind.name()));
        }
        assert_eq!(seen.len(), FaultKind::ALL_NAMES.len(), "{seen:?}");
    }

    #[test]
    fn replay_names_the_seed_and_changed_flags_only() {
        let mut c = cfg(42, 60);
        assert_eq!(
            c.replay_command(),
            "cargo run -p tributary-tests --bin chaos -- --seed 42"
        );
        c.duration_s = 25;
        c.edges = 3;
        assert_eq!(
            c.replay_command(),
            "cargo run -p tributary-tests --bin chaos -- --seed 42 --duration-s 25 --edges 3"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let mut c = cfg(1, 0);
        assert!(matches!(
            c.validate(),
            Err(ChaosError::Config {
                setting: "duration_s",
                ..
            })
        ));
        c.duration_s = 10;
        c.interval_ms = 0;
        assert!(matches!(
            c.validate(),
            Err(ChaosError::Config {
                setting: "interval_ms",
                ..
            })
        ));
        c.interval_ms = 50;
        c.bootstrap = " ".into();
        assert!(c.validate().is_err());
        c.bootstrap = "127.0.0.1:9092".into();
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_torn_last_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("edge.acks");
        std::fs::write(&log, "A d 1\nA d 2\nA d").unwrap();
        repair_torn_ack_log(&log).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "A d 1\nA d 2\n");
        repair_torn_ack_log(&log).unwrap();
        assert_eq!(acked_in(&log).unwrap(), 2);
        repair_torn_ack_log(&dir.path().join("missing")).unwrap();
        assert_eq!(acked_in(&dir.path().join("missing")).unwrap(), 0);
    }
}
