//! The proxy engine: pure Rust, no Python. Every behaviour lives in a module named after it.

pub mod access;
pub mod auth;
pub mod ca;
pub mod config;
pub mod connect;
pub mod connector;
pub mod dns;
#[cfg(test)]
mod e2e_tests;
pub mod flows;
pub mod hooks;
pub mod http1;
pub mod limits;
pub mod memory;
pub mod metrics_http;
pub mod pool;
pub mod proxy;
pub mod rules;
pub mod safety;
pub mod segment;
pub mod server;
pub mod stats;
pub mod timer;
pub mod tls;
pub mod tunnel;

pub use config::EngineConfig;
pub use server::{Engine, EngineParts, ProxyServer};
