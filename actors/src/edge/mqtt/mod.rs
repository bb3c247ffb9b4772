//! The MQTT source: devices that publish JSON telemetry to an MQTT broker.
//!
//! ```text
//! tributary.mqtt (MqttSource)    drives the core: broker link in, gateway out
//! ├── link (MqttLink)            the TCP connection, one permit per message held
//! └── core (MqttCore)            sans-IO: redeliveries, order, acks, bounds
//! ```
//!
//! The parts: [`config`] (settings and their checks), [`parse`] (topic
//! filters, the JSON payload), [`core`] (every decision, no I/O), [`link`]
//! (the broker behind a trait; MQTT 3.1.1 over TCP with rumqttc's codec for
//! real) and [`source`] (the actor).
//!
//! **Messages.** The source subscribes to `topic` (a filter such as
//! `plant-a/+/telemetry`) with QoS 1; the topic level `device_level` names
//! the device. See [`parse`] for the payload. A malformed message is acked
//! (so the broker does not redeliver it forever), counted, and logged at
//! most once per [`core::MALFORMED_LOG_INTERVAL_MS`]. Every reading carries
//! the configured `stream` (the topology component the source is).
//!
//! **Devices are not actors.** A device is an entry in the core's table
//! (first and last seen, readings, what is in flight): an actor per device
//! would cost ractor's floor, about 10 KB (two pre-allocated mailboxes), and
//! two more hops per reading, for nothing the core does not do already.
//!
//! **Acks.** A QoS 1 message is acknowledged only once its reading is
//! durable: in a segment of the outbox, or in the edge stages' input log
//! when only edge stages read it (see `gateway`). Acks go out in the order
//! the messages arrived, on the connection each came on. The session is
//! persistent (`clean_session = false`, a stable client id), so after a
//! crash or a cut the broker redelivers everything unacked.
//!
//! **Many readings in flight.** Readings go to the gateway as they arrive,
//! in batches, numbered; the gateway takes them in order (or refuses the
//! rest of a batch when the outbox is full, and the source resends from
//! there), so each device's readings enter the outbox in the order the
//! broker delivered them. A device has at most `device_inflight_max`
//! readings at the gateway; the source holds at most `inflight_max`
//! messages in all.
//!
//! # Redeliveries: the rule, and why it is exact
//! A broker sends a message again only after a reconnect of a persistent
//! session, with its original packet id and the DUP flag [MQTT-4.4.0-1,
//! MQTT-3.3.1-1], and it reuses a packet id only once the message it named
//! was acknowledged. So the source keeps, in the outbox's state table and
//! in the **same atomic batch** as the reading, one record per packet id:
//! the content hash (SHA-256 of topic and payload, 128 bits) of the last
//! message of that id made durable, and the broker session's generation.
//! A message is a redelivery, acknowledged and not forwarded, if and only if
//! 1. its packet id's record is of this broker session,
//! 2. its topic and payload hash to the record's hash,
//! 3. the record's acknowledgement was not written on the connection the
//!    message arrives on (a broker never resends on the connection that
//!    carried the ack; there a packet id names a new message), and
//! 4. it carries DUP (unless `redelivery_requires_dup` is off).
//!
//! *No distinct reading is dropped:* a new message with DUP unset fails 4;
//! one with DUP set is a resend of a message the broker still had in flight,
//! i.e. the same message. A reading's key (device, timestamp) plays no
//! part: two readings of one device in the same millisecond are both taken.
//! With `redelivery_requires_dup` off (for a broker that omits DUP), a new
//! message would be dropped only if it had the same packet id, topic and
//! payload, byte for byte, as the last durable message of that id, came on
//! a later connection, and the broker had in fact received that one's ack.
//!
//! *No duplicate reaches the outbox:* a redelivered message that is durable
//! has its record durable too (same batch), whether or not the source saw
//! the commit before a crash; so conditions 1 to 3 hold, and 4 because the
//! broker sets DUP on a resend. A copy of a message still held (not yet
//! durable) is recognised by the same packet id and hash and dropped; its
//! original's ack moves to the copy's connection. A message whose record is
//! from an earlier broker session (the broker lost the session) is new:
//! that broker will not resend anything. The one way a duplicate can reach
//! the log is a broker that resends *without* DUP while
//! `redelivery_requires_dup` is on: that is counted nowhere, because it
//! cannot be told from a new message; turn the setting off for such a broker.
//!
//! **Retained messages** are sent again at every subscription, with a new
//! packet id: they are acknowledged and skipped unless `take_retained`.
//! Messages without a `ts` are stamped on arrival.
//!
//! **Bounds and their policies.**
//! - `inflight_max` messages held (received, not yet acked, or acked and
//!   not yet written): when reached the link stops reading from the broker,
//!   which waits in TCP; pings go on, so the keep-alive is never starved
//!   (see [`link`]).
//! - `device_inflight_max` readings of one device at the gateway: that
//!   device's next readings wait in the source, within `inflight_max`.
//! - `queued_requests_max`: the link's request queue (acks and subscribes),
//!   at least `inflight_max` + 8, so that an ack always finds room (each
//!   holds a message's permit).
//! - `devices_max` devices' figures; the least recently seen is forgotten.
//! - a reading the gateway refuses as full (the outbox is full under
//!   `block`) is resent every [`core::RETRY_MS`], unacked, so the
//!   backpressure reaches the broker, which keeps the data.
//! - incoming packets above `packet_bytes_max` break the connection in rumqttc:
//!   set the broker's own limit (mosquitto's `message_size_limit`) at or below it,
//!   or such a message is redelivered forever.
//! - the broker's in-flight window (Mosquitto's `max_inflight_messages`, 20
//!   by default) bounds how many messages a commit can cover: raise it for
//!   high rates, at or below `inflight_max`.

pub mod config;
pub mod core;
pub mod link;
pub mod parse;
pub mod source;

pub use self::config::{MqttConfig, MqttConfigError};
pub use self::core::{MqttStats, MqttStatus};
pub use self::parse::{first_wildcard_level, parse_message, topic_matches, valid_filter};
pub use self::source::{MqttMsg, MqttSource, MqttSourceArgs, MqttSourceStatus, MQTT_NAME};
