//! An in-memory log with transactions, for tests and simulations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{EdgeLogWriter, Hwm, LogSink, SegmentBatch, SinkError};
use crate::reading::Reading;

/// A committed record, as a read_committed consumer would see it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRecord {
    pub edge_id: String,
    pub epoch: u64,
    pub seq: u64,
    pub reading: Reading,
}

#[derive(Debug, Default)]
struct Inner {
    records: Vec<MemoryRecord>,
    hwms: HashMap<String, Hwm>,
    /// The generation of the newest writer per edge: older ones are fenced.
    generations: HashMap<String, u64>,
    /// When set, the next commits fail, as a broker outage would.
    unavailable: bool,
}

/// A log that keeps every committed record in memory. Clones share the log.
#[derive(Debug, Clone, Default)]
pub struct MemoryLog {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything committed so far, in log order.
    pub fn records(&self) -> Vec<MemoryRecord> {
        self.inner.lock().expect("memory log lock").records.clone()
    }

    /// Makes commits and recoveries fail until called again with `false`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.inner.lock().expect("memory log lock").unavailable = unavailable;
    }
}

impl LogSink for MemoryLog {
    fn open_edge(&self, edge_id: &str) -> Result<Box<dyn EdgeLogWriter>, SinkError> {
        let mut inner = self.inner.lock().expect("memory log lock");
        let generation = inner.generations.entry(edge_id.to_string()).or_insert(0);
        *generation += 1;
        Ok(Box::new(MemoryWriter {
            log: self.clone(),
            edge_id: edge_id.to_string(),
            generation: *generation,
        }))
    }
}

struct MemoryWriter {
    log: MemoryLog,
    edge_id: String,
    generation: u64,
}

impl MemoryWriter {
    fn check(&self, inner: &Inner) -> Result<(), SinkError> {
        if inner.generations.get(&self.edge_id) != Some(&self.generation) {
            return Err(SinkError::Fenced {
                edge: self.edge_id.clone(),
            });
        }
        if inner.unavailable {
            return Err(SinkError::Aborted {
                edge: self.edge_id.clone(),
                reason: "log unavailable".into(),
            });
        }
        Ok(())
    }
}

impl EdgeLogWriter for MemoryWriter {
    fn high_water_mark(&mut self) -> Result<Option<Hwm>, SinkError> {
        let inner = self.log.inner.lock().expect("memory log lock");
        self.check(&inner)?;
        Ok(inner.hwms.get(&self.edge_id).copied())
    }

    fn commit(
        &mut self,
        edge_id: &str,
        hwm: Hwm,
        batches: &[SegmentBatch],
    ) -> Result<(), SinkError> {
        let mut inner = self.log.inner.lock().expect("memory log lock");
        self.check(&inner)?;
        for batch in batches {
            for reading in &batch.readings {
                inner.records.push(MemoryRecord {
                    edge_id: edge_id.to_string(),
                    epoch: hwm.epoch,
                    seq: batch.seq,
                    reading: reading.clone(),
                });
            }
        }
        inner.hwms.insert(edge_id.to_string(), hwm);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_writer_fences_the_older_one() {
        let log = MemoryLog::new();
        let mut old = log.open_edge("edge-1").unwrap();
        let mut new = log.open_edge("edge-1").unwrap();
        let hwm = Hwm { epoch: 1, seq: 1 };
        assert!(matches!(
            old.commit("edge-1", hwm, &[]),
            Err(SinkError::Fenced { .. })
        ));
        new.commit("edge-1", hwm, &[]).unwrap();
        assert_eq!(new.high_water_mark().unwrap(), Some(hwm));
    }
}
