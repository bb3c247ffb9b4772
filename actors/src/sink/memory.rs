//! An in-memory log with transactions, for tests and simulations.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{
    EdgeCommit, EdgeLogWriter, Hwm, LogSink, Marks, SegmentBatch, ShardLogWriter, SinkError,
};
use crate::reading::Reading;

/// A committed record, as a read_committed consumer would see it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRecord {
    pub edge_id: String,
    pub epoch: u64,
    pub seq: u64,
    pub reading: Reading,
}

/// A refused reading, as the refused topic would hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryRefused {
    pub edge_id: String,
    pub seq: u64,
    pub reading: Reading,
    pub reason: String,
}

#[derive(Debug, Default)]
struct Inner {
    records: Vec<MemoryRecord>,
    refused: Vec<MemoryRefused>,
    hwms: HashMap<String, Hwm>,
    /// The generation of the newest writer per edge (by edge id) or shard
    /// (`shard.<k>`, which no edge id can be): older ones are fenced.
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

    /// Every refused reading committed so far.
    pub fn refused(&self) -> Vec<MemoryRefused> {
        self.inner.lock().expect("memory log lock").refused.clone()
    }

    /// How many records are committed.
    pub fn records_len(&self) -> usize {
        self.inner.lock().expect("memory log lock").records.len()
    }

    /// Makes commits and recoveries fail until called again with `false`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.inner.lock().expect("memory log lock").unavailable = unavailable;
    }
}

impl LogSink for MemoryLog {
    fn calls(&self) -> super::SinkCalls {
        super::SinkCalls::Inline {
            answer_after: std::time::Duration::ZERO,
        }
    }

    fn open_edge(&self, edge_id: &str) -> Result<Box<dyn EdgeLogWriter>, SinkError> {
        Ok(Box::new(self.open_writer(edge_id.to_string())))
    }

    fn open_shard(&self, shard: u32) -> Result<Box<dyn ShardLogWriter>, SinkError> {
        Ok(Box::new(self.open_writer(format!("shard.{shard}"))))
    }
}

impl MemoryLog {
    fn open_writer(&self, key: String) -> MemoryWriter {
        let mut inner = self.inner.lock().expect("memory log lock");
        let generation = inner.generations.entry(key.clone()).or_insert(0);
        *generation += 1;
        MemoryWriter {
            log: self.clone(),
            edge_id: key,
            generation: *generation,
        }
    }
}

struct MemoryWriter {
    log: MemoryLog,
    /// The edge id, or `shard.<k>`.
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

fn append(inner: &mut Inner, edge_id: &str, hwm: Hwm, batches: &[SegmentBatch]) {
    for batch in batches {
        for reading in &batch.readings {
            inner.records.push(MemoryRecord {
                edge_id: edge_id.to_string(),
                epoch: hwm.epoch,
                seq: batch.seq,
                reading: reading.clone(),
            });
        }
        for r in &batch.refused {
            inner.refused.push(MemoryRefused {
                edge_id: edge_id.to_string(),
                seq: batch.seq,
                reading: r.reading.clone(),
                reason: r.reason.clone(),
            });
        }
    }
    inner.hwms.insert(edge_id.to_string(), hwm);
}

impl ShardLogWriter for MemoryWriter {
    fn marks(&mut self) -> Result<Marks, SinkError> {
        let inner = self.log.inner.lock().expect("memory log lock");
        self.check(&inner)?;
        Ok(inner
            .hwms
            .iter()
            .map(|(edge, hwm)| (edge.clone(), Ok(*hwm)))
            .collect())
    }

    fn commit(&mut self, edges: &[EdgeCommit]) -> Result<(), SinkError> {
        let mut inner = self.log.inner.lock().expect("memory log lock");
        self.check(&inner)?;
        for e in edges {
            append(&mut inner, &e.edge_id, e.hwm, &e.batches);
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
        append(&mut inner, edge_id, hwm, batches);
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

/// The cloud stages' side of an in-memory log: a single-partition readings
/// log, a committed offset and state checkpoint for the stages' group, and
/// the committed outputs.
/// Clones share it; each [`MemoryStageLog::open`] is a fresh consumer that
/// starts at the committed offset, as a restarted stages actor would.
#[derive(Debug, Clone, Default)]
pub struct MemoryStageLog {
    inner: Arc<Mutex<StageInner>>,
}

#[derive(Debug, Default)]
struct StageInner {
    /// Each with the edge it came through.
    readings: Vec<(String, Reading)>,
    committed_offset: usize,
    /// Committed with the offset: what the stages held of partition 0.
    checkpoint: Option<Vec<u8>>,
    outputs: Vec<super::SinkRecord>,
    /// Commits that fail before any effect, as a broker outage would.
    commits_to_fail: u32,
}

/// One consumer of a [`MemoryStageLog`].
pub struct MemoryStageConsumer {
    log: MemoryStageLog,
    position: usize,
    /// Whether the first poll told that partition 0 is this consumer's.
    assigned: bool,
}

impl MemoryStageLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StageInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends committed readings of `edge`, as its ingest would.
    pub fn append(&self, edge: &str, readings: impl IntoIterator<Item = Reading>) {
        self.lock()
            .readings
            .extend(readings.into_iter().map(|r| (edge.to_owned(), r)));
    }

    /// A consumer at the group's committed offset.
    pub fn open(&self) -> MemoryStageConsumer {
        MemoryStageConsumer {
            position: self.lock().committed_offset,
            log: self.clone(),
            assigned: false,
        }
    }

    pub fn outputs(&self) -> Vec<super::SinkRecord> {
        self.lock().outputs.clone()
    }

    pub fn committed_offset(&self) -> usize {
        self.lock().committed_offset
    }

    /// The stages' state committed with the offset.
    pub fn checkpoint(&self) -> Option<Vec<u8>> {
        self.lock().checkpoint.clone()
    }

    pub fn len(&self) -> usize {
        self.lock().readings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the next `n` commits fail.
    pub fn fail_commits(&self, n: u32) {
        self.lock().commits_to_fail = n;
    }
}

impl super::StageLog for MemoryStageConsumer {
    fn poll(
        &mut self,
        records_max: usize,
        timeout: std::time::Duration,
    ) -> Result<super::Polled, SinkError> {
        let mut inner = self.log.lock();
        if !self.assigned {
            self.assigned = true;
            return Ok(super::Polled {
                assigned: vec![(0, inner.checkpoint.clone())],
                ..super::Polled::default()
            });
        }
        if inner.readings.len() == self.position {
            // Waits a little, as a broker would, so that a driver polling in
            // a loop does not spin; a simulation passes a zero timeout.
            drop(inner);
            std::thread::sleep(timeout.min(std::time::Duration::from_millis(5)));
            inner = self.log.lock();
        }
        let end = inner.readings.len().min(self.position + records_max);
        let batch = inner.readings[self.position..end]
            .iter()
            .enumerate()
            .map(|(i, (edge, r))| super::LogReading {
                partition: 0,
                offset: (self.position + i) as i64,
                edge: edge.clone(),
                reading: r.clone(),
            })
            .collect();
        self.position = end;
        Ok(super::Polled {
            readings: batch,
            ..super::Polled::default()
        })
    }

    fn commit(
        &mut self,
        outputs: &[super::SinkRecord],
        checkpoints: &[(i32, Vec<u8>)],
    ) -> Result<(), SinkError> {
        let mut inner = self.log.lock();
        if inner.commits_to_fail > 0 {
            inner.commits_to_fail -= 1;
            return Err(SinkError::Stages {
                step: "committing the transaction",
                reason: "the simulated broker is unavailable".into(),
            });
        }
        if self.position != inner.committed_offset && !checkpoints.iter().any(|(p, _)| *p == 0) {
            return Err(SinkError::Stages {
                step: "checking the checkpoints",
                reason: "partition 0 was polled but its state is not in the commit".into(),
            });
        }
        inner.outputs.extend_from_slice(outputs);
        inner.committed_offset = self.position;
        if let Some((_, state)) = checkpoints.iter().find(|(p, _)| *p == 0) {
            inner.checkpoint = Some(state.clone());
        }
        Ok(())
    }

    fn records_malformed(&self) -> u64 {
        0
    }
}
