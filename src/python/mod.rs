//! The PyO3 binding layer: thin wrappers over engine objects. Python sees `segproxy._engine`.

use pyo3::prelude::*;

mod bench;
mod bridge;
mod convert;
mod doorbell;
mod handler;
mod logger;
mod replies;
mod rules;
mod runtime;
mod server;
mod tls;

#[pymodule]
mod _engine {
    #[pymodule_export]
    use super::bench::{hook_roundtrip, time_minting};
    #[pymodule_export]
    use super::bridge::HookBridge;
    #[pymodule_export]
    use super::logger::set_log_level;
    #[pymodule_export]
    use super::replies::{Completer, FlowHandle, WebSocketInjector};
    #[pymodule_export]
    use super::rules::{segment_policy, PyRuleSet};
    #[pymodule_export]
    use super::runtime::limit_malloc_arenas;
    #[pymodule_export]
    use super::server::{option_table, start_server, start_server_blocking, EngineServer};
    #[pymodule_export]
    use super::tls::PyCertificateAuthority;

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // The strategy names the engine's policy parser knows, as a tuple.
        m.add(
            "SEGMENT_STRATEGIES",
            pyo3::types::PyTuple::new(m.py(), crate::engine::segment::Strategy::NAMES)?,
        )?;
        Ok(())
    }
}
