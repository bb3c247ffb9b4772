//! The supervisor's strategies, restart kinds, intensity, escalation and
//! backoff. Time is paused: tokio jumps to the next timer whenever every
//! task is idle, so backoff shows exactly in virtual time and a wait that
//! times out costs no wall-clock time.
//!
//! Child names are global in ractor's registry and the tests run in
//! parallel, so each test prefixes its children's names with its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, SupervisionEvent};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tributary_actors::supervision::{
    ChildSpec, ChildStatus, Restart, Strategy, Supervisor, SupervisorArgs, SupervisorMsg,
};

const EVENTS_MAX: usize = 256;
/// Virtual time; long enough for any backoff used here.
const WAIT_MS: u64 = 60_000;
const CALL_TIMEOUT_MS: u64 = 1_000;

#[derive(Debug)]
enum Event {
    Started {
        id: usize,
        worker: ActorRef<WorkerMsg>,
        at: Instant,
    },
    Stopped {
        id: usize,
    },
}

#[derive(Debug)]
enum WorkerMsg {
    /// Return an error from the handler.
    Fail,
    /// Stop normally.
    Exit,
}

impl ractor::Message for WorkerMsg {}

#[derive(Clone)]
struct Worker;

#[derive(Clone)]
struct WorkerArgs {
    id: usize,
    events: mpsc::Sender<Event>,
    /// While set, pre_start fails.
    refuse_start: Arc<AtomicBool>,
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerArgs;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerArgs, ActorProcessingErr> {
        if args.refuse_start.load(Ordering::SeqCst) {
            return Err(format!("worker {} refused to start", args.id).into());
        }
        // Reported here, in the supervisor's task, so starts arrive in start order.
        args.events
            .send(Event::Started {
                id: args.id,
                worker: myself,
                at: Instant::now(),
            })
            .await
            .map_err(|_| "events closed")?;
        Ok(args)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<WorkerMsg>,
        state: &mut WorkerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let _ = state.events.send(Event::Stopped { id: state.id }).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Fail => Err(format!("boom {}", state.id).into()),
            WorkerMsg::Exit => {
                myself.stop(None);
                Ok(())
            }
        }
    }
}

/// Stands in for the supervisor's own parent: records its failures.
struct Parent;

enum ParentMsg {}

impl ractor::Message for ParentMsg {}

impl Actor for Parent {
    type Msg = ParentMsg;
    type State = mpsc::Sender<String>;
    type Arguments = mpsc::Sender<String>;

    async fn pre_start(
        &self,
        _myself: ActorRef<ParentMsg>,
        failures: mpsc::Sender<String>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(failures)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<ParentMsg>,
        evt: SupervisionEvent,
        failures: &mut mpsc::Sender<String>,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, err) = evt {
            let _ = failures.send(err.to_string()).await;
        }
        Ok(())
    }
}

struct Harness {
    sup: ActorRef<SupervisorMsg>,
    parent: ActorRef<ParentMsg>,
    events: mpsc::Receiver<Event>,
    failures: mpsc::Receiver<String>,
    refuse_start: Arc<AtomicBool>,
    /// The first incarnation of each child.
    workers: Vec<ActorRef<WorkerMsg>>,
}

impl Harness {
    /// Starts a supervisor of `kinds.len()` workers under a [`Parent`] and
    /// waits for the workers' first starts.
    async fn start(
        prefix: &str,
        strategy: Strategy,
        kinds: &[Restart],
        tune: impl FnOnce(&mut SupervisorArgs),
    ) -> Self {
        let (tx, events) = mpsc::channel(EVENTS_MAX);
        let refuse_start = Arc::new(AtomicBool::new(false));
        let children = kinds
            .iter()
            .enumerate()
            .map(|(id, &kind)| {
                let args = WorkerArgs {
                    id,
                    events: tx.clone(),
                    refuse_start: refuse_start.clone(),
                };
                ChildSpec::new(format!("{prefix}/{id}"), kind, Worker, args)
            })
            .collect();
        let mut args = SupervisorArgs::new(strategy, children);
        tune(&mut args);
        let (ftx, failures) = mpsc::channel(EVENTS_MAX);
        let (parent, _) = Actor::spawn(None, Parent, ftx)
            .await
            .expect("parent starts");
        let (sup, _) = Actor::spawn_linked(None, Supervisor, args, parent.get_cell())
            .await
            .expect("supervisor starts");
        let mut h = Self {
            sup,
            parent,
            events,
            failures,
            refuse_start,
            workers: Vec::new(),
        };
        for expected in 0..kinds.len() {
            let (id, worker, _) = h.started().await;
            assert_eq!(id, expected, "children start in declaration order");
            h.workers.push(worker);
        }
        h
    }

    async fn next(&mut self) -> Event {
        timeout(Duration::from_millis(WAIT_MS), self.events.recv())
            .await
            .expect("an event within the wait")
            .expect("events open")
    }

    async fn started(&mut self) -> (usize, ActorRef<WorkerMsg>, Instant) {
        match self.next().await {
            Event::Started { id, worker, at } => (id, worker, at),
            other => panic!("expected a start, got {other:?}"),
        }
    }

    async fn stopped(&mut self) -> usize {
        match self.next().await {
            Event::Stopped { id } => id,
            other => panic!("expected a stop, got {other:?}"),
        }
    }

    /// Asserts that nothing starts or stops for the whole wait. A closed
    /// channel counts as quiet: every worker and the supervisor are gone.
    async fn quiet(&mut self) {
        if let Ok(Some(evt)) = timeout(Duration::from_millis(WAIT_MS), self.events.recv()).await {
            panic!("expected no event, got {evt:?}");
        }
    }

    async fn status(&self) -> Vec<ChildStatus> {
        ractor::call_t!(self.sup, SupervisorMsg::Status, CALL_TIMEOUT_MS).expect("status")
    }

    async fn escalation(&mut self) -> String {
        timeout(Duration::from_millis(WAIT_MS), self.failures.recv())
            .await
            .expect("an escalation within the wait")
            .expect("failures open")
    }

    fn no_escalation(&mut self) {
        if let Ok(reason) = self.failures.try_recv() {
            panic!("unexpected escalation: {reason}");
        }
    }

    /// The supervisor first: a stopping parent would kill it, skipping its post_stop.
    async fn stop(self) {
        let _ = self
            .sup
            .stop_and_wait(None, Some(Duration::from_millis(WAIT_MS)))
            .await;
        self.parent.stop(None);
    }
}

fn restarts(status: &[ChildStatus]) -> Vec<u32> {
    status.iter().map(|s| s.restarts).collect()
}

fn fail(worker: &ActorRef<WorkerMsg>) {
    worker.send_message(WorkerMsg::Fail).expect("worker alive");
}

#[tokio::test(start_paused = true)]
async fn one_for_one_restarts_only_the_failed_child() {
    let kinds = [Restart::Permanent; 3];
    let mut h = Harness::start("o4o", Strategy::OneForOne, &kinds, |_| {}).await;
    fail(&h.workers[1]);
    assert_eq!(h.started().await.0, 1);
    h.quiet().await;
    let status = h.status().await;
    assert_eq!(restarts(&status), [0, 1, 0]);
    assert_eq!(status[1].last_failure.as_deref(), Some("boom 1"));
    assert!(status.iter().all(|s| s.running));
    for i in [0, 2] {
        assert_eq!(h.workers[i].get_status(), ActorStatus::Running);
    }
    h.no_escalation();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_for_all_restarts_every_child_in_declaration_order() {
    let kinds = [Restart::Permanent; 3];
    // One restart allowed: the stopped siblings must not count as failures.
    let mut h = Harness::start("o4a", Strategy::OneForAll, &kinds, |a| a.restarts_max = 1).await;
    fail(&h.workers[1]);
    // Siblings stop gracefully, last declared first; the failed one has no post_stop.
    assert_eq!(h.stopped().await, 2);
    assert_eq!(h.stopped().await, 0);
    for expected in 0..3 {
        assert_eq!(h.started().await.0, expected);
    }
    h.quiet().await;
    let status = h.status().await;
    assert_eq!(restarts(&status), [1, 1, 1]);
    assert_eq!(status[0].last_failure, None);
    assert_eq!(status[1].last_failure.as_deref(), Some("boom 1"));
    assert_eq!(status[2].last_failure, None);
    h.no_escalation();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_restarts_the_failed_child_and_later_ones() {
    let kinds = [Restart::Permanent; 4];
    let mut h = Harness::start("r4o", Strategy::RestForOne, &kinds, |_| {}).await;
    fail(&h.workers[1]);
    assert_eq!(h.stopped().await, 3);
    assert_eq!(h.stopped().await, 2);
    for expected in 1..4 {
        assert_eq!(h.started().await.0, expected);
    }
    h.quiet().await;
    assert_eq!(restarts(&h.status().await), [0, 1, 1, 1]);
    assert_eq!(h.workers[0].get_status(), ActorStatus::Running);
    h.no_escalation();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stale_restart_plan_does_not_start_later_children_early() {
    let kinds = [Restart::Permanent; 3];
    let mut h = Harness::start("stale", Strategy::RestForOne, &kinds, |a| {
        a.backoff_initial_ms = 100;
        a.backoff_max_ms = 1_000;
    })
    .await;
    let t0 = Instant::now();
    fail(&h.workers[1]);
    assert_eq!(h.stopped().await, 2);
    // Before the first plan (t0 + 100 ms) fires, the earlier child fails too.
    tokio::time::sleep(Duration::from_millis(50)).await;
    fail(&h.workers[0]);
    // The second plan waits 200 ms, and children 1 and 2 must not precede 0.
    for expected in 0..3 {
        let (id, _, at) = h.started().await;
        assert_eq!(id, expected);
        assert!(
            at - t0 >= Duration::from_millis(250),
            "started after {:?}",
            at - t0
        );
    }
    h.quiet().await;
    assert_eq!(restarts(&h.status().await), [1, 1, 1]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn exceeding_the_intensity_escalates_to_the_parent() {
    let kinds = [Restart::Permanent, Restart::Permanent];
    let mut h = Harness::start("escalate", Strategy::OneForOne, &kinds, |a| {
        a.restarts_max = 2;
        a.restart_period_ms = 10_000;
    })
    .await;
    let mut worker = h.workers[0].clone();
    for _ in 0..2 {
        fail(&worker);
        worker = h.started().await.1;
        h.no_escalation();
    }
    fail(&worker);
    // The supervisor stops the rest gracefully before it fails.
    assert_eq!(h.stopped().await, 1);
    let reason = h.escalation().await;
    assert!(reason.contains("escalate/0"), "{reason}");
    assert!(reason.contains("exceeded 2 restarts"), "{reason}");
    assert!(reason.contains("boom 0"), "{reason}");
    h.sup
        .wait(Some(Duration::from_millis(WAIT_MS)))
        .await
        .expect("supervisor ends");
    h.quiet().await;
    h.parent.stop(None);
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_between_consecutive_restarts_up_to_the_cap() {
    let mut h = Harness::start("backoff", Strategy::OneForOne, &[Restart::Permanent], |a| {
        a.restarts_max = 10;
        a.restart_period_ms = 60_000;
        a.backoff_initial_ms = 100;
        a.backoff_max_ms = 400;
    })
    .await;
    let mut worker = h.workers[0].clone();
    let first_failure = Instant::now();
    for _ in 0..5 {
        // Each new incarnation fails at once, so restarts are spaced by the backoff alone.
        fail(&worker);
        worker = h.started().await.1;
    }
    let at = h.status().await[0].restarted_at.clone();
    assert_eq!(at.len(), 5);
    let mut gaps = vec![at[0] - first_failure];
    gaps.extend(at.windows(2).map(|w| w[1] - w[0]));
    for (gap, expected_ms) in gaps.iter().zip([100u64, 200, 400, 400, 400]) {
        let expected = Duration::from_millis(expected_ms);
        assert!(*gap >= expected, "gaps {gaps:?}");
        // Capped, not doubled again.
        assert!(*gap < expected * 2, "gaps {gaps:?}");
    }
    h.no_escalation();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failure_outside_the_window_does_not_count() {
    let mut h = Harness::start("window", Strategy::OneForOne, &[Restart::Permanent], |a| {
        a.restarts_max = 1;
        a.restart_period_ms = 1_000;
        a.backoff_initial_ms = 100;
        a.backoff_max_ms = 100;
    })
    .await;
    fail(&h.workers[0]);
    let worker = h.started().await.1;
    // Let the first failure age out of the 1 s window.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    fail(&worker);
    let worker = h.started().await.1;
    h.no_escalation();
    // Within the window this one is the second: past restarts_max = 1.
    fail(&worker);
    let reason = h.escalation().await;
    assert!(reason.contains("exceeded 1 restarts"), "{reason}");
    h.parent.stop(None);
}

#[tokio::test(start_paused = true)]
async fn permanent_child_is_restarted_after_a_normal_exit() {
    let mut h = Harness::start("perm", Strategy::OneForOne, &[Restart::Permanent], |_| {}).await;
    h.workers[0]
        .send_message(WorkerMsg::Exit)
        .expect("worker alive");
    assert_eq!(h.stopped().await, 0);
    assert_eq!(h.started().await.0, 0);
    let status = h.status().await;
    assert_eq!(status[0].restarts, 1);
    assert_eq!(status[0].last_failure, None);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn transient_child_is_restarted_only_after_a_failure() {
    let kinds = [Restart::Transient; 3];
    let mut h = Harness::start("trans", Strategy::OneForOne, &kinds, |_| {}).await;
    fail(&h.workers[0]);
    assert_eq!(h.started().await.0, 0);
    h.workers[1]
        .send_message(WorkerMsg::Exit)
        .expect("worker alive");
    assert_eq!(h.stopped().await, 1);
    h.quiet().await;
    let status = h.status().await;
    assert_eq!(restarts(&status), [1, 0, 0]);
    assert_eq!(
        status.iter().map(|s| s.running).collect::<Vec<_>>(),
        [true, false, true]
    );
    assert_eq!(status[1].last_failure, None);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn temporary_child_is_never_restarted() {
    let kinds = [Restart::Temporary, Restart::Permanent, Restart::Temporary];
    let mut h = Harness::start("temp", Strategy::OneForAll, &kinds, |_| {}).await;
    // Its own failure restarts nothing, not even under one_for_all.
    fail(&h.workers[0]);
    h.quiet().await;
    // A sibling's failure stops it for good.
    fail(&h.workers[1]);
    assert_eq!(h.stopped().await, 2);
    assert_eq!(h.started().await.0, 1);
    h.quiet().await;
    let status = h.status().await;
    assert_eq!(restarts(&status), [0, 1, 0]);
    assert_eq!(
        status.iter().map(|s| s.running).collect::<Vec<_>>(),
        [false, true, false]
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_counts_as_a_failure_and_escalates() {
    let mut h = Harness::start("refuse", Strategy::OneForOne, &[Restart::Permanent], |a| {
        a.restarts_max = 2;
    })
    .await;
    h.refuse_start.store(true, Ordering::SeqCst);
    fail(&h.workers[0]);
    // The first attempt fails, is counted, and the second one past the intensity escalates.
    let reason = h.escalation().await;
    assert!(reason.contains("start failed"), "{reason}");
    assert!(reason.contains("refused to start"), "{reason}");
    assert!(reason.contains("exceeded 2 restarts"), "{reason}");
    h.quiet().await;
    h.parent.stop(None);
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_is_retried_with_backoff() {
    let mut h = Harness::start("retry", Strategy::OneForOne, &[Restart::Permanent], |a| {
        a.restarts_max = 5;
        a.backoff_initial_ms = 100;
    })
    .await;
    h.refuse_start.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    fail(&h.workers[0]);
    // Attempts at t0 + 100 ms (refused) and t0 + 300 ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.refuse_start.store(false, Ordering::SeqCst);
    let (id, _, at) = h.started().await;
    assert_eq!(id, 0);
    assert!(
        at - t0 >= Duration::from_millis(300),
        "started after {:?}",
        at - t0
    );
    let status = h.status().await;
    assert!(status[0].running);
    assert!(status[0]
        .last_failure
        .as_deref()
        .is_some_and(|r| r.contains("start failed")));
    h.no_escalation();
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stopping_the_supervisor_stops_children_gracefully_in_reverse_order() {
    let kinds = [Restart::Permanent; 3];
    let mut h = Harness::start("shutdown", Strategy::OneForOne, &kinds, |_| {}).await;
    h.sup
        .stop_and_wait(None, Some(Duration::from_millis(WAIT_MS)))
        .await
        .expect("supervisor stops");
    for expected in [2, 1, 0] {
        assert_eq!(h.stopped().await, expected);
    }
    assert!(h
        .workers
        .iter()
        .all(|w| w.get_status() == ActorStatus::Stopped));
    h.quiet().await;
    h.no_escalation();
    h.parent.stop(None);
}
