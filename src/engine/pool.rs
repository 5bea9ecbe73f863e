//! Idle upstream connections kept for reuse, per destination, with an idle timeout.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

use super::connector::Io;
use super::http1::BufStream;

/// A connection to an origin or upstream proxy, with its read buffer.
pub type OriginConn = BufStream<Box<dyn Io>>;

pub struct Pool {
    idle: Mutex<HashMap<String, Vec<(Instant, OriginConn)>>>,
    idle_timeout: Duration,
    max_per_key: usize,
}

impl Pool {
    pub fn new(idle_timeout: Duration, max_per_key: usize) -> Self {
        Pool {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
            max_per_key,
        }
    }

    /// The most recently used live connection for `key`, if any.
    pub fn take(&self, key: &str) -> Option<OriginConn> {
        let now = Instant::now();
        loop {
            let (since, mut conn) = {
                let mut idle = self.idle.lock().unwrap();
                let list = idle.get_mut(key)?;
                let item = list.pop();
                if list.is_empty() {
                    idle.remove(key);
                }
                item?
            };
            if now.duration_since(since) < self.idle_timeout
                && conn.buf.is_empty()
                && still_open(&mut conn)
            {
                return Some(conn);
            }
        }
    }

    pub fn put(&self, key: String, conn: OriginConn) {
        if self.max_per_key == 0 || !conn.buf.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        let list = idle.entry(key).or_default();
        list.retain(|(since, _)| now.duration_since(*since) < self.idle_timeout);
        if list.len() >= self.max_per_key {
            list.remove(0);
        }
        list.push((now, conn));
    }

    /// Drops connections idle past the timeout (called now and then by the server).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|_, list| {
            list.retain(|(since, _)| now.duration_since(*since) < self.idle_timeout);
            !list.is_empty()
        });
    }

    /// Idle connections held now, across destinations.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().values().map(Vec::len).sum()
    }

    pub fn clear(&self) {
        self.idle.lock().unwrap().clear();
    }
}

/// An idle connection that became readable was closed by the peer (or sent something
/// unasked): either way it must not carry the next request.
fn still_open(conn: &mut OriginConn) -> bool {
    let mut scratch = [0u8; 1];
    let mut buf = ReadBuf::new(&mut scratch);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(
        Pin::new(&mut conn.io).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}
