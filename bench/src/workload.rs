//! The readings every benchmark pushes: shaped like the simulated devices'
//! (a temperature with its unit and a counter), from a fleet of devices, so
//! that sizes and encodings are the ones the runtime really carries.

use tributary_actors::outbox::segment;
use tributary_actors::reading::{Metric, Reading, Value};

/// Devices the readings are spread over: keys vary as they do on an edge.
const DEVICES: u64 = 100;
/// A fixed start instant (2026-01-01T00:00:00Z in µs) so that every run
/// encodes to the same number of bytes.
const START_US: i64 = 1_767_225_600_000_000;

/// The `i`-th reading of a run.
pub fn reading(i: u64) -> Reading {
    let device = i % DEVICES;
    let ts = START_US + i as i64 * 100;
    Reading {
        device_id: format!("edge-1-dev-{device:03}"),
        device_ts_us: ts,
        edge_ts_us: ts + 250,
        stream: None,
        metrics: vec![
            Metric {
                name: "temperature".into(),
                value: Value::F64(60.0 + (i % 997) as f64 * 0.013),
                unit: Some("°C".into()),
            },
            Metric {
                name: "n".into(),
                value: Value::I64((i / DEVICES) as i64),
                unit: None,
            },
        ],
    }
}

pub fn readings(n: u64) -> Vec<Reading> {
    (0..n).map(reading).collect()
}

/// The bincode encoding of one reading, as the outbox stores it.
pub fn encoded(r: &Reading) -> Vec<u8> {
    let mut out = Vec::new();
    segment::encode_reading(r, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_valid_and_of_stable_size() {
        let rs = readings(2_000);
        assert!(rs.iter().all(|r| r.validate().is_ok()));
        let sizes: Vec<usize> = rs.iter().map(|r| encoded(r).len()).collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(max - min <= 4, "sizes vary from {min} to {max}");
    }
}
