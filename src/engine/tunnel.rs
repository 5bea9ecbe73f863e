//! The byte pump behind CONNECT tunnels and upgraded (101) connections: both directions
//! at once, half-close respected, idle timeout shared by the two directions.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

#[derive(Debug, Default, Clone, Copy)]
pub struct PumpTotals {
    /// Bytes from side A to side B (client -> destination).
    pub a_to_b: u64,
    /// Bytes from side B to side A (destination -> client).
    pub b_to_a: u64,
}

/// Relays bytes between `a` and `b` until both directions reached end of stream, one side
/// failed, or nothing moved either way for `idle`. Returns the byte counts and the first error.
pub async fn pump<A, B, WA, WB>(
    (a_read, a_write): (A, WA),
    (b_read, b_write): (B, WB),
    buffer: usize,
    idle: Duration,
) -> (PumpTotals, Option<io::Error>)
where
    A: AsyncRead + Unpin,
    B: AsyncRead + Unpin,
    WA: AsyncWrite + Unpin,
    WB: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_activity = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let up = one_way(a_read, b_write, buffer, idle, start, &last_activity, &stop_tx, stop_rx.clone());
    let down = one_way(b_read, a_write, buffer, idle, start, &last_activity, &stop_tx, stop_rx);
    let ((up_bytes, up_err), (down_bytes, down_err)) = tokio::join!(up, down);
    (PumpTotals { a_to_b: up_bytes, b_to_a: down_bytes }, up_err.or(down_err))
}

#[allow(clippy::too_many_arguments)]
async fn one_way<R, W>(
    mut reader: R,
    mut writer: W,
    buffer: usize,
    idle: Duration,
    start: Instant,
    last_activity: &AtomicU64,
    stop_tx: &watch::Sender<bool>,
    mut stop_rx: watch::Receiver<bool>,
) -> (u64, Option<io::Error>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer];
    let mut total = 0u64;
    let error = loop {
        let read = tokio::select! {
            r = tokio::time::timeout(idle, reader.read(&mut buf)) => r,
            _ = stop_rx.wait_for(|s| *s) => break None,
        };
        match read {
            Err(_) => {
                // Quiet here; the tunnel is idle only if the other direction is quiet too.
                let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
                if start.elapsed().saturating_sub(last) >= idle {
                    let _ = stop_tx.send(true);
                    break Some(io::Error::new(io::ErrorKind::TimedOut, format!("tunnel idle for {idle:?}")));
                }
            }
            Ok(Ok(0)) => {
                // Half-close: pass the end of stream on and keep the other direction running.
                let _ = writer.shutdown().await;
                break None;
            }
            Ok(Ok(n)) => {
                if let Err(e) = writer.write_all(&buf[..n]).await {
                    let _ = stop_tx.send(true);
                    break Some(e);
                }
                total += n as u64;
                last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                let _ = stop_tx.send(true);
                let _ = writer.shutdown().await;
                break Some(e);
            }
        }
    };
    (total, error)
}

/// Zero-copy relay between two TCP sockets with splice(2) through a pipe per direction: the
/// bytes never enter user space. Used for tunnels that neither segment nor record chunks.
#[cfg(target_os = "linux")]
pub async fn splice_pump(a: &tokio::net::TcpStream, b: &tokio::net::TcpStream, idle: Duration) -> (PumpTotals, Option<io::Error>) {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (stop_tx, stop_rx) = watch::channel(false);
    let up = splice_one_way(a, b, idle, start, &last_activity, &stop_tx, stop_rx.clone());
    let down = splice_one_way(b, a, idle, start, &last_activity, &stop_tx, stop_rx);
    let ((up_bytes, up_err), (down_bytes, down_err)) = tokio::join!(up, down);
    (PumpTotals { a_to_b: up_bytes, b_to_a: down_bytes }, up_err.or(down_err))
}

#[cfg(target_os = "linux")]
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

#[cfg(target_os = "linux")]
impl Pipe {
    fn new() -> io::Result<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let pipe = unsafe {
            Pipe { read: std::os::fd::OwnedFd::from_raw_fd(fds[0]), write: std::os::fd::OwnedFd::from_raw_fd(fds[1]) }
        };
        // A larger pipe moves more per call; failure only costs speed.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, SPLICE_CHUNK as libc::c_int) };
        Ok(pipe)
    }
}

#[cfg(target_os = "linux")]
const SPLICE_CHUNK: usize = 1 << 20;

#[cfg(target_os = "linux")]
fn splice(from: std::os::fd::RawFd, to: std::os::fd::RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors that outlive the call; null offsets (streams).
    let n = unsafe {
        libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(target_os = "linux")]
async fn splice_one_way(
    src: &tokio::net::TcpStream,
    dst: &tokio::net::TcpStream,
    idle: Duration,
    start: Instant,
    last_activity: &AtomicU64,
    stop_tx: &watch::Sender<bool>,
    mut stop_rx: watch::Receiver<bool>,
) -> (u64, Option<io::Error>) {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let pipe = match Pipe::new() {
        Ok(p) => p,
        Err(e) => {
            let _ = stop_tx.send(true);
            return (0, Some(e));
        }
    };
    let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
    let (pipe_r, pipe_w) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    let mut total = 0u64;
    let fail = |e: io::Error| {
        let _ = stop_tx.send(true);
        Some(e)
    };
    let error = 'relay: loop {
        // Socket -> pipe.
        let moved = loop {
            let ready = tokio::select! {
                r = tokio::time::timeout(idle, src.readable()) => r,
                _ = stop_rx.wait_for(|s| *s) => break 'relay None,
            };
            match ready {
                Err(_) => {
                    let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
                    if start.elapsed().saturating_sub(last) >= idle {
                        break 'relay fail(io::Error::new(io::ErrorKind::TimedOut, format!("tunnel idle for {idle:?}")));
                    }
                    continue;
                }
                Ok(Err(e)) => break 'relay fail(e),
                Ok(Ok(())) => {}
            }
            match src.try_io(Interest::READABLE, || splice(src_fd, pipe_w, SPLICE_CHUNK)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => break 'relay fail(e),
            }
        };
        if moved == 0 {
            // Half-close: pass the end of stream on, keep the other direction running.
            let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
            break None;
        }
        // Pipe -> socket, all of it.
        let mut left = moved;
        while left > 0 {
            if let Err(e) = dst.writable().await {
                break 'relay fail(e);
            }
            match dst.try_io(Interest::WRITABLE, || splice(pipe_r, dst_fd, left)) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => break 'relay fail(e),
            }
        }
        total += moved as u64;
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    (total, error)
}
