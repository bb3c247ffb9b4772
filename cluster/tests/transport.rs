//! The transport on loopback: mutual TLS, stream routing, liveness, and the
//! ractor session over QUIC.
//!
//! Tests share one process, and ractor's registry and process groups are
//! process-global, so every test uses its own node ids and group names.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use quinn::{Connection, ConnectionError, Endpoint};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tempfile::TempDir;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tributary_cluster::quic::{
    self, QuicConfig, QuicError, StreamKind, CLOSE_IDENTITY_MISMATCH, CLOSE_PROTOCOL_ERROR,
};
use tributary_cluster::session::{self, SessionEnd, SessionError, SessionState};
use tributary_cluster::tls::{self, NodeId, NodeIdentity, Role, TlsError};

/// The bound on every wait in these tests. Generous: the machine is shared.
const WAIT: Duration = Duration::from_secs(5);
/// The bound on a whole handshake-failure exchange, both sides.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
const COOKIE: &str = "transport-test-cookie";

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not done within {WAIT:?}"),
    }
}

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn identity(dir: &Path, node: &NodeId) -> NodeIdentity {
    NodeIdentity::load_from_dir(dir, node).unwrap()
}

/// A CA with one cloud and one edge node.
struct Pki {
    dir: TempDir,
    cloud: NodeIdentity,
    edge: NodeIdentity,
}

fn pki(cloud: &str, edge: &str) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    tls::init_ca(dir.path()).unwrap();
    let (cloud, edge) = (id(cloud), id(edge));
    tls::issue(dir.path(), &cloud, Role::Cloud, 1).unwrap();
    tls::issue(dir.path(), &edge, Role::Edge, 1).unwrap();
    Pki {
        cloud: identity(dir.path(), &cloud),
        edge: identity(dir.path(), &edge),
        dir,
    }
}

fn server(identity: &NodeIdentity, config: &QuicConfig) -> (Endpoint, SocketAddr) {
    let ep = quic::server_endpoint("127.0.0.1:0".parse().unwrap(), identity, config).unwrap();
    let addr = ep.local_addr().unwrap();
    (ep, addr)
}

fn client(identity: &NodeIdentity, remote: SocketAddr, config: &QuicConfig) -> Endpoint {
    quic::client_endpoint(quic::unspecified_bind_for(remote), identity, config).unwrap()
}

/// Dials `dial` (the server itself, or a relay in front of it) and accepts
/// on `server_ep`, concurrently.
async fn connect_pair(
    server_ep: &Endpoint,
    client_ep: &Endpoint,
    dial: SocketAddr,
    config: &QuicConfig,
) -> (Result<Connection, QuicError>, Result<Connection, QuicError>) {
    let (client_conn, server_conn) = tokio::join!(
        tokio::time::timeout(HANDSHAKE_WAIT, quic::connect(client_ep, dial, config)),
        tokio::time::timeout(HANDSHAKE_WAIT, quic::accept(server_ep, config)),
    );
    let client_conn = client_conn.expect("client handshake finished in time");
    let server_conn = server_conn
        .expect("server handshake finished in time")
        .expect("the server endpoint is open");
    (client_conn, server_conn)
}

/// What the client saw of a handshake the server rejects: with TLS 1.3 the
/// client may finish its side before the server checks its certificate, so
/// the rejection can arrive as the connection closing right after.
async fn client_rejection(result: Result<Connection, QuicError>) -> String {
    match result {
        Err(e) => e.to_string(),
        Ok(conn) => within("rejected connection closes", conn.closed())
            .await
            .to_string(),
    }
}

#[tokio::test]
async fn edge_identity_is_verified_from_its_certificate() {
    let pki = pki("cloud-ident", "edge-ident");
    let config = QuicConfig::default();
    let (server_ep, addr) = server(&pki.cloud, &config);
    let client_ep = client(&pki.edge, addr, &config);
    let (client_conn, server_conn) = connect_pair(&server_ep, &client_ep, addr, &config).await;
    let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());

    let edge_certs = quic::peer_certificates(&server_conn);
    assert!(!edge_certs.is_empty());
    tls::verify_peer_identity(&edge_certs, &id("edge-ident"), Role::Edge).unwrap();
    let err = tls::verify_peer_identity(&edge_certs, &id("edge-other"), Role::Edge).unwrap_err();
    assert!(
        matches!(err, TlsError::IdentityMismatch { ref claimed, role: Role::Edge } if claimed.as_str() == "edge-other"),
        "{err}"
    );
    // The right id in the wrong role is not the same identity.
    assert!(tls::verify_peer_identity(&edge_certs, &id("edge-ident"), Role::Cloud).is_err());
    assert_eq!(
        tls::peer_identity(&edge_certs).unwrap(),
        (id("edge-ident"), Role::Edge)
    );

    let cloud_certs = quic::peer_certificates(&client_conn);
    assert_eq!(
        tls::peer_identity(&cloud_certs).unwrap(),
        (id("cloud-ident"), Role::Cloud)
    );
    assert!(client_conn.handshake_data().is_some());
}

/// An identity whose certificate comes from another CA, while it trusts the
/// cluster's CA: only its own certificate is foreign. Keep the dir alive.
fn foreign_identity(pki: &Pki, name: &str, role: Role) -> (tempfile::TempDir, NodeIdentity) {
    let other = tempfile::tempdir().unwrap();
    tls::init_ca(other.path()).unwrap();
    let paths = tls::issue(other.path(), &id(name), role, 1).unwrap();
    let identity = NodeIdentity::load(
        &paths.cert,
        &paths.key,
        &pki.dir.path().join(tls::CA_CERT_FILE),
    )
    .unwrap();
    (other, identity)
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    let pki = pki("cloud-ca1", "edge-ca1");
    let (_other, stranger) = foreign_identity(&pki, "edge-ca1", Role::Edge);

    let config = QuicConfig::default();
    let (server_ep, addr) = server(&pki.cloud, &config);
    let client_ep = client(&stranger, addr, &config);
    let (client_conn, server_conn) = connect_pair(&server_ep, &client_ep, addr, &config).await;

    let server_err = server_conn
        .expect_err("the server must reject the client")
        .to_string();
    assert!(server_err.contains("UnknownIssuer"), "server: {server_err}");
    let client_err = client_rejection(client_conn).await;
    assert!(
        client_err.contains("aborted by peer") && client_err.contains("UnknownIssuer"),
        "client: {client_err}"
    );
}

#[tokio::test]
async fn server_certificate_from_another_ca_is_rejected() {
    let pki = pki("cloud-ca2", "edge-ca2");
    let (_other, stranger) = foreign_identity(&pki, "cloud-ca2", Role::Cloud);

    let config = QuicConfig::default();
    let (server_ep, addr) = server(&stranger, &config);
    let client_ep = client(&pki.edge, addr, &config);
    let (client_conn, server_conn) = connect_pair(&server_ep, &client_ep, addr, &config).await;

    let client_err = client_conn
        .expect_err("the client must reject the server")
        .to_string();
    assert!(client_err.contains("UnknownIssuer"), "client: {client_err}");
    assert!(server_conn.is_err(), "the server must not get a connection");
}

#[tokio::test]
async fn expired_client_certificate_is_rejected() {
    let pki = pki("cloud-exp", "edge-exp");
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    tls::issue_with_validity(
        pki.dir.path(),
        &id("edge-exp"),
        Role::Edge,
        now - 10 * day,
        now - day,
    )
    .unwrap();
    let expired = identity(pki.dir.path(), &id("edge-exp"));

    let config = QuicConfig::default();
    let (server_ep, addr) = server(&pki.cloud, &config);
    let client_ep = client(&expired, addr, &config);
    let (client_conn, server_conn) = connect_pair(&server_ep, &client_ep, addr, &config).await;

    let server_err = server_conn
        .expect_err("the server must reject an expired cert")
        .to_string();
    assert!(
        server_err.contains("certificate expired"),
        "server: {server_err}"
    );
    let client_err = client_rejection(client_conn).await;
    assert!(
        client_err.contains("certificate expired"),
        "client: {client_err}"
    );
}

async fn write_after_kind(send: &mut quinn::SendStream, text: &str) {
    send.write_all(text.as_bytes()).await.unwrap();
    send.finish().unwrap();
}

async fn read_text(recv: &mut quinn::RecvStream) -> String {
    let bytes = within("read stream", recv.read_to_end(1024)).await.unwrap();
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn streams_are_routed_by_their_kind_byte_in_any_order() {
    let pki = pki("cloud-route", "edge-route");
    let config = QuicConfig::default();
    let (server_ep, addr) = server(&pki.cloud, &config);
    let client_ep = client(&pki.edge, addr, &config);
    let (client_conn, server_conn) = connect_pair(&server_ep, &client_ep, addr, &config).await;
    let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());

    for (opener, acceptor, order) in [
        (
            &client_conn,
            &server_conn,
            [StreamKind::Uplink, StreamKind::Session],
        ),
        (
            &client_conn,
            &server_conn,
            [StreamKind::Session, StreamKind::Uplink],
        ),
        (
            &server_conn,
            &client_conn,
            [StreamKind::Uplink, StreamKind::Session],
        ),
    ] {
        for kind in order {
            let (mut send, _recv) = within("open", quic::open_stream(opener, kind))
                .await
                .unwrap();
            write_after_kind(&mut send, &format!("{kind:?} payload")).await;
        }
        for expected in order {
            let (kind, _send, mut recv) = within("accept", quic::accept_stream(acceptor, &config))
                .await
                .unwrap();
            assert_eq!(kind, expected);
            // The kind byte was consumed; what follows is the stream's payload.
            assert_eq!(read_text(&mut recv).await, format!("{expected:?} payload"));
        }
    }
}

#[tokio::test]
async fn unknown_or_missing_stream_kind_is_an_error() {
    let pki = pki("cloud-kind", "edge-kind");
    let config = QuicConfig::default();
    let (server_ep, addr) = server(&pki.cloud, &config);
    let client_ep = client(&pki.edge, addr, &config);
    let (client_conn, server_conn) = connect_pair(&server_ep, &client_ep, addr, &config).await;
    let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());

    // A stream that ends before its kind byte.
    let (mut send, _recv) = within("open", client_conn.open_bi()).await.unwrap();
    send.finish().unwrap();
    let err = within("accept", quic::accept_stream(&server_conn, &config))
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::ReadStreamKind(_)), "{err}");

    // A stream with a kind byte nobody knows.
    let (mut send, _recv) = within("open", client_conn.open_bi()).await.unwrap();
    send.write_all(&[99]).await.unwrap();
    let err = within("accept", quic::accept_stream(&server_conn, &config))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QuicError::UnknownStreamKind { byte: 99 }),
        "{err}"
    );
    server_conn.close(CLOSE_PROTOCOL_ERROR, b"unknown stream kind");

    match within("client sees the close", client_conn.closed()).await {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_PROTOCOL_ERROR)
        }
        other => panic!("expected an application close, got {other}"),
    }
}

/// A UDP relay between one client and a server that can drop every packet,
/// to cut the link without either endpoint noticing anything but silence.
struct Relay {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(server: SocketAddr) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let drop_all = blackhole.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                if drop_all.load(Ordering::Relaxed) {
                    continue;
                }
                let to = if from == server {
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    server
                };
                let _ = sock.send_to(&buf[..n], to).await;
            }
        });
        Self {
            addr,
            blackhole,
            task,
        }
    }

    fn cut(&self) {
        self.blackhole.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn idle_timeout_notices_a_silent_peer() {
    let pki = pki("cloud-idle", "edge-idle");
    let config = QuicConfig::default();
    let (server_ep, addr) = server(&pki.cloud, &config);
    let relay = Relay::start(addr).await;
    let client_ep = client(&pki.edge, relay.addr, &config);
    let (client_conn, server_conn) =
        connect_pair(&server_ep, &client_ep, relay.addr, &config).await;
    let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());

    // Keep-alives hold an idle but healthy link open past the idle timeout.
    let idle_for = config.idle_timeout() + Duration::from_millis(500);
    tokio::select! {
        err = client_conn.closed() => panic!("healthy idle link closed: {err}"),
        _ = tokio::time::sleep(idle_for) => {}
    }

    relay.cut();
    let cut_at = Instant::now();
    let err = within("client notices the dead link", client_conn.closed()).await;
    let noticed_after = cut_at.elapsed();
    eprintln!("dead link noticed {noticed_after:?} after the cut");
    assert!(matches!(err, ConnectionError::TimedOut), "{err}");
    assert!(
        noticed_after >= config.idle_timeout() / 2,
        "noticed too soon: {noticed_after:?}"
    );
    let err = within("server notices the dead link", server_conn.closed()).await;
    assert!(matches!(err, ConnectionError::TimedOut), "{err}");
}

/// Forwards every String it receives to the test.
struct Sink;

impl Actor for Sink {
    type Msg = String;
    type State = mpsc::Sender<String>;
    type Arguments = mpsc::Sender<String>;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        tx.send(msg).await?;
        Ok(())
    }
}

/// A cloud and an edge node server with a QUIC connection between them;
/// the cloud accepts the session stream and hands it to ractor.
struct SessionPair {
    cloud_server: ActorRef<ractor_cluster::NodeServerMessage>,
    edge_server: ActorRef<ractor_cluster::NodeServerMessage>,
    cloud: session::SessionHandle,
    edge: session::SessionHandle,
    client_conn: Connection,
    server_conn: Connection,
    _endpoints: (Endpoint, Endpoint),
}

async fn session_pair(
    pki: &Pki,
    edge_node_name: &NodeId,
    cloud_cookie: &str,
    edge_cookie: &str,
) -> SessionPair {
    let config = QuicConfig::default();
    let cloud_server = session::start_node_server(pki.cloud.id(), cloud_cookie.to_string())
        .await
        .unwrap();
    let edge_server = session::start_node_server(edge_node_name, edge_cookie.to_string())
        .await
        .unwrap();
    let (server_ep, addr) = server(&pki.cloud, &config);
    let client_ep = client(&pki.edge, addr, &config);
    let (client_conn, server_conn) = connect_pair(&server_ep, &client_ep, addr, &config).await;
    let (client_conn, server_conn) = (client_conn.unwrap(), server_conn.unwrap());

    let edge = within("dial", session::dial_session(&edge_server, &client_conn))
        .await
        .unwrap();
    let (kind, send, recv) = within("accept", quic::accept_stream(&server_conn, &config))
        .await
        .unwrap();
    assert_eq!(kind, StreamKind::Session);
    let cloud = session::accept_session(&cloud_server, &server_conn, send, recv)
        .await
        .unwrap();
    assert_eq!(cloud.peer(), pki.edge.id());
    assert_eq!(edge.peer(), pki.cloud.id());
    SessionPair {
        cloud_server,
        edge_server,
        cloud,
        edge,
        client_conn,
        server_conn,
        _endpoints: (server_ep, client_ep),
    }
}

impl SessionPair {
    async fn stop(self) {
        for server in [self.cloud_server, self.edge_server] {
            let _ = server.stop_and_wait(None, Some(WAIT)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ractor_session_over_quic_shares_process_groups() {
    let pki = pki("cloud-pg", "edge-pg");
    let mut pair = session_pair(&pki, pki.edge.id(), COOKIE, COOKIE).await;
    pair.edge.authenticated(WAIT).await.unwrap();
    pair.cloud.authenticated(WAIT).await.unwrap();

    let group = "tributary-test.transport.pg-sink".to_string();
    let (tx, mut rx) = mpsc::channel(8);
    let (sink, _) = Actor::spawn(None, Sink, tx).await.unwrap();
    ractor::pg::join(group.clone(), vec![sink.get_cell()]);

    // pg has no event to await from outside an actor; poll, bounded.
    let deadline = Instant::now() + WAIT;
    let remote = loop {
        let members = ractor::pg::get_members(&group);
        if let Some(remote) = members.into_iter().find(|m| !m.get_id().is_local()) {
            break remote;
        }
        assert!(
            Instant::now() < deadline,
            "no remote member of {group} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A remote member is a proxy: its messages travel through the session.
    remote.send_message("hello over quic".to_string()).unwrap();
    let got = within("message through the session", rx.recv()).await;
    assert_eq!(got.as_deref(), Some("hello over quic"));

    // Ending the session closes its QUIC connection, and the peer's session
    // ends with it.
    pair.edge.close();
    assert_eq!(
        within("edge session ends", pair.edge.ended()).await,
        SessionEnd::LocalClose
    );
    let cloud_end = within("cloud session ends", pair.cloud.ended()).await;
    assert!(
        matches!(
            cloud_end,
            SessionEnd::ConnectionClosed(_) | SessionEnd::Stopped
        ),
        "{cloud_end:?}"
    );
    within("server connection closes", pair.server_conn.closed()).await;
    sink.stop(None);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_cookie_ends_the_session_and_closes_the_connection() {
    let pki = pki("cloud-cookie", "edge-cookie");
    let mut pair = session_pair(&pki, pki.edge.id(), COOKIE, "not-the-cookie").await;

    let err = pair.cloud.authenticated(WAIT).await.unwrap_err();
    assert!(matches!(err, SessionError::Ended { .. }), "{err}");
    let err = pair.edge.authenticated(WAIT).await.unwrap_err();
    assert!(matches!(err, SessionError::Ended { .. }), "{err}");
    // Without the tie, keep-alives would hold this connection open forever.
    within("client connection closes", pair.client_conn.closed()).await;
    within("server connection closes", pair.server_conn.closed()).await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_name_must_match_the_certificate() {
    let pki = pki("cloud-name", "edge-name");
    // The edge holds edge-name's certificate but runs a ractor node named otherwise.
    let mut pair = session_pair(&pki, &id("impostor-name"), COOKIE, COOKIE).await;

    let err = pair.cloud.authenticated(WAIT).await.unwrap_err();
    match err {
        SessionError::Ended {
            end:
                SessionEnd::IdentityMismatch {
                    expected,
                    presented,
                },
            ..
        } => {
            assert_eq!(expected, "edge-name@tributary");
            assert_eq!(presented, "impostor-name@tributary");
        }
        other => panic!("expected an identity mismatch, got {other}"),
    }
    assert!(matches!(pair.cloud.state(), SessionState::Ended(_)));
    match within("edge sees the close", pair.client_conn.closed()).await {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_IDENTITY_MISMATCH)
        }
        other => panic!("expected an application close, got {other}"),
    }
    let edge_end = within("edge session ends", pair.edge.ended()).await;
    assert!(
        matches!(
            edge_end,
            SessionEnd::ConnectionClosed(_) | SessionEnd::Stopped
        ),
        "{edge_end:?}"
    );
    pair.stop().await;
}
