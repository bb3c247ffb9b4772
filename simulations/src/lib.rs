//! Seeded, deterministic simulations of Tributary.
//!
//! - [`world`]: the real edge and cloud actors on simulated UDP (turmoil),
//!   a simulated disk, a simulated log with transactions and a simulated
//!   clock; one seed replays one run exactly.
//! - [`scenario`]: the named fault presets and the seeded plan of a run.
//! - [`swarm`]: many seeds, in parallel, with a summary.
//! - [`report`]: a run as an SVG or HTML picture.
//! - [`broker`]: a simulated MQTT broker with publishers, persistent
//!   sessions and Mosquitto's packet ids, behind the MQTT source's link
//!   trait, so that MQTT-fed edges run the real `MqttSource`.
//! - [`model`]: the sans-IO cores alone (outbox, uplink, ingest) driven step
//!   by step, thousands of steps per millisecond, for the protocol's corner
//!   cases.

pub mod broker;
pub mod model;
pub mod report;
pub mod scenario;
pub mod swarm;
pub mod world;

pub use scenario::{MqttEdges, Params, Scenario};
pub use world::{run, Mutation, Outcome, RunSpec, Violation};
