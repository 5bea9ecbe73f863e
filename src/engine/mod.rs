//! The proxy engine: pure Rust, no Python. Every behaviour lives in a module named after it.

pub mod access;
pub mod config;
pub mod connector;
pub mod http1;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod tunnel;

pub use config::EngineConfig;
pub use server::{Engine, EngineParts, ProxyServer};
