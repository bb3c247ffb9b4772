#![no_main]
//! The MQTT source's redelivery records read back from the outbox: MqttCore::new.

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_mqtt_core(
    data,
    std::env::var_os("TRIBUTARY_FUZZ_SKIP_KNOWN").is_some()
));
