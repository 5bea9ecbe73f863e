//! Python's answers to the engine: `FlowHandle` (commands about one request) and `Completer`
//! (one reply to one hook call), converting Python values to Rust ones on the loop thread.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::{mpsc, oneshot};

use crate::engine::hooks::{
    ConnectDecision, ForwardOrder, HandlerCommand, InjectedMessage, MessageVerdict, RequestParts,
    ResponseParts, WebSocketInjector as EngineInjector,
};
use crate::engine::lanes;

use super::convert::{bytes_from_py, headers_from_py, policy_from_py};
use super::doorbell::Doorbell;
use super::runtime::runtime;

// ------------------------------------------------------------------------------------------
// FlowHandle: a request's command channel, as Python sees it

/// Sends commands about one request to the engine. Every method is synchronous and never
/// blocks; after the engine gave up on the request (timeout, client gone) they do nothing.
#[pyclass(frozen, module = "segproxy._engine")]
pub struct FlowHandle {
    pub(crate) tx: mpsc::UnboundedSender<HandlerCommand>,
    pub(crate) bell: Arc<Doorbell>,
    /// The lane of the connection waiting for these commands (`lanes::current()` where the
    /// hook was called): commands go through its mailbox, one wake-up for many.
    pub(crate) lane: usize,
}

impl FlowHandle {
    /// Sends `command` to the engine by way of the connection's lane; false when the engine
    /// stopped listening for this request.
    fn deliver(&self, command: HandlerCommand) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        let tx = self.tx.clone();
        lanes::post(self.lane, move || drop(tx.send(command)));
        true
    }
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
        Ok(self.deliver(HandlerCommand::Forward(Box::new(order))))
    }

    /// Raw bytes for the client (a whole response, status line included, possibly in pieces).
    fn write(&self, data: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.deliver(HandlerCommand::Write(bytes_from_py(data)?)))
    }

    /// Asks for the next piece of the client's request body; `future` (an asyncio future of the
    /// calling loop) gets bytes, or None at the end, or an exception.
    fn read_body(&self, future: Py<PyAny>) -> PyResult<()> {
        let (tx, rx) = oneshot::channel();
        // Through the lane too, so it stays behind any command sent before it.
        if !self.deliver(HandlerCommand::ReadBody(tx)) {
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
        self.deliver(HandlerCommand::Finish)
    }

    /// The request hook raised: the message goes to the log and the client's 502.
    fn fail(&self, message: String) -> bool {
        self.deliver(HandlerCommand::Fail(message))
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
    Message(oneshot::Sender<Result<MessageVerdict, String>>),
}

/// Answers one engine question (response head, body chunk, completion, CONNECT decision).
/// Dropped unanswered, it answers "handler went away".
#[pyclass(frozen, module = "segproxy._engine")]
pub struct Completer {
    pub(crate) pending: Mutex<Option<Pending>>,
    /// The lane of the connection waiting for the answer (`lanes::current()` where the hook
    /// was called).
    pub(crate) lane: usize,
}

/// Sends a hook's answer by way of the lane waiting for it: one wake-up for all the answers
/// the loop gives that lane in a row.
fn answer<T: Send + 'static>(lane: usize, tx: oneshot::Sender<T>, value: T) {
    lanes::post(lane, move || drop(tx.send(value)));
}

impl Completer {
    fn take(&self) -> Option<Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub(crate) fn fail_with(&self, msg: String) {
        match self.take() {
            Some(Pending::Response(tx)) => answer(self.lane, tx, Err(msg)),
            Some(Pending::Chunk(tx)) => answer(self.lane, tx, Err(msg)),
            Some(Pending::Unit(tx)) => answer(self.lane, tx, Err(msg)),
            Some(Pending::Connect(tx)) => answer(self.lane, tx, Err(msg)),
            Some(Pending::Auth(tx)) => answer(self.lane, tx, Err(msg)),
            Some(Pending::Message(tx)) => answer(self.lane, tx, Err(msg)),
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
                    answer(self.lane, tx, Ok(parts));
                }
            }
            Pending::Chunk(_) => {
                let chunk = if value.is_none() {
                    None
                } else {
                    Some(bytes_from_py(value)?)
                };
                if let Some(Pending::Chunk(tx)) = guard.take() {
                    answer(self.lane, tx, Ok(chunk));
                }
            }
            Pending::Unit(_) => {
                if let Some(Pending::Unit(tx)) = guard.take() {
                    answer(self.lane, tx, Ok(()));
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
                    answer(self.lane, tx, Ok(decision));
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
                    answer(self.lane, tx, Ok(ok));
                }
            }
            Pending::Message(_) => {
                // None: unchanged; "drop"; or the new content.
                let verdict = if value.is_none() {
                    MessageVerdict::Keep
                } else if value.extract::<String>().is_ok_and(|s| s == "drop") {
                    MessageVerdict::Drop
                } else {
                    MessageVerdict::Replace(bytes_from_py(value)?)
                };
                if let Some(Pending::Message(tx)) = guard.take() {
                    answer(self.lane, tx, Ok(verdict));
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
// WebSocketInjector: messages a handler adds to an upgraded WebSocket connection

/// Queues messages into one upgraded WebSocket connection, toward the client or the server.
#[pyclass(frozen, module = "segproxy._engine")]
pub struct WebSocketInjector {
    pub(crate) inner: EngineInjector,
}

#[pymethods]
impl WebSocketInjector {
    /// Queues `content` (bytes) as one text or binary message; False once that direction of
    /// the connection has closed.
    fn inject(&self, content: &Bound<'_, PyAny>, to_client: bool, is_text: bool) -> PyResult<bool> {
        let content = bytes_from_py(content)?;
        Ok(self
            .inner
            .inject(to_client, InjectedMessage { content, is_text }))
    }
}
