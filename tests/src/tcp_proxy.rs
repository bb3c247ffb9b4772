//! A TCP proxy that can cut its connections, for an edge's MQTT link: put it
//! between the edge and the broker, then `cut` (every connection through it
//! ends, and new ones are closed at once) and `heal`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::HarnessError;

/// Connections served at once; further ones are closed at once and counted.
pub const TCP_CONNECTIONS_MAX: usize = 64;

pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Bumped at each cut: every connection task watches it and ends.
    generation: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self, HarnessError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(HarnessError::FreePort)?;
        let addr = listener.local_addr().map_err(HarnessError::FreePort)?;
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, watcher) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let live = Arc::new(Mutex::new(0usize));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            cut.clone(),
            watcher,
            accepted.clone(),
            live.clone(),
        ));
        Ok(Self {
            addr,
            cut,
            generation,
            accepted,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Ends every connection through the proxy and refuses new ones until
    /// [`TcpProxy::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: watch::Receiver<u64>,
    accepted: Arc<AtomicU64>,
    live: Arc<Mutex<usize>>,
) {
    while let Ok((client, _)) = listener.accept().await {
        let full = live.lock().map_or(true, |l| *l >= TCP_CONNECTIONS_MAX);
        if cut.load(Ordering::SeqCst) || full {
            drop(client);
            continue;
        }
        accepted.fetch_add(1, Ordering::SeqCst);
        let mut ended = generation.clone();
        ended.mark_unchanged();
        let live = live.clone();
        if let Ok(mut l) = live.lock() {
            *l += 1;
        }
        tokio::spawn(async move {
            if let Ok(mut server) = TcpStream::connect(upstream).await {
                let mut client = client;
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = ended.changed() => {}
                }
            }
            if let Ok(mut l) = live.lock() {
                *l = l.saturating_sub(1);
            }
        });
    }
}
