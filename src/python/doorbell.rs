//! The doorbell: how tokio tasks get work done on the asyncio loop thread.
//!
//! A tokio task never takes the GIL. It pushes a pure-Rust work item onto a queue and, only
//! when the "scheduled" flag goes false -> true, writes one byte to a socketpair whose other end
//! the loop watches with `loop.add_reader`. The loop side (`HookBridge.drain`) then, in this
//! order: (a) reads the socket until it would block, (b) sets "scheduled" back to false,
//! (c) takes the whole queue and runs each item with the GIL. Doing (b) before (a) would lose
//! wake-ups (a push between them rings a byte that (a) then swallows). With many flows one
//! wake-up runs many items.
//!
//! Loops without `add_reader` (Windows' Proactor) get a small ringer thread instead: it blocks
//! on the socket and asks the loop to drain with a coalesced `call_soon_threadsafe`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use pyo3::prelude::*;

/// Work for the loop thread. It runs with the GIL on the loop thread, nowhere else, and handles
/// its own errors (a returned error is only logged).
pub type Item = Box<dyn FnOnce(Python<'_>) -> PyResult<()> + Send>;

pub struct Doorbell {
    queue: Mutex<Vec<Item>>,
    scheduled: AtomicBool,
    /// Write end (non-blocking): one byte per wake-up.
    bell: UnixStream,
    /// Read end, watched by the loop (or by the ringer thread).
    pub(crate) ear: UnixStream,
    closed: AtomicBool,
    pub(crate) wakeups: AtomicU64,
    pub(crate) items: AtomicU64,
}

impl Doorbell {
    pub fn new() -> std::io::Result<Doorbell> {
        let (bell, ear) = UnixStream::pair()?;
        bell.set_nonblocking(true)?;
        ear.set_nonblocking(true)?;
        Ok(Doorbell {
            queue: Mutex::new(Vec::with_capacity(64)),
            scheduled: AtomicBool::new(false),
            bell,
            ear,
            closed: AtomicBool::new(false),
            wakeups: AtomicU64::new(0),
            items: AtomicU64::new(0),
        })
    }

    /// Queues `item` for the loop thread; callable from any thread, never takes the GIL.
    /// After `close` the item is dropped, which drops its reply senders: the waiting Rust side
    /// sees "handler went away" instead of hanging.
    pub fn push(&self, item: Item) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(item);
        if !self.scheduled.swap(true, Ordering::AcqRel) {
            self.ring();
        }
    }

    fn ring(&self) {
        match (&self.bell).write(&[1]) {
            Ok(_) => {}
            // The socket is full of unread bytes: a wake-up is already due.
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => log::warn!("hook bridge: cannot ring the loop: {e}"),
        }
    }

    /// Loop side. `read_socket` is false when the ringer thread already consumed the bytes.
    pub fn drain(&self, py: Python<'_>, read_socket: bool) -> usize {
        if read_socket {
            let mut buf = [0u8; 512];
            loop {
                match (&self.ear).read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break, // WouldBlock: all read
                }
            }
        }
        self.scheduled.store(false, Ordering::SeqCst);
        let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let n = batch.len();
        self.wakeups.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(n as u64, Ordering::Relaxed);
        for item in batch {
            if let Err(e) = item(py) {
                log::warn!("hook bridge: work item failed: {e}");
            }
        }
        n
    }

    /// Stops accepting work; queued items are dropped (their waiters see an error).
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let _ = self.bell.shutdown(std::net::Shutdown::Write);
            let stale = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
            drop(stale);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
