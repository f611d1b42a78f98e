//! Benchmark helpers (not part of berth): see `bench/`. Depends on no berth crate.
#![forbid(unsafe_code)]
