#![no_main]
//! The dashboard's node reports: Wire::<NodeReport>::from_bytes on the cloud.

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_node_report(data));
