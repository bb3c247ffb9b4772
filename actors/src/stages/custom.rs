//! User-defined stages.
//!
//! A topology holds a factory rather than an instance: each node that runs
//! the stage, and each restart of it, gets a fresh operator, so state never
//! leaks between nodes or survives the failure that caused a restart.

use std::fmt;
use std::sync::Arc;

use super::{Operator, Output, StageStats};
use crate::reading::Reading;

/// An operator of your own. Same contract as the built-in stages: no clock
/// and no I/O in `handle`; time is the readings' event time.
pub trait CustomStage: Send {
    /// What kind of operator this is, for logs and `Debug` (the topology
    /// names each instance).
    fn name(&self) -> &str;

    fn handle(&mut self, reading: Reading) -> Vec<Output>;

    /// See [`Operator::advance_watermark`]; stateless stages ignore it.
    fn advance_watermark(&mut self, watermark_us: i64) -> Vec<Output> {
        let _ = watermark_us;
        Vec::new()
    }

    /// The stage's state as bytes, for the edge's checkpoints. A stage on an
    /// edge that keeps state should implement it (with [`restore`]) so that
    /// its state survives a crash of the edge; `None` (the default) means
    /// that after a crash the stage starts fresh and sees again only what it
    /// read since the last checkpoint. Stateless stages return `Some(vec![])`.
    ///
    /// [`restore`]: CustomStage::restore
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }

    /// Takes back what [`CustomStage::snapshot`] saved, on a fresh instance.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let _ = bytes;
        Err(format!("{} cannot restore a checkpoint", self.name()))
    }
}

type Factory = Arc<dyn Fn() -> Box<dyn CustomStage> + Send + Sync>;

/// A custom stage in a topology: `Custom::new(|| Debounce::new(3))`.
#[derive(Clone)]
pub struct Custom {
    factory: Factory,
    /// The kind's name, taken from one instance, for `Debug`.
    kind: String,
}

impl Custom {
    pub fn new<S, F>(factory: F) -> Self
    where
        S: CustomStage + 'static,
        F: Fn() -> S + Send + Sync + 'static,
    {
        let kind = factory().name().to_owned();
        Self {
            factory: Arc::new(move || Box::new(factory())),
            kind,
        }
    }

    pub(crate) fn build(&self) -> CustomOperator {
        CustomOperator {
            inner: (self.factory)(),
            stats: StageStats::default(),
        }
    }
}

impl fmt::Debug for Custom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Custom({:?})", self.kind)
    }
}

/// Counts what a custom stage does, so the dashboard shows it like any other.
pub(crate) struct CustomOperator {
    inner: Box<dyn CustomStage>,
    stats: StageStats,
}

impl Operator for CustomOperator {
    fn handle(&mut self, reading: Reading) -> Vec<Output> {
        self.stats.readings_in += 1;
        let out = self.inner.handle(reading);
        self.stats.count_outputs(&out);
        out
    }

    fn advance_watermark(&mut self, watermark_us: i64) -> Vec<Output> {
        let out = self.inner.advance_watermark(watermark_us);
        self.stats.count_outputs(&out);
        out
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        self.inner.snapshot()
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.inner.restore(bytes)
    }

    fn stats(&self) -> StageStats {
        self.stats
    }
}
