//! The fleet registry: one entry per edge (and, later, per device), with its
//! status. The log is the source of truth: entries are records of a
//! compacted topic (`registry_topic`), keyed `<kind>/<id>`, whose newest
//! record per key is the entry; a tombstone deletes it. Every cloud node
//! rebuilds this view from the topic and follows it, so a revocation
//! written by any operator reaches every node.
//!
//! This is the sans-IO core: it takes records ([`Registry::handle_record`])
//! and answers questions (may this edge connect?); `sink::kafka::registry`
//! reads and writes the topic, the cloud's listener asks.
//!
//! **Record format.** The key is `edge/<id>`; the value is an
//! [`Entry`] in JSON. A record that does not decode is skipped and counted:
//! it changes nothing, so a garbage record cannot revoke or restore anyone.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Entries the registry holds at most; records of further ids are counted
/// and ignored (their edges are admitted as unknown ones are).
pub const REGISTRY_ENTRIES_MAX: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Edge,
    Device,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Edge => "edge",
            Kind::Device => "device",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Active,
    /// Refused until resumed.
    Suspended,
    /// Refused for good (a new entry must be written to admit it again).
    Revoked,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Active => "active",
            Status::Suspended => "suspended",
            Status::Revoked => "revoked",
        }
    }

    /// Whether a node of this status may connect.
    pub fn admits(self) -> bool {
        matches!(self, Status::Active | Status::Pending)
    }
}

/// One edge or device, as the registry topic holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub kind: Kind,
    pub status: Status,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Why the status is what it is (a revocation's reason).
    #[serde(default)]
    pub reason: Option<String>,
    /// When the status last changed, Unix ms, and by whom.
    pub changed_ms: u64,
    #[serde(default)]
    pub changed_by: String,
    #[serde(default)]
    pub first_seen_ms: Option<u64>,
}

impl Entry {
    pub fn key(&self) -> String {
        key(self.kind, &self.id)
    }
}

pub fn key(kind: Kind, id: &str) -> String {
    format!("{}/{id}", kind.as_str())
}

/// The kind and id a record's key names.
fn parse_key(key: &str) -> Option<(Kind, &str)> {
    let (kind, id) = key.split_once('/')?;
    let kind = match kind {
        "edge" => Kind::Edge,
        "device" => Kind::Device,
        _ => return None,
    };
    (!id.is_empty()).then_some((kind, id))
}

/// What one record did to the view.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The entry is new or changed; `admitted_before` is whether its node
    /// was admitted before the change.
    Put {
        entry: Entry,
        admitted_before: bool,
    },
    Deleted {
        key: String,
    },
    /// The record did not decode, or its key does not match its entry.
    Malformed,
    /// A new id past [`REGISTRY_ENTRIES_MAX`].
    OverLimit,
}

/// Counts of the records taken; they only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    pub records: u64,
    pub malformed: u64,
    pub over_limit: u64,
}

/// The view of the registry topic.
#[derive(Debug, Default)]
pub struct Registry {
    /// By id, one map per kind, so that the check every new connection
    /// makes looks an id up without building a key.
    edges: HashMap<String, Entry>,
    devices: HashMap<String, Entry>,
    stats: RegistryStats,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self, kind: Kind) -> &HashMap<String, Entry> {
        match kind {
            Kind::Edge => &self.edges,
            Kind::Device => &self.devices,
        }
    }

    fn map_mut(&mut self, kind: Kind) -> &mut HashMap<String, Entry> {
        match kind {
            Kind::Edge => &mut self.edges,
            Kind::Device => &mut self.devices,
        }
    }

    /// Takes one record of the topic (`None`: a tombstone).
    pub fn handle_record(&mut self, key: &str, value: Option<&[u8]>) -> Change {
        self.stats.records += 1;
        let Some((kind, id)) = parse_key(key) else {
            self.stats.malformed += 1;
            return Change::Malformed;
        };
        let Some(bytes) = value else {
            self.map_mut(kind).remove(id);
            return Change::Deleted {
                key: key.to_owned(),
            };
        };
        let entry = match serde_json::from_slice::<Entry>(bytes) {
            Ok(e) if e.kind == kind && e.id == id => e,
            _ => {
                self.stats.malformed += 1;
                return Change::Malformed;
            }
        };
        if !self.map(kind).contains_key(id) && self.len() >= REGISTRY_ENTRIES_MAX {
            self.stats.over_limit += 1;
            return Change::OverLimit;
        }
        let admitted_before = self.map(kind).get(id).is_none_or(|e| e.status.admits());
        self.map_mut(kind).insert(id.to_owned(), entry.clone());
        Change::Put {
            entry,
            admitted_before,
        }
    }

    /// Why edge `id` may not connect, if it may not. An edge the registry
    /// does not know is admitted: its certificate is what lets it in.
    pub fn refusal(&self, kind: Kind, id: &str) -> Option<String> {
        let e = self.map(kind).get(id)?;
        (!e.status.admits()).then(|| match &e.reason {
            Some(r) => format!("{} {id} is {}: {r}", kind.as_str(), e.status.as_str()),
            None => format!("{} {id} is {}", kind.as_str(), e.status.as_str()),
        })
    }

    pub fn get(&self, kind: Kind, id: &str) -> Option<&Entry> {
        self.map(kind).get(id)
    }

    /// Every entry, edges first, each kind in id order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        let mut edges: Vec<&Entry> = self.edges.values().collect();
        edges.sort_by(|a, b| a.id.cmp(&b.id));
        let mut devices: Vec<&Entry> = self.devices.values().collect();
        devices.sort_by(|a, b| a.id.cmp(&b.id));
        edges.into_iter().chain(devices)
    }

    pub fn len(&self) -> usize {
        self.edges.len() + self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> RegistryStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, status: Status) -> Vec<u8> {
        serde_json::to_vec(&Entry {
            id: id.into(),
            kind: Kind::Edge,
            status,
            labels: Vec::new(),
            reason: Some("lost in transit".into()),
            changed_ms: 1,
            changed_by: "test".into(),
            first_seen_ms: None,
        })
        .unwrap()
    }

    #[test]
    fn the_newest_record_decides_and_garbage_changes_nothing() {
        let mut r = Registry::new();
        assert_eq!(
            r.refusal(Kind::Edge, "edge-7"),
            None,
            "unknown edges are admitted"
        );
        let change = r.handle_record("edge/edge-7", Some(&entry("edge-7", Status::Revoked)));
        assert!(matches!(
            change,
            Change::Put {
                admitted_before: true,
                ..
            }
        ));
        let why = r.refusal(Kind::Edge, "edge-7").expect("revoked");
        assert!(
            why.contains("revoked") && why.contains("lost in transit"),
            "{why}"
        );

        // Garbage, and an entry filed under another edge's key, are skipped.
        assert_eq!(
            r.handle_record("edge/edge-7", Some(b"{not json")),
            Change::Malformed
        );
        assert_eq!(
            r.handle_record("edge/edge-7", Some(&entry("edge-8", Status::Active))),
            Change::Malformed
        );
        assert_eq!(
            r.handle_record("robot/edge-7", Some(b"{}")),
            Change::Malformed
        );
        assert_eq!(r.handle_record("edge/", None), Change::Malformed);
        assert!(r.refusal(Kind::Edge, "edge-7").is_some());
        assert_eq!(r.stats().malformed, 4);

        r.handle_record("edge/edge-7", Some(&entry("edge-7", Status::Active)));
        assert_eq!(r.refusal(Kind::Edge, "edge-7"), None);
        r.handle_record("edge/edge-7", Some(&entry("edge-7", Status::Suspended)));
        assert!(r
            .refusal(Kind::Edge, "edge-7")
            .unwrap()
            .contains("suspended"));
        r.handle_record("edge/edge-7", None);
        assert_eq!(r.refusal(Kind::Edge, "edge-7"), None);
        assert!(r.is_empty());
    }
}
