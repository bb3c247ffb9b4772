//! Who this node's cluster peers are: up or down, since when, and the link's
//! round-trip time. Fed by the session hooks; one log line per change
//! (`member up` / `member down`, then `peer=<id>`), which tests wait for.
//!
//! A peer is up from the moment its session is ready until the session ends,
//! and the session ends with its QUIC connection, so the idle timeout bounds
//! how long a partition goes unnoticed. Each session gets a number; events
//! of a session that a newer one replaced change nothing.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;
use tributary_cluster::session::SessionCloser;
use tributary_cluster::tls::{NodeId, Role};
use tributary_cluster::uplink::link::LinkHandle;

/// One peer, as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub peer: String,
    pub role: Role,
    pub up: bool,
    /// When it last came up or went down.
    pub since: SystemTime,
    /// The link's smoothed round-trip time, sampled while up.
    pub rtt: Option<Duration>,
    /// The number of the session that brought it up last.
    pub session: u64,
    /// How many times it came up since this node started.
    pub ups: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("membership is full: {members_max} peers are up (members_max)")]
pub struct MembershipFull {
    pub members_max: usize,
}

pub enum MembershipMsg {
    /// A session with `peer` is about to start: numbers it, and hands back
    /// the peer's current session, which the caller must end first.
    Opening {
        peer: NodeId,
        role: Role,
        reply: RpcReplyPort<Result<(u64, Option<SessionCloser>), MembershipFull>>,
    },
    /// The session started; it can be ended through `closer`.
    Attach {
        peer: NodeId,
        session: u64,
        closer: SessionCloser,
    },
    /// The session is ready: the peer is up.
    Up {
        peer: NodeId,
        session: u64,
        link: LinkHandle,
    },
    /// The session ended (or never got ready).
    Down {
        peer: NodeId,
        session: u64,
        reason: String,
    },
    SampleRtt,
}

impl ractor::Message for MembershipMsg {}

#[derive(Clone)]
pub struct MembershipArgs {
    pub members_max: usize,
    pub rtt_sample_interval_ms: u64,
    pub publish: watch::Sender<Vec<Member>>,
}

#[derive(Clone, Default)]
pub struct Membership;

struct Record {
    member: Member,
    /// The newest session number handed out for this peer.
    latest: u64,
    closer: Option<SessionCloser>,
    link: Option<LinkHandle>,
}

pub struct MembershipState {
    args: MembershipArgs,
    records: BTreeMap<String, Record>,
    next_session: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl MembershipState {
    /// The peers that were up at least once; sessions still starting are
    /// not members yet.
    fn snapshot(&self) -> Vec<Member> {
        self.records
            .values()
            .filter(|r| r.member.ups > 0)
            .map(|r| r.member.clone())
            .collect()
    }

    fn publish(&self) {
        self.args.publish.send_replace(self.snapshot());
    }

    /// Makes room for one more peer by forgetting the one down the longest.
    fn evict_one(&mut self) -> bool {
        let oldest = self
            .records
            .iter()
            .filter(|(_, r)| !r.member.up && r.closer.is_none())
            .min_by_key(|(_, r)| r.member.since)
            .map(|(k, _)| k.clone());
        match oldest {
            Some(k) => self.records.remove(&k).is_some(),
            None => false,
        }
    }
}

impl Actor for Membership {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MembershipMsg>,
        args: MembershipArgs,
    ) -> Result<MembershipState, ActorProcessingErr> {
        if args.rtt_sample_interval_ms > 0 {
            myself.send_interval(Duration::from_millis(args.rtt_sample_interval_ms), || {
                MembershipMsg::SampleRtt
            });
        }
        Ok(MembershipState {
            args,
            records: BTreeMap::new(),
            next_session: 1,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<MembershipMsg>,
        msg: MembershipMsg,
        state: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MembershipMsg::Opening { peer, role, reply } => {
                let key = peer.to_string();
                if !state.records.contains_key(&key)
                    && state.records.len() >= state.args.members_max
                    && !state.evict_one()
                {
                    let _ = reply.send(Err(MembershipFull {
                        members_max: state.args.members_max,
                    }));
                    return Ok(());
                }
                let session = state.next_session;
                state.next_session += 1;
                let record = state.records.entry(key.clone()).or_insert_with(|| Record {
                    member: Member {
                        peer: key,
                        role,
                        up: false,
                        since: SystemTime::now(),
                        rtt: None,
                        session,
                        ups: 0,
                    },
                    latest: session,
                    closer: None,
                    link: None,
                });
                record.latest = session;
                let stale = record.closer.take();
                let _ = reply.send(Ok((session, stale)));
            }
            MembershipMsg::Attach {
                peer,
                session,
                closer,
            } => match state.records.get_mut(peer.as_str()) {
                Some(r) if r.latest == session => r.closer = Some(closer),
                // Replaced while it started: end it, as its successor's
                // opening would have.
                _ => {
                    closer.close_and_wait(Duration::ZERO).await;
                }
            },
            MembershipMsg::Up {
                peer,
                session,
                link,
            } => {
                let Some(r) = state.records.get_mut(peer.as_str()) else {
                    return Ok(());
                };
                if r.latest != session {
                    return Ok(());
                }
                let now = SystemTime::now();
                let rtt = link.rtt();
                r.member.up = true;
                r.member.since = now;
                r.member.rtt = Some(rtt);
                r.member.session = session;
                r.member.ups += 1;
                r.link = Some(link);
                tracing::info!(
                    peer = %peer,
                    role = %r.member.role,
                    session,
                    rtt_ms = ms(rtt),
                    since_ms = unix_ms(now),
                    "member up"
                );
                state.publish();
            }
            MembershipMsg::Down {
                peer,
                session,
                reason,
            } => {
                let Some(r) = state.records.get_mut(peer.as_str()) else {
                    return Ok(());
                };
                if r.latest == session {
                    r.closer = None;
                }
                if r.member.up && r.member.session == session {
                    let now = SystemTime::now();
                    let up_ms = now.duration_since(r.member.since).map_or(0, ms);
                    r.member.up = false;
                    r.member.since = now;
                    r.link = None;
                    tracing::info!(
                        peer = %peer,
                        role = %r.member.role,
                        session,
                        up_ms,
                        since_ms = unix_ms(now),
                        %reason,
                        "member down"
                    );
                    state.publish();
                }
            }
            MembershipMsg::SampleRtt => {
                let mut changed = false;
                for r in state.records.values_mut() {
                    if let (true, Some(link)) = (r.member.up, &r.link) {
                        let rtt = Some(link.rtt());
                        changed |= r.member.rtt != rtt;
                        r.member.rtt = rtt;
                    }
                }
                if changed {
                    state.publish();
                }
            }
        }
        Ok(())
    }
}
