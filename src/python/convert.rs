//! Conversions between the engine's values and Python's, done on the loop thread: headers as
//! Latin-1 str, request and response tuples, body bytes, segmentation policies, option values.

use bytes::Bytes;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::engine::hooks::{RequestParts, ResponseParts};
use crate::engine::http1::{Header, Headers};
use crate::engine::options::Value;
use crate::engine::segment::SegmentPolicy;

/// Header bytes as str, losslessly (Latin-1), as HTTP/1.1 defines field values.
pub(crate) fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// A str back to header bytes: Latin-1 when it fits, else UTF-8.
pub(crate) fn header_bytes(s: &str) -> Bytes {
    if s.is_ascii() {
        return Bytes::copy_from_slice(s.as_bytes());
    }
    if s.chars().all(|c| (c as u32) < 256) {
        Bytes::from(s.chars().map(|c| c as u8).collect::<Vec<u8>>())
    } else {
        Bytes::copy_from_slice(s.as_bytes())
    }
}

/// A header value as str. Nearly every value is ASCII, which is its own UTF-8: it goes to
/// Python as it is, without widening it byte by byte into a String first.
fn header_value_to_py<'py>(py: Python<'py>, value: &[u8]) -> Bound<'py, PyString> {
    match std::str::from_utf8(value) {
        Ok(s) if s.is_ascii() => PyString::new(py, s),
        _ => PyString::new(py, &latin1(value)),
    }
}

pub(crate) fn headers_to_py<'py>(
    py: Python<'py>,
    headers: &Headers,
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for h in &headers.0 {
        list.append((PyString::new(py, &h.name), header_value_to_py(py, &h.value)))?;
    }
    Ok(list)
}

pub(crate) fn headers_from_py(value: &Bound<'_, PyAny>) -> PyResult<Headers> {
    let mut out = Vec::new();
    for pair in value.try_iter()? {
        // Borrowed as UTF-8 from the str objects (no copy into Strings first).
        let (name, value): (Bound<'_, PyString>, Bound<'_, PyString>) = pair?.extract()?;
        let (name, value) = (name.to_str()?, value.to_str()?);
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
        out.push(Header::new(name, header_bytes(value)));
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

/// A policy tuple `(strategy, chunk, min, max, delay_ms)`, read by the engine's one parser.
pub(crate) fn policy_from_py(value: &Bound<'_, PyAny>) -> PyResult<SegmentPolicy> {
    let (strategy, chunk, min, max, delay_ms): (String, i64, i64, i64, f64) = value.extract()?;
    SegmentPolicy::parse(&strategy, Some(chunk), Some(min), Some(max), delay_ms)
        .map_err(PyValueError::new_err)
}

/// An option's value for the engine's parser: None, bool, int, float, str, a path
/// (`os.PathLike`, as its str) or an iterable of these (a list, a tuple...).
pub(crate) fn value_from_py(name: &str, value: &Bound<'_, PyAny>) -> PyResult<Value> {
    if value.is_none() {
        return Ok(Value::None);
    }
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        return Ok(Value::Int(value.extract()?));
    }
    if let Ok(x) = value.cast::<PyFloat>() {
        return Ok(Value::Float(x.value()));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(Value::Str(s.to_str()?.to_owned()));
    }
    if value.hasattr("__fspath__")? {
        let path = value.py().import("os")?.call_method1("fspath", (value,))?;
        return match path.cast::<PyString>() {
            Ok(s) => Ok(Value::Str(s.to_str()?.to_owned())),
            Err(_) => Err(PyTypeError::new_err(format!(
                "{name}: a path must be str, not {}",
                type_name(&path)
            ))),
        };
    }
    if value.hasattr("__index__")? {
        return Ok(Value::Int(value.call_method0("__index__")?.extract()?));
    }
    if value.hasattr("__float__")? {
        return Ok(Value::Float(value.call_method0("__float__")?.extract()?));
    }
    if !value.is_instance_of::<PyBytes>() && !value.is_instance_of::<PyDict>() {
        if let Ok(items) = value.try_iter() {
            return items
                .map(|item| value_from_py(name, &item?))
                .collect::<PyResult<_>>()
                .map(Value::List);
        }
    }
    Err(PyTypeError::new_err(format!(
        "{name}: an option value is None, a bool, a number, a str, a path or a list of them, not {}",
        type_name(value)
    )))
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}

/// An option's value (a default) as Python's: an empty or other list as a tuple.
pub(crate) fn value_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::None => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(n) => n.into_pyobject(py)?.into_any(),
        Value::Float(x) => x.into_pyobject(py)?.into_any(),
        Value::Str(s) => PyString::new(py, s).into_any(),
        Value::List(items) => PyTuple::new(
            py,
            items
                .iter()
                .map(|item| value_to_py(py, item))
                .collect::<PyResult<Vec<_>>>()?,
        )?
        .into_any(),
    })
}
