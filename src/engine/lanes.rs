//! Connection lanes: one thread per CPU, each running a current-thread tokio runtime. An
//! accepted connection is handed to one lane and lives there until it closes: its client
//! socket, its origin sockets and its tasks all wake the same thread, so a keep-alive request
//! costs no wake-ups between workers and no work stealing (`perf` had these at a fifth of the
//! proxy's CPU on a keep-alive load with the work-stealing runtime).
//!
//! Lanes are shared by every server of the process and started on first use. Lanes take
//! connections in turn; a connection's sub-tasks (a tunnel's second direction, an HTTP/2
//! connection driver) are spawned on its lane. `SEGPROXY_LANES=0` turns lanes off: connections
//! then run on the runtime that accepted them.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

/// Threads to run: `SEGPROXY_WORKERS` if set (1-64), else one per CPU (at most 8).
pub fn worker_threads() -> usize {
    let from_env = std::env::var("SEGPROXY_WORKERS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=64).contains(n));
    from_env.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8)
    })
}

thread_local! {
    static CURRENT_LANE: Cell<usize> = const { Cell::new(NOT_A_LANE) };
}

/// What [`current`] says on a thread that is not a lane.
pub const NOT_A_LANE: usize = usize::MAX;

/// The lane this thread runs, or [`NOT_A_LANE`]. Kept with pooled origin connections, so a
/// connection is reused on the lane whose poller watches its socket.
pub fn current() -> usize {
    CURRENT_LANE.with(Cell::get)
}

/// Makes this thread count as lane `lane` (tests of lane-aware code).
#[cfg(test)]
pub fn pretend_lane(lane: usize) {
    CURRENT_LANE.with(|l| l.set(lane));
}

pub struct Lanes {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

static LANES: OnceLock<Option<Lanes>> = OnceLock::new();

/// The process's lanes, started on first use; `None` when `SEGPROXY_LANES=0`.
pub fn lanes() -> Option<&'static Lanes> {
    LANES
        .get_or_init(|| {
            let off = std::env::var("SEGPROXY_LANES").is_ok_and(|v| v.trim() == "0");
            (!off).then(|| Lanes::start(worker_threads()))
        })
        .as_ref()
}

impl Lanes {
    fn start(count: usize) -> Lanes {
        let handles = (0..count)
            .map(|i| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cannot start a connection lane's runtime");
                let handle = rt.handle().clone();
                std::thread::Builder::new()
                    .name(format!("segproxy-lane-{i}"))
                    .spawn(move || {
                        CURRENT_LANE.with(|lane| lane.set(i));
                        rt.block_on(std::future::pending::<()>())
                    })
                    .expect("cannot start a connection lane's thread");
                handle
            })
            .collect();
        Lanes {
            handles,
            next: AtomicUsize::new(0),
        }
    }

    /// Runs `future` on the next lane in turn.
    pub fn spawn<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        drop(self.handles[i].spawn(future));
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_lanes_in_turn() {
        let lanes = Lanes::start(2);
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            lanes.spawn(async move {
                let _ = tx.send(current());
            });
        }
        let mut seen: Vec<usize> = (0..4).map(|_| rx.recv().unwrap()).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 0, 1, 1]);
        assert_eq!(current(), NOT_A_LANE);
    }
}
