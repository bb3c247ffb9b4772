#![no_main]
//! Cluster control requests and answers: Wire::<ControlRequest/ControlAnswer>::from_bytes.

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_control(data));
