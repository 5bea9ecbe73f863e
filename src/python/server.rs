//! `EngineServer`: a running engine as Python sees it. Starting and stopping return awaitables
//! that run on the engine's runtime, so the caller's asyncio loop never blocks.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::engine::access::AccessLog;
use crate::engine::auth::{open_relay_refusal, ProxyAuth};
use crate::engine::connector::Connector;
use crate::engine::dns::{DnsConfig, DnsResolver, DnsSettings, DnsTransport};
use crate::engine::flow::FlowView;
use crate::engine::flows::FlowRecorder;
use crate::engine::safety::DomainFilter;
use crate::engine::tls::OriginTrust;
use crate::engine::{EngineConfig, EngineParts, ProxyServer};

use super::bridge::HookBridge;
use super::rules::PyRuleSet;
use super::runtime::runtime;
use super::tls::PyCertificateAuthority;

#[pyclass(frozen, module = "segproxy._engine")]
pub struct EngineServer {
    inner: Arc<ProxyServer>,
    stopped: StopSignal,
}

/// A pipe that becomes readable once the server has stopped. Python waits on it with
/// `loop.add_reader`, so completion never needs the GIL on an engine thread (a thread that
/// wants the GIL while the interpreter finalizes would crash the process at exit).
struct StopSignal {
    read: std::os::fd::OwnedFd,
}

impl StopSignal {
    fn watch(server: &Arc<ProxyServer>) -> std::io::Result<StopSignal> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills `fds` with two new descriptors that we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: freshly created, owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let server = server.clone();
        runtime().spawn(async move {
            server.stopped().await;
            // SAFETY: one byte from a valid buffer to a descriptor this task owns.
            unsafe { libc::write(write.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        });
        Ok(StopSignal { read })
    }
}

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    if !value.is_finite() || value <= 0.0 {
        return Err(PyValueError::new_err(format!(
            "{name} must be a positive number of seconds, got {value}"
        )));
    }
    Ok(Duration::from_secs_f64(value))
}

fn listen_addr(host: &str, port: u16) -> PyResult<SocketAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (bare, port)
        .to_socket_addrs()
        .map_err(|e| PyOSError::new_err(format!("cannot resolve listen host {host:?}: {e}")))?
        .next()
        .ok_or_else(|| PyOSError::new_err(format!("listen host {host:?} has no address")))
}

/// Starts an engine listening on `host:port` (port 0 picks a free port). Returns an
/// awaitable resolving to an `EngineServer`.
#[pyfunction]
#[pyo3(signature = (
    host = "127.0.0.1", port = 8080, *,
    connect_timeout = 10.0, idle_timeout = 60.0, header_timeout = 30.0, response_timeout = 60.0,
    max_connections = None, max_header_bytes = 65536, access_log = None, access_records = 10000,
    hook_timeout = 30.0, rules = None, dns_server = None, dns_port = 53, dns_transport = "udp",
    dns_cache_size = 1024, allow_domains = Vec::new(), deny_domains = Vec::new(), deny_private = false,
    ca = None, upstream_ca = Vec::new(), upstream_insecure = false, record_flows = false,
    flows_file = None, flows_capacity = 1000, handler = None, pool_idle_timeout = 30.0,
    access_log_format = "text", proxy_auth = Vec::new(), allow_open_proxy = false,
    stats_port = None,
))]
#[allow(clippy::too_many_arguments)]
pub fn start_server<'py>(
    py: Python<'py>,
    host: &str,
    port: u16,
    connect_timeout: f64,
    idle_timeout: f64,
    header_timeout: f64,
    response_timeout: f64,
    max_connections: Option<usize>,
    max_header_bytes: usize,
    access_log: Option<PathBuf>,
    access_records: usize,
    hook_timeout: f64,
    rules: Option<PyRef<'py, PyRuleSet>>,
    dns_server: Option<String>,
    dns_port: u16,
    dns_transport: &str,
    dns_cache_size: usize,
    allow_domains: Vec<String>,
    deny_domains: Vec<String>,
    deny_private: bool,
    ca: Option<PyRef<'py, PyCertificateAuthority>>,
    upstream_ca: Vec<PathBuf>,
    upstream_insecure: bool,
    record_flows: bool,
    flows_file: Option<PathBuf>,
    flows_capacity: usize,
    handler: Option<PyRef<'py, HookBridge>>,
    pool_idle_timeout: f64,
    access_log_format: &str,
    proxy_auth: Vec<String>,
    allow_open_proxy: bool,
    stats_port: Option<u16>,
) -> PyResult<Bound<'py, PyAny>> {
    let json_log = match access_log_format {
        "text" => false,
        "json" => true,
        other => {
            return Err(PyValueError::new_err(format!(
                "access_log_format must be \"text\" or \"json\", not {other:?}"
            )))
        }
    };
    if max_connections == Some(0) {
        return Err(PyValueError::new_err("max_connections must be at least 1"));
    }
    // None: the engine derives it from the open-file limit (raised to the hard limit).
    let max_connections = max_connections.unwrap_or(0);
    let config = EngineConfig {
        listen: listen_addr(host, port)?,
        connect_timeout: seconds("connect_timeout", connect_timeout)?,
        idle_timeout: seconds("idle_timeout", idle_timeout)?,
        header_timeout: seconds("header_timeout", header_timeout)?,
        response_timeout: seconds("response_timeout", response_timeout)?,
        max_connections,
        max_header_bytes: max_header_bytes.max(1024),
        hook_timeout: seconds("hook_timeout", hook_timeout)?,
        pool_idle_timeout: seconds("pool_idle_timeout", pool_idle_timeout)?,
        proxy_auth: ProxyAuth::new(&proxy_auth).map_err(PyValueError::new_err)?,
        stats_port,
        ..EngineConfig::default()
    };
    let hook_authenticates = handler
        .as_ref()
        .is_some_and(|bridge| bridge.handler().hooks().authenticate);
    open_relay_refusal(
        config.listen,
        config.proxy_auth.is_enabled() || hook_authenticates,
        allow_open_proxy,
    )
    .map_err(PyValueError::new_err)?;
    let dns_config = match dns_server {
        None => DnsConfig::System,
        Some(server) => DnsConfig::Custom {
            server: server.parse().map_err(|_| {
                PyValueError::new_err(format!("dns_server must be an IP address, got {server:?}"))
            })?,
            port: dns_port,
            transport: match dns_transport {
                "udp" => DnsTransport::Udp,
                "tcp" => DnsTransport::Tcp,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "dns_transport must be udp or tcp, got {other:?}"
                    )))
                }
            },
        },
    };
    let resolver = DnsResolver::new(DnsSettings {
        config: dns_config,
        cache_size: dns_cache_size,
        ..DnsSettings::default()
    })
    .map_err(|e| PyValueError::new_err(e.to_string()))?;
    let connector = Connector {
        connect_timeout: config.connect_timeout,
        resolver,
        addr_check: None,
    };
    // Flows written to a file only (no record_flows) are not also kept in memory.
    let flows_capacity = if record_flows { flows_capacity } else { 0 };
    let flows = if record_flows || flows_file.is_some() {
        Some(Arc::new(
            FlowRecorder::new(flows_capacity, flows_file.as_deref()).map_err(|e| {
                PyOSError::new_err(format!(
                    "cannot write flow records to {}: {e}",
                    flows_file
                        .as_deref()
                        .unwrap_or_else(|| "".as_ref())
                        .display()
                ))
            })?,
        ))
    } else {
        None
    };
    let access = AccessLog::new(access_log.as_deref(), access_records)
        .map_err(|e| {
            PyOSError::new_err(format!(
                "cannot open access log {}: {e}",
                access_log
                    .as_deref()
                    .unwrap_or_else(|| "".as_ref())
                    .display()
            ))
        })?
        .json(json_log);
    let parts = EngineParts {
        access: Some(access),
        connector: Some(connector),
        rules: rules.map(|r| r.inner.lock().unwrap().clone()),
        filter: Some(DomainFilter::new(allow_domains, deny_domains, deny_private)),
        ca: ca.map(|c| c.inner.clone()),
        origin_trust: OriginTrust {
            extra_ca_files: upstream_ca,
            insecure: upstream_insecure,
        },
        handler: handler.map(|bridge| bridge.handler()),
        flows,
    };
    runtime();
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let listen = config.listen;
        let server = ProxyServer::bind(config, parts)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidInput => PyValueError::new_err(e.to_string()),
                // The engine's own message (the stats port) names its address already.
                _ if e.get_ref().is_some() => PyOSError::new_err(e.to_string()),
                _ => PyOSError::new_err(format!("cannot listen on {listen}: {e}")),
            })?;
        let inner = Arc::new(server);
        let stopped = StopSignal::watch(&inner)
            .map_err(|e| PyOSError::new_err(format!("cannot create stop signal: {e}")))?;
        Ok(EngineServer { inner, stopped })
    })
}

/// A record as a Python dict, from its serde form (so a new field needs no code here).
fn to_dict<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyDict>> {
    Ok(pythonize::pythonize(py, value)?.cast_into::<PyDict>()?)
}

#[pymethods]
impl EngineServer {
    /// Finished flow records (oldest first): decision and per-chunk (direction, size, time).
    #[pyo3(signature = (clear = false))]
    fn flows<'py>(&self, py: Python<'py>, clear: bool) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let Some(recorder) = &self.inner.engine().sinks.flows else {
            return Ok(Vec::new());
        };
        let flows = recorder.flows();
        if clear {
            recorder.clear();
        }
        flows
            .iter()
            .map(|(flow, chunks)| to_dict(py, &FlowView::new(flow, chunks)))
            .collect()
    }

    fn recording_flows(&self) -> bool {
        self.inner.engine().sinks.flows.is_some()
    }

    /// The connection limit in force (derived from the open-file limit unless one was given).
    #[getter]
    fn max_connections(&self) -> usize {
        self.inner.engine().config.max_connections
    }

    /// The bound address as (host, port).
    fn local_addr(&self) -> (String, u16) {
        let a = self.inner.local_addr();
        (a.ip().to_string(), a.port())
    }

    /// Starts shutting down: stop accepting, let exchanges in flight finish for up to `grace`
    /// seconds, then close the rest. Returns at once; `stopped_fd` tells when it is done.
    #[pyo3(signature = (grace = 5.0))]
    fn begin_shutdown(&self, grace: f64) {
        let server = self.inner.clone();
        let grace = Duration::from_secs_f64(if grace.is_finite() {
            grace.max(0.0)
        } else {
            0.0
        });
        runtime().spawn(async move { server.shutdown(grace).await });
    }

    /// A descriptor that becomes readable once the server has stopped (for `loop.add_reader`).
    fn stopped_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.stopped.read.as_raw_fd()
    }

    fn is_stopped(&self) -> bool {
        self.inner.is_stopped()
    }

    fn active_connections(&self) -> usize {
        self.inner.engine().active_connections()
    }

    /// The server's counters now: open connections, tunnels and interceptions, requests,
    /// bytes each way, and errors by outcome.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.engine().stats_snapshot();
        let d = PyDict::new(py);
        d.set_item("connections_open", s.connections_open)?;
        d.set_item("connections_total", s.connections_total)?;
        d.set_item("requests_total", s.requests_total)?;
        d.set_item("tunnels_open", s.tunnels_open)?;
        d.set_item("tunnels_total", s.tunnels_total)?;
        d.set_item("intercepts_open", s.intercepts_open)?;
        d.set_item("intercepts_total", s.intercepts_total)?;
        d.set_item("bytes_up", s.bytes_up)?;
        d.set_item("bytes_down", s.bytes_down)?;
        let errors = PyDict::new(py);
        for (outcome, n) in s.errors {
            errors.set_item(outcome.as_str(), n)?;
        }
        d.set_item("errors", errors)?;
        Ok(d)
    }

    /// Where `/metrics` is served as (host, port), or None (no stats port, or stopped).
    fn stats_addr(&self) -> Option<(String, u16)> {
        let a = self.inner.engine().stats().metrics_addr()?;
        Some((a.ip().to_string(), a.port()))
    }

    /// The most recent access records (oldest first) as dicts; `clear` empties the buffer.
    #[pyo3(signature = (clear = false))]
    fn access_records<'py>(
        &self,
        py: Python<'py>,
        clear: bool,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let access = &self.inner.engine().sinks.access;
        let records = access.recent();
        if clear {
            access.clear();
        }
        records
            .iter()
            .map(|r| to_dict(py, &r.access_view()))
            .collect()
    }
}
