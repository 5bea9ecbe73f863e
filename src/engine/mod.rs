//! The proxy engine: pure Rust, no Python. Every behaviour lives in a module named after it.

pub mod access;
pub mod auth;
pub mod ca;
pub mod capture;
pub mod config;
pub mod connect;
pub mod connection;
pub mod connector;
pub mod decision;
pub mod dns;
#[cfg(test)]
mod e2e_tests;
pub mod exchange;
pub mod flow;
pub mod flow_error;
pub mod flows;
pub mod h2_client;
pub mod h2_server;
pub mod hooks;
pub mod http1;
pub mod lanes;
pub mod limits;
pub mod memory;
pub mod metrics_http;
pub mod options;
pub mod outcome;
pub mod pool;
pub mod respond;
pub mod rules;
pub mod safety;
pub mod segment;
pub mod server;
pub mod session;
pub mod shaping;
pub mod sink;
pub mod socks;
pub mod state;
pub mod stats;
pub mod target;
#[cfg(test)]
mod test_util;
pub mod timer;
pub mod tls;
pub mod tunnel;
pub mod websocket;

pub use config::EngineConfig;
pub use server::ProxyServer;
pub use state::{Engine, EngineParts};
