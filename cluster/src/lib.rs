//! Tributary's cluster transport.
//!
//! This is the only crate that knows quinn, rustls and ractor_cluster: the
//! rest of Tributary sees node identities, links and frames, never sockets or
//! certificates.
//!
//! - [`tls`]: the cluster CA, node certificates and the peer identity check.
//! - [`quic`]: QUIC endpoints and stream routing.
//! - [`net`]: where UDP sockets come from: the OS, or a simulated network.
//! - [`session`]: the ractor_cluster session over a QUIC stream.
//! - [`backoff`]: reconnect delays with jitter.
//! - [`uplink`]: the edge-to-cloud protocol: frames, sans-IO cores, and links.

pub mod backoff;
pub mod guard;
pub mod net;
pub mod quic;
pub mod reports;
pub mod session;
pub mod tls;
pub mod uplink;

/// Names ring as the process's rustls provider. quinn and ractor_cluster
/// would otherwise link two providers, and rustls then refuses to pick one.
/// Our own configs name ring explicitly too; this covers code we do not own.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
