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

/// Caps glibc's malloc arenas (one per thread, up to eight per CPU, by default). The
/// command-line proxy calls it before starting; a library user's process is left as it is.
///
/// `None` gives one arena for each thread the engine keeps: the Python thread, the runtime's
/// workers and the connection lanes. Fewer would put two lanes on one arena, whose lock they
/// then take in turn for every allocation the per-thread cache does not serve (a TLS record,
/// a response head with its body): `perf` counted 0.34 futex calls a request on a keep-alive
/// load with a single arena, none with one per thread, for 1.2 MiB more peak RSS.
#[pyo3::pyfunction]
#[pyo3(signature = (arenas=None))]
pub fn limit_malloc_arenas(arenas: Option<i32>) -> bool {
    let threads = 1 + 2 * crate::engine::lanes::worker_threads();
    let arenas = arenas.unwrap_or(i32::try_from(threads).unwrap_or(i32::MAX));
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
