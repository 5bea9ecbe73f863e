//! Idle upstream connections kept for reuse, per destination, with an idle timeout.

use std::collections::{HashMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};

use super::connector::Io;
use super::http1::BufStream;
use super::lanes;
use super::segment::{ChunkObserver, RawSocket};

/// A connection to an origin or upstream proxy, with its read buffer.
pub struct OriginConn {
    stream: BufStream<Box<dyn Io>>,
    /// For a TLS connection of an intercepted flow (recording flows): where the encrypted
    /// chunks written below TLS are reported. A pooled connection serves many requests, so
    /// each points it at its own flow while it uses the connection.
    pub wire_up: Option<WireTap>,
    /// The TCP socket below, for a fault's reset (`fault=reset@N` toward the destination).
    pub fd: Option<RawSocket>,
    /// The address it reached, when a capturing flow opened it (later captures show it).
    pub peer: Option<std::net::SocketAddr>,
    /// Closing without a response means the request was not taken (a stream of a shared
    /// HTTP/2 connection the origin retired): a request without a body may go again.
    pub retry_safe: bool,
    /// The lane it was opened on ([`lanes::current`]), whose poller watches its socket for as
    /// long as it lives, whichever lane's connection borrows it: the pool offers it to that
    /// lane first (filing it under the lane that put it back kept a borrowed one on the wrong
    /// lane for good).
    lane: usize,
}

impl OriginConn {
    pub fn new(io: Box<dyn Io>) -> Self {
        OriginConn {
            stream: BufStream::new(io),
            wire_up: None,
            fd: None,
            peer: None,
            retry_safe: false,
            lane: lanes::current(),
        }
    }

    /// The connection itself, for relaying raw bytes (after an upgrade).
    pub fn into_io(self) -> Box<dyn Io> {
        self.stream.io
    }
}

impl Deref for OriginConn {
    type Target = BufStream<Box<dyn Io>>;
    fn deref(&self) -> &Self::Target {
        &self.stream
    }
}

impl DerefMut for OriginConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.stream
    }
}

/// A re-pointable chunk observer: the segmenting writer below an origin connection's TLS
/// holds the tap's observer, and the exchange using the connection sets where it reports.
#[derive(Clone, Default)]
pub struct WireTap(Arc<Mutex<Option<ChunkObserver>>>);

impl WireTap {
    pub fn point_to(&self, observer: Option<ChunkObserver>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = observer;
    }

    /// The observer to give the segmenting writer: reports to wherever the tap points.
    pub fn observer(&self) -> ChunkObserver {
        let tap = self.clone();
        Arc::new(move |size, short, at| {
            let current = tap.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(observe) = current {
                observe(size, short, at);
            }
        })
    }
}

/// An idle connection and when it was put back.
type Idle = (Instant, OriginConn);

/// Each key's idle connections are kept oldest first, so the stale ones are at the front.
pub struct Pool {
    idle: Mutex<HashMap<String, VecDeque<Idle>>>,
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

    /// The most recently used live connection for `key`, if any: one opened on this lane
    /// first, since its socket wakes this lane's poller (one from another lane wakes that
    /// lane's thread for every read).
    pub fn take(&self, key: &str) -> Option<OriginConn> {
        let now = Instant::now();
        let lane = lanes::current();
        loop {
            let (since, mut conn) = {
                let mut idle = self.idle.lock().unwrap();
                let list = idle.get_mut(key)?;
                // An emptied list stays (the sweep drops it): the next put reuses it.
                match list.iter().rposition(|(_, c)| c.lane == lane) {
                    Some(i) => list.remove(i),
                    None => list.pop_back(),
                }?
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
        // Only the front can be stale: no scan of the whole list under the lock.
        while list
            .front()
            .is_some_and(|(since, _)| now.duration_since(*since) >= self.idle_timeout)
        {
            list.pop_front();
        }
        if list.len() >= self.max_per_key {
            list.pop_front();
        }
        list.push_back((now, conn));
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
        self.idle.lock().unwrap().values().map(VecDeque::len).sum()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn origin_conn() -> (OriginConn, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(64);
        (OriginConn::new(Box::new(near)), far)
    }

    #[tokio::test]
    async fn a_lane_takes_back_its_own_connection_first() {
        let pool = Pool::new(Duration::from_secs(60), 8);
        lanes::pretend_lane(0);
        let (on_lane_0, _far0) = origin_conn();
        lanes::pretend_lane(1);
        let (on_lane_1, _far1) = origin_conn();
        let mark = |c: &mut OriginConn, port: u16| {
            c.peer = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        };
        let (mut a, mut b) = (on_lane_0, on_lane_1);
        mark(&mut a, 1000);
        mark(&mut b, 1001);
        // Lane 1 puts both back (it borrowed lane 0's): each is filed under its own lane.
        pool.put("k".into(), a);
        pool.put("k".into(), b);
        // Lane 0 gets its own, though lane 1's is the most recent.
        lanes::pretend_lane(0);
        assert_eq!(pool.take("k").unwrap().peer.unwrap().port(), 1000);
        // With none of its own left, another lane's connection is better than none.
        assert_eq!(pool.take("k").unwrap().peer.unwrap().port(), 1001);
        assert!(pool.take("k").is_none());
        lanes::pretend_lane(lanes::NOT_A_LANE);
    }

    #[tokio::test]
    async fn a_full_key_drops_its_oldest_and_stale_ones_go() {
        let port = |c: &OriginConn| c.peer.unwrap().port();
        let conn = |p: u16| {
            let (mut c, far) = origin_conn();
            c.peer = Some(std::net::SocketAddr::from(([127, 0, 0, 1], p)));
            (c, far)
        };
        let capped = Pool::new(Duration::from_secs(60), 2);
        let mut ends = Vec::new();
        for p in [1000, 1001, 1002] {
            let (c, far) = conn(p);
            ends.push(far);
            capped.put("k".into(), c);
        }
        assert_eq!(capped.idle_count(), 2);
        assert_eq!(port(&capped.take("k").unwrap()), 1002);
        assert_eq!(port(&capped.take("k").unwrap()), 1001);
        assert!(capped.take("k").is_none());

        // With no idle time allowed, each put finds the one before it stale.
        let stale = Pool::new(Duration::ZERO, 8);
        for p in [2000, 2001] {
            let (c, far) = conn(p);
            ends.push(far);
            stale.put("k".into(), c);
        }
        assert_eq!(stale.idle_count(), 1);
        assert!(stale.take("k").is_none());
    }
}
