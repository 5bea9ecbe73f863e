//! `Rules`: the engine's rule set, built from SegmentedProxy-style text or files.

use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::engine::rules::{Action, Direction, RuleError, RuleSet, Scheme};
use crate::engine::segment::SegmentPolicy;

fn rule_error(e: RuleError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A segmentation policy from its parts, read by the engine's one parser of policies: the
/// policy's description (`fixed chunk=512 delay=5ms`), or ValueError with the engine's
/// reason. `set_segmentation` checks its arguments with it.
#[pyfunction]
#[pyo3(signature = (strategy, chunk = None, min = None, max = None, delay_ms = 0.0))]
pub fn segment_policy(
    strategy: &str,
    chunk: Option<i64>,
    min: Option<i64>,
    max: Option<i64>,
    delay_ms: f64,
) -> PyResult<String> {
    Ok(policy_from(strategy, chunk, min, max, delay_ms)?.describe())
}

fn policy_from(
    strategy: &str,
    chunk: Option<i64>,
    min: Option<i64>,
    max: Option<i64>,
    delay_ms: f64,
) -> PyResult<SegmentPolicy> {
    SegmentPolicy::parse(strategy, chunk, min, max, delay_ms).map_err(PyValueError::new_err)
}

fn direction_from(text: &str) -> PyResult<Direction> {
    match text {
        "up" => Ok(Direction::Up),
        "down" => Ok(Direction::Down),
        "both" => Ok(Direction::Both),
        other => Err(PyValueError::new_err(format!(
            "unknown direction {other:?} (up, down or both)"
        ))),
    }
}

#[pyclass(frozen, module = "segproxy._engine", name = "RuleSet")]
pub struct PyRuleSet {
    pub inner: Mutex<RuleSet>,
}

#[pymethods]
impl PyRuleSet {
    /// An empty rule set with a default segmentation policy.
    #[new]
    #[pyo3(signature = (strategy = "none", chunk = None, min = None, max = None, delay_ms = 0.0, direction = "up", mode = None, rate = None, ttfb_ms = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        strategy: &str,
        chunk: Option<i64>,
        min: Option<i64>,
        max: Option<i64>,
        delay_ms: f64,
        direction: &str,
        mode: Option<&str>,
        rate: Option<&str>,
        ttfb_ms: Option<i64>,
    ) -> PyResult<Self> {
        let rate = rate
            .map(SegmentPolicy::parse_rate)
            .transpose()
            .map_err(PyValueError::new_err)?;
        let policy = policy_from(strategy, chunk, min, max, delay_ms)?
            .with_rate(rate)
            .and_then(|p| p.with_ttfb(ttfb_ms))
            .map_err(PyValueError::new_err)?;
        let mut set = RuleSet::new(policy, direction_from(direction)?);
        if let Some(mode) = mode {
            set.set_default_mode(mode);
        }
        Ok(PyRuleSet {
            inner: Mutex::new(set),
        })
    }

    /// Adds rules from text, one a line; errors name `source` and the line.
    #[pyo3(signature = (text, source = "<text>"))]
    fn add_text(&self, text: &str, source: &str) -> PyResult<()> {
        self.inner
            .lock()
            .unwrap()
            .add_text(text, source)
            .map_err(rule_error)
    }

    fn add_file(&self, path: PathBuf) -> PyResult<()> {
        self.inner
            .lock()
            .unwrap()
            .add_file(&path)
            .map_err(rule_error)
    }

    fn describe(&self) -> String {
        self.inner.lock().unwrap().describe()
    }

    /// `FILE:LINE: note` for every accepted line that does nothing or looks wrong.
    fn warnings(&self) -> Vec<String> {
        self.inner.lock().unwrap().warnings()
    }

    fn __len__(&self) -> usize {
        self.inner.lock().unwrap().rules().len()
    }

    /// The decision for a request, with a one-line explanation.
    #[pyo3(signature = (method, scheme, host, port, path = "/"))]
    fn decide<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        scheme: &str,
        host: &str,
        port: u16,
        path: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => {
                return Err(PyValueError::new_err(format!(
                    "scheme must be http or https, got {other:?}"
                )))
            }
        };
        let rules = self.inner.lock().unwrap();
        let d = rules.decide(method, scheme, host, port, path);
        let out = PyDict::new(py);
        let (action, upstream, reason) = match &d.action {
            Action::Direct => ("direct", None, None),
            Action::Upstream(u) => ("upstream", Some(u.to_string()), None),
            Action::Block { reason } => ("block", None, Some(reason.clone())),
        };
        out.set_item("action", action)?;
        out.set_item("upstream", upstream)?;
        out.set_item("reason", reason)?;
        out.set_item("policy", d.policy.describe())?;
        out.set_item("direction", d.direction.as_str())?;
        out.set_item("intercept", d.intercept.as_str())?;
        out.set_item("capture", d.capture)?;
        out.set_item("rule", d.rule.map(|i| rules.rules()[i].source.to_string()))?;
        out.set_item("rule_text", d.rule.map(|i| rules.rules()[i].text.clone()))?;
        out.set_item("score", d.score)?;
        out.set_item("mode", d.mode)?;
        out.set_item("explanation", d.explanation)?;
        Ok(out)
    }
}
