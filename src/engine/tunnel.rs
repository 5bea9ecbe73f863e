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
