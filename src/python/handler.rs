//! The engine's `Handler` / `ConnectionHandler` implemented by a Python handler class.
//!
//! Every method pushes one doorbell item and returns at once; the item runs on the loop thread,
//! where it calls the connection's Python driver (`segproxy.handlers._Connection`), which starts
//! the hook as a task in the connection's `contextvars.Context`. Answers come back through
//! `FlowHandle` (commands about a request) and `Completer` (one reply), both converting Python
//! values to Rust values on the loop thread. No Python object or error reaches a tokio thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};
use tokio::sync::{mpsc, oneshot};

use crate::engine::hooks::{
    ConnectDecision, ConnectionHandler, ConnectionMeta, Handler, HandlerCommand, HookSet,
    MessageVerdict, Reply, RequestParts, ResponseParts, WebSocketInjector, WebSocketMessage,
};

use super::convert::{request_to_py, response_to_py};
use super::doorbell::{Doorbell, Item};
use super::replies::{Completer, FlowHandle, Pending, WebSocketInjector as PyInjector};

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
        let lane = crate::engine::lanes::current();
        self.shared.bell.push(Box::new(move |py| {
            let completer = Py::new(
                py,
                Completer {
                    pending: Mutex::new(Some(pending)),
                    lane,
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
            lane: crate::engine::lanes::current(),
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

    fn websocket_opened(&self, injector: WebSocketInjector) {
        self.call(
            "websocket_opened",
            move |py| PyTuple::new(py, [Bound::new(py, PyInjector { inner: injector })?]),
            |_| {},
        );
    }

    fn websocket_message(&self, message: WebSocketMessage) -> Reply<MessageVerdict> {
        self.reply("websocket_message", Pending::Message, move |py| {
            Ok(vec![
                message.from_client.into_pyobject(py)?.to_owned().into_any(),
                message.is_text.into_pyobject(py)?.to_owned().into_any(),
                PyBytes::new(py, &message.content).into_any(),
            ])
        })
    }

    fn websocket_closed(&self) {
        self.call("websocket_closed", |py| Ok(PyTuple::empty(py)), |_| {});
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
