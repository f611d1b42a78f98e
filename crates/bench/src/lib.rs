//! Benchmark helpers (not part of berth): see `bench/`.
#![forbid(unsafe_code)]
