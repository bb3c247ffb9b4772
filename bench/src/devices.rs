//! `bench devices`: memory per idle device actor, against a bare ractor actor.
//!
//! The goal is 100k device actors on one edge in at most 512 MB. Each kind
//! of actor is measured in a fresh child process (this binary, hidden
//! subcommand `devices-child`), because memory freed by one kind would
//! otherwise be reused by the next and hide its cost. The child starts a
//! tokio runtime as the node does, takes its RSS and the allocator's bytes
//! in use, spawns N actors, waits until they are idle, and takes both again.
//!
//! The kinds:
//! - `bare`, the baseline: an actor with no state and no arguments, unnamed,
//!   spawned linked to a parent as the MQTT source spawns its devices: the
//!   floor of what ractor itself costs per actor;
//! - `mqtt`: what the MQTT source keeps per device, which is no actor but
//!   an entry in its core's device table (figures and what is in flight),
//!   plus the redelivery record of its message's packet id (at most 65,535
//!   in all): one message per device (ids of 16 bytes) received, made
//!   durable and acknowledged;
//! - `simulated`: [`SimulatedDevice`] under the project's `Supervisor`, as
//!   `start_edge` runs them (registered under `device/<id>`, one `ChildSpec`
//!   each), after its first reading went to a stub gateway that acknowledges
//!   at once; it then waits on a one-hour timer;
//! - `tokio-task`: a tokio task awaiting a oneshot, for scale: what a task
//!   and a channel cost without ractor.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Notify;
use tributary_actors::edge::device::{DeviceArgs, Signal, SimulatedDevice};
use tributary_actors::edge::gateway::{GatewayMsg, IngestReply, SourceAnswer};
use tributary_actors::edge::mqtt::core::{Message, MqttCore};
use tributary_actors::edge::mqtt::MqttConfig;
use tributary_actors::edge::{EdgeNames, GATEWAY_NAME};
use tributary_actors::supervision::{ChildSpec, Restart, Strategy, Supervisor, SupervisorArgs};

use crate::stats::{median, thousands};

/// The simulated devices' interval: long enough that none ticks again
/// while memory is taken.
const SIMULATED_INTERVAL_MS: u64 = 3_600_000;
/// Bound on the simulated devices' first readings reaching the stub gateway.
const FIRST_READINGS_TIMEOUT_MS: u64 = 300_000;
/// Bound on one child process.
const CHILD_TIMEOUT_MS: u64 = 600_000;
/// How long the spawned actors are left before memory is taken: the
/// processing loops' first polls and the allocator's deferred frees happen
/// in it; nothing signals their end.
const SETTLE_MS: u64 = 500;
/// The prefix of the child's one result line on stdout.
const RESULT_PREFIX: &str = "DEVICES-RESULT ";
/// Megabytes as the goal counts them (10^6 bytes, the stricter reading).
const MB: f64 = 1e6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Bare,
    Mqtt,
    Simulated,
    TokioTask,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Bare => "bare ractor actor (empty state), linked",
            Kind::Mqtt => "MQTT device: an entry in the source's core (no actor)",
            Kind::Simulated => "SimulatedDevice under the Supervisor, named",
            Kind::TokioTask => "tokio task awaiting a oneshot (no ractor)",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Kind::Bare => "bare",
            Kind::Mqtt => "mqtt",
            Kind::Simulated => "simulated",
            Kind::TokioTask => "tokio-task",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DevicesOpts {
    pub count: usize,
    pub runs: usize,
    pub kinds: Vec<Kind>,
    pub budget_mb: f64,
}

/// What one child measured.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Sample {
    rss_before: u64,
    rss_after: u64,
    heap_before: u64,
    heap_after: u64,
    spawn_ms: f64,
}

/// The process's resident set, in bytes.
pub(crate) fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

/// Bytes glibc's malloc has handed out and not got back, over all arenas
/// (mmapped blocks included): the heap without the allocator's slack.
fn heap_bytes() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

#[derive(Clone, Default)]
struct Bare;

impl Actor for Bare {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

/// Stands in for the gateway: acknowledges every reading at once and counts them.
struct StubGateway;

struct StubGatewayArgs {
    ingested: Arc<AtomicU64>,
    notify: Arc<Notify>,
}

impl Actor for StubGateway {
    type Msg = GatewayMsg;
    type State = StubGatewayArgs;
    type Arguments = StubGatewayArgs;

    async fn pre_start(
        &self,
        _: ActorRef<GatewayMsg>,
        args: StubGatewayArgs,
    ) -> Result<StubGatewayArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<GatewayMsg>,
        msg: GatewayMsg,
        state: &mut StubGatewayArgs,
    ) -> Result<(), ActorProcessingErr> {
        if let GatewayMsg::Ingest(_, reply) = msg {
            let _ = reply.send(IngestReply::Committed { seq: 1 });
            state.ingested.fetch_add(1, Ordering::Relaxed);
            state.notify.notify_one();
        }
        Ok(())
    }
}

/// Device ids of 16 bytes, as an edge's might be.
fn device_id(i: usize) -> String {
    format!("plant-a-dev-{i:04}")
}

/// What a child keeps alive until memory is taken.
#[allow(dead_code)]
enum Alive {
    Bare(ActorRef<()>, Vec<ActorRef<()>>),
    Mqtt(Box<MqttCore<()>>),
    Simulated(
        ActorRef<GatewayMsg>,
        ActorRef<tributary_actors::supervision::SupervisorMsg>,
    ),
    Tasks(
        Vec<tokio::sync::oneshot::Sender<()>>,
        Vec<tokio::task::JoinHandle<()>>,
    ),
}

async fn spawn_kind(kind: Kind, count: usize) -> Result<(Alive, Sample)> {
    // The parents and stubs exist before the first measure: they are the
    // edge's, not the devices'.
    let ingested = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(Notify::new());
    let (bare_parent, _source, gateway): (_, Option<()>, _) = match kind {
        Kind::Bare => (Some(Actor::spawn(None, Bare, ()).await?.0), None, None),
        Kind::Mqtt => (None, None, None),
        Kind::Simulated => {
            let args = StubGatewayArgs {
                ingested: ingested.clone(),
                notify: notify.clone(),
            };
            let (g, _) = Actor::spawn(Some(GATEWAY_NAME.to_string()), StubGateway, args).await?;
            (None, None, Some(g))
        }
        Kind::TokioTask => (None, None, None),
    };
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let rss_before = rss_bytes();
    let heap_before = heap_bytes();
    let start = Instant::now();
    let alive = match kind {
        Kind::Bare => {
            let parent = bare_parent.context("the bare parent")?;
            let mut children = Vec::with_capacity(count);
            for _ in 0..count {
                let (a, _) = Actor::spawn_linked(None, Bare, (), parent.get_cell()).await?;
                children.push(a);
            }
            Alive::Bare(parent, children)
        }
        Kind::Mqtt => {
            let config = MqttConfig::new("127.0.0.1", 1883, "bench-edge", "p/+/t")?;
            let mut core: MqttCore<()> = MqttCore::new(config, &[]);
            core.handle_connected(1, false);
            let now = Instant::now();
            for i in 0..count {
                let message = Message {
                    pkid: (i % 65_535 + 1) as u16,
                    acked: true,
                    dup: false,
                    retain: false,
                    topic: format!("p/{}/t", device_id(i)),
                    payload: bytes::Bytes::from_static(br#"{"ts": 1700000000000, "v": 1.5}"#),
                };
                core.handle_publish(now, 0, 1, message, ());
                while let Some(f) = core.poll_forward(now) {
                    let through_n = f.first_n + f.items.len() as u64 - 1;
                    core.handle_answer(now, SourceAnswer::Durable { through_n });
                }
                while core.poll_ack().is_some() {}
            }
            Alive::Mqtt(Box::new(core))
        }
        Kind::Simulated => {
            let gateway = gateway.context("the stub gateway")?;
            let specs = (0..count)
                .map(|i| {
                    let id = device_id(i);
                    let args = DeviceArgs {
                        device_id: id.clone(),
                        interval_ms: SIMULATED_INTERVAL_MS,
                        signal: Signal::default(),
                        seed: i as u64,
                        readings_max: 0,
                        stream: None,
                        stop_at_us: None,
                        names: EdgeNames::default(),
                        clock: tributary_actors::clock::system(),
                    };
                    ChildSpec::new(
                        format!("device/{id}"),
                        Restart::Transient,
                        SimulatedDevice,
                        args,
                    )
                })
                .collect();
            let (sup, _) = Actor::spawn(
                None,
                Supervisor,
                SupervisorArgs::new(Strategy::OneForOne, specs),
            )
            .await?;
            let deadline = Instant::now() + Duration::from_millis(FIRST_READINGS_TIMEOUT_MS);
            loop {
                let waiting = notify.notified();
                if ingested.load(Ordering::Relaxed) >= count as u64 {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, waiting).await.is_err() {
                    bail!(
                        "only {} of {count} simulated devices sent their first reading in {} ms",
                        ingested.load(Ordering::Relaxed),
                        FIRST_READINGS_TIMEOUT_MS
                    );
                }
            }
            Alive::Simulated(gateway, sup)
        }
        Kind::TokioTask => {
            let mut senders = Vec::with_capacity(count);
            let mut tasks = Vec::with_capacity(count);
            for _ in 0..count {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                senders.push(tx);
                tasks.push(tokio::spawn(async move {
                    let _ = rx.await;
                }));
            }
            Alive::Tasks(senders, tasks)
        }
    };
    let spawn_ms = start.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let sample = Sample {
        rss_before,
        rss_after: rss_bytes(),
        heap_before,
        heap_after: heap_bytes(),
        spawn_ms,
    };
    Ok((alive, sample))
}

/// The child: spawns `count` actors of `kind` and prints what it measured.
pub fn child(kind: Kind, count: usize) -> Result<()> {
    // As the node's `#[tokio::main]`: one worker per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let (alive, sample) = rt.block_on(spawn_kind(kind, count))?;
    println!("{RESULT_PREFIX}{}", serde_json::to_string(&sample)?);
    // The process ends here: tearing 100k actors down is not measured.
    std::mem::forget(alive);
    std::mem::forget(rt);
    Ok(())
}

fn run_child(kind: Kind, count: usize) -> Result<Sample> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(&exe)
        .args([
            "devices-child",
            "--kind",
            kind.arg(),
            "--count",
            &count.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", exe.display()))?;
    let deadline = Instant::now() + Duration::from_millis(CHILD_TIMEOUT_MS);
    // Bounded wait: a child that hangs is killed, not waited on forever.
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the {} child ran past {CHILD_TIMEOUT_MS} ms", kind.arg());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_PREFIX))
        .with_context(|| {
            format!(
                "the {} child printed no result ({}): {}",
                kind.arg(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok(serde_json::from_str(line)?)
}

struct KindResult {
    kind: Kind,
    samples: Vec<Sample>,
}

impl KindResult {
    fn med(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        median(&v)
    }

    fn rss_per_actor(&self, count: usize) -> f64 {
        self.med(|s| s.rss_after.saturating_sub(s.rss_before) as f64 / count as f64)
    }

    fn heap_per_actor(&self, count: usize) -> f64 {
        self.med(|s| s.heap_after.saturating_sub(s.heap_before) as f64 / count as f64)
    }
}

/// Slots in the first block a tokio unbounded channel allocates when it is
/// created (tokio's `BLOCK_CAP` on 64-bit targets).
const TOKIO_BLOCK_SLOTS: usize = 32;

/// What ractor's mailboxes cost before any message: each actor has two tokio
/// unbounded channels (messages, supervision events), and each allocates a
/// block of 32 slots of its item type up front.
fn print_mailbox_floor() {
    let message = std::mem::size_of::<ractor::message::BoxedMessage>();
    let supervision = std::mem::size_of::<ractor::SupervisionEvent>();
    println!(
        "\nractor's mailboxes, allocated at spawn: {TOKIO_BLOCK_SLOTS} slots × {message} B (a boxed \
         message) + {TOKIO_BLOCK_SLOTS} slots × {supervision} B (a supervision event) = {} B per \
         actor before any message is sent",
        TOKIO_BLOCK_SLOTS * (message + supervision)
    );
}

pub fn run(o: &DevicesOpts) -> Result<()> {
    if o.count == 0 || o.runs == 0 {
        bail!("--count and --runs must be positive");
    }
    println!(
        "devices: {} idle actors per kind, each kind in a fresh process, {} runs; goal: 100k \
         device actors in at most {} MB",
        thousands(o.count as f64),
        o.runs,
        o.budget_mb
    );
    let mut results: Vec<KindResult> = o
        .kinds
        .iter()
        .map(|&kind| KindResult {
            kind,
            samples: Vec::new(),
        })
        .collect();
    for run in 0..o.runs {
        for r in &mut results {
            r.samples.push(run_child(r.kind, o.count)?);
        }
        eprintln!("  run {}/{} done", run + 1, o.runs);
    }
    let base = results.iter().find(|r| r.kind == Kind::Bare);
    println!(
        "\n### memory per idle actor, {} actors\n",
        thousands(o.count as f64)
    );
    println!(
        "| kind | RSS bytes per actor (median) | min | max | heap bytes per actor (median) | \
         process RSS after (MB) | spawn µs per actor | ratio to baseline (RSS) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &results {
        let per = |s: &Sample| s.rss_after.saturating_sub(s.rss_before) as f64 / o.count as f64;
        let (lo, hi) = r
            .samples
            .iter()
            .map(per)
            .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let ratio = match base {
            Some(b) if b.kind == r.kind => "baseline".to_string(),
            Some(b) => format!("{:.2}", r.rss_per_actor(o.count) / b.rss_per_actor(o.count)),
            None => "n/a".to_string(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.1} | {} |",
            r.kind.label(),
            thousands(r.rss_per_actor(o.count)),
            thousands(lo),
            thousands(hi),
            thousands(r.heap_per_actor(o.count)),
            r.med(|s| s.rss_after as f64) / MB,
            r.med(|s| s.spawn_ms * 1000.0 / o.count as f64),
            ratio,
        );
    }
    println!(
        "\n| kind | 100k actors, from the per-actor RSS (MB) | whole process at {} actors (MB) | \
         goal: 100k in {} MB |",
        thousands(o.count as f64),
        o.budget_mb
    );
    println!("|---|---:|---:|---|");
    for r in results.iter().filter(|r| r.kind != Kind::TokioTask) {
        let projected = r.rss_per_actor(o.count) * 100_000.0;
        let verdict = if projected <= o.budget_mb * MB {
            format!(
                "met ({:.0} % of it)",
                projected / (o.budget_mb * MB) * 100.0
            )
        } else {
            format!(
                "missed ({:.0} % of it)",
                projected / (o.budget_mb * MB) * 100.0
            )
        };
        println!(
            "| {} | {:.0} | {:.0} | {} |",
            r.kind.label(),
            projected / MB,
            r.med(|s| s.rss_after as f64) / MB,
            verdict
        );
    }
    print_mailbox_floor();
    Ok(())
}
