//! Per-device state with a bound: past `devices_max`, a new device evicts the
//! least recently seen one.
//!
//! Recency is a logical tick per lookup, not a clock, so eviction is
//! deterministic; ordered maps make iteration (and so output order) too.

use std::collections::BTreeMap;

struct Entry<S> {
    state: S,
    seen: u64,
}

/// A [`DeviceTable`] taken apart, for a checkpoint.
#[derive(bincode::Encode, bincode::Decode)]
pub(crate) struct TableParts<S> {
    pub(crate) tick: u64,
    pub(crate) evicted: u64,
    /// (device, recency tick, state).
    pub(crate) devices: Vec<(String, u64, S)>,
}

pub(crate) struct DeviceTable<S> {
    devices: BTreeMap<String, Entry<S>>,
    /// `seen` tick -> device id: the oldest entry is the one to evict.
    recency: BTreeMap<u64, String>,
    tick: u64,
    devices_max: usize,
    evicted: u64,
}

impl<S> DeviceTable<S> {
    pub(crate) fn new(devices_max: usize) -> Self {
        Self {
            devices: BTreeMap::new(),
            recency: BTreeMap::new(),
            tick: 0,
            devices_max,
            evicted: 0,
        }
    }

    /// The state of `device`, made by `init` if it is new. When a new device
    /// would exceed `devices_max`, the least recently seen one is removed first
    /// and returned, so that the caller can emit what it held.
    pub(crate) fn touch(
        &mut self,
        device: &str,
        init: impl FnOnce() -> S,
    ) -> (&mut S, Option<(String, S)>) {
        self.tick += 1;
        let tick = self.tick;
        let mut evicted = None;
        if let Some(entry) = self.devices.get_mut(device) {
            // Moves the id to its new tick rather than allocating a new one:
            // this runs for every reading.
            let id = self
                .recency
                .remove(&entry.seen)
                .unwrap_or_else(|| device.to_owned());
            entry.seen = tick;
            self.recency.insert(tick, id);
        } else {
            if self.devices.len() >= self.devices_max {
                if let Some((_, oldest)) = self.recency.pop_first() {
                    if let Some(entry) = self.devices.remove(&oldest) {
                        self.evicted += 1;
                        evicted = Some((oldest, entry.state));
                    }
                }
            }
            self.devices.insert(
                device.to_owned(),
                Entry {
                    state: init(),
                    seen: tick,
                },
            );
            self.recency.insert(tick, device.to_owned());
        }
        let entry = self
            .devices
            .get_mut(device)
            .expect("the device was just found or inserted");
        (&mut entry.state, evicted)
    }

    /// Every device's state, in device id order.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut S)> {
        self.devices
            .iter_mut()
            .map(|(id, e)| (id.as_str(), &mut e.state))
    }

    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Everything that decides the table's future (states, recency, the
    /// eviction count), for a checkpoint.
    pub(crate) fn to_parts(&self) -> TableParts<&S> {
        TableParts {
            tick: self.tick,
            evicted: self.evicted,
            devices: self
                .devices
                .iter()
                .map(|(id, e)| (id.clone(), e.seen, &e.state))
                .collect(),
        }
    }

    /// A table as [`DeviceTable::to_parts`] described it.
    pub(crate) fn from_parts(devices_max: usize, parts: TableParts<S>) -> Self {
        let mut t = Self::new(devices_max);
        t.tick = parts.tick;
        t.evicted = parts.evicted;
        for (id, seen, state) in parts.devices {
            t.recency.insert(seen, id.clone());
            t.devices.insert(id, Entry { state, seen });
        }
        t
    }

    /// The table as checkpoint bytes: [`DeviceTable::to_parts`] in bincode.
    pub(crate) fn encode(&self) -> Option<Vec<u8>>
    where
        S: bincode::Encode,
    {
        bincode::encode_to_vec(self.to_parts(), crate::reading::bincode_config()).ok()
    }

    /// Replaces the table with the one [`DeviceTable::encode`] wrote; `what`
    /// names the stage in the error.
    pub(crate) fn decode_into(&mut self, bytes: &[u8], what: &str) -> Result<(), String>
    where
        S: bincode::Decode<()>,
    {
        let (parts, _): (TableParts<S>, _) =
            bincode::decode_from_slice(bytes, crate::reading::bincode_config())
                .map_err(|e| format!("the {what}'s checkpoint does not decode: {e}"))?;
        *self = Self::from_parts(self.devices_max, parts);
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.devices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_seen() {
        let mut t = DeviceTable::new(2);
        *t.touch("a", || 0).0 += 1;
        *t.touch("b", || 0).0 += 1;
        // "a" is seen again, so "b" is now the oldest.
        *t.touch("a", || 0).0 += 1;
        let (c, evicted) = t.touch("c", || 10);
        assert_eq!(*c, 10);
        assert_eq!(evicted, Some(("b".to_owned(), 1)));
        assert_eq!(t.len(), 2);
        assert_eq!(t.evicted(), 1);
        let states: Vec<_> = t.iter_mut().map(|(id, s)| (id.to_owned(), *s)).collect();
        assert_eq!(states, vec![("a".to_owned(), 2), ("c".to_owned(), 10)]);
    }

    #[test]
    fn a_known_device_never_evicts() {
        let mut t = DeviceTable::new(1);
        t.touch("a", || 0);
        for _ in 0..5 {
            assert!(t.touch("a", || 0).1.is_none());
        }
        assert_eq!(t.evicted(), 0);
    }
}
