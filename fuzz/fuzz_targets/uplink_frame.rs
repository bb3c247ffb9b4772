#![no_main]
//! Uplink frames: FrameDecoder::push / next_frame (cluster/src/uplink/frame.rs).

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_frame(data));
