//! Shared code of the fuzz targets: the decoders' contracts (also compiled
//! into the CI smoke run, tests/tests/decoders.rs) and the counting
//! allocator that lets them bound what one decode allocates.

pub mod contracts;

#[global_allocator]
static ALLOC: contracts::alloc_track::Tracking = contracts::alloc_track::Tracking;

/// A current-thread runtime for the targets that start actors.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}
