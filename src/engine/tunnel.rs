//! The byte pump behind CONNECT tunnels and upgraded (101) connections: both directions
//! at once, half-close respected, idle timeout shared by the two directions.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::segment::{read_flushing, Segmented};

/// Read buffer of each direction of a pump whose writer segments or records: chunks are
/// small, so a large buffer would only cost memory per tunnel.
pub const SEGMENTING_BUFFER: usize = 16 * 1024;

#[derive(Debug, Default, Clone, Copy)]
pub struct PumpTotals {
    /// Bytes from side A to side B (client -> destination).
    pub a_to_b: u64,
    /// Bytes from side B to side A (destination -> client).
    pub b_to_a: u64,
}

/// Relays bytes between `a` and `b` until both directions reached end of stream, one side
/// failed, or nothing moved either way for `idle`. Returns the byte counts and the first error.
///
/// Each direction reads into a buffer of `buffer` bytes (allocated when the first read starts)
/// and writes through its `Segmented` writer; when the source goes quiet for
/// [`super::segment::IDLE_FLUSH`], bytes held for an incomplete chunk are flushed.
pub async fn pump<A, B, WA, WB>(
    (a_read, a_write): (A, Segmented<WA>),
    (b_read, b_write): (B, Segmented<WB>),
    buffer: usize,
    idle: Duration,
) -> (PumpTotals, Option<io::Error>)
where
    A: AsyncRead + Unpin,
    B: AsyncRead + Unpin,
    WA: AsyncWrite + Unpin,
    WB: AsyncWrite + Unpin,
{
    let clock = IdleClock::new(idle);
    let (stop_tx, stop_rx) = watch::channel(false);
    let up = one_way(a_read, b_write, buffer, &clock, &stop_tx, stop_rx.clone());
    let down = one_way(b_read, a_write, buffer, &clock, &stop_tx, stop_rx);
    let ((up_bytes, up_err), (down_bytes, down_err)) = tokio::join!(up, down);
    (
        PumpTotals {
            a_to_b: up_bytes,
            b_to_a: down_bytes,
        },
        up_err.or(down_err),
    )
}

/// When either direction last moved bytes: a tunnel is idle only when both are quiet.
pub(crate) struct IdleClock {
    start: Instant,
    pub(crate) idle: Duration,
    last_activity_ms: AtomicU64,
}

impl IdleClock {
    pub(crate) fn new(idle: Duration) -> Self {
        IdleClock {
            start: Instant::now(),
            idle,
            last_activity_ms: AtomicU64::new(0),
        }
    }
    pub(crate) fn touch(&self) {
        self.last_activity_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    pub(crate) fn expired(&self) -> bool {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last) >= self.idle
    }
    pub(crate) fn error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("tunnel idle for {:?}", self.idle),
        )
    }
}

async fn one_way<R, W>(
    mut reader: R,
    mut writer: Segmented<W>,
    buffer: usize,
    clock: &IdleClock,
    stop_tx: &watch::Sender<bool>,
    mut stop_rx: watch::Receiver<bool>,
) -> (u64, Option<io::Error>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut total = 0u64;
    let stop = |e: io::Error| {
        let _ = stop_tx.send(true);
        Some(e)
    };
    let error = loop {
        if buf.is_empty() {
            buf = vec![0u8; buffer];
        }
        let holding = writer.holds_bytes();
        let read = tokio::select! {
            r = tokio::time::timeout(clock.idle, read_flushing(reader.read(&mut buf), writer.idle_work(), holding)) => r,
            _ = stop_rx.wait_for(|s| *s) => break None,
        };
        match read {
            Err(_) => {
                // Quiet here; the tunnel is idle only if the other direction is quiet too.
                if clock.expired() {
                    break stop(clock.error());
                }
            }
            // The held bytes could not be flushed: the destination is gone.
            Ok(Err(e)) => break stop(e),
            Ok(Ok(Ok(0))) => {
                // Half-close: pass the end of stream on and keep the other direction running.
                let _ = writer.shutdown().await;
                break None;
            }
            Ok(Ok(Ok(n))) => {
                let written = async {
                    writer.write_all(&buf[..n]).await?;
                    writer.progress().await
                };
                if let Err(e) = written.await {
                    break stop(e);
                }
                total += n as u64;
                clock.touch();
            }
            Ok(Ok(Err(e))) => {
                let _ = writer.shutdown().await;
                break stop(e);
            }
        }
    };
    (total, error)
}

/// Relay between two TCP sockets for tunnels that neither segment nor record chunks. Each
/// direction reads what the socket holds into a buffer taken from a shared pool only while
/// bytes move, so an idle tunnel holds no buffer: just its two sockets. A direction starts
/// with a small buffer and moves to a large one while its reads fill the buffer (bulk
/// transfer), back when they stop filling it.
///
/// This copies through user space rather than splice(2) through a pipe: on loopback,
/// measured side by side, 1 MiB copies moved 30 % more bytes a second than spliced pipes
/// (docs/benchmarks.md, "Tunnels copy, not splice").
pub async fn plain_pump(
    a: &tokio::net::TcpStream,
    b: &tokio::net::TcpStream,
    idle: Duration,
) -> (PumpTotals, Option<io::Error>) {
    let clock = IdleClock::new(idle);
    let (stop_tx, stop_rx) = watch::channel(false);
    let up = plain_one_way(a, b, &clock, &stop_tx, stop_rx.clone());
    let down = plain_one_way(b, a, &clock, &stop_tx, stop_rx);
    let ((up_bytes, up_err), (down_bytes, down_err)) = tokio::join!(up, down);
    (
        PumpTotals {
            a_to_b: up_bytes,
            b_to_a: down_bytes,
        },
        up_err.or(down_err),
    )
}

/// Read buffers shared by every plain tunnel, in two sizes.
mod buffers {
    use std::sync::Mutex;

    /// A direction's first read, and every read while its traffic is not bulk.
    pub const SMALL: usize = 64 * 1024;
    /// Reads of a bulk transfer: fewer, larger system calls a byte.
    pub const LARGE: usize = 1 << 20;
    /// Empty buffers kept for reuse (at most 4 + 1 MiB held when no tunnel moves bytes);
    /// more are freed when given back.
    const KEEP_SMALL: usize = 16;
    const KEEP_LARGE: usize = 4;

    static SMALL_POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    static LARGE_POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    fn pool(large: bool) -> &'static Mutex<Vec<Vec<u8>>> {
        if large {
            &LARGE_POOL
        } else {
            &SMALL_POOL
        }
    }

    /// An empty buffer with room for `LARGE` or `SMALL` bytes. Its memory is not written
    /// until a read fills it, so a fresh large buffer costs only the pages a read touches.
    pub fn take(large: bool) -> Vec<u8> {
        let size = if large { LARGE } else { SMALL };
        let pooled = pool(large).lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.unwrap_or_else(|| Vec::with_capacity(size))
    }

    pub fn give_back(mut buf: Vec<u8>) {
        let large = buf.capacity() >= LARGE;
        buf.clear();
        let mut pool = pool(large).lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < if large { KEEP_LARGE } else { KEEP_SMALL } {
            pool.push(buf);
        }
    }
}

async fn plain_one_way(
    src: &tokio::net::TcpStream,
    dst: &tokio::net::TcpStream,
    clock: &IdleClock,
    stop_tx: &watch::Sender<bool>,
    mut stop_rx: watch::Receiver<bool>,
) -> (u64, Option<io::Error>) {
    let mut total = 0u64;
    let mut bulk = false;
    let stop = |e: io::Error| {
        let _ = stop_tx.send(true);
        Some(e)
    };
    let error = 'relay: loop {
        let ready = tokio::select! {
            r = tokio::time::timeout(clock.idle, src.readable()) => r,
            _ = stop_rx.wait_for(|s| *s) => break 'relay None,
        };
        match ready {
            Err(_) if clock.expired() => break stop(clock.error()),
            Err(_) => continue,
            Ok(Err(e)) => break stop(e),
            Ok(Ok(())) => {}
        }
        let mut buf = buffers::take(bulk);
        match src.try_read_buf(&mut buf) {
            Ok(0) => {
                buffers::give_back(buf);
                // Half-close: pass the end of stream on, keep the other direction running.
                let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
                break None;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                buffers::give_back(buf);
                continue;
            }
            Err(e) => break stop(e),
        }
        // A full buffer means the socket held more: the next read takes the large one.
        bulk = buf.len() == buf.capacity();
        let mut written = 0;
        while written < buf.len() {
            if let Err(e) = dst.writable().await {
                break 'relay stop(e);
            }
            match dst.try_write(&buf[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => break 'relay stop(e),
            }
        }
        total += buf.len() as u64;
        buffers::give_back(buf);
        clock.touch();
    };
    (total, error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Bytes move both ways: a few, then 300,000 (enough for a read to fill the small buffer,
    /// so the bulk path with the large one runs too).
    #[tokio::test]
    async fn plain_tunnels_move_bytes_through_pooled_buffers() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_origin, mut origin) = pair().await;
        let relay = tokio::spawn(async move {
            plain_pump(&proxy_client, &proxy_origin, Duration::from_secs(30)).await
        });
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        origin.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let mut back = vec![0u8; 300_000];
        let (sent, read) = tokio::join!(
            origin.write_all(&[7u8; 300_000]),
            client.read_exact(&mut back)
        );
        sent.unwrap();
        read.unwrap();
        assert!(back.iter().all(|&b| b == 7));
        drop(client);
        drop(origin);
        let (totals, err) = relay.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!((totals.a_to_b, totals.b_to_a), (5, 300_000));
    }
}
