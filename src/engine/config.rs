//! Engine settings with the defaults a user gets when they name nothing (the options that set
//! them, with the same defaults, are the table of [`super::options`]).

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub listen: SocketAddr,
    /// Longest wait for a TCP connection to a destination or upstream proxy.
    pub connect_timeout: Duration,
    /// A client connection (between requests) or tunnel with no traffic this long is closed.
    pub idle_timeout: Duration,
    /// Longest time from a request's first byte to the end of its head (slow-header defence).
    pub header_timeout: Duration,
    /// Longest wait for a response head once the request was sent; past it the client gets 504.
    pub response_timeout: Duration,
    /// Most client connections served at once; more are answered 503 and closed. 0 means
    /// "from the open-file limit" (see [`super::limits::connections_for`]), settled at bind.
    pub max_connections: usize,
    /// Largest request or response head accepted (431 past it).
    pub max_header_bytes: usize,
    /// How long an idle upstream connection is kept for reuse.
    pub pool_idle_timeout: Duration,
    /// Most idle upstream connections kept per destination.
    pub pool_max_idle_per_host: usize,
    /// Buffer size of each direction of a tunnel: large buffers cut syscalls per byte.
    pub tunnel_buffer_bytes: usize,
    /// Longest wait for one user hook; past it the flow is abandoned (504).
    pub hook_timeout: Duration,
    /// Client credentials required on Proxy-Authorization (none: no authentication).
    pub proxy_auth: super::auth::ProxyAuth,
    /// Serve the server's counters at `GET /metrics` (Prometheus text format) on this port
    /// of the proxy's listen address (0 picks a free port); None serves none.
    pub stats_port: Option<u16>,
    /// Serve SOCKS5 on this port of the listen address too (0 picks a free port); None: only
    /// the proxy port, where a SOCKS5 greeting is told apart by its first byte.
    pub socks_port: Option<u16>,
    /// How long exchanges in flight get to finish when the server is closed without a grace
    /// of its own (the binding's `close()`, SIGTERM in the command line); then they are cut.
    pub shutdown_timeout: Duration,
    /// Capture every HTTP flow's heads, phase times and bodies up to this many bytes each
    /// (0: only flows whose rule says `capture=yes`, with the default limit).
    pub capture_bodies: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(60),
            max_connections: 0,
            max_header_bytes: 64 * 1024,
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 64,
            tunnel_buffer_bytes: 256 * 1024,
            hook_timeout: Duration::from_secs(30),
            proxy_auth: Default::default(),
            stats_port: None,
            socks_port: None,
            shutdown_timeout: Duration::from_secs(5),
            capture_bodies: 0,
        }
    }
}
