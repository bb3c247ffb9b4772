#![no_main]
//! MQTT messages: parse_message, topic_matches, valid_filter (actors/src/edge/mqtt/parse.rs).

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_mqtt_parse(data));
