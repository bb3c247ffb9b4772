//! The reading: what a device measured, in the spirit of Sparkplug metrics.
//!
//! A reading is bincode 2 on the wire and in the outbox, and JSON in the log,
//! where consumers outside Tributary read it.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// Device ids are bounded so that a misbehaving source cannot make the
/// outbox or the log carry arbitrarily large keys.
pub const DEVICE_ID_BYTES_MAX: usize = 128;
/// Metric names share the same reasoning as device ids.
pub const METRIC_NAME_BYTES_MAX: usize = 128;
/// A stream is named after a topology component, whose names are this long at most.
pub const STREAM_NAME_BYTES_MAX: usize = 64;
/// A reading with more metrics than this is refused at the edge. With the
/// string bounds below, the JSON of any valid reading (where escapes can
/// make a byte six) stays under a Kafka record's usual 1 MB limit.
pub const READING_METRICS_MAX: usize = 64;
/// String values and units are bounded for the same reason.
pub const METRIC_STRING_BYTES_MAX: usize = 1024;

/// One measurement of one device at one instant.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct Reading {
    pub device_id: String,
    /// When the device took the measurement, in microseconds since the Unix epoch.
    pub device_ts_us: i64,
    /// When the edge received it, in microseconds since the Unix epoch.
    pub edge_ts_us: i64,
    /// The topology stream it belongs to: the source or stage that emitted
    /// it. `None` for a reading from outside any topology.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    pub metrics: Vec<Metric>,
}

/// A named value with an optional unit.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct Metric {
    pub name: String,
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Value {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(String),
}

/// Why a reading was refused before it reached the outbox.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadingError {
    #[error("device id is empty")]
    EmptyDeviceId,
    #[error("device id is {0} bytes, more than the {DEVICE_ID_BYTES_MAX} allowed")]
    DeviceIdTooLong(usize),
    #[error("stream name is empty or longer than {STREAM_NAME_BYTES_MAX} bytes")]
    BadStreamName,
    #[error("reading has {0} metrics, more than the {READING_METRICS_MAX} allowed")]
    TooManyMetrics(usize),
    #[error("metric name is empty or longer than {METRIC_NAME_BYTES_MAX} bytes")]
    BadMetricName,
    #[error("metric {0:?} has a string value or unit longer than {METRIC_STRING_BYTES_MAX} bytes")]
    MetricStringTooLong(String),
    #[error("metric {0:?} is not a finite number")]
    NotFinite(String),
}

impl Reading {
    /// Checks the bounds that every accepted reading must respect.
    pub fn validate(&self) -> Result<(), ReadingError> {
        if self.device_id.is_empty() {
            return Err(ReadingError::EmptyDeviceId);
        }
        if self.device_id.len() > DEVICE_ID_BYTES_MAX {
            return Err(ReadingError::DeviceIdTooLong(self.device_id.len()));
        }
        if let Some(stream) = &self.stream {
            if stream.is_empty() || stream.len() > STREAM_NAME_BYTES_MAX {
                return Err(ReadingError::BadStreamName);
            }
        }
        if self.metrics.len() > READING_METRICS_MAX {
            return Err(ReadingError::TooManyMetrics(self.metrics.len()));
        }
        for m in &self.metrics {
            if m.name.is_empty() || m.name.len() > METRIC_NAME_BYTES_MAX {
                return Err(ReadingError::BadMetricName);
            }
            let unit_len = m.unit.as_ref().map_or(0, String::len);
            let str_len = match &m.value {
                Value::Str(s) => s.len(),
                _ => 0,
            };
            if unit_len > METRIC_STRING_BYTES_MAX || str_len > METRIC_STRING_BYTES_MAX {
                return Err(ReadingError::MetricStringTooLong(m.name.clone()));
            }
            if let Value::F64(v) = m.value {
                if !v.is_finite() {
                    return Err(ReadingError::NotFinite(m.name.clone()));
                }
            }
        }
        Ok(())
    }

    /// The JSON form written into the log.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).expect("a reading always serializes to JSON")
    }

    /// The metric of that name, if present.
    pub fn metric(&self, name: &str) -> Option<&Value> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| &m.value)
    }
}

/// The most bytes one encoded reading may claim. Above every reading that
/// passes [`Reading::validate`], so it never refuses a valid one; it exists so
/// that a damaged length field cannot make the decoder allocate more.
pub const READING_ENCODED_BYTES_MAX: usize = 1024 * 1024;

/// Bincode's configuration for readings: fixed so that the outbox and the
/// wire agree across builds, and with a limit so that decoding a damaged or
/// hostile payload never allocates more than [`READING_ENCODED_BYTES_MAX`].
pub fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<READING_ENCODED_BYTES_MAX>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Reading {
        Reading {
            device_id: "press-7".into(),
            device_ts_us: 1_700_000_000_000_000,
            edge_ts_us: 1_700_000_000_000_100,
            stream: None,
            metrics: vec![
                Metric {
                    name: "temperature".into(),
                    value: Value::F64(21.5),
                    unit: Some("°C".into()),
                },
                Metric {
                    name: "running".into(),
                    value: Value::Bool(true),
                    unit: None,
                },
            ],
        }
    }

    #[test]
    fn json_uses_lowercase_value_tags() {
        let json: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        assert_eq!(json["metrics"][0]["value"]["f64"], 21.5);
        assert_eq!(json["metrics"][1]["value"]["bool"], true);
        assert!(json["metrics"][1].get("unit").is_none());
    }

    #[test]
    fn bincode_round_trips() {
        let bytes = bincode::encode_to_vec(sample(), bincode_config()).unwrap();
        let (back, used): (Reading, usize) =
            bincode::decode_from_slice(&bytes, bincode_config()).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, sample());
    }

    #[test]
    fn validation_names_the_problem() {
        let mut r = sample();
        r.metrics[0].value = Value::F64(f64::NAN);
        assert_eq!(
            r.validate(),
            Err(ReadingError::NotFinite("temperature".into()))
        );
        r.device_id = String::new();
        assert_eq!(r.validate(), Err(ReadingError::EmptyDeviceId));
    }
}
