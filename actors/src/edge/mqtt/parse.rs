//! MQTT topic filters and the JSON payload of a reading.
//!
//! The payload is a JSON object: `ts` is the device's timestamp in
//! **milliseconds** since the Unix epoch (an integer; the edge's clock if
//! absent), `unit` an optional object of metric name to unit, and every other
//! field a metric: integers become `I64`, other numbers `F64`, booleans
//! `Bool`, strings `Str`. Anything else (not JSON, nulls, arrays, a bad `ts`,
//! an empty or overlong device id, a topic outside the filter) is malformed.

use crate::reading::{Metric, Reading, ReadingError, Value, DEVICE_ID_BYTES_MAX};

/// Why a message was dropped as malformed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    #[error("topic does not match the subscription's filter")]
    TopicMismatch,
    #[error("the device id's topic level is empty")]
    EmptyDeviceId,
    #[error("device id is {0} bytes, more than the {DEVICE_ID_BYTES_MAX} allowed")]
    DeviceIdTooLong(usize),
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload is not a JSON object")]
    NotObject,
    #[error("ts must be a non-negative integer of milliseconds since the Unix epoch")]
    BadTs,
    #[error("unit must be an object of metric name to string")]
    BadUnits,
    #[error("field {0:?} is not a number, a boolean or a string")]
    BadValue(String),
    #[error("payload has no metrics")]
    NoMetrics,
    #[error("reading refused: {0}")]
    Invalid(#[from] ReadingError),
}

impl MessageError {
    pub fn is_topic(&self) -> bool {
        matches!(
            self,
            Self::TopicMismatch | Self::EmptyDeviceId | Self::DeviceIdTooLong(_)
        )
    }
}

/// A parsed message: the device's reading without its timestamp resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub device_id: String,
    /// `ts` converted to microseconds, if the payload had one.
    pub ts_us: Option<i64>,
    pub metrics: Vec<Metric>,
}

/// The level of the first `+` in a topic filter.
pub fn first_wildcard_level(filter: &str) -> Option<usize> {
    filter.split('/').position(|l| l == "+")
}

/// Whether `filter` is a valid MQTT topic filter (`+` alone in a level, `#`
/// alone and last).
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "+" => true,
        "#" => i == levels.len() - 1,
        l => !l.contains('+') && !l.contains('#'),
    })
}

/// Whether `topic` matches `filter` (MQTT 3.1.1 §4.7; `$` topics excepted).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(l)) if f == l => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// Parses one message of `topic` under `filter`, the device id at `device_level`.
pub fn parse_message(
    filter: &str,
    device_level: usize,
    topic: &str,
    payload: &[u8],
) -> Result<Parsed, MessageError> {
    if !topic_matches(filter, topic) {
        return Err(MessageError::TopicMismatch);
    }
    let device_id = topic
        .split('/')
        .nth(device_level)
        .filter(|d| !d.is_empty())
        .ok_or(MessageError::EmptyDeviceId)?;
    if device_id.len() > DEVICE_ID_BYTES_MAX {
        return Err(MessageError::DeviceIdTooLong(device_id.len()));
    }
    let json: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| MessageError::NotJson(e.to_string()))?;
    let serde_json::Value::Object(mut fields) = json else {
        return Err(MessageError::NotObject);
    };
    let ts_us = match fields.remove("ts") {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .filter(|ms| *ms >= 0)
                .and_then(|ms| ms.checked_mul(1000))
                .ok_or(MessageError::BadTs)?,
        ),
    };
    let units = match fields.remove("unit") {
        None => serde_json::Map::new(),
        Some(serde_json::Value::Object(u)) if u.values().all(|v| v.is_string()) => u,
        Some(_) => return Err(MessageError::BadUnits),
    };
    let mut metrics = Vec::with_capacity(fields.len());
    for (name, v) in fields {
        let value = match v {
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::String(s) => Value::Str(s),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::I64(i),
                None => Value::F64(
                    n.as_f64()
                        .ok_or_else(|| MessageError::BadValue(name.clone()))?,
                ),
            },
            _ => return Err(MessageError::BadValue(name)),
        };
        let unit = units.get(&name).and_then(|u| u.as_str()).map(str::to_owned);
        metrics.push(Metric { name, value, unit });
    }
    if metrics.is_empty() {
        return Err(MessageError::NoMetrics);
    }
    let parsed = Parsed {
        device_id: device_id.to_owned(),
        ts_us,
        metrics,
    };
    // Checks the bounds every reading must meet, before it holds any resource.
    Reading {
        device_id: parsed.device_id.clone(),
        device_ts_us: 0,
        edge_ts_us: 0,
        stream: None,
        metrics: parsed.metrics.clone(),
    }
    .validate()?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: &str = "plant-a/+/telemetry";

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(topic_matches(F, "plant-a/press-7/telemetry"));
        assert!(topic_matches(F, "plant-a//telemetry"));
        assert!(!topic_matches(F, "plant-a/press-7/telemetry/x"));
        assert!(!topic_matches(F, "plant-b/press-7/telemetry"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(valid_filter(F) && valid_filter("a/#") && !valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+/c"));
        assert_eq!(first_wildcard_level(F), Some(1));
    }

    #[test]
    fn a_payload_becomes_metrics() {
        let p = parse_message(
            F,
            1,
            "plant-a/press-7/telemetry",
            r#"{"ts": 1700000000123, "temperature": 21.5, "count": 3, "running": true,
                 "mode": "auto", "unit": {"temperature": "°C"}}"#
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(p.device_id, "press-7");
        assert_eq!(p.ts_us, Some(1_700_000_000_123_000));
        let get = |n: &str| p.metrics.iter().find(|m| m.name == n).unwrap().clone();
        assert_eq!(get("temperature").value, Value::F64(21.5));
        assert_eq!(get("temperature").unit.as_deref(), Some("°C"));
        assert_eq!(get("count").value, Value::I64(3));
        assert_eq!(get("running").value, Value::Bool(true));
        assert_eq!(get("mode").value, Value::Str("auto".into()));
        assert_eq!(p.metrics.len(), 4);
        let no_ts = parse_message(F, 1, "plant-a/d/telemetry", br#"{"v": 1}"#).unwrap();
        assert_eq!(no_ts.ts_us, None);
    }

    #[test]
    fn malformed_messages_name_their_problem() {
        let e = |topic: &str, payload: &[u8]| parse_message(F, 1, topic, payload).unwrap_err();
        let t = "plant-a/d/telemetry";
        assert!(matches!(e(t, b"not json"), MessageError::NotJson(_)));
        assert_eq!(e(t, b"[1, 2]"), MessageError::NotObject);
        assert_eq!(e(t, br#"{"ts": "x", "v": 1}"#), MessageError::BadTs);
        assert_eq!(e(t, br#"{"ts": -1, "v": 1}"#), MessageError::BadTs);
        assert_eq!(e(t, br#"{"ts": 1.5, "v": 1}"#), MessageError::BadTs);
        assert_eq!(
            e(t, br#"{"ts": 9223372036854775807, "v": 1}"#),
            MessageError::BadTs
        );
        assert_eq!(e(t, br#"{"v": null}"#), MessageError::BadValue("v".into()));
        assert_eq!(e(t, br#"{"v": [1]}"#), MessageError::BadValue("v".into()));
        assert_eq!(e(t, br#"{"v": 1, "unit": 3}"#), MessageError::BadUnits);
        assert_eq!(e(t, br#"{"ts": 1}"#), MessageError::NoMetrics);
        assert_eq!(e("plant-a//telemetry", b"{}"), MessageError::EmptyDeviceId);
        assert_eq!(e("plant-b/d/telemetry", b"{}"), MessageError::TopicMismatch);
        let long = format!("plant-a/{}/telemetry", "x".repeat(DEVICE_ID_BYTES_MAX + 1));
        assert!(matches!(e(&long, b"{}"), MessageError::DeviceIdTooLong(_)));
        let big = format!(r#"{{"v": "{}"}}"#, "x".repeat(5000));
        assert!(matches!(e(t, big.as_bytes()), MessageError::Invalid(_)));
        assert!(e("plant-a//telemetry", b"{}").is_topic());
        assert!(!e(t, b"x").is_topic());
    }
}
