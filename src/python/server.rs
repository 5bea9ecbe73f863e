//! `EngineServer`: a running engine as Python sees it. Starting and stopping return awaitables
//! that run on the engine's runtime, so the caller's asyncio loop never blocks.

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::engine::flow::FlowView;
use crate::engine::options::{self, Built, Cli, ErrorKind, Objects, OptionError};
use crate::engine::safety::DomainFilter;
use crate::engine::ProxyServer;

use super::bridge::HookBridge;
use super::convert::{value_from_py, value_to_py};
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

/// An engine error about options as Python's exception: TypeError for an unknown option or a
/// value of the wrong type, ValueError for a value out of range, OSError for a file.
fn option_error(e: OptionError) -> PyErr {
    match e.kind {
        ErrorKind::Unknown | ErrorKind::Type => PyTypeError::new_err(e.message),
        ErrorKind::Value => PyValueError::new_err(e.message),
        ErrorKind::Io => PyOSError::new_err(e.message),
    }
}

/// The engine's configuration from `start_server`'s arguments: only conversions here; the
/// engine's one parser reads (and checks) every option.
fn build<'py>(
    host: &str,
    port: u16,
    handler: Option<PyRef<'py, HookBridge>>,
    rules: Option<PyRef<'py, PyRuleSet>>,
    ca: Option<PyRef<'py, PyCertificateAuthority>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Built> {
    let mut values = Vec::new();
    for (name, value) in options.into_iter().flat_map(|d| d.iter()) {
        let name: String = name.extract()?;
        let value = value_from_py(&name, &value)?;
        values.push((name, value));
    }
    let objects = Objects {
        rules: rules.map(|r| r.inner.lock().unwrap().clone()),
        ca: ca.map(|c| c.inner.clone()),
        handler: handler.map(|bridge| bridge.handler()),
    };
    options::build(host, port, values, objects).map_err(option_error)
}

/// Binds the listener and starts serving.
async fn bind(built: Built) -> PyResult<EngineServer> {
    let Built { config, parts } = built;
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
}

/// Starts an engine listening on `host:port` (port 0 picks a free port). Returns an
/// awaitable resolving to an `EngineServer`. `options` are the engine's table of options
/// (`option_table()`), read by the engine's one parser; this only converts the values.
#[pyfunction]
#[pyo3(signature = (host = "127.0.0.1", port = 8080, *, handler = None, rules = None, ca = None, **options))]
pub fn start_server<'py>(
    py: Python<'py>,
    host: &str,
    port: u16,
    handler: Option<PyRef<'py, HookBridge>>,
    rules: Option<PyRef<'py, PyRuleSet>>,
    ca: Option<PyRef<'py, PyCertificateAuthority>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let built = build(host, port, handler, rules, ca, options)?;
    runtime();
    pyo3_async_runtimes::tokio::future_into_py(py, bind(built))
}

/// `start_server` without asyncio: returns the running `EngineServer` once it listens. For
/// processes that run no Python hooks (the command line), which then need no event loop.
#[pyfunction]
#[pyo3(signature = (host = "127.0.0.1", port = 8080, *, rules = None, ca = None, **options))]
pub fn start_server_blocking<'py>(
    py: Python<'py>,
    host: &str,
    port: u16,
    rules: Option<PyRef<'py, PyRuleSet>>,
    ca: Option<PyRef<'py, PyCertificateAuthority>>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<EngineServer> {
    let built = build(host, port, None, rules, ca, options)?;
    let rt = runtime();
    py.detach(move || rt.block_on(bind(built)))
}

/// The engine's options, one dict each, in the table's order: `name`, `kind` (`"seconds"`,
/// `"count"`, `"choice"`...), `choices`, `default`, `optional` (None is a value), `topic`,
/// `help`, `metavar`, `cli` (the command-line flag, or None), `cli_by_hand` (the command line
/// shapes that flag itself) and `cli_note` (how, or why there is no flag).
#[pyfunction]
pub fn option_table(py: Python<'_>) -> PyResult<Vec<Bound<'_, PyDict>>> {
    options::OPTIONS
        .iter()
        .map(|o| {
            let d = PyDict::new(py);
            d.set_item("name", o.name)?;
            d.set_item("kind", o.kind.name())?;
            let choices = o.kind.choices();
            d.set_item("choices", (!choices.is_empty()).then(|| choices.to_vec()))?;
            d.set_item("default", value_to_py(py, &o.default.value())?)?;
            d.set_item("optional", o.optional())?;
            d.set_item("topic", o.topic)?;
            d.set_item("help", o.help)?;
            d.set_item("metavar", o.metavar)?;
            d.set_item("cli", o.cli_flag())?;
            d.set_item("cli_by_hand", matches!(o.cli, Cli::ByHand(..)))?;
            d.set_item(
                "cli_note",
                match o.cli {
                    Cli::ByHand(_, note) | Cli::Absent(note) => Some(note),
                    Cli::Flag | Cli::Renamed(_) => None,
                },
            )?;
            Ok(d)
        })
        .collect()
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

    /// Whether `flows()` returns anything: finished flows are kept in memory.
    fn recording_flows(&self) -> bool {
        self.inner
            .engine()
            .sinks
            .flows
            .as_ref()
            .is_some_and(|store| store.keeps_flows())
    }

    /// Puts a new rule set in force now (an atomic swap): new connections and new requests
    /// on kept-alive connections are decided by it; flows already decided keep their policy.
    fn set_rules(&self, rules: PyRef<'_, PyRuleSet>) -> PyResult<()> {
        let rules = rules
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.inner
            .engine()
            .set_rules(rules)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Puts a new destination filter in force now (allow and deny lists, `deny_private`).
    #[pyo3(signature = (allow_domains = Vec::new(), deny_domains = Vec::new(), deny_private = false))]
    fn set_domain_filter(
        &self,
        allow_domains: Vec<String>,
        deny_domains: Vec<String>,
        deny_private: bool,
    ) {
        self.inner.engine().set_filter(DomainFilter::new(
            allow_domains,
            deny_domains,
            deny_private,
        ));
    }

    /// The connection limit in force (derived from the open-file limit unless one was given).
    #[getter]
    fn max_connections(&self) -> usize {
        self.inner.engine().config.max_connections
    }

    /// Seconds that exchanges in flight get when the server closes without a grace of its own.
    #[getter]
    fn shutdown_timeout(&self) -> f64 {
        self.inner.engine().config.shutdown_timeout.as_secs_f64()
    }

    /// The bound address as (host, port).
    fn local_addr(&self) -> (String, u16) {
        let a = self.inner.local_addr();
        (a.ip().to_string(), a.port())
    }

    /// The SOCKS5 port's address as (host, port), or None without `socks_port`.
    fn socks_addr(&self) -> Option<(String, u16)> {
        let a = self.inner.socks_addr()?;
        Some((a.ip().to_string(), a.port()))
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
