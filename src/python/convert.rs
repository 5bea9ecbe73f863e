//! Conversions between the engine's values and Python's, done on the loop thread: headers as
//! Latin-1 str, request and response tuples, body bytes, segmentation policies.

use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::engine::hooks::{RequestParts, ResponseParts};
use crate::engine::http1::{Header, Headers};
use crate::engine::segment::SegmentPolicy;

/// Header bytes as str, losslessly (Latin-1), as HTTP/1.1 defines field values.
pub(crate) fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// A str back to header bytes: Latin-1 when it fits, else UTF-8.
pub(crate) fn header_bytes(s: &str) -> Bytes {
    if s.chars().all(|c| (c as u32) < 256) {
        Bytes::from(s.chars().map(|c| c as u8).collect::<Vec<u8>>())
    } else {
        Bytes::copy_from_slice(s.as_bytes())
    }
}

pub(crate) fn headers_to_py<'py>(
    py: Python<'py>,
    headers: &Headers,
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for h in &headers.0 {
        list.append((
            PyString::new(py, &h.name),
            PyString::new(py, &latin1(&h.value)),
        ))?;
    }
    Ok(list)
}

pub(crate) fn headers_from_py(value: &Bound<'_, PyAny>) -> PyResult<Headers> {
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

pub(crate) fn request_to_py<'py>(
    py: Python<'py>,
    r: &RequestParts,
) -> PyResult<Bound<'py, PyTuple>> {
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

pub(crate) fn response_to_py<'py>(
    py: Python<'py>,
    r: &ResponseParts,
) -> PyResult<Bound<'py, PyTuple>> {
    (
        &r.version,
        r.status,
        &r.reason,
        headers_to_py(py, &r.headers)?,
    )
        .into_pyobject(py)
}

pub(crate) fn bytes_from_py(value: &Bound<'_, PyAny>) -> PyResult<Bytes> {
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

pub(crate) fn policy_from_py(value: &Bound<'_, PyAny>) -> PyResult<SegmentPolicy> {
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
