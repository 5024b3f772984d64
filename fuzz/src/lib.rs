//! The checks the fuzz targets run (see docs/benchmarks.md, "Fuzzing"). Each module is also
//! included by path from the owning crate's corpus test, so CI replays the committed corpora
//! through the same code on stable Rust.

pub mod callback;
pub mod request;
