//! Frames over a QUIC stream: the uplink's only I/O.
//!
//! The uplink runs on its own bi-stream of the one connection per edge and
//! cloud pair, so bulk segments never queue behind ractor's control messages.

use std::time::Duration;

use super::frame::{self, Frame, FrameDecoder, FrameError};

/// How many bytes one read takes from the stream at most. Bounds the buffer
/// between the socket and the frame decoder.
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("writing a frame failed: {0}")]
    Write(String),
    #[error("reading a frame failed: {0}")]
    Read(String),
    #[error("malformed frame: {0}")]
    Malformed(#[from] FrameError),
    #[error("the peer closed the stream in the middle of a frame")]
    Truncated,
}

pub struct FrameWriter {
    send: quinn::SendStream,
}

impl FrameWriter {
    pub fn new(send: quinn::SendStream) -> Self {
        Self { send }
    }

    pub async fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        let bytes = frame::encode(frame);
        self.send
            .write_all(&bytes)
            .await
            .map_err(|e| LinkError::Write(e.to_string()))
    }

    /// Writes raw bytes, bypassing the encoder: for tests of what a
    /// misbehaving peer could send.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|e| LinkError::Write(e.to_string()))
    }

    /// Finishes the stream so the peer reads a clean end.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, frame_bytes_max: usize) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(frame_bytes_max),
        }
    }

    /// The next frame, or `None` at a clean end of stream.
    pub async fn recv(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            // Read no further than the current frame, so that at most one
            // frame (bounded by frame_bytes_max) is ever buffered. quinn
            // hands over its own buffer: no zeroed chunk per read (that
            // memset was 8 % of a busy cloud node's CPU).
            let want = self.decoder.bytes_wanted().min(READ_CHUNK_BYTES_MAX);
            match self.recv.read_chunk(want, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) if self.decoder.buffered_bytes() == 0 => return Ok(None),
                Ok(None) => return Err(LinkError::Truncated),
                Err(e) => return Err(LinkError::Read(e.to_string())),
            }
        }
    }
}

/// A handle on the connection that carries a link.
#[derive(Clone)]
pub struct LinkHandle {
    conn: quinn::Connection,
}

impl LinkHandle {
    pub fn new(conn: quinn::Connection) -> Self {
        Self { conn }
    }

    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    pub fn close(&self, code: u32, reason: &str) {
        self.conn.close(code.into(), reason.as_bytes());
    }

    /// Resolves when the connection is gone, with the reason.
    pub async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }

    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.conn.remote_address()
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

/// Why an uplink could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UplinkSetupError {
    #[error(transparent)]
    Quic(#[from] crate::quic::QuicError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the edge's first frame was not Hello")]
    NoHello,
    #[error("no Hello within {0} ms")]
    HelloTimeout(u64),
    #[error("the edge id {claimed:?} in Hello is not a valid node id: {reason}")]
    BadEdgeId { claimed: String, reason: String },
    #[error("the edge says it is {claimed:?} but its certificate does not name it: {reason}")]
    IdentityMismatch { claimed: String, reason: String },
    #[error("the connection opened no stream within {timeout_ms} ms")]
    FirstStreamTimeout { timeout_ms: u64 },
    #[error("resolving the cloud node {target}: {reason}")]
    Resolve { target: String, reason: String },
    #[error("an edge needs at least one cloud node to dial")]
    NoClouds,
}

/// The edge's end of a fresh uplink: Hello is not sent yet.
pub struct DialedUplink {
    pub reader: FrameReader,
    pub writer: FrameWriter,
    pub handle: LinkHandle,
    /// The cloud node's place in the edge's order of preference (0: its
    /// first choice).
    pub rank: usize,
}

/// Connects to a cloud node and opens the uplink stream.
pub async fn dial_uplink(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    quic: &crate::quic::QuicConfig,
    frame_bytes_max: usize,
) -> Result<DialedUplink, UplinkSetupError> {
    let conn = crate::quic::connect(endpoint, addr, quic).await?;
    let (send, recv) = match crate::quic::open_stream(&conn, crate::quic::StreamKind::Uplink).await
    {
        Ok(s) => s,
        Err(e) => {
            conn.close(
                crate::quic::CLOSE_SHUTDOWN,
                b"opening the uplink stream failed",
            );
            return Err(e.into());
        }
    };
    Ok(DialedUplink {
        reader: FrameReader::new(recv, frame_bytes_max),
        writer: FrameWriter::new(send),
        handle: LinkHandle::new(conn),
        rank: 0,
    })
}

/// The cloud's end of an uplink whose Hello was read and whose claimed edge
/// id was checked against the peer's certificate.
pub struct AcceptedUplink {
    pub edge_id: crate::tls::NodeId,
    /// The labels the edge's certificate carries, sorted.
    pub labels: Vec<String>,
    pub epoch: u64,
    pub next_seq: u64,
    pub reader: FrameReader,
    pub writer: FrameWriter,
    pub handle: LinkHandle,
}

/// Reads the Hello on an uplink stream and binds its edge id to the
/// connection's certificate. On error the caller closes the connection.
pub async fn accept_uplink(
    conn: &quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    frame_bytes_max: usize,
    hello_timeout_ms: u64,
) -> Result<AcceptedUplink, UplinkSetupError> {
    let mut reader = FrameReader::new(recv, frame_bytes_max);
    let first = tokio::time::timeout(Duration::from_millis(hello_timeout_ms), reader.recv())
        .await
        .map_err(|_| UplinkSetupError::HelloTimeout(hello_timeout_ms))??;
    let Some(Frame::Hello {
        edge_id,
        epoch,
        next_seq,
    }) = first
    else {
        return Err(UplinkSetupError::NoHello);
    };
    let id = crate::tls::NodeId::new(edge_id.clone()).map_err(|e| UplinkSetupError::BadEdgeId {
        claimed: edge_id.clone(),
        reason: e.to_string(),
    })?;
    let certs = crate::quic::peer_certificates(conn);
    crate::tls::verify_peer_identity(&certs, &id, crate::tls::Role::Edge).map_err(|e| {
        UplinkSetupError::IdentityMismatch {
            claimed: edge_id.clone(),
            reason: e.to_string(),
        }
    })?;
    let labels =
        crate::tls::peer_labels(&certs).map_err(|e| UplinkSetupError::IdentityMismatch {
            claimed: edge_id.clone(),
            reason: e.to_string(),
        })?;
    Ok(AcceptedUplink {
        edge_id: id,
        labels,
        epoch,
        next_seq,
        reader,
        writer: FrameWriter::new(send),
        handle: LinkHandle::new(conn.clone()),
    })
}

/// What an edge needs to (re)connect its uplink: the endpoint and where the
/// cloud is. Cheap to clone.
#[derive(Clone)]
pub struct EdgeConnector {
    endpoint: quinn::Endpoint,
    /// In the edge's order of preference.
    clouds: Vec<CloudTarget>,
    quic: crate::quic::QuicConfig,
    frame_bytes_max: usize,
}

/// The most cloud nodes one edge may be given.
pub const CLOUDS_MAX: usize = 16;

/// A cloud node an edge may dial: an address, or a DNS name resolved at
/// every dial (so that a replaced cloud node may come back elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CloudTarget {
    Addr(std::net::SocketAddr),
    Name { host: String, port: u16 },
}

impl std::str::FromStr for CloudTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(a) = s.parse::<std::net::SocketAddr>() {
            return Ok(Self::Addr(a));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: the port {port:?} is not a number from 1 to 65535"))?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if port == 0 || host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is neither an IP address with a port nor a DNS name with a port"
            ));
        }
        Ok(Self::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl std::fmt::Display for CloudTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl CloudTarget {
    async fn resolve(&self, timeout_ms: u64) -> Result<std::net::SocketAddr, UplinkSetupError> {
        let (host, port) = match self {
            Self::Addr(a) => return Ok(*a),
            Self::Name { host, port } => (host.as_str(), *port),
        };
        let err = |reason: String| UplinkSetupError::Resolve {
            target: self.to_string(),
            reason,
        };
        let found = tokio::time::timeout(
            std::time::Duration::from_millis(timeout_ms),
            tokio::net::lookup_host((host, port)),
        )
        .await
        .map_err(|_| err(format!("no answer within {timeout_ms} ms")))?
        .map_err(|e| err(e.to_string()))?;
        // The endpoint is bound for IPv4 unless the first target says
        // otherwise; take an address of that family first.
        let mut found: Vec<_> = found.collect();
        found.sort_by_key(|a| !a.is_ipv4());
        found
            .into_iter()
            .next()
            .ok_or_else(|| err("no address".into()))
    }
}

/// Rendezvous (highest random weight) score of `target` for `key`: every
/// edge with the same key ranks the same cloud nodes the same way, and a
/// cloud node leaving moves only the keys it ranked first.
fn rendezvous_score(key: &str, target: &CloudTarget) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(target.to_string().into_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV alone spreads close keys poorly.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// `clouds` in the order an edge with `key` prefers them.
pub fn rank_clouds(key: &str, mut clouds: Vec<CloudTarget>) -> Vec<CloudTarget> {
    clouds.sort_by_key(|c| std::cmp::Reverse(rendezvous_score(key, c)));
    clouds
}

impl EdgeConnector {
    /// An edge with one cloud node.
    pub fn new(
        identity: &crate::tls::NodeIdentity,
        cloud_addr: std::net::SocketAddr,
        quic: crate::quic::QuicConfig,
        frame_bytes_max: usize,
    ) -> Result<Self, UplinkSetupError> {
        Self::new_on(
            &crate::net::OsNetwork,
            identity,
            cloud_addr,
            quic,
            frame_bytes_max,
        )
    }

    /// [`EdgeConnector::new`] on the given network.
    pub fn new_on(
        network: &dyn crate::net::Network,
        identity: &crate::tls::NodeIdentity,
        cloud_addr: std::net::SocketAddr,
        quic: crate::quic::QuicConfig,
        frame_bytes_max: usize,
    ) -> Result<Self, UplinkSetupError> {
        Self::to_clouds_on(
            network,
            identity,
            vec![CloudTarget::Addr(cloud_addr)],
            "",
            quic,
            frame_bytes_max,
        )
    }

    /// An edge with several cloud nodes, dialled in the rendezvous order of
    /// `placement_key` (edges of one log shard share a key, so that they
    /// all prefer the same cloud node and its writer of that shard).
    pub fn to_clouds(
        identity: &crate::tls::NodeIdentity,
        clouds: Vec<CloudTarget>,
        placement_key: &str,
        quic: crate::quic::QuicConfig,
        frame_bytes_max: usize,
    ) -> Result<Self, UplinkSetupError> {
        Self::to_clouds_on(
            &crate::net::OsNetwork,
            identity,
            clouds,
            placement_key,
            quic,
            frame_bytes_max,
        )
    }

    /// [`EdgeConnector::to_clouds`] on the given network.
    pub fn to_clouds_on(
        network: &dyn crate::net::Network,
        identity: &crate::tls::NodeIdentity,
        clouds: Vec<CloudTarget>,
        placement_key: &str,
        quic: crate::quic::QuicConfig,
        frame_bytes_max: usize,
    ) -> Result<Self, UplinkSetupError> {
        if clouds.is_empty() {
            return Err(UplinkSetupError::NoClouds);
        }
        let clouds = rank_clouds(placement_key, clouds);
        let bind = match clouds.iter().find_map(|c| match c {
            CloudTarget::Addr(a) => Some(*a),
            CloudTarget::Name { .. } => None,
        }) {
            Some(a) => crate::quic::unspecified_bind_for(a),
            None => std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
        };
        let endpoint = crate::quic::client_endpoint_on(network, bind, identity, &quic)?;
        Ok(Self {
            endpoint,
            clouds,
            quic,
            frame_bytes_max,
        })
    }

    /// The cloud nodes, in this edge's order of preference.
    pub fn clouds(&self) -> &[CloudTarget] {
        &self.clouds
    }

    /// The cloud node this edge prefers.
    pub fn cloud_addr(&self) -> String {
        self.clouds[0].to_string()
    }

    /// Dials the cloud nodes in order of preference; the first that answers
    /// wins. The error is the last one's.
    pub async fn connect(&self) -> Result<DialedUplink, UplinkSetupError> {
        self.connect_avoiding(None).await
    }

    /// [`EdgeConnector::connect`], but the cloud node of rank `last_lost`
    /// (the one whose link just went down) is tried last, so that a dead
    /// first choice does not cost a connect timeout before every failover.
    pub async fn connect_avoiding(
        &self,
        last_lost: Option<usize>,
    ) -> Result<DialedUplink, UplinkSetupError> {
        let order: Vec<usize> = (0..self.clouds.len())
            .filter(|i| Some(*i) != last_lost)
            .chain(last_lost.filter(|i| *i < self.clouds.len()))
            .collect();
        self.dial_in(&order).await
    }

    /// Whether a cloud node this edge prefers to the one of `rank` answers:
    /// a handshake, closed at once, with no stream (so the node counts no
    /// uplink that never said Hello). Returns the rank of the first that did.
    pub async fn probe_above(&self, rank: usize) -> Result<usize, UplinkSetupError> {
        let mut last = UplinkSetupError::NoClouds;
        for (i, target) in self.clouds.iter().enumerate().take(rank) {
            let attempt = async {
                let addr = target.resolve(self.quic.connect_timeout_ms).await?;
                Ok::<_, UplinkSetupError>(
                    crate::quic::connect(&self.endpoint, addr, &self.quic).await?,
                )
            };
            match attempt.await {
                Ok(conn) => {
                    conn.close(crate::quic::CLOSE_SHUTDOWN, b"probe");
                    return Ok(i);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn dial_in(&self, order: &[usize]) -> Result<DialedUplink, UplinkSetupError> {
        let mut last = UplinkSetupError::NoClouds;
        for &i in order {
            let target = &self.clouds[i];
            let attempt = async {
                let addr = target.resolve(self.quic.connect_timeout_ms).await?;
                dial_uplink(&self.endpoint, addr, &self.quic, self.frame_bytes_max).await
            };
            match attempt.await {
                Ok(mut d) => {
                    d.rank = i;
                    return Ok(d);
                }
                Err(e) => {
                    tracing::debug!(cloud = %target, error = %e, "a cloud node did not answer");
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// The cloud's QUIC endpoint, accepting edges.
pub struct CloudEndpoint {
    endpoint: quinn::Endpoint,
    quic: crate::quic::QuicConfig,
    frame_bytes_max: usize,
    hello_timeout_ms: u64,
}

/// A bi-stream that carries a ractor_cluster session, handed to
/// [`crate::session`] as is.
pub struct SessionStreams {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

pub enum IncomingStream {
    Uplink(Box<AcceptedUplink>),
    Session(SessionStreams),
    /// The peer's status reports, with its certified id.
    Report(Box<crate::reports::ReportReader>),
}

/// A connection attempt whose handshake has not completed yet.
pub struct PendingConnection {
    incoming: quinn::Incoming,
    quic: crate::quic::QuicConfig,
    frame_bytes_max: usize,
    hello_timeout_ms: u64,
}

impl PendingConnection {
    /// Whether the peer proved it owns its address (it came back with a
    /// Retry token): a flood of spoofed Initials cannot.
    pub fn address_validated(&self) -> bool {
        self.incoming.remote_address_validated()
    }

    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.incoming.remote_address()
    }

    /// Answers with a stateless Retry, which a real client follows with a
    /// token proving its address; nothing is kept meanwhile. Refuses instead
    /// if the attempt already carried a token.
    pub fn retry(self) {
        if self.incoming.may_retry() {
            let _ = self.incoming.retry();
        } else {
            self.incoming.refuse();
        }
    }

    /// Refuses the attempt (the peer is told the server is busy).
    pub fn refuse(self) {
        self.incoming.refuse();
    }

    /// Completes the handshake (which verifies the peer's certificate chain),
    /// within `connect_timeout_ms`.
    pub async fn complete(self) -> Result<IncomingConnection, UplinkSetupError> {
        let conn = crate::quic::complete_handshake(self.incoming, &self.quic).await?;
        Ok(IncomingConnection {
            conn,
            quic: self.quic,
            frame_bytes_max: self.frame_bytes_max,
            hello_timeout_ms: self.hello_timeout_ms,
        })
    }
}

/// One edge's connection, before its streams are known.
#[derive(Clone)]
pub struct IncomingConnection {
    conn: quinn::Connection,
    quic: crate::quic::QuicConfig,
    frame_bytes_max: usize,
    hello_timeout_ms: u64,
}

impl CloudEndpoint {
    pub fn bind(
        addr: std::net::SocketAddr,
        identity: &crate::tls::NodeIdentity,
        quic: crate::quic::QuicConfig,
        frame_bytes_max: usize,
        hello_timeout_ms: u64,
    ) -> Result<Self, UplinkSetupError> {
        Self::bind_on(
            &crate::net::OsNetwork,
            addr,
            identity,
            quic,
            frame_bytes_max,
            hello_timeout_ms,
        )
    }

    /// [`CloudEndpoint::bind`] on the given network.
    pub fn bind_on(
        network: &dyn crate::net::Network,
        addr: std::net::SocketAddr,
        identity: &crate::tls::NodeIdentity,
        quic: crate::quic::QuicConfig,
        frame_bytes_max: usize,
        hello_timeout_ms: u64,
    ) -> Result<Self, UplinkSetupError> {
        let endpoint = crate::quic::server_endpoint_on(network, addr, identity, &quic)?;
        Ok(Self {
            endpoint,
            quic,
            frame_bytes_max,
            hello_timeout_ms,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next connection attempt; `None` once the endpoint is closed. Its
    /// handshake is completed by [`PendingConnection::complete`], which the
    /// caller runs in its own task, so that one slow peer delays no other.
    pub async fn accept(&self) -> Option<PendingConnection> {
        let incoming = self.endpoint.accept().await?;
        Some(PendingConnection {
            incoming,
            quic: self.quic.clone(),
            frame_bytes_max: self.frame_bytes_max,
            hello_timeout_ms: self.hello_timeout_ms,
        })
    }

    pub fn close(&self) {
        self.endpoint
            .close(crate::quic::CLOSE_SHUTDOWN, b"cloud node stopping");
    }
}

impl IncomingConnection {
    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.conn.remote_address()
    }

    /// The peer's id and role, from its certificate.
    pub fn peer(&self) -> Result<(crate::tls::NodeId, crate::tls::Role), crate::tls::TlsError> {
        crate::tls::peer_identity(&crate::quic::peer_certificates(&self.conn))
    }

    /// The connection's first stream, which must come within
    /// `first_stream_timeout_ms`: a connection that opens none holds a
    /// set-up slot for nothing.
    pub async fn first_stream(&self) -> Result<IncomingStream, UplinkSetupError> {
        let timeout = Duration::from_millis(self.quic.first_stream_timeout_ms);
        match tokio::time::timeout(timeout, self.next_stream()).await {
            Ok(r) => r,
            Err(_) => Err(UplinkSetupError::FirstStreamTimeout {
                timeout_ms: self.quic.first_stream_timeout_ms,
            }),
        }
    }

    /// Closes the connection as refused (too many of this peer's).
    pub fn close_refused(&self, reason: &str) {
        self.conn
            .close(crate::quic::CLOSE_REFUSED, reason.as_bytes());
    }

    pub fn handle(&self) -> LinkHandle {
        LinkHandle::new(self.conn.clone())
    }

    /// The next stream the edge opens, routed by its kind byte. An uplink
    /// stream comes back with its Hello read and its edge id verified.
    pub async fn next_stream(&self) -> Result<IncomingStream, UplinkSetupError> {
        let (kind, send, recv) = crate::quic::accept_stream(&self.conn, &self.quic).await?;
        match kind {
            crate::quic::StreamKind::Uplink => {
                let up = accept_uplink(
                    &self.conn,
                    send,
                    recv,
                    self.frame_bytes_max,
                    self.hello_timeout_ms,
                )
                .await?;
                Ok(IncomingStream::Uplink(Box::new(up)))
            }
            crate::quic::StreamKind::Session => {
                Ok(IncomingStream::Session(SessionStreams { send, recv }))
            }
            crate::quic::StreamKind::Report => {
                drop(send);
                let (peer, _) = self.peer().map_err(crate::quic::QuicError::from)?;
                Ok(IncomingStream::Report(Box::new(
                    crate::reports::ReportReader::new(peer, recv),
                )))
            }
        }
    }

    /// Closes the connection, telling the peer why.
    pub fn close_protocol_error(&self, reason: &str) {
        self.conn
            .close(crate::quic::CLOSE_PROTOCOL_ERROR, reason.as_bytes());
    }

    pub fn close_identity_mismatch(&self, reason: &str) {
        self.conn
            .close(crate::quic::CLOSE_IDENTITY_MISMATCH, reason.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::{rank_clouds, CloudTarget};

    fn targets(n: usize) -> Vec<CloudTarget> {
        (0..n)
            .map(|i| format!("10.0.0.{i}:7400").parse().expect("an address"))
            .collect()
    }

    #[test]
    fn every_edge_of_a_shard_ranks_the_clouds_alike_whatever_their_order() {
        let clouds = targets(5);
        let mut reversed = clouds.clone();
        reversed.reverse();
        for k in 0..32 {
            let key = format!("shard/{k}");
            assert_eq!(
                rank_clouds(&key, clouds.clone()),
                rank_clouds(&key, reversed.clone())
            );
        }
    }

    #[test]
    fn a_cloud_leaving_moves_only_the_shards_it_ranked_first() {
        let clouds = targets(4);
        let gone = clouds[2].clone();
        let rest: Vec<CloudTarget> = clouds.iter().filter(|c| **c != gone).cloned().collect();
        let mut firsts = std::collections::HashMap::new();
        for k in 0..256 {
            let key = format!("shard/{k}");
            let before = rank_clouds(&key, clouds.clone());
            let after = rank_clouds(&key, rest.clone());
            *firsts.entry(before[0].clone()).or_insert(0) += 1;
            if before[0] != gone {
                assert_eq!(before[0], after[0], "{key} moved though its cloud stayed");
            } else {
                // It goes to its second choice.
                assert_eq!(after[0], before[1], "{key}");
            }
        }
        // Spread: every cloud is someone's first choice, none takes most.
        assert_eq!(firsts.len(), 4, "{firsts:?}");
        assert!(firsts.values().all(|n| *n < 128), "{firsts:?}");
    }
}
