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
struct IdleClock {
    start: Instant,
    idle: Duration,
    last_activity_ms: AtomicU64,
}

impl IdleClock {
    fn new(idle: Duration) -> Self {
        IdleClock {
            start: Instant::now(),
            idle,
            last_activity_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        self.last_activity_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn expired(&self) -> bool {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last) >= self.idle
    }
    fn error(&self) -> io::Error {
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

/// Zero-copy relay between two TCP sockets with splice(2) through a pipe: the bytes never
/// enter user space. Used for tunnels that neither segment nor record chunks. A pipe is
/// taken from a shared pool only while bytes move, so an idle tunnel holds no pipe: just
/// its two sockets.
#[cfg(target_os = "linux")]
pub async fn splice_pump(
    a: &tokio::net::TcpStream,
    b: &tokio::net::TcpStream,
    idle: Duration,
) -> (PumpTotals, Option<io::Error>) {
    let clock = IdleClock::new(idle);
    let (stop_tx, stop_rx) = watch::channel(false);
    let up = splice_one_way(a, b, &clock, &stop_tx, stop_rx.clone());
    let down = splice_one_way(b, a, &clock, &stop_tx, stop_rx);
    let ((up_bytes, up_err), (down_bytes, down_err)) = tokio::join!(up, down);
    (
        PumpTotals {
            a_to_b: up_bytes,
            b_to_a: down_bytes,
        },
        up_err.or(down_err),
    )
}

#[cfg(target_os = "linux")]
mod pipes {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::Mutex;

    /// Bytes one splice call moves at most (and the pipe's capacity, when the kernel allows).
    pub const SPLICE_CHUNK: usize = 1 << 20;
    /// Empty pipes kept for reuse; more are closed when given back.
    const POOL_MAX: usize = 64;

    static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    impl Pipe {
        fn new() -> io::Result<Pipe> {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: pipe2 writes two new descriptors into `fds`, which we then own.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just created and are owned by nobody else.
            let pipe = unsafe {
                Pipe {
                    read: OwnedFd::from_raw_fd(fds[0]),
                    write: OwnedFd::from_raw_fd(fds[1]),
                }
            };
            // A larger pipe moves more per call; failure only costs speed.
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, SPLICE_CHUNK as libc::c_int) };
            Ok(pipe)
        }

        /// An empty pipe: from the pool, or new.
        pub fn take() -> io::Result<Pipe> {
            match POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                Some(p) => Ok(p),
                None => Pipe::new(),
            }
        }

        /// Gives an empty pipe back for reuse (one still holding bytes must be dropped instead).
        pub fn give_back(self) {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        }

        pub fn read_fd(&self) -> RawFd {
            self.read.as_raw_fd()
        }
        pub fn write_fd(&self) -> RawFd {
            self.write.as_raw_fd()
        }
    }

    pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain syscall on descriptors that outlive the call; null offsets (streams).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(target_os = "linux")]
async fn splice_one_way(
    src: &tokio::net::TcpStream,
    dst: &tokio::net::TcpStream,
    clock: &IdleClock,
    stop_tx: &watch::Sender<bool>,
    mut stop_rx: watch::Receiver<bool>,
) -> (u64, Option<io::Error>) {
    use pipes::{splice, Pipe, SPLICE_CHUNK};
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut total = 0u64;
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
        let pipe = match Pipe::take() {
            Ok(p) => p,
            Err(e) => break stop(e),
        };
        // Socket -> pipe.
        let moved = match src.try_io(Interest::READABLE, || {
            splice(src_fd, pipe.write_fd(), SPLICE_CHUNK)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) => break stop(e),
        };
        if moved == 0 {
            pipe.give_back();
            // Half-close: pass the end of stream on, keep the other direction running.
            let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
            break None;
        }
        // Pipe -> socket, all of it; a pipe that could not be emptied is dropped, not pooled.
        let mut left = moved;
        while left > 0 {
            if let Err(e) = dst.writable().await {
                break 'relay stop(e);
            }
            match dst.try_io(Interest::WRITABLE, || splice(pipe.read_fd(), dst_fd, left)) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => break 'relay stop(e),
            }
        }
        pipe.give_back();
        total += moved as u64;
        clock.touch();
    };
    (total, error)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Bytes move both ways through pooled pipes, and the pipes go back to the pool.
    #[tokio::test]
    async fn spliced_tunnels_move_bytes_through_pooled_pipes() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_origin, mut origin) = pair().await;
        let relay = tokio::spawn(async move {
            splice_pump(&proxy_client, &proxy_origin, Duration::from_secs(30)).await
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
