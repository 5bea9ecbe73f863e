//! Engine log records to stderr, filtered by a level set from Python (`--log-level`).
//! Written from tokio threads without touching Python, so logging never takes the GIL.

use std::io::Write;
use std::sync::Once;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "segproxy {:<5} {}",
                record.level(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

static INSTALL: Once = Once::new();

/// Sets the engine's log level: "off", "error", "warning", "info", "debug" or "trace".
#[pyfunction]
pub fn set_log_level(level: &str) -> PyResult<()> {
    let filter = match level.to_ascii_lowercase().as_str() {
        "off" | "none" | "critical" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" | "warning" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown log level {other:?}"
            )))
        }
    };
    INSTALL.call_once(|| {
        let _ = log::set_logger(&StderrLogger);
    });
    log::set_max_level(filter);
    Ok(())
}
