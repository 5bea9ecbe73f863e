//! Measurements of the binding for bench/ scripts (not used by the proxy itself).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::engine::hooks::{ConnectionMeta, Handler, HookWaits};

use super::bridge::HookBridge;
use super::runtime::runtime;
use super::tls::{ca_error, PyCertificateAuthority};

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

/// Seconds to mint a certificate for `count` new hosts and to fetch a cached one
/// `count` times (for benchmarks): (mint_seconds_each, cached_seconds_each).
#[pyfunction]
#[pyo3(signature = (ca, count = 200))]
pub fn time_minting(
    py: Python<'_>,
    ca: PyRef<'_, PyCertificateAuthority>,
    count: usize,
) -> PyResult<(f64, f64)> {
    let ca = ca.inner.clone();
    py.detach(move || {
        let tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let start = std::time::Instant::now();
        for i in 0..count {
            ca.server_config(&format!("bench{i}-{tag}.test"))
                .map_err(ca_error)?;
        }
        let mint = start.elapsed().as_secs_f64() / count as f64;
        let start = std::time::Instant::now();
        for _ in 0..count {
            ca.server_config(&format!("bench0-{tag}.test"))
                .map_err(ca_error)?;
        }
        Ok((mint, start.elapsed().as_secs_f64() / count as f64))
    })
}
