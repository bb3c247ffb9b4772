//! Supervisors in the manner of Erlang/OTP: a declared strategy, a restart
//! intensity (`restarts_max` within `restart_period_ms`) and exponential
//! backoff between restarts. Past the intensity the supervisor stops its
//! children and fails itself, so the failure escalates to its own parent.
//!
//! ractor has supervision events but no restart strategies; this module adds
//! them. Each child's restarts and last failure are recorded for the
//! dashboard and for tests.
//!
//! Exits: an `Err`, a panic or a failed start is a failure. A stop, with or
//! without a reason, is a normal exit, and so is a kill: ractor reports it
//! as a termination like any other. Children are started in
//! declaration order and stopped in reverse order, gracefully (their
//! `post_stop` runs) within `child_shutdown_timeout_ms`, then killed.
//!
//! Backoff spreads restarts out, so a child that keeps failing escalates only
//! if `restarts_max` + 1 failures fit in `restart_period_ms`; keep
//! `restarts_max * backoff_max_ms` below the period if it must.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
};
use tokio::time::Instant;

/// Restarts a supervisor allows per period unless told otherwise; the
/// node's `restarts_max` and `restart_period_ms` default to these.
pub const RESTARTS_MAX_DEFAULT: u32 = 5;
pub const RESTART_PERIOD_MS_DEFAULT: u64 = 10_000;

/// Restart times kept per child in [`ChildStatus::restarted_at`].
const RESTART_HISTORY_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Restart only the child that failed.
    OneForOne,
    /// Restart every child when one fails.
    OneForAll,
    /// Restart the failed child and every child declared after it.
    RestForOne,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always restarted, even after a normal exit.
    Permanent,
    /// Restarted only after a failure.
    Transient,
    /// Never restarted, not even with a failed sibling.
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
    /// A child that runs `actor` with a fresh clone of `args` at each start,
    /// registered under `name` (names are global: keep them unique).
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
    /// How long a child may take to stop gracefully before it is killed.
    pub child_shutdown_timeout_ms: u64,
    pub children: Vec<ChildSpec>,
}

impl SupervisorArgs {
    pub fn new(strategy: Strategy, children: Vec<ChildSpec>) -> Self {
        Self {
            strategy,
            restarts_max: RESTARTS_MAX_DEFAULT,
            restart_period_ms: RESTART_PERIOD_MS_DEFAULT,
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            child_shutdown_timeout_ms: 5_000,
            children,
        }
    }
}

/// What a supervisor knows of one child.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildStatus {
    pub name: String,
    pub running: bool,
    /// Starts after the first one, including restarts with a failed sibling.
    pub restarts: u32,
    pub last_failure: Option<String>,
    pub last_failure_at: Option<SystemTime>,
    /// When the latest restarts happened, oldest first (at most 64 kept).
    pub restarted_at: Vec<Instant>,
}

pub enum SupervisorMsg {
    /// Starts the children whose slot is empty, unless a newer restart was planned.
    Restart {
        generation: u64,
    },
    Status(RpcReplyPort<Vec<ChildStatus>>),
    /// Restarts the child named `name` at once (an operator's action): it is
    /// stopped, counted as restarted with that reason, and started again,
    /// with its group under `one_for_all` / `rest_for_one`. It does not
    /// count toward the restart intensity: it is not a failure.
    RestartChild {
        name: String,
        reply: RpcReplyPort<Result<(), String>>,
    },
}

impl ractor::Message for SupervisorMsg {}

/// The reason recorded for a restart an operator asked for.
pub const OPERATOR_RESTART: &str = "restarted by an operator";

#[derive(Clone, Default)]
pub struct Supervisor;

pub struct SupervisorState {
    args: SupervisorArgs,
    /// The running incarnation of each child; `None` while it is down.
    cells: Vec<Option<ActorCell>>,
    /// Children that ended for good (temporary, or transient that exited normally).
    retired: Vec<bool>,
    status: Vec<ChildStatus>,
    /// Restart times within the intensity window, oldest first.
    window: VecDeque<Instant>,
    consecutive: u32,
    /// Bumped at each planned restart, so only the latest plan starts children.
    generation: u64,
}

/// Why a child is down.
enum Exit {
    Normal,
    Failed(String),
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

    /// Starts the down children in declaration order. Returns the children
    /// that failed to start, with the reason. Under one_for_all and
    /// rest_for_one it stops at the first failure: later children depend on
    /// the earlier ones.
    async fn start_missing(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        initial: bool,
    ) -> Vec<(usize, String)> {
        let mut failed = Vec::new();
        for i in 0..state.cells.len() {
            if state.cells[i].is_some() || state.retired[i] {
                continue;
            }
            match (state.args.children[i].start)(myself.get_cell()).await {
                Ok(cell) => {
                    state.cells[i] = Some(cell);
                    let status = &mut state.status[i];
                    status.running = true;
                    if !initial {
                        status.restarts = status.restarts.saturating_add(1);
                        if status.restarted_at.len() >= RESTART_HISTORY_MAX {
                            status.restarted_at.remove(0);
                        }
                        status.restarted_at.push(Instant::now());
                    }
                }
                Err(e) => {
                    failed.push((i, format!("start failed: {e}")));
                    if state.args.strategy != Strategy::OneForOne {
                        break;
                    }
                }
            }
        }
        failed
    }

    /// Stops one child gracefully, killing it if it overstays the timeout.
    /// Waiting keeps the old incarnation from holding the registered name
    /// when the new one starts.
    async fn stop_child(cell: ActorCell, reason: &str, timeout: Duration) {
        if cell
            .stop_and_wait(Some(reason.to_string()), Some(timeout))
            .await
            .is_ok()
        {
            return;
        }
        // Also reached when the child was already gone: the kill then returns at once.
        if cell.kill_and_wait(Some(timeout)).await.is_err() {
            tracing::warn!(child = ?cell.get_name(), "supervised actor did not stop when killed");
        }
    }

    /// Stops the running children among `indices`, last declared first.
    /// Their exit events arrive later and are ignored: their slots are empty.
    async fn stop_children(state: &mut SupervisorState, indices: &[usize], reason: &str) {
        let timeout = Duration::from_millis(state.args.child_shutdown_timeout_ms);
        for &i in indices.iter().rev() {
            if let Some(cell) = state.cells[i].take() {
                state.status[i].running = false;
                Self::stop_child(cell, reason, timeout).await;
            }
        }
    }

    async fn stop_all(state: &mut SupervisorState, reason: &str) {
        let all: Vec<usize> = (0..state.cells.len()).collect();
        Self::stop_children(state, &all, reason).await;
    }

    /// Applies the restart policy to a child that went down: restart it
    /// (and its group) after a backoff, retire it, or escalate.
    async fn child_down(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        index: usize,
        exit: Exit,
    ) -> Result<(), ActorProcessingErr> {
        state.cells[index] = None;
        state.status[index].running = false;
        let name = state.args.children[index].name.clone();
        if let Exit::Failed(reason) = &exit {
            state.status[index].last_failure = Some(reason.clone());
            state.status[index].last_failure_at = Some(SystemTime::now());
            tracing::warn!(child = %name, %reason, "supervised actor failed");
        }
        let restart = matches!(
            (state.args.children[index].restart, &exit),
            (Restart::Permanent, _) | (Restart::Transient, Exit::Failed(_))
        );
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
            // A quiet period ends the backoff sequence.
            state.consecutive = 0;
        }
        if state.window.len() >= state.args.restarts_max as usize {
            let why = match exit {
                Exit::Normal => "exited normally".to_string(),
                Exit::Failed(reason) => reason,
            };
            let msg = format!(
                "child {name} exceeded {} restarts in {} ms (last: {why}); escalating",
                state.args.restarts_max, state.args.restart_period_ms
            );
            // Graceful here too: on an Err ractor skips post_stop and kills the children.
            Self::stop_all(state, "supervisor escalating").await;
            return Err(msg.into());
        }
        state.window.push_back(now);

        let n = state.cells.len();
        let group: Vec<usize> = match state.args.strategy {
            Strategy::OneForOne => vec![],
            Strategy::OneForAll => (0..n).filter(|&i| i != index).collect(),
            Strategy::RestForOne => (index + 1..n).collect(),
        };
        // OTP's rule: a temporary sibling stopped for a group restart stays stopped.
        for &i in &group {
            if state.args.children[i].restart == Restart::Temporary && state.cells[i].is_some() {
                state.retired[i] = true;
            }
        }
        Self::stop_children(state, &group, "restarted with a failed sibling").await;

        let delay = Self::backoff(&state.args, state.consecutive);
        state.consecutive = state.consecutive.saturating_add(1);
        // An earlier plan still in flight would restart the group before this backoff ends.
        state.generation += 1;
        let generation = state.generation;
        myself.send_after(delay, move || SupervisorMsg::Restart { generation });
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
        };
        let failed = Self::start_missing(&myself, &mut state, true).await;
        if let Some((i, reason)) = failed.into_iter().next() {
            // As in OTP, a child that cannot start at first is the supervisor's failure.
            Self::stop_all(&mut state, "supervisor failed to start").await;
            let name = &state.args.children[i].name;
            return Err(format!("child {name}: {reason}").into());
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Without this ractor kills the children, skipping their post_stop.
        Self::stop_all(state, "supervisor stopping").await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart { generation } => {
                if generation != state.generation {
                    return Ok(());
                }
                for (i, reason) in Self::start_missing(&myself, state, false).await {
                    Self::child_down(&myself, state, i, Exit::Failed(reason)).await?;
                }
            }
            SupervisorMsg::Status(reply) => {
                let _ = reply.send(state.status.clone());
            }
            SupervisorMsg::RestartChild { name, reply } => {
                let Some(index) = state.args.children.iter().position(|c| c.name == name) else {
                    let _ = reply.send(Err(format!("this supervisor has no child {name:?}")));
                    return Ok(());
                };
                let n = state.cells.len();
                let mut group: Vec<usize> = match state.args.strategy {
                    Strategy::OneForOne => vec![],
                    Strategy::OneForAll => (0..n).filter(|&i| i != index).collect(),
                    Strategy::RestForOne => (index + 1..n).collect(),
                };
                group.push(index);
                group.sort_unstable();
                Self::stop_children(state, &group, OPERATOR_RESTART).await;
                state.retired[index] = false;
                let status = &mut state.status[index];
                status.last_failure = Some(OPERATOR_RESTART.to_string());
                status.last_failure_at = Some(SystemTime::now());
                tracing::info!(child = %name, "supervised actor restarted by an operator");
                let failed = Self::start_missing(&myself, state, false).await;
                let answer = match failed.iter().find(|(i, _)| *i == index) {
                    Some((_, why)) => Err(why.clone()),
                    None => Ok(()),
                };
                let _ = reply.send(answer);
                for (i, reason) in failed {
                    Self::child_down(&myself, state, i, Exit::Failed(reason)).await?;
                }
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
        let (cell, exit) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Exit::Failed(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, Exit::Normal),
            _ => return Ok(()),
        };
        let Some(index) = state
            .cells
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.get_id() == cell.get_id()))
        else {
            // An incarnation we stopped ourselves, or one already replaced.
            return Ok(());
        };
        Self::child_down(&myself, state, index, exit).await
    }
}
