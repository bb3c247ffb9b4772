//! The uplink: how an edge's outbox segments reach the cloud's log.
//!
//! - [`frame`]: the versioned, length-prefixed wire format.
//! - [`edge`]: the edge's sans-IO state machine.
//! - [`cloud`]: the cloud's sans-IO state machine, one per edge.
//! - [`link`]: reading and writing frames on a QUIC stream (the only I/O here).

pub mod cloud;
pub mod edge;
pub mod frame;
pub mod link;

pub use cloud::{CommitBatch, Ingest, IngestConfig, IngestError};
pub use edge::{EdgeUplink, EdgeUplinkConfig, ReadRequest, UplinkError};
pub use frame::{Frame, FrameDecoder, FrameError, RefuseCode, SegmentFrame};
