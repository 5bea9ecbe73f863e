//! A sleep that ends on time to tens of microseconds, for pacing segmented chunks.
//!
//! tokio's timer wheel ticks every millisecond and rounds deadlines up to the next tick, so
//! a 5 ms pause lasts 5 to 6+ ms. [`sleep_until`] instead hands its wake-up time to one
//! process-wide timer thread that waits on a futex with a timeout (on Linux with a timer
//! slack of 1 µs, so the kernel does not round it by its default 50 µs), then wakes the task.
//!
//! Waking a task on another thread takes tens to hundreds of microseconds (more on a virtual
//! machine whose idle CPU must be woken). So the task is woken a little early, by a margin
//! learnt from how late recent wake-ups arrived, and spends the rest of the wait in a short
//! busy loop that ends at the deadline. The spin is bounded by [`MAX_SPIN`]; its CPU cost is
//! reported by bench/fidelity.py. Entries of dropped sleeps stay queued until their time and
//! then wake nobody who cares; that is cheaper than removing them.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A future that completes at `deadline` (at once when it has passed).
pub fn sleep_until(deadline: Instant) -> PreciseSleep {
    PreciseSleep {
        deadline,
        waker: None,
        wake_at: None,
    }
}

/// The longest busy wait before a deadline.
pub const MAX_SPIN: Duration = Duration::from_micros(400);
const MIN_MARGIN_NS: u64 = 30_000;

/// How late the timer's wake-ups reach their tasks, learnt as they come (nanoseconds): a
/// running mean and mean deviation, updated without locks (a lost update only slows learning).
static LATENESS_MEAN_NS: AtomicU64 = AtomicU64::new(100_000);
static LATENESS_DEV_NS: AtomicU64 = AtomicU64::new(50_000);

/// How early to be woken: the usual lateness plus four deviations, within bounds.
fn margin() -> Duration {
    let mean = LATENESS_MEAN_NS.load(AtomicOrdering::Relaxed);
    let dev = LATENESS_DEV_NS.load(AtomicOrdering::Relaxed);
    Duration::from_nanos((mean + 4 * dev).clamp(MIN_MARGIN_NS, MAX_SPIN.as_nanos() as u64))
}

fn learn_lateness(late: Duration) {
    let late = late.as_nanos().min(10_000_000) as i64;
    let mean = LATENESS_MEAN_NS.load(AtomicOrdering::Relaxed) as i64;
    let dev = LATENESS_DEV_NS.load(AtomicOrdering::Relaxed) as i64;
    let new_mean = mean + (late - mean) / 16;
    let new_dev = dev + ((late - mean).abs() - dev) / 16;
    LATENESS_MEAN_NS.store(new_mean.max(0) as u64, AtomicOrdering::Relaxed);
    LATENESS_DEV_NS.store(new_dev.max(0) as u64, AtomicOrdering::Relaxed);
}

/// See [`sleep_until`].
#[derive(Debug)]
pub struct PreciseSleep {
    deadline: Instant,
    /// The waker last handed to the timer thread: it is registered again only if it changes.
    waker: Option<Waker>,
    /// When the timer was asked to wake this task.
    wake_at: Option<Instant>,
}

impl PreciseSleep {
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

impl Future for PreciseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        if now >= self.deadline {
            if let Some(at) = self.wake_at.take() {
                learn_lateness(now - at);
            }
            return Poll::Ready(());
        }
        let left = self.deadline - now;
        if let Some(at) = self.wake_at.filter(|at| now >= *at) {
            // Woken (a little early, on purpose): learn how late that was, and spin the rest.
            learn_lateness(now - at);
            self.wake_at = None;
            if left <= MAX_SPIN {
                while Instant::now() < self.deadline {
                    std::hint::spin_loop();
                }
                return Poll::Ready(());
            }
        } else if left <= margin() {
            // Too close to the deadline to be woken in time: spin.
            while Instant::now() < self.deadline {
                std::hint::spin_loop();
            }
            return Poll::Ready(());
        }
        let registered =
            self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) && self.wake_at.is_some();
        if !registered {
            let at = self.deadline - margin().min(left);
            self.waker = Some(cx.waker().clone());
            self.wake_at = Some(at);
            timer().add(at, cx.waker().clone());
        }
        Poll::Pending
    }
}

struct Entry {
    deadline: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.deadline == other.deadline && self.seq == other.seq
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    // Reversed: BinaryHeap is a max-heap and the earliest deadline must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .deadline
            .cmp(&self.deadline)
            .then(other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct Queue {
    entries: BinaryHeap<Entry>,
    seq: u64,
}

struct Timer {
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            queue: Mutex::default(),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("segproxy-timer".into())
            .spawn(move || timer.run())
            .expect("cannot start the segmentation timer thread");
        timer
    })
}

impl Timer {
    fn add(&self, deadline: Instant, waker: Waker) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.seq += 1;
        let seq = queue.seq;
        let earliest = queue.entries.peek().is_none_or(|e| deadline < e.deadline);
        queue.entries.push(Entry {
            deadline,
            seq,
            waker,
        });
        drop(queue);
        if earliest {
            self.changed.notify_one();
        }
    }

    fn run(&self) {
        precise_timer_slack();
        let mut due = Vec::new();
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            while queue.entries.peek().is_some_and(|e| e.deadline <= now) {
                due.extend(queue.entries.pop().map(|e| e.waker));
            }
            if !due.is_empty() {
                // Wake outside the lock: a woken task may register its next deadline at once.
                drop(queue);
                due.drain(..).for_each(Waker::wake);
                queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            queue = match queue.entries.peek().map(|e| e.deadline) {
                None => self.changed.wait(queue).unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let wait = at
                        .saturating_duration_since(now)
                        .max(Duration::from_nanos(1));
                    self.changed
                        .wait_timeout(queue, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// Linux rounds a sleeping thread's timeout up by its timer slack (50 µs by default); this
/// thread exists to be on time, so it asks for 1 µs.
#[cfg(target_os = "linux")]
fn precise_timer_slack() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
    }
}

#[cfg(not(target_os = "linux"))]
fn precise_timer_slack() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sleeps_never_end_early_and_keep_order() {
        let start = Instant::now();
        let mut handles = Vec::new();
        for ms in [7u64, 1, 4, 2, 0] {
            handles.push(tokio::spawn(async move {
                let deadline = start + Duration::from_millis(ms);
                sleep_until(deadline).await;
                assert!(Instant::now() >= deadline);
                ms
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert!(start.elapsed() >= Duration::from_millis(7));
    }

    #[tokio::test]
    async fn a_past_deadline_is_ready_at_once() {
        let past = Instant::now() - Duration::from_millis(5);
        tokio::time::timeout(Duration::from_secs(5), sleep_until(past))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_dropped_sleep_does_not_disturb_later_ones() {
        let start = Instant::now();
        drop(sleep_until(start + Duration::from_millis(1)));
        let mut early = Box::pin(sleep_until(start + Duration::from_millis(2)));
        // Poll once so it registers, then drop it.
        assert!(crate::engine::test_util::poll_once(early.as_mut())
            .await
            .is_pending());
        drop(early);
        sleep_until(start + Duration::from_millis(3)).await;
        assert!(start.elapsed() >= Duration::from_millis(3));
    }
}

#[cfg(test)]
mod lateness {
    use super::*;

    /// How late `sleep_until` wakes a task on a multi-thread runtime (run with --ignored --nocapture).
    #[test]
    #[ignore]
    fn timer_lateness() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for gap_us in [1000u64, 5000, 20000] {
            let late: Vec<f64> = rt.block_on(async move {
                tokio::spawn(async move {
                    let mut late = Vec::new();
                    let mut at = Instant::now();
                    for _ in 0..200 {
                        at += Duration::from_micros(gap_us);
                        sleep_until(at).await;
                        late.push((Instant::now() - at).as_secs_f64() * 1e6);
                    }
                    late
                })
                .await
                .unwrap()
            });
            let mut sorted = late.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "gap {gap_us} us: median {:.0} us p99 {:.0} us max {:.0} us",
                sorted[100], sorted[197], sorted[199]
            );
        }
    }
}
