//! Stateless stages: keep the readings a predicate accepts, or rewrite each one.
//!
//! The closures sit behind an `Arc` so that a spec clones cheaply and every
//! operator built from it shares them.

use std::fmt;
use std::sync::Arc;

use super::{Operator, Output, StageStats};
use crate::reading::Reading;

type Predicate = Arc<dyn Fn(&Reading) -> bool + Send + Sync>;
type Transform = Arc<dyn Fn(Reading) -> Reading + Send + Sync>;

/// Passes on the readings for which the predicate is true.
#[derive(Clone)]
pub struct Filter {
    predicate: Predicate,
}

impl Filter {
    pub fn new(predicate: impl Fn(&Reading) -> bool + Send + Sync + 'static) -> Self {
        Self {
            predicate: Arc::new(predicate),
        }
    }

    pub(crate) fn build(&self) -> FilterStage {
        FilterStage {
            predicate: self.predicate.clone(),
            stats: StageStats::default(),
        }
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Filter(<predicate>)")
    }
}

pub(crate) struct FilterStage {
    predicate: Predicate,
    stats: StageStats,
}

impl Operator for FilterStage {
    fn handle(&mut self, reading: Reading) -> Vec<Output> {
        self.stats.readings_in += 1;
        if (self.predicate)(&reading) {
            self.stats.readings_out += 1;
            vec![Output::Reading(reading)]
        } else {
            Vec::new()
        }
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        // Stateless: nothing to save.
        Some(Vec::new())
    }

    fn restore(&mut self, _bytes: &[u8]) -> Result<(), String> {
        Ok(())
    }

    fn stats(&self) -> StageStats {
        self.stats
    }
}

/// Rewrites every reading (renames, unit conversions, derived metrics).
///
/// The result is not validated here: an edge stage's output is validated
/// when it enters the outbox, as any reading is.
#[derive(Clone)]
pub struct Map {
    transform: Transform,
}

impl Map {
    pub fn new(transform: impl Fn(Reading) -> Reading + Send + Sync + 'static) -> Self {
        Self {
            transform: Arc::new(transform),
        }
    }

    pub(crate) fn build(&self) -> MapStage {
        MapStage {
            transform: self.transform.clone(),
            stats: StageStats::default(),
        }
    }
}

impl fmt::Debug for Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Map(<transform>)")
    }
}

pub(crate) struct MapStage {
    transform: Transform,
    stats: StageStats,
}

impl Operator for MapStage {
    fn handle(&mut self, reading: Reading) -> Vec<Output> {
        self.stats.readings_in += 1;
        self.stats.readings_out += 1;
        vec![Output::Reading((self.transform)(reading))]
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        // Stateless: nothing to save.
        Some(Vec::new())
    }

    fn restore(&mut self, _bytes: &[u8]) -> Result<(), String> {
        Ok(())
    }

    fn stats(&self) -> StageStats {
        self.stats
    }
}
