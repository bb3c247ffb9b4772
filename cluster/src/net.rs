//! Where a node's UDP sockets come from: the operating system, or (with the
//! `sim` feature) turmoil's simulated network, so that the same QUIC code runs
//! in a deterministic simulation with partitions, loss and latency.

use std::fmt::Debug;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// Binds UDP sockets for QUIC endpoints.
pub trait Network: Send + Sync + Debug + 'static {
    fn bind(&self, addr: SocketAddr) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>>;

    /// The endpoint settings for a socket of this network; a simulation
    /// seeds quinn's randomness (packet-number skipping, connection ids),
    /// which changes what goes on the wire, so that a seed replays a run.
    fn endpoint_config(&self) -> quinn::EndpointConfig {
        quinn::EndpointConfig::default()
    }
}

pub type SharedNetwork = Arc<dyn Network>;

/// The operating system's UDP stack, driven by tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsNetwork;

impl Network for OsNetwork {
    fn bind(&self, addr: SocketAddr) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let socket = std::net::UdpSocket::bind(addr)?;
        quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)
    }
}

/// The operating system's network, shared.
pub fn os() -> SharedNetwork {
    Arc::new(OsNetwork)
}

#[cfg(feature = "sim")]
pub use turmoil_udp::TurmoilNetwork;

#[cfg(feature = "sim")]
mod turmoil_udp {
    //! quinn on turmoil's UDP: a task moves datagrams from the simulated
    //! socket into a bounded queue that quinn polls; sends go straight out,
    //! since a simulated socket never blocks.

    use std::future::Future;
    use std::io::{self, IoSliceMut};
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use quinn::udp::{RecvMeta, Transmit};
    use quinn::{AsyncUdpSocket, UdpPoller};
    use tokio::sync::mpsc;

    use super::Network;

    /// Datagrams received and not yet read by quinn; more are dropped, as a
    /// full socket buffer would drop them.
    const DATAGRAMS_QUEUED_MAX: usize = 1024;
    /// Larger than any QUIC datagram quinn sends (it keeps under 1500 bytes).
    const DATAGRAM_BYTES_MAX: usize = 65_535;

    /// Binds sockets on the turmoil host the calling task runs on. Each
    /// endpoint gets the next seed of a sequence that starts at `seed`.
    #[derive(Debug, Default)]
    pub struct TurmoilNetwork {
        seed: u64,
        endpoints: AtomicU64,
    }

    impl TurmoilNetwork {
        pub fn seeded(seed: u64) -> Self {
            Self {
                seed,
                endpoints: AtomicU64::new(0),
            }
        }
    }

    impl Network for TurmoilNetwork {
        fn endpoint_config(&self) -> quinn::EndpointConfig {
            let n = self.endpoints.fetch_add(1, Ordering::Relaxed);
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&self.seed.to_le_bytes());
            seed[8..16].copy_from_slice(&n.to_le_bytes());
            let mut config = quinn::EndpointConfig::default();
            config.rng_seed(Some(seed));
            config
        }

        fn bind(&self, addr: SocketAddr) -> io::Result<Arc<dyn AsyncUdpSocket>> {
            // turmoil's bind is async in name only: it never waits.
            let bind = std::pin::pin!(turmoil::net::UdpSocket::bind(addr));
            let socket = match bind.poll(&mut Context::from_waker(std::task::Waker::noop())) {
                Poll::Ready(result) => Arc::new(result?),
                Poll::Pending => {
                    return Err(io::Error::other(
                        "binding a simulated socket did not complete",
                    ))
                }
            };
            let local = socket.local_addr()?;
            let (tx, rx) = mpsc::channel(DATAGRAMS_QUEUED_MAX);
            let reader = socket.clone();
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
                while let Ok((n, from)) = reader.recv_from(&mut buf).await {
                    match tx.try_send((buf[..n].to_vec(), from)) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
            });
            Ok(Arc::new(TurmoilUdp {
                socket,
                local,
                rx: Mutex::new(rx),
                reader: task,
            }))
        }
    }

    #[derive(Debug)]
    struct TurmoilUdp {
        socket: Arc<turmoil::net::UdpSocket>,
        local: SocketAddr,
        rx: Mutex<mpsc::Receiver<(Vec<u8>, SocketAddr)>>,
        reader: tokio::task::JoinHandle<()>,
    }

    impl Drop for TurmoilUdp {
        fn drop(&mut self) {
            self.reader.abort();
        }
    }

    #[derive(Debug)]
    struct AlwaysWritable;

    impl UdpPoller for AlwaysWritable {
        fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncUdpSocket for TurmoilUdp {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Box::pin(AlwaysWritable)
        }

        fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
            // A send to a partitioned or crashed peer is lost silently, as on
            // a real network; only a local error is worth reporting.
            match self
                .socket
                .try_send_to(transmit.contents, transmit.destination)
            {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
                Err(e) => Err(e),
            }
        }

        fn poll_recv(
            &self,
            cx: &mut Context,
            bufs: &mut [IoSliceMut<'_>],
            meta: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            let mut rx = self.rx.lock().expect("simulated socket queue lock");
            let mut n = 0;
            while n < bufs.len().min(meta.len()) {
                let next = if n == 0 {
                    match rx.poll_recv(cx) {
                        Poll::Ready(Some(d)) => d,
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(io::Error::other("simulated socket closed")))
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                } else {
                    match rx.try_recv() {
                        Ok(d) => d,
                        Err(_) => break,
                    }
                };
                let (bytes, from) = next;
                let len = bytes.len().min(bufs[n].len());
                bufs[n][..len].copy_from_slice(&bytes[..len]);
                meta[n] = RecvMeta {
                    addr: from,
                    len,
                    stride: len,
                    dst_ip: Some(self.local.ip()),
                    ..RecvMeta::default()
                };
                n += 1;
            }
            Poll::Ready(Ok(n))
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok(self.local)
        }

        fn may_fragment(&self) -> bool {
            false
        }
    }
}
