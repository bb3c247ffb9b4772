//! A userspace UDP fault proxy: put it between a QUIC client and its server to cut,
//! heal, thin out or delay the path, without privileges.
//!
//! Each client source address gets its own upstream socket, so the server sees one peer
//! per client and replies go back to the right client. Loss decisions come from a
//! seeded generator; which datagram a decision falls on still depends on the tasks'
//! interleaving, so a seed repeats the loss rate, not the exact datagrams.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::HarnessError;

/// How many client source addresses the proxy serves; datagrams of further clients are
/// dropped and counted.
pub const CLIENTS_MAX: usize = 64;
/// The largest UDP payload.
pub const DATAGRAM_BYTES_MAX: usize = 65_535;
/// How many delayed datagrams may wait at once; beyond that they are dropped, as a
/// router's queue would.
pub const DELAYED_DATAGRAMS_MAX: usize = 8_192;

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub to_upstream: u64,
    pub to_client: u64,
    pub dropped: u64,
    /// Datagrams dropped because `CLIENTS_MAX` clients were already served.
    pub refused_clients: u64,
}

struct Faults {
    cut: AtomicBool,
    loss: Mutex<(f64, SmallRng)>,
    delay_ms: AtomicU64,
    delayed: AtomicUsize,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    dropped: AtomicU64,
    refused_clients: AtomicU64,
}

impl Faults {
    /// Whether to let this datagram through.
    fn pass(&self) -> bool {
        if self.cut.load(Ordering::SeqCst) {
            return false;
        }
        // A poisoned lock only means another proxy task panicked; the data is still sane.
        let mut loss = self.loss.lock().unwrap_or_else(|e| e.into_inner());
        let (p, rng) = &mut *loss;
        *p <= 0.0 || rng.random::<f64>() >= *p
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToUpstream,
    ToClient,
}

/// A running proxy. Dropping it stops every forwarding task.
pub struct UdpProxy {
    faults: Arc<Faults>,
    main: tokio::task::JoinHandle<()>,
    listen: SocketAddr,
    upstream: SocketAddr,
}

impl UdpProxy {
    /// Listens on a free port of the loopback address of `upstream`'s family and
    /// forwards to `upstream`. Returns the proxy and the address clients should use.
    pub async fn start(upstream: SocketAddr) -> Result<(UdpProxy, SocketAddr), HarnessError> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (Ipv6Addr::LOCALHOST, 0).into()
        };
        let socket = UdpSocket::bind(bind)
            .await
            .map_err(HarnessError::ProxyBind)?;
        let listen = socket.local_addr().map_err(HarnessError::ProxyBind)?;
        let faults = Arc::new(Faults {
            cut: AtomicBool::new(false),
            loss: Mutex::new((0.0, SmallRng::seed_from_u64(0))),
            delay_ms: AtomicU64::new(0),
            delayed: AtomicUsize::new(0),
            to_upstream: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            refused_clients: AtomicU64::new(0),
        });
        let main = tokio::spawn(serve(Arc::new(socket), upstream, faults.clone()));
        Ok((
            UdpProxy {
                faults,
                main,
                listen,
                upstream,
            },
            listen,
        ))
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn upstream_addr(&self) -> SocketAddr {
        self.upstream
    }

    /// Drops every datagram, both ways, until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.faults.cut.store(true, Ordering::SeqCst);
    }

    /// Undoes [`cut`](Self::cut); loss and delay settings stay.
    pub fn heal(&self) {
        self.faults.cut.store(false, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.faults.cut.load(Ordering::SeqCst)
    }

    /// Drops each datagram, either way, with this probability (clamped to 0..=1), drawn
    /// from a generator seeded with `seed`.
    pub fn set_loss(&self, probability: f64, seed: u64) {
        let p = if probability.is_nan() {
            0.0
        } else {
            probability.clamp(0.0, 1.0)
        };
        let mut loss = self.faults.loss.lock().unwrap_or_else(|e| e.into_inner());
        *loss = (p, SmallRng::seed_from_u64(seed));
    }

    /// Delays each forwarded datagram by this much; 0 forwards at once.
    pub fn set_delay(&self, ms: u64) {
        self.faults.delay_ms.store(ms, Ordering::SeqCst);
    }

    pub fn stats(&self) -> ProxyStats {
        let f = &self.faults;
        ProxyStats {
            to_upstream: f.to_upstream.load(Ordering::SeqCst),
            to_client: f.to_client.load(Ordering::SeqCst),
            dropped: f.dropped.load(Ordering::SeqCst),
            refused_clients: f.refused_clients.load(Ordering::SeqCst),
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        // Aborting the main task drops its JoinSet, which aborts the per-client tasks.
        self.main.abort();
    }
}

async fn serve(listen: Arc<UdpSocket>, upstream: SocketAddr, faults: Arc<Faults>) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        // Reap finished client tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let (len, client) = match listen.recv_from(&mut buf).await {
            Ok(v) => v,
            // ICMP errors from earlier sends surface here on some platforms; keep serving.
            Err(_) => continue,
        };
        let up = match clients.get(&client) {
            Some(s) => s.clone(),
            None => {
                if clients.len() >= CLIENTS_MAX {
                    faults.refused_clients.fetch_add(1, Ordering::SeqCst);
                    faults.dropped.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let bind: SocketAddr = if upstream.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let Ok(sock) = UdpSocket::bind(bind).await else {
                    faults.dropped.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                if sock.connect(upstream).await.is_err() {
                    faults.dropped.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let sock = Arc::new(sock);
                clients.insert(client, sock.clone());
                tasks.spawn(replies(
                    sock.clone(),
                    listen.clone(),
                    client,
                    faults.clone(),
                ));
                sock
            }
        };
        forward(&faults, Direction::ToUpstream, &buf[..len], move |data| {
            let up = up.clone();
            async move { up.send(&data).await.map(|_| ()) }
        })
        .await;
    }
}

/// Carries the server's datagrams for one client back to it.
async fn replies(
    up: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    faults: Arc<Faults>,
) {
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        let len = match up.recv(&mut buf).await {
            Ok(len) => len,
            // A refused port (the server is down) is reported on the connected socket;
            // the server may come back, so keep listening.
            Err(_) => continue,
        };
        let listen = listen.clone();
        forward(&faults, Direction::ToClient, &buf[..len], move |data| {
            let listen = listen.clone();
            async move { listen.send_to(&data, client).await.map(|_| ()) }
        })
        .await;
    }
}

async fn forward<F, Fut>(faults: &Arc<Faults>, dir: Direction, data: &[u8], send: F)
where
    F: Fn(Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send,
{
    if !faults.pass() {
        faults.dropped.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let counter = match dir {
        Direction::ToUpstream => &faults.to_upstream,
        Direction::ToClient => &faults.to_client,
    };
    let delay_ms = faults.delay_ms.load(Ordering::SeqCst);
    if delay_ms == 0 {
        match send(data.to_vec()).await {
            Ok(()) => counter.fetch_add(1, Ordering::SeqCst),
            Err(_) => faults.dropped.fetch_add(1, Ordering::SeqCst),
        };
        return;
    }
    if faults.delayed.fetch_add(1, Ordering::SeqCst) >= DELAYED_DATAGRAMS_MAX {
        faults.delayed.fetch_sub(1, Ordering::SeqCst);
        faults.dropped.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let faults = faults.clone();
    let data = data.to_vec();
    let due = tokio::time::Instant::now() + Duration::from_millis(delay_ms);
    // Detached on purpose: a delayed datagram is in flight, bounded by DELAYED_DATAGRAMS_MAX
    // and by the delay itself, and sending it after the proxy is gone is harmless.
    tokio::spawn(async move {
        tokio::time::sleep_until(due).await;
        let counter = match dir {
            Direction::ToUpstream => &faults.to_upstream,
            Direction::ToClient => &faults.to_client,
        };
        match send(data).await {
            Ok(()) => counter.fetch_add(1, Ordering::SeqCst),
            Err(_) => faults.dropped.fetch_add(1, Ordering::SeqCst),
        };
        faults.delayed.fetch_sub(1, Ordering::SeqCst);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a test waits for a datagram it expects.
    const ECHO_TIMEOUT_MS: u64 = 2_000;
    /// How long a test listens to show a datagram does not come.
    const SILENCE_MS: u64 = 300;
    const STATS_POLL_MS: u64 = 5;

    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
            while let Ok((len, from)) = sock.recv_from(&mut buf).await {
                let _ = sock.send_to(&buf[..len], from).await;
            }
        });
        (addr, task)
    }

    async fn roundtrip(
        client: &UdpSocket,
        to: SocketAddr,
        payload: &[u8],
        wait_ms: u64,
    ) -> Option<Vec<u8>> {
        client.send_to(payload, to).await.unwrap();
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        match tokio::time::timeout(Duration::from_millis(wait_ms), client.recv_from(&mut buf)).await
        {
            Ok(Ok((len, _))) => Some(buf[..len].to_vec()),
            _ => None,
        }
    }

    async fn wait_stats(proxy: &UdpProxy, ok: impl Fn(&ProxyStats) -> bool) -> ProxyStats {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ECHO_TIMEOUT_MS);
        loop {
            let s = proxy.stats();
            if ok(&s) || tokio::time::Instant::now() >= deadline {
                return s;
            }
            // Counters have no change event; poll them.
            tokio::time::sleep(Duration::from_millis(STATS_POLL_MS)).await;
        }
    }

    #[tokio::test]
    async fn cut_drops_both_ways_and_heal_restores() {
        let (server, _echo) = echo_server().await;
        let (proxy, listen) = UdpProxy::start(server).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

        assert_eq!(
            roundtrip(&client, listen, b"one", ECHO_TIMEOUT_MS)
                .await
                .as_deref(),
            Some(&b"one"[..])
        );
        let s = wait_stats(&proxy, |s| s.to_client == 1).await;
        assert_eq!(
            s,
            ProxyStats {
                to_upstream: 1,
                to_client: 1,
                dropped: 0,
                refused_clients: 0
            }
        );

        proxy.cut();
        assert_eq!(roundtrip(&client, listen, b"two", SILENCE_MS).await, None);
        let s = wait_stats(&proxy, |s| s.dropped == 1).await;
        assert_eq!((s.to_upstream, s.dropped), (1, 1));

        proxy.heal();
        assert_eq!(
            roundtrip(&client, listen, b"three", ECHO_TIMEOUT_MS)
                .await
                .as_deref(),
            Some(&b"three"[..])
        );
        assert_eq!(wait_stats(&proxy, |s| s.to_client == 2).await.to_client, 2);
    }

    /// Sends 100 datagrams one way through a proxy losing half, and counts those passed.
    async fn passed_of_100(seed: u64) -> u64 {
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (proxy, listen) = UdpProxy::start(sink.local_addr().unwrap()).await.unwrap();
        proxy.set_loss(0.5, seed);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..100u8 {
            client.send_to(&[i], listen).await.unwrap();
        }
        let s = wait_stats(&proxy, |s| s.to_upstream + s.dropped == 100).await;
        assert_eq!(s.to_upstream + s.dropped, 100, "{s:?}");
        s.to_upstream
    }

    #[tokio::test]
    async fn loss_is_seeded() {
        let first = passed_of_100(7).await;
        assert!(
            (20..=80).contains(&first),
            "{first} of 100 passed at p = 0.5"
        );
        assert_eq!(
            passed_of_100(7).await,
            first,
            "the same seed gives the same count"
        );
    }

    #[tokio::test]
    async fn total_loss_and_delay() {
        let (server, _echo) = echo_server().await;
        let (proxy, listen) = UdpProxy::start(server).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

        proxy.set_loss(1.0, 7);
        assert_eq!(roundtrip(&client, listen, b"lost", SILENCE_MS).await, None);

        proxy.set_loss(0.0, 0);
        proxy.set_delay(150);
        let started = tokio::time::Instant::now();
        let echoed = roundtrip(&client, listen, b"slow", ECHO_TIMEOUT_MS).await;
        assert_eq!(echoed.as_deref(), Some(&b"slow"[..]));
        // Delayed both ways.
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
}
