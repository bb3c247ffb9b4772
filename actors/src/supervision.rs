//! Supervisors in the manner of Erlang/OTP: a declared strategy, a restart
//! intensity (`restarts_max` within `restart_period_ms`) and exponential
//! backoff between restarts. Past the intensity the supervisor fails itself,
//! so the failure escalates to its own parent.
//!
//! ractor has supervision events but no restart strategies; this module adds
//! them. Each child's restarts and last failure are recorded for the
//! dashboard and for tests.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Restart only the child that failed.
    OneForOne,
    /// Restart every child when one fails.
    OneForAll,
    /// Restart the failed child and every child started after it.
    RestForOne,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always restarted, even after a normal exit.
    Permanent,
    /// Restarted only after a failure.
    Transient,
    /// Never restarted.
    Temporary,
}

pub type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;
/// Spawns the child linked to the given supervisor.
pub type StartFn = Arc<dyn Fn(ActorCell) -> StartFuture + Send + Sync>;

#[derive(Clone)]
pub struct ChildSpec {
    pub name: String,
    pub restart: Restart,
    pub start: StartFn,
}

impl ChildSpec {
    /// A child that runs `actor` with a fresh clone of `args` at each start.
    pub fn new<A>(name: impl Into<String>, restart: Restart, actor: A, args: A::Arguments) -> Self
    where
        A: Actor + Clone,
        A::Arguments: Clone + Sync,
    {
        let name = name.into();
        let registered = name.clone();
        let start: StartFn = Arc::new(move |sup: ActorCell| {
            let actor = actor.clone();
            let args = args.clone();
            let name = registered.clone();
            Box::pin(async move {
                let (r, _) = Actor::spawn_linked(Some(name), actor, args, sup).await?;
                Ok(r.get_cell())
            })
        });
        Self {
            name,
            restart,
            start,
        }
    }
}

#[derive(Clone)]
pub struct SupervisorArgs {
    pub strategy: Strategy,
    /// Restarts allowed within `restart_period_ms` before escalating.
    pub restarts_max: u32,
    pub restart_period_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub children: Vec<ChildSpec>,
}

impl SupervisorArgs {
    pub fn new(strategy: Strategy, children: Vec<ChildSpec>) -> Self {
        Self {
            strategy,
            restarts_max: 5,
            restart_period_ms: 10_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            children,
        }
    }
}

/// What a supervisor knows of one child.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildStatus {
    pub name: String,
    pub running: bool,
    pub restarts: u32,
    pub last_failure: Option<String>,
    pub last_failure_at: Option<SystemTime>,
    pub restarted_at: Vec<Instant>,
}

pub enum SupervisorMsg {
    /// Starts the children whose slot is empty, unless a newer restart was planned.
    Restart {
        generation: u64,
    },
    Status(RpcReplyPort<Vec<ChildStatus>>),
}

impl ractor::Message for SupervisorMsg {}

#[derive(Clone, Default)]
pub struct Supervisor;

pub struct SupervisorState {
    args: SupervisorArgs,
    cells: Vec<Option<ActorCell>>,
    /// Children that ended for good (temporary, or transient that exited normally).
    retired: Vec<bool>,
    status: Vec<ChildStatus>,
    /// Restart times within the intensity window, oldest first.
    window: VecDeque<Instant>,
    consecutive: u32,
    generation: u64,
    pending_restart: bool,
}

impl Supervisor {
    /// The delay before the next restart: initial doubled per consecutive
    /// restart, capped.
    fn backoff(args: &SupervisorArgs, consecutive: u32) -> Duration {
        let factor = 1u64.checked_shl(consecutive.min(32)).unwrap_or(u64::MAX);
        Duration::from_millis(
            args.backoff_initial_ms
                .saturating_mul(factor)
                .min(args.backoff_max_ms),
        )
    }

    async fn start_missing(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        for i in 0..state.cells.len() {
            if state.cells[i].is_none() && !state.retired[i] {
                let spec = &state.args.children[i];
                let cell = (spec.start)(myself.get_cell()).await?;
                state.cells[i] = Some(cell);
                state.status[i].running = true;
            }
        }
        Ok(())
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let n = args.children.len();
        let status = args
            .children
            .iter()
            .map(|c| ChildStatus {
                name: c.name.clone(),
                running: false,
                restarts: 0,
                last_failure: None,
                last_failure_at: None,
                restarted_at: Vec::new(),
            })
            .collect();
        let mut state = SupervisorState {
            args,
            cells: vec![None; n],
            retired: vec![false; n],
            status,
            window: VecDeque::new(),
            consecutive: 0,
            generation: 0,
            pending_restart: false,
        };
        Self::start_missing(&myself, &mut state).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart { generation } => {
                if generation == state.generation {
                    state.pending_restart = false;
                    let now = Instant::now();
                    for (i, c) in state.cells.iter().enumerate() {
                        if c.is_none() && !state.retired[i] {
                            state.status[i].restarted_at.push(now);
                            // Bound the history kept per child.
                            if state.status[i].restarted_at.len() > 64 {
                                state.status[i].restarted_at.remove(0);
                            }
                        }
                    }
                    Self::start_missing(&myself, state).await?;
                }
            }
            SupervisorMsg::Status(reply) => {
                let _ = reply.send(state.status.clone());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        let Some(index) = state
            .cells
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.get_id() == cell.get_id()))
        else {
            // A child we stopped ourselves for a group restart.
            return Ok(());
        };
        state.cells[index] = None;
        state.status[index].running = false;
        let spec_restart = state.args.children[index].restart;
        let restart = matches!(
            (spec_restart, &failure),
            (Restart::Permanent, _) | (Restart::Transient, Some(_))
        );
        if let Some(reason) = &failure {
            state.status[index].last_failure = Some(reason.clone());
            state.status[index].last_failure_at = Some(SystemTime::now());
            tracing::warn!(child = %state.args.children[index].name, %reason, "supervised actor failed");
        }
        if !restart {
            state.retired[index] = true;
            return Ok(());
        }
        let now = Instant::now();
        let period = Duration::from_millis(state.args.restart_period_ms);
        while state
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) > period)
        {
            state.window.pop_front();
        }
        if state.window.is_empty() {
            state.consecutive = 0;
        }
        if state.window.len() as u32 >= state.args.restarts_max {
            let name = &state.args.children[index].name;
            return Err(format!(
                "child {name} exceeded {} restarts in {} ms; escalating",
                state.args.restarts_max, state.args.restart_period_ms
            )
            .into());
        }
        state.window.push_back(now);
        state.status[index].restarts += 1;
        // Stop the siblings the strategy restarts together with the child.
        let siblings: Vec<usize> = match state.args.strategy {
            Strategy::OneForOne => vec![],
            Strategy::OneForAll => (0..state.cells.len()).filter(|&i| i != index).collect(),
            Strategy::RestForOne => (index + 1..state.cells.len()).collect(),
        };
        for i in siblings {
            if let Some(c) = state.cells[i].take() {
                c.unlink(myself.get_cell());
                c.stop(Some("restarted with a failed sibling".into()));
                state.status[i].running = false;
                state.status[i].restarts += 1;
            }
        }
        let delay = Self::backoff(&state.args, state.consecutive);
        state.consecutive += 1;
        state.generation += 1;
        state.pending_restart = true;
        let generation = state.generation;
        myself.send_after(delay, move || SupervisorMsg::Restart { generation });
        Ok(())
    }
}
