#![no_main]
//! Settings files: toml::from_str::<Settings>, resolve, validate (node/src/config.rs).

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_settings(data));
