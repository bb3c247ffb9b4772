//! The wall clock, behind a trait, so that a simulation can run the edge's
//! actors on simulated time (with skew) and replay a run exactly.
//!
//! Durations and deadlines use `tokio::time::Instant`, which a paused or
//! simulated runtime already controls; only the calendar time stamped on
//! readings and used for watermarks needs this trait.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Calendar time as the node sees it.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Microseconds since the Unix epoch.
    fn now_us(&self) -> i64;
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64)
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}
