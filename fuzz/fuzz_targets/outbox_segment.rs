#![no_main]
//! Outbox segments: segment::verify and decode_payload (actors/src/outbox/segment.rs).

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_segment(data));
