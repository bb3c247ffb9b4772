//! QUIC endpoints with mutual TLS, and the routing of bi-streams.
//!
//! One connection joins an edge and a cloud node. Every bi-stream on it opens
//! with one byte naming what it carries ([`StreamKind`]), as HTTP/3 does, so
//! the acceptor routes on that byte and never on the order streams arrive in.
//! Writing the byte at once also makes the stream visible to the peer: quinn
//! announces a stream only when its first frame is sent.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, IdleTimeout, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;

use crate::net::{Network, OsNetwork};
use crate::tls::{self, NodeIdentity, TlsError, CLOUD_SERVER_NAME};

// Closing codes of a Tributary connection, sent in CONNECTION_CLOSE so the
// peer's log says why.

/// A deliberate, orderly close (shutdown, or replaced by a newer connection).
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// The peer broke the protocol: an unknown stream kind, a malformed frame.
pub const CLOSE_PROTOCOL_ERROR: VarInt = VarInt::from_u32(1);
/// The peer's claimed identity does not match its certificate.
pub const CLOSE_IDENTITY_MISMATCH: VarInt = VarInt::from_u32(2);
/// The ractor session on this connection ended, so the connection has no
/// reason to live; the dialer reconnects.
pub const CLOSE_SESSION_ENDED: VarInt = VarInt::from_u32(3);
/// The peer was refused by policy (for example, an edge that is not allowed).
pub const CLOSE_REFUSED: VarInt = VarInt::from_u32(4);

/// A name for a close code, for logs.
pub fn close_code_name(code: VarInt) -> &'static str {
    match code.into_inner() {
        0 => "shutdown",
        1 => "protocol error",
        2 => "identity mismatch",
        3 => "session ended",
        4 => "refused",
        _ => "unknown",
    }
}

/// The limits of a connection. Both sides should use the same values: the
/// idle timeout in force is the smaller of the two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicConfig {
    /// How often an idle connection sends a PING, so the idle timeout only
    /// fires when the peer is really gone. Must be below `idle_timeout_ms`.
    pub keep_alive_interval_ms: u64,
    /// A connection with no packet from the peer for this long is dead. This
    /// is the cluster's failure detector (ractor's heartbeat never times out),
    /// so it bounds how long a dead link goes unnoticed.
    pub idle_timeout_ms: u64,
    /// How long dialing (UDP plus the TLS handshake) may take. Short, so that
    /// a dial made during a partition gives way to a fresh one soon after the
    /// heal; raise it for links whose round trip nears half of it.
    pub connect_timeout_ms: u64,
    /// How long an accepted stream may take to deliver its kind byte.
    pub stream_kind_timeout_ms: u64,
    /// Concurrent bi-streams the peer may open: a session and an uplink need
    /// two; the rest is headroom for a reconnecting peer's overlap.
    pub streams_bidi_max: u32,
    /// Bytes the peer may send on one stream before we read them.
    pub stream_receive_window_bytes: u32,
    /// Bytes the peer may send on all streams of a connection before we read.
    pub connection_receive_window_bytes: u32,
    /// Bytes we keep unacknowledged in flight across a connection.
    pub send_window_bytes: u64,
    /// Incoming connections accepted by the endpoint but not yet handed to
    /// the application; more are refused.
    pub incoming_max: usize,
    /// How long an accepted connection may take to open its first stream;
    /// a connection that opens none is closed, so idle connections cannot
    /// hold the server's set-up slots.
    pub first_stream_timeout_ms: u64,
}

/// The round trip assumed before one is measured; it paces handshake resends.
const INITIAL_RTT_MS: u64 = 100;

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            keep_alive_interval_ms: 200,
            idle_timeout_ms: 1_500,
            connect_timeout_ms: 1_000,
            stream_kind_timeout_ms: 2_000,
            streams_bidi_max: 8,
            stream_receive_window_bytes: 2 * 1024 * 1024,
            connection_receive_window_bytes: 8 * 1024 * 1024,
            send_window_bytes: 8 * 1024 * 1024,
            incoming_max: 256,
            first_stream_timeout_ms: 5_000,
        }
    }
}

impl QuicConfig {
    pub fn validate(&self) -> Result<(), QuicError> {
        let invalid = |field, rule| Err(QuicError::InvalidConfig { field, rule });
        if self.idle_timeout_ms == 0 {
            return invalid("idle_timeout_ms", "must be at least 1");
        }
        if self.keep_alive_interval_ms == 0 || self.keep_alive_interval_ms >= self.idle_timeout_ms {
            return invalid(
                "keep_alive_interval_ms",
                "must be at least 1 and below idle_timeout_ms",
            );
        }
        if self.connect_timeout_ms == 0 {
            return invalid("connect_timeout_ms", "must be at least 1");
        }
        if self.stream_kind_timeout_ms == 0 {
            return invalid("stream_kind_timeout_ms", "must be at least 1");
        }
        if self.streams_bidi_max < 2 {
            return invalid(
                "streams_bidi_max",
                "must be at least 2 (session and uplink)",
            );
        }
        if self.stream_receive_window_bytes == 0 {
            return invalid("stream_receive_window_bytes", "must be at least 1");
        }
        if self.connection_receive_window_bytes < self.stream_receive_window_bytes {
            return invalid(
                "connection_receive_window_bytes",
                "must be at least stream_receive_window_bytes",
            );
        }
        if self.send_window_bytes == 0 {
            return invalid("send_window_bytes", "must be at least 1");
        }
        if self.incoming_max == 0 {
            return invalid("incoming_max", "must be at least 1");
        }
        if self.first_stream_timeout_ms == 0 {
            return invalid("first_stream_timeout_ms", "must be at least 1");
        }
        Ok(())
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    fn transport(&self) -> Result<quinn::TransportConfig, QuicError> {
        self.validate()?;
        let idle =
            IdleTimeout::try_from(self.idle_timeout()).map_err(|_| QuicError::InvalidConfig {
                field: "idle_timeout_ms",
                rule: "must fit a QUIC varint",
            })?;
        let mut transport = quinn::TransportConfig::default();
        // quinn assumes 333 ms before it has measured a round trip, so an
        // unanswered handshake packet is resent only after ~1 s, then ~2 s:
        // a link healed meanwhile would sit unused. LAN and WAN links between
        // edges and the cloud answer well within 100 ms.
        transport.initial_rtt(Duration::from_millis(INITIAL_RTT_MS));
        transport
            .keep_alive_interval(Some(Duration::from_millis(self.keep_alive_interval_ms)))
            .max_idle_timeout(Some(idle))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.streams_bidi_max))
            // Nothing uses uni-streams or datagrams: refuse them outright.
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None)
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window_bytes))
            .receive_window(VarInt::from_u32(self.connection_receive_window_bytes))
            .send_window(self.send_window_bytes);
        Ok(transport)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("invalid QUIC config: {field} {rule}")]
    InvalidConfig {
        field: &'static str,
        rule: &'static str,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("wrap the {side} TLS config for QUIC: {source}")]
    QuicTls {
        side: &'static str,
        source: NoInitialCipherSuite,
    },
    #[error("bind the UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("start connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("handshake with {addr} timed out after {timeout_ms} ms")]
    HandshakeTimeout { addr: SocketAddr, timeout_ms: u64 },
    #[error("open a stream: {0}")]
    OpenStream(quinn::ConnectionError),
    #[error("write the stream kind: {0}")]
    WriteStreamKind(quinn::WriteError),
    #[error("accept a stream: {0}")]
    AcceptStream(quinn::ConnectionError),
    #[error("read the stream kind: {0}")]
    ReadStreamKind(quinn::ReadExactError),
    #[error("no stream kind byte within {timeout_ms} ms")]
    StreamKindTimeout { timeout_ms: u64 },
    #[error("unknown stream kind byte {byte}")]
    UnknownStreamKind { byte: u8 },
}

/// What a bi-stream carries, announced by its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StreamKind {
    /// The ractor_cluster session.
    Session = 1,
    /// The uplink's frames.
    Uplink = 2,
    /// A node's status reports for the cloud's dashboard (see
    /// [`crate::reports`]).
    Report = 3,
}

impl StreamKind {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Session),
            2 => Some(Self::Uplink),
            3 => Some(Self::Report),
            _ => None,
        }
    }
}

/// The wildcard address of the same family as `remote`, for a client socket.
pub fn unspecified_bind_for(remote: SocketAddr) -> SocketAddr {
    match remote {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// A server endpoint on `bind` that accepts only cluster nodes.
pub fn server_endpoint(
    bind: SocketAddr,
    identity: &NodeIdentity,
    config: &QuicConfig,
) -> Result<Endpoint, QuicError> {
    server_endpoint_on(&OsNetwork, bind, identity, config)
}

/// [`server_endpoint`] on the given network.
pub fn server_endpoint_on(
    network: &dyn Network,
    bind: SocketAddr,
    identity: &NodeIdentity,
    config: &QuicConfig,
) -> Result<Endpoint, QuicError> {
    let tls = tls::server_config(identity)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|source| QuicError::QuicTls {
        side: "server",
        source,
    })?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(config.transport()?));
    server.max_incoming(config.incoming_max);
    // A client that changes address is more likely an attack than a roaming
    // edge behind the same NAT; a reconnect is cheap.
    server.migration(false);
    let socket = network
        .bind(bind)
        .map_err(|source| QuicError::Bind { addr: bind, source })?;
    Endpoint::new_with_abstract_socket(
        network.endpoint_config(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| QuicError::Bind { addr: bind, source })
}

/// A client endpoint on `bind` (see [`unspecified_bind_for`]) that dials
/// cloud nodes, presenting this node's certificate.
pub fn client_endpoint(
    bind: SocketAddr,
    identity: &NodeIdentity,
    config: &QuicConfig,
) -> Result<Endpoint, QuicError> {
    client_endpoint_on(&OsNetwork, bind, identity, config)
}

/// [`client_endpoint`] on the given network.
pub fn client_endpoint_on(
    network: &dyn Network,
    bind: SocketAddr,
    identity: &NodeIdentity,
    config: &QuicConfig,
) -> Result<Endpoint, QuicError> {
    let tls = tls::client_config(identity)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|source| QuicError::QuicTls {
        side: "client",
        source,
    })?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(config.transport()?));
    let socket = network
        .bind(bind)
        .map_err(|source| QuicError::Bind { addr: bind, source })?;
    let mut endpoint = Endpoint::new_with_abstract_socket(
        network.endpoint_config(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| QuicError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Dials a cloud node at `addr`, within `connect_timeout_ms`.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    config: &QuicConfig,
) -> Result<Connection, QuicError> {
    let connecting = endpoint
        .connect(addr, CLOUD_SERVER_NAME)
        .map_err(|source| QuicError::Connect { addr, source })?;
    match tokio::time::timeout(config.connect_timeout(), connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(QuicError::Handshake { addr, source }),
        Err(_) => Err(QuicError::HandshakeTimeout {
            addr,
            timeout_ms: config.connect_timeout_ms,
        }),
    }
}

/// The next incoming connection, handshake done, within `connect_timeout_ms`.
/// `None` once the endpoint is closed. A failed handshake is an `Err` for this
/// one connection; keep accepting.
///
/// This waits for each handshake in turn, so one slow peer delays the next
/// for up to `connect_timeout_ms`. A server with many peers should instead
/// take `endpoint.accept()` in a loop and spawn [`complete_handshake`] per
/// incoming connection.
pub async fn accept(
    endpoint: &Endpoint,
    config: &QuicConfig,
) -> Option<Result<Connection, QuicError>> {
    let incoming = endpoint.accept().await?;
    Some(complete_handshake(incoming, config).await)
}

/// Accepts one incoming connection and waits for its handshake, within
/// `connect_timeout_ms`. The client certificate is verified against the CA
/// during the handshake; an `Err` names why it failed.
pub async fn complete_handshake(
    incoming: quinn::Incoming,
    config: &QuicConfig,
) -> Result<Connection, QuicError> {
    let addr = incoming.remote_address();
    let connecting = incoming
        .accept()
        .map_err(|source| QuicError::Handshake { addr, source })?;
    match tokio::time::timeout(config.connect_timeout(), connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(source)) => Err(QuicError::Handshake { addr, source }),
        Err(_) => Err(QuicError::HandshakeTimeout {
            addr,
            timeout_ms: config.connect_timeout_ms,
        }),
    }
}

/// The certificate chain the peer presented (end-entity first); empty if the
/// handshake has not finished.
pub fn peer_certificates(conn: &Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|certs| *certs)
        .unwrap_or_default()
}

/// Opens a bi-stream carrying `kind`. The kind byte is written before
/// returning, which is also what makes the stream visible to the peer.
pub async fn open_stream(
    conn: &Connection,
    kind: StreamKind,
) -> Result<(SendStream, RecvStream), QuicError> {
    let (mut send, recv) = conn.open_bi().await.map_err(QuicError::OpenStream)?;
    send.write_all(&[kind as u8])
        .await
        .map_err(QuicError::WriteStreamKind)?;
    Ok((send, recv))
}

/// Accepts the peer's next bi-stream and reads its kind byte, waiting at
/// most `stream_kind_timeout_ms` for it. On an unknown kind the caller should
/// close the connection with [`CLOSE_PROTOCOL_ERROR`].
pub async fn accept_stream(
    conn: &Connection,
    config: &QuicConfig,
) -> Result<(StreamKind, SendStream, RecvStream), QuicError> {
    let (send, mut recv) = conn.accept_bi().await.map_err(QuicError::AcceptStream)?;
    let kind = read_stream_kind(&mut recv, config).await?;
    Ok((kind, send, recv))
}

/// Reads the kind byte of a stream accepted by other means.
pub async fn read_stream_kind(
    recv: &mut RecvStream,
    config: &QuicConfig,
) -> Result<StreamKind, QuicError> {
    let mut byte = [0u8; 1];
    let timeout = Duration::from_millis(config.stream_kind_timeout_ms);
    match tokio::time::timeout(timeout, recv.read_exact(&mut byte)).await {
        Ok(Ok(())) => {
            StreamKind::from_byte(byte[0]).ok_or(QuicError::UnknownStreamKind { byte: byte[0] })
        }
        Ok(Err(e)) => Err(QuicError::ReadStreamKind(e)),
        Err(_) => Err(QuicError::StreamKindTimeout {
            timeout_ms: config.stream_kind_timeout_ms,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        QuicConfig::default().validate().unwrap();
        QuicConfig::default().transport().unwrap();
    }

    #[test]
    fn invalid_config_names_the_field() {
        let config = QuicConfig {
            keep_alive_interval_ms: 2_000,
            ..QuicConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("keep_alive_interval_ms"), "{err}");
        let config = QuicConfig {
            streams_bidi_max: 1,
            ..QuicConfig::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("streams_bidi_max"), "{err}");
    }

    #[test]
    fn stream_kind_bytes() {
        for kind in [StreamKind::Session, StreamKind::Uplink, StreamKind::Report] {
            assert_eq!(StreamKind::from_byte(kind as u8), Some(kind));
        }
        assert_eq!(StreamKind::from_byte(0), None);
        assert_eq!(StreamKind::from_byte(99), None);
    }
}
