//! Giving memory back to the system after a burst of connections ends.
//!
//! glibc's malloc keeps the memory that thousands of closed tunnels freed (measured: 3,000
//! idle tunnels closing left RSS 57 MiB above where it started, for good), because freed
//! blocks in the middle of its heap are not returned on their own. `malloc_trim(0)` returns
//! them. It walks the heap, so it runs only after the number of open connections has
//! fallen by [`BURST`] since the last trim, at most once per [`EVERY`], on a blocking thread.
//! (mimalloc was measured as the alternative: more RSS per idle tunnel, and it kept the
//! memory too.)

use std::sync::Arc;
use std::time::Duration;

use super::state::Engine;

/// How far the open connections must fall before memory is given back.
pub const BURST: usize = 128;
/// How often the count is looked at.
pub const EVERY: Duration = Duration::from_secs(1);

/// Runs until the engine closes.
pub async fn return_after_bursts(engine: Arc<Engine>) {
    let mut closing = engine.closing.clone();
    let mut high = engine.active_connections();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = closing.wait_for(|c| *c) => return,
        }
        let now = engine.active_connections();
        high = high.max(now);
        if high - now >= BURST {
            high = now;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

/// Returns the allocator's free memory to the system, where the allocator can.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
