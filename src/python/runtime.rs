//! The one tokio runtime of the process: its own worker threads, never the Python thread.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<&'static Runtime> = OnceLock::new();

pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("segproxy-engine")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime");
        let rt: &'static Runtime = Box::leak(Box::new(rt));
        // pyo3-async-runtimes bridges awaitables onto this same runtime.
        let _ = pyo3_async_runtimes::tokio::init_with_runtime(rt);
        rt
    })
}
