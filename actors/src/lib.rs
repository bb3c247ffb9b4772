//! Tributary's domain: readings, the store-and-forward outbox, the log sink,
//! and the edge and cloud actors that drive them.

pub mod outbox;
pub mod reading;
pub mod sink;
