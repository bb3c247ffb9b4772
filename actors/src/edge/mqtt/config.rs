//! The MQTT source's settings and their checks.

use super::parse::{first_wildcard_level, valid_filter};

/// The longest client id: it names the source's entries in the outbox's
/// state table.
pub const CLIENT_ID_BYTES_MAX: usize = 256;
/// The longest keep-alive MQTT can say (a u16 of seconds).
pub const KEEP_ALIVE_MS_MAX: u64 = 65_535_000;
/// The most messages the source may hold: MQTT packet ids are 16 bits, and a
/// broker never has more than that many in flight to one client.
pub const INFLIGHT_MAX_LIMIT: usize = 65_535;

/// The MQTT source's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Stable across restarts: the broker keeps the session (and what is
    /// unacked) under it.
    pub client_id: String,
    /// The subscription's topic filter.
    pub topic: String,
    /// The topic level (0-based) holding the device id.
    pub device_level: usize,
    /// Devices whose figures the source keeps (first and last seen,
    /// readings); past it the least recently seen is forgotten. Devices hold
    /// no other state in the source.
    pub devices_max: usize,
    /// Messages held at once: received and not yet acknowledged (queued,
    /// at the gateway, waiting for an older one's ack, or acked and not yet
    /// written). When reached the link stops reading from the broker.
    pub inflight_max: usize,
    /// Readings of one device at the gateway and not yet durable; past it
    /// that device's next readings wait in the source (still counted in
    /// `inflight_max`), so one chatty device cannot take every slot.
    pub device_inflight_max: usize,
    /// The link's request queue (acks and subscribes).
    pub queued_requests_max: usize,
    pub keep_alive_ms: u64,
    pub packet_bytes_max: usize,
    pub reconnect_backoff_initial_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Whether a redelivery must carry MQTT's DUP flag to be recognised as
    /// one (the spec requires brokers to set it). Turn it off only for a
    /// broker known to omit it; see the module doc for what that costs.
    pub redelivery_requires_dup: bool,
    /// Whether retained messages (sent again at every subscription) are
    /// taken as readings; by default they are acknowledged and skipped.
    pub take_retained: bool,
    /// The topology stream every reading of this source belongs to (the
    /// source's component name); `None` outside topologies.
    pub stream: Option<String>,
}

impl MqttConfig {
    /// Defaults for everything but the broker, the session and the filter;
    /// the device id is the filter's first `+` level.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        client_id: impl Into<String>,
        topic: impl Into<String>,
    ) -> Result<Self, MqttConfigError> {
        let topic = topic.into();
        let device_level = first_wildcard_level(&topic).ok_or(MqttConfigError::NoDeviceLevel)?;
        let config = Self {
            host: host.into(),
            port,
            client_id: client_id.into(),
            topic,
            device_level,
            devices_max: 100_000,
            inflight_max: 4096,
            device_inflight_max: 4096,
            queued_requests_max: 4096 + REQUEST_HEADROOM,
            keep_alive_ms: 30_000,
            packet_bytes_max: 256 * 1024,
            reconnect_backoff_initial_ms: 100,
            // The node's reconnect_backoff_max_ms, shared with the uplink.
            reconnect_backoff_max_ms: 500,
            redelivery_requires_dup: true,
            take_retained: false,
            stream: None,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), MqttConfigError> {
        use MqttConfigError as E;
        if self.host.is_empty() || self.port == 0 {
            return Err(E::Address);
        }
        if self.client_id.is_empty() || self.client_id.len() > CLIENT_ID_BYTES_MAX {
            return Err(E::ClientId);
        }
        if !valid_filter(&self.topic) {
            return Err(E::Topic(self.topic.clone()));
        }
        let levels: Vec<&str> = self.topic.split('/').collect();
        match levels.get(self.device_level) {
            Some(&"#") | None => return Err(E::DeviceLevel(self.device_level)),
            Some(_) => {}
        }
        if self.devices_max == 0 {
            return Err(E::Zero("devices_max"));
        }
        if self.inflight_max == 0 || self.inflight_max > INFLIGHT_MAX_LIMIT {
            return Err(E::Inflight(self.inflight_max));
        }
        if self.device_inflight_max == 0 {
            return Err(E::Zero("device_inflight_max"));
        }
        if self.queued_requests_max < self.inflight_max + REQUEST_HEADROOM {
            return Err(E::QueuedRequests);
        }
        if !(4_000..=KEEP_ALIVE_MS_MAX).contains(&self.keep_alive_ms) {
            return Err(E::KeepAlive);
        }
        if self.packet_bytes_max < 1024 {
            return Err(E::PacketBytes);
        }
        if self.reconnect_backoff_initial_ms == 0
            || self.reconnect_backoff_max_ms < self.reconnect_backoff_initial_ms
        {
            return Err(E::Backoff);
        }
        Ok(())
    }
}

/// The link's request queue holds, beyond one ack per held message, the
/// subscribe of a reconnect: this is the headroom required for it.
pub const REQUEST_HEADROOM: usize = 8;

/// A setting the MQTT source cannot run with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MqttConfigError {
    #[error("the broker address needs a host and a non-zero port")]
    Address,
    #[error("the client id must be 1 to {CLIENT_ID_BYTES_MAX} bytes")]
    ClientId,
    #[error("{0:?} is not a valid MQTT topic filter")]
    Topic(String),
    #[error("the topic filter has no `+` level to take the device id from")]
    NoDeviceLevel,
    #[error("topic level {0} does not exist in the filter or is `#`")]
    DeviceLevel(usize),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("inflight_max is {0}; it must be 1 to {INFLIGHT_MAX_LIMIT} (MQTT's packet ids)")]
    Inflight(usize),
    #[error("queued_requests_max must be at least inflight_max + {REQUEST_HEADROOM}")]
    QueuedRequests,
    #[error(
        "keep_alive_ms must be 4000 to {KEEP_ALIVE_MS_MAX} (MQTT counts it in seconds, in 16 bits)"
    )]
    KeepAlive,
    #[error("packet_bytes_max must be at least 1024")]
    PacketBytes,
    #[error("reconnect_backoff_max_ms must be at least reconnect_backoff_initial_ms, which must be positive")]
    Backoff,
}
