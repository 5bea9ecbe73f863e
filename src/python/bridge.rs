//! `HookBridge`: the Python face of the doorbell (see `doorbell.rs`), built by
//! `segproxy.handlers` with the running loop and handed to `start_server(handler=...)`.

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

use crate::engine::hooks::{Handler, HookSet};

use super::handler::PyHandler;

use super::doorbell::Doorbell;

/// The Python face of the bridge: built by `segproxy.handlers` with the running loop, handed to
/// `start_server(handler=...)`.
#[pyclass(frozen, module = "segproxy._engine")]
pub struct HookBridge {
    pub(crate) bell: Arc<Doorbell>,
    pub(crate) handler: Arc<PyHandler>,
    ringer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl HookBridge {
    pub fn handler(&self) -> Arc<dyn Handler> {
        self.handler.clone()
    }
}

fn hook_set(names: &[String]) -> PyResult<HookSet> {
    let mut set = HookSet::default();
    for name in names {
        let flag = match name.as_str() {
            "client_connected" => &mut set.client_connected,
            "request" => &mut set.request,
            "response" => &mut set.response,
            "response_chunk" => &mut set.response_chunk,
            "response_complete" => &mut set.response_complete,
            "error" => &mut set.error,
            "connect" => &mut set.connect,
            "tunnel" => &mut set.tunnel,
            "authenticate" => &mut set.authenticate,
            "websocket_message" => &mut set.websocket_message,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "unknown hook {other:?}"
                )))
            }
        };
        *flag = true;
    }
    Ok(set)
}

#[pymethods]
impl HookBridge {
    /// `connection_factory(conn_id, client_host, client_port)` is called on the loop thread the
    /// first time a hook applies to a client connection; `hooks` names the hooks the handler
    /// class implements (the engine never calls the others).
    #[new]
    fn new(connection_factory: Py<PyAny>, hooks: Vec<String>) -> PyResult<Self> {
        let bell = Arc::new(
            Doorbell::new()
                .map_err(|e| PyOSError::new_err(format!("hook bridge socketpair: {e}")))?,
        );
        let handler = Arc::new(PyHandler::new(
            bell.clone(),
            hook_set(&hooks)?,
            connection_factory,
        ));
        Ok(HookBridge {
            bell,
            handler,
            ringer: Mutex::new(None),
        })
    }

    /// The socket to watch with `loop.add_reader(fileno, drain)`.
    fn fileno(&self) -> i32 {
        self.bell_fd()
    }

    /// Runs everything queued for the loop; the `add_reader` callback. Returns the item count.
    fn drain(&self, py: Python<'_>) -> usize {
        self.bell.drain(py, true)
    }

    /// Fallback for loops without `add_reader`: a thread blocks on the socket and calls
    /// `loop.call_soon_threadsafe(self._drain_woken)` once per wake-up.
    fn start_ringer(slf: Bound<'_, Self>, event_loop: Py<PyAny>) -> PyResult<()> {
        let this = slf.get();
        let ear = this
            .bell
            .ear
            .try_clone()
            .map_err(|e| PyOSError::new_err(format!("hook bridge: {e}")))?;
        ear.set_nonblocking(false)
            .map_err(|e| PyOSError::new_err(format!("hook bridge: {e}")))?;
        let drain_cb: Py<PyAny> = slf.getattr("_drain_woken")?.unbind();
        let handle = std::thread::Builder::new()
            .name("segproxy-ringer".into())
            .spawn(move || {
                let mut buf = [0u8; 512];
                loop {
                    match (&ear).read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                    let ok = Python::attach(|py| {
                        event_loop
                            .call_method1(py, "call_soon_threadsafe", (drain_cb.clone_ref(py),))
                            .is_ok()
                    });
                    if !ok {
                        break; // the loop is closed
                    }
                }
            })
            .map_err(|e| {
                PyOSError::new_err(format!("hook bridge: cannot start ringer thread: {e}"))
            })?;
        *this.ringer.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    fn _drain_woken(&self, py: Python<'_>) -> usize {
        self.bell.drain(py, false)
    }

    /// Stops the bridge: pending and later hook calls fail on the Rust side (never hang).
    /// The caller unregisters the reader first.
    fn close(&self, py: Python<'_>) {
        self.bell.close();
        let ringer = self.ringer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = ringer {
            py.detach(|| {
                let _ = handle.join();
            });
        }
    }

    fn is_closed(&self) -> bool {
        self.bell.is_closed()
    }

    /// (wake-ups, items run) since start: items per wake-up shows the batching.
    fn stats(&self) -> (u64, u64) {
        (
            self.bell.wakeups.load(Ordering::Relaxed),
            self.bell.items.load(Ordering::Relaxed),
        )
    }

    /// The hooks the engine will call, as given at creation.
    fn hooks(&self) -> Vec<&'static str> {
        let h = self.handler.hooks();
        let mut out = Vec::new();
        for (on, name) in [
            (h.client_connected, "client_connected"),
            (h.request, "request"),
            (h.response, "response"),
            (h.response_chunk, "response_chunk"),
            (h.response_complete, "response_complete"),
            (h.error, "error"),
            (h.connect, "connect"),
            (h.tunnel, "tunnel"),
            (h.authenticate, "authenticate"),
            (h.websocket_message, "websocket_message"),
        ] {
            if on {
                out.push(name);
            }
        }
        out
    }
}

impl HookBridge {
    fn bell_fd(&self) -> i32 {
        self.bell.ear.as_raw_fd()
    }
}
