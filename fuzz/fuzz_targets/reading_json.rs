#![no_main]
//! Readings as JSON (the readings topic): serde_json::from_slice::<Reading>, validate.

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_reading_json(data));
