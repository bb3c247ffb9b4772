//! Tributary's domain: readings, the store-and-forward outbox, the log sink,
//! and the edge and cloud actors that drive them.
//!
//! **Boundary:** only [`sink::kafka`] knows rdkafka; only the cluster crate
//! knows quinn and rustls.

pub mod clock;
pub mod cloud;
pub mod edge;
pub mod histogram;
pub mod outbox;
pub mod pipeline;
pub mod reading;
pub mod registry;
pub mod sink;
pub mod stages;
pub mod supervision;
pub mod topology;
