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
//!
//! Each lane also has a mailbox ([`post`]): work handed to a lane from another thread (a
//! Python hook's answer, from the asyncio loop's thread) is queued there and the lane is woken
//! once for all that arrived meanwhile, instead of once per answer. Waking a parked lane is a
//! system call and, on a busy machine, most of what answering a hook costs the loop thread.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;

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
    mailboxes: Vec<Arc<Mailbox>>,
    next: AtomicUsize,
}

/// Work for one lane's thread, from other threads.
type Delivery = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Mailbox {
    queue: Mutex<Vec<Delivery>>,
    ring: Notify,
}

impl Mailbox {
    fn push(&self, work: Delivery) {
        let was_empty = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.push(work);
            queue.len() == 1
        };
        // Only the first item of a batch wakes the lane; it takes the whole queue.
        if was_empty {
            self.ring.notify_one();
        }
    }

    /// The lane's main future: runs what other threads post, on the lane's thread, where
    /// waking a connection's task is a local push rather than a system call.
    async fn serve(&self) {
        let mut batch = Vec::new();
        loop {
            self.ring.notified().await;
            std::mem::swap(
                &mut batch,
                &mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()),
            );
            for work in batch.drain(..) {
                work();
            }
        }
    }
}

/// How far ahead a lane's timer driver plans its next wake-up, at most.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A timer that keeps firing, so the driver's next planned wake-up is never more than
/// [`HEARTBEAT`] away. tokio wakes a runtime's own driver (a write to its eventfd, and a
/// needless turn) whenever a new timer falls due before that planned wake-up. With only
/// 30-60 s timeouts pending, each request through a hook did it (its 30 s hook timeout among
/// 60 s idle timeouts): `perf` counted 0.5 such writes a request, 0 with the heartbeat.
async fn heartbeat() {
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        beat.tick().await;
    }
}

/// Runs `work` on lane `lane` (from [`current`] where the work's receiver lives); right here
/// when that is not a lane.
pub fn post(lane: usize, work: impl FnOnce() + Send + 'static) {
    match lanes().and_then(|l| l.mailboxes.get(lane)) {
        Some(mailbox) => mailbox.push(Box::new(work)),
        None => work(),
    }
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
        let (handles, mailboxes) = (0..count)
            .map(|i| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cannot start a connection lane's runtime");
                let handle = rt.handle().clone();
                let mailbox = Arc::new(Mailbox::default());
                let serving = mailbox.clone();
                std::thread::Builder::new()
                    .name(format!("segproxy-lane-{i}"))
                    .spawn(move || {
                        CURRENT_LANE.with(|lane| lane.set(i));
                        rt.block_on(async {
                            tokio::join!(serving.serve(), heartbeat());
                        })
                    })
                    .expect("cannot start a connection lane's thread");
                (handle, mailbox)
            })
            .unzip();
        Lanes {
            handles,
            mailboxes,
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

    /// Write system calls made by thread `tid` of this process so far (`/proc`'s `syscw`);
    /// `None` on a kernel without per-task I/O accounting.
    #[cfg(target_os = "linux")]
    fn writes_by_thread(tid: i32) -> Option<u64> {
        let io = std::fs::read_to_string(format!("/proc/self/task/{tid}/io")).ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// A lane parked with only long timers pending registers a shorter one without waking its
    /// own driver (tokio does that with an eventfd write when the new timer is due before
    /// the driver's planned wake-up; the heartbeat keeps that wake-up near).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_shorter_timeout_does_not_wake_the_lanes_own_driver() {
        let lanes = Lanes::start(1);
        let (tx, rx) = std::sync::mpsc::channel();
        // A long timer, as an idle kept-alive connection holds; and the lane's thread id.
        lanes.spawn(async move {
            // SAFETY: gettid has no preconditions.
            let _ = tx.send(unsafe { libc::gettid() });
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let tid = rx.recv().unwrap();
        let Some(before) = writes_by_thread(tid) else {
            eprintln!("skipped: this kernel does not count a thread's system calls");
            return;
        };
        const TIMEOUTS: u64 = 40;
        for _ in 0..TIMEOUTS {
            // Each arrives from another thread while the lane is idle and waits under a 30 s
            // timeout, as a request waits for its hook; the answer comes, so the timer is gone
            // again before the next one.
            let (answer, waiting) = tokio::sync::oneshot::channel::<()>();
            let (step, next_step) = std::sync::mpsc::channel();
            lanes.spawn(async move {
                let wait = tokio::time::timeout(Duration::from_secs(30), waiting);
                let mut wait = std::pin::pin!(wait);
                // The first poll registers the timer.
                let first = crate::engine::test_util::poll_once(wait.as_mut()).await;
                let _ = step.send(());
                if first.is_pending() {
                    let _ = wait.await;
                }
                let _ = step.send(());
            });
            next_step.recv().unwrap();
            let _ = answer.send(());
            next_step.recv().unwrap();
        }
        let writes = writes_by_thread(tid).unwrap() - before;
        // Without the heartbeat: a write for most timeouts (27 to 40 of 40 measured). With it:
        // 1 or 2, a heartbeat tick rescheduling itself.
        assert!(
            writes < TIMEOUTS / 4,
            "{writes} writes for {TIMEOUTS} timeouts"
        );
    }

    #[test]
    fn posted_work_runs_on_its_lane_in_order() {
        let lanes = Lanes::start(2);
        let (tx, rx) = std::sync::mpsc::channel();
        for k in 0..50 {
            let tx = tx.clone();
            lanes.mailboxes[1].push(Box::new(move || {
                let _ = tx.send((k, current()));
            }));
        }
        let got: Vec<(i32, usize)> = (0..50).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(got, (0..50).map(|k| (k, 1)).collect::<Vec<_>>());
    }
}
