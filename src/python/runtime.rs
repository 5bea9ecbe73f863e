//! The one tokio runtime of the process: its own worker threads, never the Python thread.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<&'static Runtime> = OnceLock::new();

pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let workers = crate::engine::lanes::worker_threads();
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

/// Caps glibc's malloc arenas (one per thread by default). The command-line proxy calls it
/// before starting: fewer arenas means less memory held per worker thread, at no measured
/// cost in request rate. A library user's process is left as it is.
#[pyo3::pyfunction]
pub fn limit_malloc_arenas(arenas: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts allocator tuning; any positive value is valid.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas.max(1)) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = arenas;
        false
    }
}
