//! segproxy: a programmable forward proxy. `engine` is pure Rust; `python` is the PyO3 binding.
pub mod engine;
#[cfg(feature = "python")]
mod python;
