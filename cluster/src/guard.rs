//! The session guard: reads what a peer sends over its ractor session before
//! ractor does, and stops the session on what a peer must not do.
//!
//! ractor_cluster trusts every authenticated session with the whole node:
//! the name a peer presents decides which session wins an election (so an
//! edge presenting another node's name could end that node's session), and a
//! peer may announce any number of actors, join any process group, and ask
//! for the list of the node's other sessions. QUIC's mutual TLS says who the
//! peer is; this guard holds it to that, frame by frame:
//! - every name-bearing handshake message (the client's `NameMessage`, the
//!   server's `Challenge`) must carry the name its certificate gives, or the
//!   frame never reaches ractor and the session ends;
//! - a peer may join only the process groups its [`SessionPolicy`] allows
//!   (an edge, its own control groups): any other join is dropped before
//!   ractor sees it, and counted (a node advertises every group of its
//!   process, so nodes sharing a process, as in tests, announce each
//!   other's groups: dropping, not ending the session, keeps them working);
//! - a peer may announce at most `remote_actors_max` actors and
//!   `group_joins_max` group joins over a session;
//! - asking for the node's sessions (ractor's transitive mode, which
//!   Tributary never uses) is refused.
//!
//! A frame is ractor's: a `u64` big-endian length, then a protobuf
//! `NetworkMessage` (see ractor_cluster's `protocol/*.proto`). Only the few
//! fields above are read, with a minimal protobuf walker; a frame the guard
//! cannot read is passed on, for ractor's own decoder to refuse.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::tls::{NodeId, Role};

/// Which process groups a peer may join, by its certified id and role.
pub type JoinRule = Arc<dyn Fn(&NodeId, Role, &str) -> bool + Send + Sync>;

/// What a node allows the peers of its sessions.
#[derive(Clone)]
pub struct SessionPolicy {
    pub may_join: JoinRule,
    /// Actors a peer may announce (spawned or in groups) over one session.
    pub remote_actors_max: usize,
    /// Group joins a peer may announce over one session.
    pub group_joins_max: usize,
}

/// Actors a peer may announce over one session unless told otherwise: a
/// node advertises only its actors with serializable messages (a handful).
pub const REMOTE_ACTORS_MAX_DEFAULT: usize = 1024;
/// Group joins a peer may announce over one session unless told otherwise.
pub const GROUP_JOINS_MAX_DEFAULT: usize = 1024;

impl Default for SessionPolicy {
    fn default() -> Self {
        Self {
            may_join: Arc::new(|_, _, _| true),
            remote_actors_max: REMOTE_ACTORS_MAX_DEFAULT,
            group_joins_max: GROUP_JOINS_MAX_DEFAULT,
        }
    }
}

impl std::fmt::Debug for SessionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPolicy")
            .field("remote_actors_max", &self.remote_actors_max)
            .field("group_joins_max", &self.group_joins_max)
            .finish_non_exhaustive()
    }
}

/// What the guard refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A handshake message named another node.
    Name { expected: String, presented: String },
    /// A join of a group the peer may not join.
    Group(String),
    /// More actors or joins than the policy allows.
    TooMany { what: &'static str, max: usize },
    /// A request for the node's other sessions.
    Enumerate,
    /// A frame longer than the session allows.
    FrameTooLong { len: u64, max: u64 },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Name {
                expected,
                presented,
            } => write!(
                f,
                "the peer presented ractor node name {presented:?}, its certificate says {expected:?}"
            ),
            Violation::Group(g) => write!(f, "the peer may not join process group {g:?}"),
            Violation::TooMany { what, max } => {
                write!(f, "the peer announced more than {max} {what}")
            }
            Violation::Enumerate => f.write_str("the peer asked for this node's sessions"),
            Violation::FrameTooLong { len, max } => {
                write!(f, "a session frame of {len} bytes, more than {max}")
            }
        }
    }
}

static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static JOINS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Sessions ended by the guard, since the process started.
pub fn violations() -> u64 {
    VIOLATIONS.load(Ordering::Relaxed)
}

/// Group joins the guard dropped, since the process started.
pub fn joins_dropped() -> u64 {
    JOINS_DROPPED.load(Ordering::Relaxed)
}

/// What becomes of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    /// Never reaches ractor; the session goes on.
    Drop,
}

fn policies() -> &'static Mutex<HashMap<String, SessionPolicy>> {
    static P: OnceLock<Mutex<HashMap<String, SessionPolicy>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

/// Sets the policy of the sessions of node `local` (its NodeServer's
/// sessions); until set, the default (any group, default bounds).
pub fn set_policy(local: &NodeId, policy: SessionPolicy) {
    if let Ok(mut p) = policies().lock() {
        p.insert(local.to_string(), policy);
    }
}

pub(crate) fn policy_of(local: &str) -> SessionPolicy {
    policies()
        .lock()
        .ok()
        .and_then(|p| p.get(local).cloned())
        .unwrap_or_default()
}

/// A protobuf field: its number, and its value for the two wire types read.
enum Field<'a> {
    Varint,
    Bytes(&'a [u8]),
}

fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of a protobuf message, or `None` if it does not parse.
fn fields(msg: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < msg.len() {
        let key = varint(msg, &mut at)?;
        let (number, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => {
                varint(msg, &mut at)?;
                Field::Varint
            }
            1 => {
                at = at.checked_add(8).filter(|e| *e <= msg.len())?;
                Field::Varint
            }
            2 => {
                let len = usize::try_from(varint(msg, &mut at)?).ok()?;
                let end = at.checked_add(len).filter(|e| *e <= msg.len())?;
                let v = &msg[at..end];
                at = end;
                Field::Bytes(v)
            }
            5 => {
                at = at.checked_add(4).filter(|e| *e <= msg.len())?;
                Field::Varint
            }
            _ => return None,
        };
        out.push((number, value));
    }
    Some(out)
}

fn field<'a>(fs: &[(u64, Field<'a>)], number: u64) -> Option<&'a [u8]> {
    fs.iter().find_map(|(n, v)| match v {
        Field::Bytes(b) if *n == number => Some(*b),
        _ => None,
    })
}

fn count(fs: &[(u64, Field<'_>)], number: u64) -> usize {
    fs.iter().filter(|(n, _)| *n == number).count()
}

/// What the guard keeps of one session.
pub(crate) struct Guard {
    expected_name: String,
    peer: NodeId,
    role: Role,
    policy: SessionPolicy,
    actors: usize,
    joins: usize,
    joins_dropped: u64,
    frame_bytes_max: u64,
}

impl Guard {
    pub(crate) fn new(
        expected_name: String,
        peer: NodeId,
        role: Role,
        policy: SessionPolicy,
        frame_bytes_max: u64,
    ) -> Self {
        Self {
            expected_name,
            peer,
            role,
            policy,
            actors: 0,
            joins: 0,
            joins_dropped: 0,
            frame_bytes_max,
        }
    }

    /// Checks one frame's payload (a `NetworkMessage`).
    pub(crate) fn check(&mut self, frame: &[u8]) -> Result<Verdict, Violation> {
        let Some(top) = fields(frame) else {
            return Ok(Verdict::Pass);
        };
        if let Some(auth) = field(&top, 1).and_then(fields) {
            // NameMessage (1) and Challenge (4) both carry the name as field 1.
            for number in [1, 4] {
                if let Some(named) = field(&auth, number).and_then(fields) {
                    let presented = field(&named, 1)
                        .map(|n| String::from_utf8_lossy(n).into_owned())
                        .unwrap_or_default();
                    if presented != self.expected_name {
                        return Err(Violation::Name {
                            expected: self.expected_name.clone(),
                            presented,
                        });
                    }
                }
            }
        }
        if let Some(control) = field(&top, 3).and_then(fields) {
            if field(&control, 7).is_some() {
                return Err(Violation::Enumerate);
            }
            if let Some(spawn) = field(&control, 1).and_then(fields) {
                self.actors += count(&spawn, 1);
            }
            if let Some(join) = field(&control, 5).and_then(fields) {
                let group = field(&join, 1)
                    .map(|g| String::from_utf8_lossy(g).into_owned())
                    .unwrap_or_default();
                if !(self.policy.may_join)(&self.peer, self.role, &group) {
                    self.joins_dropped += 1;
                    JOINS_DROPPED.fetch_add(1, Ordering::Relaxed);
                    if self.joins_dropped == 1 {
                        tracing::warn!(peer = %self.peer, %group, "a peer announced a process group it may not join; dropped (and any further ones)");
                    }
                    return Ok(Verdict::Drop);
                }
                self.joins += 1;
                self.actors += count(&join, 2);
            }
            if self.actors > self.policy.remote_actors_max {
                return Err(Violation::TooMany {
                    what: "actors",
                    max: self.policy.remote_actors_max,
                });
            }
            if self.joins > self.policy.group_joins_max {
                return Err(Violation::TooMany {
                    what: "group joins",
                    max: self.policy.group_joins_max,
                });
            }
        }
        Ok(Verdict::Pass)
    }
}

/// Reads a peer's bytes for ractor one whole frame at a time, each checked
/// by the [`Guard`] before ractor sees it.
pub(crate) struct GuardedRead<R> {
    inner: R,
    guard: Guard,
    /// Bytes read from the peer and not yet handed to ractor; the first
    /// `checked` of them are checked frames.
    pending: Vec<u8>,
    checked: usize,
    on_violation: Box<dyn Fn(Violation) + Send + Sync>,
    failed: bool,
}

/// Bytes the guard reads from the peer at a time.
const READ_CHUNK_BYTES: usize = 16 * 1024;

impl<R> GuardedRead<R> {
    pub(crate) fn new(
        inner: R,
        guard: Guard,
        on_violation: Box<dyn Fn(Violation) + Send + Sync>,
    ) -> Self {
        Self {
            inner,
            guard,
            pending: Vec::new(),
            checked: 0,
            on_violation,
            failed: false,
        }
    }

    /// Checks the whole frames at the front of what is pending.
    fn check_pending(&mut self) -> Result<(), Violation> {
        loop {
            let rest = &self.pending[self.checked..];
            let Some(header) = rest.get(..8) else {
                return Ok(());
            };
            let len = u64::from_be_bytes(header.try_into().expect("8 bytes"));
            if len > self.guard.frame_bytes_max {
                return Err(Violation::FrameTooLong {
                    len,
                    max: self.guard.frame_bytes_max,
                });
            }
            let total = 8 + len as usize;
            if rest.len() < total {
                return Ok(());
            }
            match self.guard.check(&rest[8..total])? {
                Verdict::Pass => self.checked += total,
                Verdict::Drop => {
                    let at = self.checked;
                    self.pending.drain(at..at + total);
                }
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for GuardedRead<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Checked frames go first, even those before a violation.
            if this.checked > 0 {
                let n = this.checked.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.drain(..n);
                this.checked -= n;
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the session guard stopped this session",
                )));
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // The peer finished: a partial frame is dropped with it.
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    this.pending.extend_from_slice(read.filled());
                    if let Err(v) = this.check_pending() {
                        this.failed = true;
                        // The offending frame and what follows never reach ractor.
                        this.pending.truncate(this.checked);
                        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
                        (this.on_violation)(v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(number: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, number << 3 | 2);
        put_varint(&mut out, value.len() as u64);
        out.extend_from_slice(value);
        out
    }

    /// NetworkMessage { auth: AuthenticationMessage { name: NameMessage { name } } }.
    fn name_frame(name: &str) -> Vec<u8> {
        let mut named = bytes_field(1, name.as_bytes());
        // connection_id = 1 (a varint field 4), as an impostor would send it.
        named.extend_from_slice(&[4 << 3, 1]);
        bytes_field(1, &bytes_field(1, &named))
    }

    fn join_frame(group: &str, actors: usize) -> Vec<u8> {
        let mut join = bytes_field(1, group.as_bytes());
        for pid in 0..actors {
            let mut actor = Vec::new();
            put_varint(&mut actor, 1 << 3);
            put_varint(&mut actor, pid as u64);
            join.extend(bytes_field(2, &actor));
        }
        bytes_field(3, &bytes_field(5, &join))
    }

    fn guard(policy: SessionPolicy) -> Guard {
        let policy = SessionPolicy {
            may_join: Arc::new(move |p, r, g| g != "not-mine" && (policy.may_join)(p, r, g)),
            ..policy
        };
        Guard::new(
            "edge-1@tributary".into(),
            NodeId::new("edge-1").unwrap(),
            Role::Edge,
            policy,
            1 << 20,
        )
    }

    #[test]
    fn a_name_other_than_the_certificate_s_is_refused() {
        let mut g = guard(SessionPolicy::default());
        assert_eq!(g.check(&name_frame("edge-1@tributary")), Ok(Verdict::Pass));
        assert!(matches!(
            g.check(&name_frame("edge-2@tributary")),
            Err(Violation::Name { presented, .. }) if presented == "edge-2@tributary"
        ));
        // The server's challenge carries its name too.
        let challenge = bytes_field(1, &bytes_field(4, &bytes_field(1, b"cloud-9@tributary")));
        assert!(g.check(&challenge).is_err());
        // What does not parse is ractor's to refuse.
        assert_eq!(g.check(&[0xff, 0xff, 0xff]), Ok(Verdict::Pass));
    }

    #[test]
    fn joins_and_announced_actors_are_bounded_by_the_policy() {
        let policy = SessionPolicy {
            may_join: Arc::new(|peer, _, group| group.ends_with(peer.as_str())),
            remote_actors_max: 5,
            group_joins_max: 10,
        };
        let mut g = guard(policy);
        assert_eq!(g.check(&join_frame("control.edge-1", 3)), Ok(Verdict::Pass));
        assert_eq!(g.check(&join_frame("control.edge-2", 1)), Ok(Verdict::Drop));
        assert!(matches!(
            g.check(&join_frame("control.edge-1", 3)),
            Err(Violation::TooMany { what: "actors", .. })
        ));
        let enumerate = bytes_field(3, &bytes_field(7, &[]));
        assert_eq!(g.check(&enumerate), Err(Violation::Enumerate));
    }

    #[tokio::test]
    async fn the_reader_hands_over_checked_frames_whole_and_stops_at_a_violation() {
        let mut wire = Vec::new();
        let frames = [
            name_frame("edge-1@tributary"),
            join_frame("not-mine", 1),
            name_frame("edge-2@tributary"),
        ];
        for f in frames {
            wire.extend_from_slice(&(f.len() as u64).to_be_bytes());
            wire.extend_from_slice(&f);
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut r = GuardedRead::new(
            &wire[..],
            guard(SessionPolicy::default()),
            Box::new(move |v| s.lock().unwrap().push(v)),
        );
        let mut out = Vec::new();
        let err = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut out)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        // Only the first, good frame reached ractor: the join was dropped,
        // the impostor's name stopped the session.
        assert_eq!(out.len(), 8 + name_frame("edge-1@tributary").len());
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
