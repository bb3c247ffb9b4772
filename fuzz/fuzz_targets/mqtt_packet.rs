#![no_main]
//! MQTT packets from the broker: rumqttc::mqttbytes::v4::Packet::read, as the link calls it.

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_mqtt_packet(data));
