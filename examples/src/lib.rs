//! Nothing to import: the runnable examples are `supervision.rs` and `custom_stage.rs` beside `src/`.
