//! Supervision: a flaky device restarted with exponential backoff, then a
//! device that fails so often that its supervisor gives up and escalates the
//! failure to its own parent.
//!
//! Run it with `cargo run -p tributary-examples --example supervision`
//! (about 4 s, real time).
//!
//! ```text
//! plant                          a tiny parent: prints what its supervisors report
//! ├── plant.line-1 (one_for_one) ── press-7  fails at every 4th reading, one per 150 ms
//! └── plant.line-2 (one_for_one) ── pump-3   fails at every 2nd reading, one per 20 ms
//! ```
//!
//! Both supervisors allow `restarts_max` = 3 restarts within
//! `restart_period_ms` = 1 s, and wait 50 ms before the first restart, then
//! 100, 200 and 400 ms (the cap). press-7 lives about 600 ms each time, so at
//! most two of its restarts fall within any second and it keeps being
//! restarted. pump-3 lives 40 ms: its fourth failure within a second is one
//! too many.

use std::time::Duration;

use anyhow::{bail, Context};
use ractor::{call_t, Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tributary_actors::supervision::{
    ChildSpec, Restart, Strategy, Supervisor, SupervisorArgs, SupervisorMsg,
};

/// Events from devices and reports from the parent, each well under this.
const EVENTS_MAX: usize = 64;
const CALL_TIMEOUT_MS: u64 = 1_000;
/// Children get `child_shutdown_timeout_ms` each; this covers a supervisor and its child.
const STOP_TIMEOUT_MS: u64 = 3_000;
/// Each part ends well before this; past it the example fails rather than hangs.
const PART_TIMEOUT_MS: u64 = 8_000;
/// press-7's restarts to watch before part 1 ends: enough to reach the cap.
const PART_1_RESTARTS: u32 = 4;

// --- A simulated device that fails every `fail_every` readings ------------

#[derive(Clone)]
struct FlakyDevice;

#[derive(Clone)]
struct DeviceArgs {
    id: &'static str,
    fail_every: u32,
    interval_ms: u64,
    events: mpsc::Sender<DeviceEvent>,
}

/// What a device tells `main`, which prints the supervisor's view of it.
#[derive(Debug)]
enum DeviceEvent {
    Started,
    Failed { at: Instant },
}

/// The only message: take the next reading.
enum DeviceMsg {
    Read,
}

impl ractor::Message for DeviceMsg {}

struct DeviceState {
    args: DeviceArgs,
    /// Counted from 1 in each incarnation: a restart starts from fresh state.
    readings: u32,
}

impl Actor for FlakyDevice {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = DeviceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DeviceMsg>,
        args: DeviceArgs,
    ) -> Result<DeviceState, ActorProcessingErr> {
        args.events.send(DeviceEvent::Started).await?;
        myself.send_after(Duration::from_millis(args.interval_ms), || DeviceMsg::Read);
        Ok(DeviceState { args, readings: 0 })
    }

    async fn handle(
        &self,
        myself: ActorRef<DeviceMsg>,
        _read: DeviceMsg,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        state.readings += 1;
        let (id, n) = (state.args.id, state.readings);
        if n % state.args.fail_every == 0 {
            println!("  {id:<8} reading {n}: FAILED (sensor timeout)");
            let at = Instant::now();
            state.args.events.send(DeviceEvent::Failed { at }).await?;
            // An Err from a handler is a failure: the supervisor decides what follows.
            return Err(format!("{id}: sensor timeout on reading {n}").into());
        }
        println!("  {id:<8} reading {n}: {:.1} °C", 20.0 + f64::from(n) * 0.5);
        myself.send_after(Duration::from_millis(state.args.interval_ms), || {
            DeviceMsg::Read
        });
        Ok(())
    }
}

// --- The supervisors' parent -----------------------------------------------

/// What the parent saw happen to one of its supervisors.
#[derive(Debug)]
enum Report {
    Stopped,
    Escalated,
}

struct Plant;

enum PlantMsg {}

impl ractor::Message for PlantMsg {}

impl Actor for Plant {
    type Msg = PlantMsg;
    type State = mpsc::Sender<Report>;
    type Arguments = mpsc::Sender<Report>;

    async fn pre_start(
        &self,
        _myself: ActorRef<PlantMsg>,
        reports: mpsc::Sender<Report>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(reports)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<PlantMsg>,
        evt: SupervisionEvent,
        reports: &mut mpsc::Sender<Report>,
    ) -> Result<(), ActorProcessingErr> {
        // Replaces ractor's default, which stops the parent when any child
        // exits. A real parent would restart the line, or fail in turn.
        match evt {
            SupervisionEvent::ActorFailed(who, reason) => {
                println!("plant: {} failed and escalated to me:", name(&who));
                println!("plant:   {reason}");
                reports.send(Report::Escalated).await?;
            }
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                let reason = reason.unwrap_or_else(|| "no reason".into());
                println!("plant: {} stopped normally ({reason})", name(&who));
                reports.send(Report::Stopped).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn name(cell: &ActorCell) -> String {
    cell.get_name().unwrap_or_else(|| cell.get_id().to_string())
}

// --- main ------------------------------------------------------------------

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stop_timeout = Duration::from_millis(STOP_TIMEOUT_MS);
    let (report_tx, mut reports) = mpsc::channel(EVENTS_MAX);
    let (plant, _) = Actor::spawn(Some("plant".into()), Plant, report_tx).await?;

    println!("== 1. press-7 fails every 4th reading; its supervisor restarts it ==");
    let (events_tx, mut events) = mpsc::channel(EVENTS_MAX);
    let press = device("press-7", 4, 150, events_tx.clone());
    let line_1 = start_line(&plant, "plant.line-1", press).await?;
    watch(&line_1, &mut events, &mut reports, Some(PART_1_RESTARTS)).await?;
    line_1
        .stop_and_wait(Some("part 1 is over".into()), Some(stop_timeout))
        .await?;
    expect(&mut reports, "plant.line-1's stop").await?;
    println!("(press-7 never failed 4 times within 1 s, so plant.line-1 never gave up)");

    println!();
    println!("== 2. pump-3 fails every 2nd reading: too often, so its supervisor escalates ==");
    // A clone: `main` keeps a sender, so the channel outlives line-2.
    let pump = device("pump-3", 2, 20, events_tx.clone());
    let line_2 = start_line(&plant, "plant.line-2", pump).await?;
    watch(&line_2, &mut events, &mut reports, None).await?;
    println!("(plant.line-2 stopped pump-3 and failed itself: what follows is the plant's call)");

    plant.stop_and_wait(None, Some(stop_timeout)).await?;
    Ok(())
}

fn device(
    id: &'static str,
    fail_every: u32,
    interval_ms: u64,
    events: mpsc::Sender<DeviceEvent>,
) -> ChildSpec {
    let args = DeviceArgs {
        id,
        fail_every,
        interval_ms,
        events,
    };
    // Permanent: restarted whatever the reason it stopped.
    ChildSpec::new(id, Restart::Permanent, FlakyDevice, args)
}

/// A supervisor over one device, linked to `plant` so that its failure
/// reaches the plant.
async fn start_line(
    plant: &ActorRef<PlantMsg>,
    name: &str,
    device: ChildSpec,
) -> anyhow::Result<ActorRef<SupervisorMsg>> {
    let args = SupervisorArgs {
        restarts_max: 3,
        restart_period_ms: 1_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 400,
        child_shutdown_timeout_ms: 1_000,
        ..SupervisorArgs::new(Strategy::OneForOne, vec![device])
    };
    println!(
        "{name}: one_for_one, at most {} restarts in {} ms, backoff {} ms doubling up to {} ms",
        args.restarts_max, args.restart_period_ms, args.backoff_initial_ms, args.backoff_max_ms
    );
    let (sup, _) =
        Actor::spawn_linked(Some(name.into()), Supervisor, args, plant.get_cell()).await?;
    Ok(sup)
}

/// Prints each restart as the supervisor recorded it, until the device has
/// been restarted `restarts_wanted` times or, with `None`, until the
/// supervisor escalates.
async fn watch(
    sup: &ActorRef<SupervisorMsg>,
    events: &mut mpsc::Receiver<DeviceEvent>,
    reports: &mut mpsc::Receiver<Report>,
    restarts_wanted: Option<u32>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(PART_TIMEOUT_MS);
    let mut starts = 0u32;
    let mut failed_at = None;
    loop {
        tokio::select! {
            event = events.recv() => match event.context("the devices' events channel closed")? {
                DeviceEvent::Failed { at } => failed_at = Some(at),
                DeviceEvent::Started => {
                    starts += 1;
                    if starts == 1 {
                        continue;
                    }
                    // Served after the restart is recorded: the supervisor
                    // handles one message at a time, and this start is inside one.
                    let status = call_t!(sup, SupervisorMsg::Status, CALL_TIMEOUT_MS)?;
                    let child = status.first().context("the supervisor has no child")?;
                    let restarted = *child.restarted_at.last().context("no restart recorded")?;
                    let waited = failed_at.map(|f| restarted.duration_since(f).as_millis());
                    println!(
                        "{}: restart {} of {}, {} ms after it failed (last failure: {:?})",
                        sup.get_name().unwrap_or_default(),
                        child.restarts,
                        child.name,
                        waited.unwrap_or_default(),
                        child.last_failure.as_deref().unwrap_or("none"),
                    );
                    if restarts_wanted.is_some_and(|n| child.restarts >= n) {
                        return Ok(());
                    }
                }
            },
            report = reports.recv() => match report.context("the plant stopped")? {
                Report::Escalated if restarts_wanted.is_none() => return Ok(()),
                other => bail!("unexpected report from the plant: {other:?}"),
            },
            _ = sleep_until(deadline) => bail!("gave up after {PART_TIMEOUT_MS} ms"),
        }
    }
}

/// Waits for the plant's next report, which `main` has just caused.
async fn expect(reports: &mut mpsc::Receiver<Report>, what: &str) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), reports.recv())
        .await
        .with_context(|| format!("timed out waiting for {what}"))?
        .context("the plant stopped")?;
    Ok(())
}
