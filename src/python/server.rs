//! `EngineServer`: a running engine as Python sees it. Starting and stopping return awaitables
//! that run on the engine's runtime, so the caller's asyncio loop never blocks.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::engine::access::{AccessLog, AccessRecord};
use crate::engine::{EngineConfig, EngineParts, ProxyServer};

use super::runtime::runtime;

#[pyclass(frozen, module = "segproxy._engine")]
pub struct EngineServer {
    inner: Arc<ProxyServer>,
}

fn seconds(name: &str, value: f64) -> PyResult<Duration> {
    if !value.is_finite() || value <= 0.0 {
        return Err(PyValueError::new_err(format!("{name} must be a positive number of seconds, got {value}")));
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
    max_connections = 1024, max_header_bytes = 65536, access_log = None, access_records = 10000,
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
    max_connections: usize,
    max_header_bytes: usize,
    access_log: Option<PathBuf>,
    access_records: usize,
) -> PyResult<Bound<'py, PyAny>> {
    if max_connections == 0 {
        return Err(PyValueError::new_err("max_connections must be at least 1"));
    }
    let config = EngineConfig {
        listen: listen_addr(host, port)?,
        connect_timeout: seconds("connect_timeout", connect_timeout)?,
        idle_timeout: seconds("idle_timeout", idle_timeout)?,
        header_timeout: seconds("header_timeout", header_timeout)?,
        response_timeout: seconds("response_timeout", response_timeout)?,
        max_connections,
        max_header_bytes: max_header_bytes.max(1024),
        ..EngineConfig::default()
    };
    let access = AccessLog::new(access_log.as_deref(), access_records).map_err(|e| {
        PyOSError::new_err(format!("cannot open access log {}: {e}", access_log.as_deref().unwrap_or_else(|| "".as_ref()).display()))
    })?;
    let parts = EngineParts { access: Some(access), ..Default::default() };
    runtime();
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let listen = config.listen;
        let server = ProxyServer::bind(config, parts)
            .await
            .map_err(|e| PyOSError::new_err(format!("cannot listen on {listen}: {e}")))?;
        Ok(EngineServer { inner: Arc::new(server) })
    })
}

fn record_to_dict<'py>(py: Python<'py>, r: &AccessRecord) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", &r.id)?;
    d.set_item("client", r.client.map(|c| c.to_string()))?;
    d.set_item("method", &r.method)?;
    d.set_item("target", &r.target)?;
    d.set_item("status", r.status)?;
    d.set_item("bytes_up", r.bytes_up)?;
    d.set_item("bytes_down", r.bytes_down)?;
    d.set_item("duration", r.duration.as_secs_f64())?;
    d.set_item("kind", &r.kind)?;
    d.set_item("rule", &r.rule)?;
    d.set_item("action", &r.action)?;
    d.set_item("policy", &r.policy)?;
    d.set_item("dns", &r.dns)?;
    d.set_item("error", &r.error)?;
    d.set_item("started", r.started)?;
    d.set_item("line", r.to_line())?;
    Ok(d)
}

#[pymethods]
impl EngineServer {
    /// The bound address as (host, port).
    fn local_addr(&self) -> (String, u16) {
        let a = self.inner.local_addr();
        (a.ip().to_string(), a.port())
    }

    /// Stops accepting, lets exchanges in flight finish for up to `grace` seconds, then
    /// closes the rest. Awaitable.
    #[pyo3(signature = (grace = 5.0))]
    fn shutdown<'py>(&self, py: Python<'py>, grace: f64) -> PyResult<Bound<'py, PyAny>> {
        let server = self.inner.clone();
        let grace = Duration::from_secs_f64(grace.max(0.0));
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            server.shutdown(grace).await;
            Ok(())
        })
    }

    /// Awaitable that resolves once the server has shut down.
    fn wait_stopped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let server = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            server.stopped().await;
            Ok(())
        })
    }

    fn is_stopped(&self) -> bool {
        self.inner.is_stopped()
    }

    fn active_connections(&self) -> usize {
        self.inner.engine().active_connections()
    }

    /// The most recent access records (oldest first) as dicts; `clear` empties the buffer.
    #[pyo3(signature = (clear = false))]
    fn access_records<'py>(&self, py: Python<'py>, clear: bool) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let access = &self.inner.engine().access;
        let records = access.recent();
        if clear {
            access.clear();
        }
        records.iter().map(|r| record_to_dict(py, r)).collect()
    }
}
