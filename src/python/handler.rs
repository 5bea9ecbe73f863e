//! The engine's `Handler` / `ConnectionHandler` implemented by a Python handler class.
//!
//! Every method pushes one doorbell item and returns at once; the item runs on the loop thread,
//! where it calls the connection's Python driver (`segproxy.handlers._Connection`), which starts
//! the hook as a task in the connection's `contextvars.Context`. Answers come back through
//! `FlowHandle` (commands about a request) and `Completer` (one reply), both converting Python
//! values to Rust values on the loop thread. No Python object or error reaches a tokio thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use tokio::sync::{mpsc, oneshot};

use crate::engine::hooks::{
    ConnectDecision, ConnectionHandler, ConnectionMeta, ForwardOrder, Handler, HandlerCommand,
    HookSet, HookWaits, Reply, RequestParts, ResponseParts,
};
use crate::engine::http1::{Header, Headers};
use crate::engine::segment::SegmentPolicy;

use super::bridge::{Doorbell, HookBridge, Item};
use super::runtime::runtime;

pub struct PyHandler {
    bell: Arc<Doorbell>,
    hooks: HookSet,
    factory: Arc<Py<PyAny>>,
}

impl PyHandler {
    pub fn new(bell: Arc<Doorbell>, hooks: HookSet, factory: Py<PyAny>) -> Self {
        PyHandler {
            bell,
            hooks,
            factory: Arc::new(factory),
        }
    }
}

impl Handler for PyHandler {
    fn hooks(&self) -> HookSet {
        self.hooks
    }

    fn open(&self, meta: ConnectionMeta) -> Box<dyn ConnectionHandler> {
        Box::new(PyConnection {
            shared: Arc::new(Shared {
                bell: self.bell.clone(),
                factory: self.factory.clone(),
                meta,
                driver: Mutex::new(Driver::NotOpened),
            }),
            touched: AtomicBool::new(false),
            released: AtomicBool::new(false),
        })
    }
}

/// The Python driver of one client connection; touched only on the loop thread.
enum Driver {
    NotOpened,
    Open(Py<PyAny>),
    Failed(String),
    Closed,
}

struct Shared {
    bell: Arc<Doorbell>,
    factory: Arc<Py<PyAny>>,
    meta: ConnectionMeta,
    driver: Mutex<Driver>,
}

impl Shared {
    /// The connection's driver, built on first use (this calls the user's `handler_builder`).
    /// Loop thread only.
    fn driver<'py>(&self, py: Python<'py>) -> Result<Bound<'py, PyAny>, String> {
        {
            let d = self.driver.lock().unwrap_or_else(|e| e.into_inner());
            match &*d {
                Driver::Open(obj) => return Ok(obj.bind(py).clone()),
                Driver::Failed(msg) => return Err(msg.clone()),
                Driver::Closed => return Err("client connection closed".into()),
                Driver::NotOpened => {}
            }
        }
        let client = self.meta.client;
        let made =
            self.factory
                .bind(py)
                .call1((self.meta.id, client.ip().to_string(), client.port()));
        let mut d = self.driver.lock().unwrap_or_else(|e| e.into_inner());
        match made {
            Ok(obj) => {
                *d = Driver::Open(obj.clone().unbind());
                Ok(obj)
            }
            Err(e) => {
                let msg = format!("handler_builder failed: {}", describe(py, &e));
                *d = Driver::Failed(msg.clone());
                Err(msg)
            }
        }
    }
}

/// "TypeName: message" of a Python exception, formatted on the loop thread.
pub fn describe(py: Python<'_>, e: &PyErr) -> String {
    let name = e
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    let value = e.value(py).str().map(|s| s.to_string()).unwrap_or_default();
    if value.is_empty() {
        name
    } else {
        format!("{name}: {value}")
    }
}

pub struct PyConnection {
    shared: Arc<Shared>,
    /// Whether any hook crossed into Python (only then does `closed` cross too).
    touched: AtomicBool,
    released: AtomicBool,
}

impl PyConnection {
    /// Queues a call of `driver.<method>(...)`; `on_fail` gets the message if it cannot be made.
    fn call(
        &self,
        method: &'static str,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyTuple>> + Send + 'static,
        on_fail: impl FnOnce(String) + Send + 'static,
    ) {
        self.touched.store(true, Ordering::Relaxed);
        let shared = self.shared.clone();
        let item: Item = Box::new(move |py| {
            let outcome = shared.driver(py).and_then(|driver| {
                let args = args(py).map_err(|e| describe(py, &e))?;
                driver
                    .call_method1(method, args)
                    .map(drop)
                    .map_err(|e| describe(py, &e))
            });
            if let Err(msg) = outcome {
                on_fail(msg);
            }
            Ok(())
        });
        self.shared.bell.push(item);
    }

    /// Queues a hook whose answer comes back through a `Completer` (passed first to the
    /// driver method, before `extra` arguments).
    fn reply<T: Send + 'static>(
        &self,
        method: &'static str,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Pending + Send + 'static,
        extra: impl for<'py> FnOnce(Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> + Send + 'static,
    ) -> Reply<T> {
        let (tx, rx) = oneshot::channel();
        let pending = make(tx);
        self.touched.store(true, Ordering::Relaxed);
        let shared = self.shared.clone();
        self.shared.bell.push(Box::new(move |py| {
            let completer = Py::new(
                py,
                Completer {
                    pending: Mutex::new(Some(pending)),
                },
            )?;
            let outcome = shared.driver(py).and_then(|driver| {
                let mut args = vec![completer.bind(py).clone().into_any()];
                args.extend(extra(py).map_err(|e| describe(py, &e))?);
                let args = PyTuple::new(py, args).map_err(|e| describe(py, &e))?;
                driver
                    .call_method1(method, args)
                    .map(drop)
                    .map_err(|e| describe(py, &e))
            });
            if let Err(msg) = outcome {
                completer.get().fail_with(msg);
            }
            Ok(())
        }));
        rx
    }

    /// Lets the Python side go (once), on the loop thread; only if it was ever used.
    fn release(&self) {
        if !self.touched.load(Ordering::Relaxed) || self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.shared.clone();
        self.shared.bell.push(Box::new(move |py| {
            let prev = std::mem::replace(
                &mut *shared.driver.lock().unwrap_or_else(|e| e.into_inner()),
                Driver::Closed,
            );
            if let Driver::Open(driver) = prev {
                driver.bind(py).call_method0("closed")?;
            }
            Ok(())
        }));
    }
}

impl ConnectionHandler for PyConnection {
    fn request(&self, request: RequestParts) -> mpsc::UnboundedReceiver<HandlerCommand> {
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = FlowHandle {
            tx: tx.clone(),
            bell: self.shared.bell.clone(),
        };
        self.call(
            "request",
            move |py| {
                PyTuple::new(
                    py,
                    [
                        Bound::new(py, flow)?.into_any(),
                        request_to_py(py, &request)?.into_any(),
                    ],
                )
            },
            move |msg| {
                let _ = tx.send(HandlerCommand::Fail(msg));
            },
        );
        rx
    }

    fn response(&self, response: ResponseParts) -> Reply<ResponseParts> {
        self.reply("response", Pending::Response, move |py| {
            Ok(vec![response_to_py(py, &response)?.into_any()])
        })
    }

    fn response_chunk(&self, chunk: Bytes) -> Reply<Option<Bytes>> {
        self.reply("response_chunk", Pending::Chunk, move |py| {
            Ok(vec![PyBytes::new(py, &chunk).into_any()])
        })
    }

    fn response_complete(&self) -> Reply<()> {
        self.reply("response_complete", Pending::Unit, |_| Ok(Vec::new()))
    }

    fn error(&self, message: String) {
        self.call("error", move |py| PyTuple::new(py, [message]), |_| {});
    }

    fn connect(&self, host: String, port: u16) -> Reply<ConnectDecision> {
        self.reply("connect", Pending::Connect, move |py| {
            Ok(vec![
                PyString::new(py, &host).into_any(),
                port.into_pyobject(py)?.into_any(),
            ])
        })
    }

    fn tunnel_opened(&self, host: String, port: u16) {
        self.call(
            "tunnel_opened",
            move |py| (host, port).into_pyobject(py),
            |_| {},
        );
    }

    fn tunnel_closed(&self, host: String, port: u16, bytes_up: u64, bytes_down: u64) {
        self.call(
            "tunnel_closed",
            move |py| (host, port, bytes_up, bytes_down).into_pyobject(py),
            |_| {},
        );
    }

    fn closed(&self) {
        self.release();
    }

    fn authenticate(&self, scheme: String, credentials: String) -> Reply<bool> {
        self.reply("authenticate", Pending::Auth, move |py| {
            Ok(vec![
                PyString::new(py, &scheme).into_any(),
                PyString::new(py, &credentials).into_any(),
            ])
        })
    }
}

impl Drop for PyConnection {
    fn drop(&mut self) {
        // The engine may drop a connection without `closed()`: release the Python side anyway.
        self.release();
    }
}

// ------------------------------------------------------------------------------------------
// conversions (loop thread)

/// Header bytes as str, losslessly (Latin-1), as HTTP/1.1 defines field values.
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// A str back to header bytes: Latin-1 when it fits, else UTF-8.
fn header_bytes(s: &str) -> Bytes {
    if s.chars().all(|c| (c as u32) < 256) {
        Bytes::from(s.chars().map(|c| c as u8).collect::<Vec<u8>>())
    } else {
        Bytes::copy_from_slice(s.as_bytes())
    }
}

fn headers_to_py<'py>(py: Python<'py>, headers: &Headers) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for h in &headers.0 {
        list.append((
            PyString::new(py, &h.name),
            PyString::new(py, &latin1(&h.value)),
        ))?;
    }
    Ok(list)
}

fn headers_from_py(value: &Bound<'_, PyAny>) -> PyResult<Headers> {
    let mut out = Vec::new();
    for pair in value.try_iter()? {
        let (name, value): (String, String) = pair?.extract()?;
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b == b':' || b >= 0x7f) {
            return Err(PyValueError::new_err(format!(
                "invalid header name {name:?}"
            )));
        }
        if value.contains(['\r', '\n']) {
            return Err(PyValueError::new_err(format!(
                "header {name} has a line break in its value"
            )));
        }
        out.push(Header::new(name, header_bytes(&value)));
    }
    Ok(Headers(out))
}

fn request_to_py<'py>(py: Python<'py>, r: &RequestParts) -> PyResult<Bound<'py, PyTuple>> {
    (
        &r.method,
        &r.scheme,
        &r.host,
        r.port,
        &r.path,
        &r.version,
        headers_to_py(py, &r.headers)?,
    )
        .into_pyobject(py)
}

fn response_to_py<'py>(py: Python<'py>, r: &ResponseParts) -> PyResult<Bound<'py, PyTuple>> {
    (
        &r.version,
        r.status,
        &r.reason,
        headers_to_py(py, &r.headers)?,
    )
        .into_pyobject(py)
}

fn bytes_from_py(value: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(b) = value.cast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(b.as_bytes()));
    }
    if value.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "expected bytes, got str (encode it first)",
        ));
    }
    let v: Vec<u8> = value
        .call_method0("__bytes__")
        .or_else(|_| value.py().get_type::<PyBytes>().call1((value,)))
        .map_err(|_| {
            PyTypeError::new_err(format!(
                "expected bytes, got {}",
                value
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?
        .extract()?;
    Ok(Bytes::from(v))
}

fn policy_from_py(value: &Bound<'_, PyAny>) -> PyResult<SegmentPolicy> {
    let (strategy, chunk, min, max, delay_ms): (String, usize, usize, usize, f64) =
        value.extract()?;
    if !delay_ms.is_finite() || delay_ms < 0.0 {
        return Err(PyValueError::new_err(format!(
            "delay_ms must be >= 0, got {delay_ms}"
        )));
    }
    let delay = Duration::from_secs_f64(delay_ms / 1000.0);
    let policy = match strategy.as_str() {
        "none" => SegmentPolicy {
            delay,
            ..SegmentPolicy::none()
        },
        "fixed" => SegmentPolicy::fixed(chunk, delay),
        "random" => SegmentPolicy::random(min, max, delay),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown segmentation strategy {other:?} (none, fixed, random)"
            )))
        }
    };
    policy.validate().map_err(PyValueError::new_err)?;
    Ok(policy)
}

// ------------------------------------------------------------------------------------------
// FlowHandle: a request's command channel, as Python sees it

/// Sends commands about one request to the engine. Every method is synchronous and never
/// blocks; after the engine gave up on the request (timeout, client gone) they do nothing.
#[pyclass(frozen, module = "segproxy._engine")]
pub struct FlowHandle {
    tx: mpsc::UnboundedSender<HandlerCommand>,
    bell: Arc<Doorbell>,
}

#[pymethods]
impl FlowHandle {
    /// Forward the (possibly changed) request. `request` is the tuple
    /// (method, scheme, host, port, path, version, headers); `body` replaces the client's body
    /// (None streams it); `policy` is (strategy, chunk, min, max, delay_ms) or None.
    #[pyo3(signature = (request, body = None, policy = None))]
    fn forward(
        &self,
        request: &Bound<'_, PyAny>,
        body: Option<&Bound<'_, PyAny>>,
        policy: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let (method, scheme, host, port, path, version, headers): (
            String,
            String,
            String,
            u16,
            String,
            String,
            Bound<'_, PyAny>,
        ) = request.extract()?;
        if method.is_empty()
            || method
                .bytes()
                .any(|b| !b.is_ascii_alphanumeric() && !b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(PyValueError::new_err(format!("invalid method {method:?}")));
        }
        if path.is_empty() || path.contains([' ', '\r', '\n']) {
            return Err(PyValueError::new_err(format!(
                "invalid path {path:?} (no spaces or line breaks; start with /)"
            )));
        }
        let order = ForwardOrder {
            request: RequestParts {
                method,
                scheme,
                host,
                port,
                path,
                version,
                headers: headers_from_py(&headers)?,
            },
            body: body.map(bytes_from_py).transpose()?,
            policy: policy.map(policy_from_py).transpose()?,
        };
        Ok(self.tx.send(HandlerCommand::Forward(order)).is_ok())
    }

    /// Raw bytes for the client (a whole response, status line included, possibly in pieces).
    fn write(&self, data: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self
            .tx
            .send(HandlerCommand::Write(bytes_from_py(data)?))
            .is_ok())
    }

    /// Asks for the next piece of the client's request body; `future` (an asyncio future of the
    /// calling loop) gets bytes, or None at the end, or an exception.
    fn read_body(&self, future: Py<PyAny>) -> PyResult<()> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(HandlerCommand::ReadBody(tx)).is_err() {
            return Err(PyRuntimeError::new_err(
                "the request is no longer being handled (timed out or client gone)",
            ));
        }
        let bell = self.bell.clone();
        runtime().spawn(async move {
            let got = rx
                .await
                .unwrap_or_else(|_| Err("the request is no longer being handled".into()));
            bell.push(Box::new(move |py| {
                let fut = future.bind(py);
                if fut.call_method0("done")?.is_truthy()? {
                    return Ok(());
                }
                match got {
                    Ok(Some(b)) => fut.call_method1("set_result", (PyBytes::new(py, &b),))?,
                    Ok(None) => fut.call_method1("set_result", (py.None(),))?,
                    Err(msg) => fut.call_method1(
                        "set_exception",
                        (pyo3::exceptions::PyConnectionError::new_err(msg).into_value(py),),
                    )?,
                };
                Ok(())
            }));
        });
        Ok(())
    }

    /// The request hook returned.
    fn finish(&self) -> bool {
        self.tx.send(HandlerCommand::Finish).is_ok()
    }

    /// The request hook raised: the message goes to the log and the client's 502.
    fn fail(&self, message: String) -> bool {
        self.tx.send(HandlerCommand::Fail(message)).is_ok()
    }

    /// False once the engine stopped listening for this request.
    fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }
}

// ------------------------------------------------------------------------------------------
// Completer: one reply to the engine

pub enum Pending {
    Response(oneshot::Sender<Result<ResponseParts, String>>),
    Chunk(oneshot::Sender<Result<Option<Bytes>, String>>),
    Unit(oneshot::Sender<Result<(), String>>),
    Connect(oneshot::Sender<Result<ConnectDecision, String>>),
    Auth(oneshot::Sender<Result<bool, String>>),
}

/// Answers one engine question (response head, body chunk, completion, CONNECT decision).
/// Dropped unanswered, it answers "handler went away".
#[pyclass(frozen, module = "segproxy._engine")]
pub struct Completer {
    pending: Mutex<Option<Pending>>,
}

impl Completer {
    fn take(&self) -> Option<Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn fail_with(&self, msg: String) {
        match self.take() {
            Some(Pending::Response(tx)) => drop(tx.send(Err(msg))),
            Some(Pending::Chunk(tx)) => drop(tx.send(Err(msg))),
            Some(Pending::Unit(tx)) => drop(tx.send(Err(msg))),
            Some(Pending::Connect(tx)) => drop(tx.send(Err(msg))),
            Some(Pending::Auth(tx)) => drop(tx.send(Err(msg))),
            None => {}
        }
    }
}

#[pymethods]
impl Completer {
    /// Sends the hook's result: a response tuple (version, status, reason, headers), a chunk
    /// (bytes or None), None for completion, or a CONNECT decision (None, "tunnel",
    /// "intercept", "block" or ("block", reason)). A value of the wrong shape raises and leaves
    /// the completer unanswered.
    fn resolve(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut guard = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pending) = guard.as_ref() else {
            return Ok(());
        };
        match pending {
            Pending::Response(_) => {
                let (version, status, reason, headers): (String, u16, String, Bound<'_, PyAny>) =
                    value.extract()?;
                if !(100..=999).contains(&status) {
                    return Err(PyValueError::new_err(format!(
                        "status code must be 100..999, got {status}"
                    )));
                }
                if reason.contains(['\r', '\n']) {
                    return Err(PyValueError::new_err("reason phrase has a line break"));
                }
                let parts = ResponseParts {
                    version,
                    status,
                    reason,
                    headers: headers_from_py(&headers)?,
                };
                if let Some(Pending::Response(tx)) = guard.take() {
                    let _ = tx.send(Ok(parts));
                }
            }
            Pending::Chunk(_) => {
                let chunk = if value.is_none() {
                    None
                } else {
                    Some(bytes_from_py(value)?)
                };
                if let Some(Pending::Chunk(tx)) = guard.take() {
                    let _ = tx.send(Ok(chunk));
                }
            }
            Pending::Unit(_) => {
                if let Some(Pending::Unit(tx)) = guard.take() {
                    let _ = tx.send(Ok(()));
                }
            }
            Pending::Connect(_) => {
                let decision = if value.is_none() {
                    ConnectDecision::Default
                } else if let Ok(s) = value.extract::<String>() {
                    match s.as_str() {
                        "tunnel" => ConnectDecision::Tunnel,
                        "intercept" => ConnectDecision::Intercept,
                        "block" => ConnectDecision::Block("blocked by handler".into()),
                        "default" => ConnectDecision::Default,
                        other => return Err(PyValueError::new_err(format!("on_connect returned {other:?}; expected \"tunnel\", \"intercept\", \"block\" or None"))),
                    }
                } else {
                    let (what, reason): (String, String) = value.extract().map_err(|_| {
                        PyTypeError::new_err("on_connect must return None, \"tunnel\", \"intercept\", \"block\" or (\"block\", reason)")
                    })?;
                    if what != "block" {
                        return Err(PyValueError::new_err(format!("on_connect returned ({what:?}, ...); only (\"block\", reason) takes a reason")));
                    }
                    ConnectDecision::Block(reason)
                };
                if let Some(Pending::Connect(tx)) = guard.take() {
                    let _ = tx.send(Ok(decision));
                }
            }
            Pending::Auth(_) => {
                let Ok(ok) = value.cast::<pyo3::types::PyBool>().map(|b| b.is_true()) else {
                    return Err(PyTypeError::new_err(format!(
                        "on_authenticate must return True or False, not {}",
                        value.get_type().name()?
                    )));
                };
                if let Some(Pending::Auth(tx)) = guard.take() {
                    let _ = tx.send(Ok(ok));
                }
            }
        }
        Ok(())
    }

    /// Sends an error instead of a result (the hook raised; the message is for log and 502).
    fn fail(&self, message: String) {
        self.fail_with(message)
    }

    fn done(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }
}

// ------------------------------------------------------------------------------------------
// measuring the bridge without the engine

/// Round-trip cost of the hook path, engine-free: `flows` concurrent fake connections each make
/// `calls` sequential `response_chunk` hook calls through `bridge`. Awaitable resolving to the
/// list of per-call durations in microseconds.
#[pyfunction]
pub fn hook_roundtrip<'py>(
    py: Python<'py>,
    bridge: &Bound<'py, HookBridge>,
    flows: usize,
    calls: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let handler: Arc<dyn Handler> = bridge.get().handler();
    runtime();
    // Waited for as the engine waits for hooks (a lone wait polls briefly first).
    let waits = Arc::new(HookWaits::default());
    pyo3_async_runtimes::tokio::future_into_py(py, async move {
        let mut tasks = Vec::new();
        for i in 0..flows {
            let handler = handler.clone();
            let waits = waits.clone();
            tasks.push(tokio::spawn(async move {
                let conn = handler.open(ConnectionMeta {
                    id: i as u64 + 1,
                    client: ([127, 0, 0, 1], 1).into(),
                });
                let mut times = Vec::with_capacity(calls);
                for _ in 0..calls {
                    let t = Instant::now();
                    let mut reply = conn.response_chunk(Bytes::from_static(b"ping"));
                    let wait = waits.begin();
                    match tokio::time::timeout(Duration::from_secs(30), wait.reply(&mut reply))
                        .await
                    {
                        Ok(Some(Ok(_))) => times.push(t.elapsed().as_secs_f64() * 1e6),
                        Ok(Some(Err(msg))) => return Err(format!("hook failed: {msg}")),
                        Ok(None) => return Err("hook reply dropped".to_string()),
                        Err(_) => return Err("hook call timed out (lost wake-up?)".to_string()),
                    }
                }
                conn.closed();
                Ok(times)
            }));
        }
        let mut all = Vec::with_capacity(flows * calls);
        for t in tasks {
            match t.await {
                Ok(Ok(times)) => all.extend(times),
                Ok(Err(msg)) => return Err(PyRuntimeError::new_err(msg)),
                Err(e) => return Err(PyRuntimeError::new_err(format!("flow task failed: {e}"))),
            }
        }
        Ok(all)
    })
}
