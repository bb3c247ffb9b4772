#![no_main]
//! The gateway's stage state read back after a crash (checkpoint meta, chunks, input log).

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_gateway_recovery(
    tributary_fuzz::runtime(),
    data,
    std::env::var_os("TRIBUTARY_FUZZ_SKIP_KNOWN").is_some()
));
