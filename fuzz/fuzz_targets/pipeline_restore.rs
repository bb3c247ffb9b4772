#![no_main]
//! The edge stages' checkpoint: Pipeline::restore (actors/src/pipeline.rs).

use libfuzzer_sys::fuzz_target;
use tributary_fuzz::contracts;

fuzz_target!(|data: &[u8]| contracts::check_pipeline_restore(data));
