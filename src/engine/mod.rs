//! The proxy engine: pure Rust, no Python. Every behaviour lives in a module named after it.
pub mod dns;
