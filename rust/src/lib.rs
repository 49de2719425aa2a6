//! Rust core of dpo_fast.
//!
//! The algorithms live in plain-Rust modules (no Python types, testable with `cargo test`);
//! the PyO3 glue (`py.rs`) is compiled only with the `python` feature, which maturin enables.

pub mod pack;

#[cfg(feature = "python")]
mod py;

/// Version of the native crate, reported by `dpo-fast info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
