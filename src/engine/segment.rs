//! Segmentation: the one adapter every output path puts in front of its writer.
//!
//! [`Segmented`] wraps an `AsyncWrite` and re-groups the bytes a caller writes
//! into chunks chosen by a [`SegmentPolicy`], flushing after each chunk and
//! optionally pausing between chunks. It changes timing and grouping only:
//! no byte is ever altered, dropped, duplicated or reordered.
//!
//! Chunking rules:
//! - Each `poll_write` starts at most one chunk: `min(policy size, buf.len())`
//!   bytes (the policy size is fixed N, a fresh uniform draw in `[min, max]`
//!   for random, or the whole buffer for none). A chunk therefore never spans
//!   two caller writes; a short write makes a short chunk.
//! - A chunk is written fully to the inner writer, then the inner writer is
//!   flushed, then the observer is called with the chunk size, then (if the
//!   delay is non-zero) a `tokio::time::sleep` must elapse before the next
//!   chunk's first byte is accepted, also across separate writes.
//! - If the inner writer accepts only part of a chunk, the rest is copied into
//!   a small internal buffer (at most one chunk) and `poll_write` reports the
//!   whole chunk as accepted; the rest is written before anything else, and
//!   `poll_flush` / `poll_shutdown` drain it. As with any buffering writer,
//!   callers must flush or shut down before dropping the wrapper.
//!
//! TCP_NODELAY is the caller's job: without it the kernel may coalesce chunks.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How writes are cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Every caller write is one chunk.
    None,
    /// Chunks of exactly `chunk` bytes (the last one of a write may be shorter).
    Fixed { chunk: usize },
    /// Each chunk has a fresh uniform size in `[min, max]`.
    Random { min: usize, max: usize },
}

/// A segmentation strategy plus the pause between chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentPolicy {
    pub strategy: Strategy,
    pub delay: Duration,
}

impl Default for SegmentPolicy {
    fn default() -> Self {
        Self::none()
    }
}

impl SegmentPolicy {
    /// No segmentation, no delay: bytes pass through untouched.
    pub fn none() -> Self {
        Self {
            strategy: Strategy::None,
            delay: Duration::ZERO,
        }
    }

    /// Shorthand for a fixed-size policy.
    pub fn fixed(chunk: usize, delay: Duration) -> Self {
        Self {
            strategy: Strategy::Fixed { chunk },
            delay,
        }
    }

    /// Shorthand for a random-size policy.
    pub fn random(min: usize, max: usize, delay: Duration) -> Self {
        Self {
            strategy: Strategy::Random { min, max },
            delay,
        }
    }

    /// True when the policy cannot change timing or grouping at all.
    pub fn is_passthrough(&self) -> bool {
        self.strategy == Strategy::None && self.delay.is_zero()
    }

    /// Checks the sizes: fixed needs `chunk > 0`; random needs `0 < min <= max`.
    pub fn validate(&self) -> Result<(), String> {
        match self.strategy {
            Strategy::None => Ok(()),
            Strategy::Fixed { chunk: 0 } => Err("fixed strategy needs chunk > 0".into()),
            Strategy::Fixed { .. } => Ok(()),
            Strategy::Random { min: 0, .. } => Err("random strategy needs min > 0".into()),
            Strategy::Random { min, max } if min > max => Err(format!(
                "random strategy needs min <= max (min={min} max={max})"
            )),
            Strategy::Random { .. } => Ok(()),
        }
    }

    /// One-line summary, e.g. `none`, `fixed chunk=1024 delay=5ms`,
    /// `random min=10 max=100 delay=0ms`, `none delay=20ms`.
    pub fn describe(&self) -> String {
        let ms = self.delay.as_millis();
        match self.strategy {
            Strategy::None if self.delay.is_zero() => "none".to_string(),
            Strategy::None => format!("none delay={ms}ms"),
            Strategy::Fixed { chunk } => format!("fixed chunk={chunk} delay={ms}ms"),
            Strategy::Random { min, max } => format!("random min={min} max={max} delay={ms}ms"),
        }
    }
}

impl fmt::Display for SegmentPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Called once per chunk written (after the flush), with the chunk's size.
pub type ChunkObserver = Arc<dyn Fn(usize) + Send + Sync>;

/// An `AsyncWrite` that segments what is written through it; reads pass through.
pub struct Segmented<S> {
    inner: S,
    policy: SegmentPolicy,
    observer: Option<ChunkObserver>,
    /// Passthrough policy and no observer: forward every call untouched.
    fast: bool,
    rng: fastrand::Rng,
    /// Size drawn for the next chunk; kept across `Pending` so a retried write
    /// does not re-draw (only matters for random).
    planned: Option<usize>,
    /// Accepted bytes of the current chunk the inner writer has not taken yet.
    tail: Vec<u8>,
    tail_pos: usize,
    /// Size of a chunk fully handed to the inner writer but not yet flushed/observed.
    finishing: Option<usize>,
    /// The pause that must elapse before the next chunk starts.
    pause: Option<Pin<Box<Sleep>>>,
    /// An error hit while finishing a chunk after its bytes were already
    /// reported as accepted; returned by the next call.
    error: Option<io::Error>,
}

impl<S> Segmented<S> {
    pub fn new(inner: S, policy: SegmentPolicy, observer: Option<ChunkObserver>) -> Self {
        let fast = policy.is_passthrough() && observer.is_none();
        Self {
            inner,
            policy,
            observer,
            fast,
            rng: fastrand::Rng::new(),
            planned: None,
            tail: Vec::new(),
            tail_pos: 0,
            finishing: None,
            pause: None,
            error: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Writing to the inner stream directly bypasses segmentation (and any
    /// pending tail): flush the wrapper first.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Returns the inner stream. Unflushed tail bytes are lost: flush first.
    pub fn into_inner(self) -> S {
        self.inner
    }

    pub fn policy(&self) -> &SegmentPolicy {
        &self.policy
    }

    /// Takes the pause still due before the next chunk, so that a new wrapper writing the
    /// next bytes on the same stream keeps the spacing (see [`Segmented::with_pause`]).
    pub fn take_pause(&mut self) -> Option<Pin<Box<Sleep>>> {
        self.pause.take()
    }

    /// Starts with a pause taken from the wrapper that wrote the previous chunk.
    pub fn with_pause(mut self, pause: Option<Pin<Box<Sleep>>>) -> Self {
        if !self.fast {
            self.pause = pause;
        }
        self
    }

    fn draw_chunk_size(&mut self, available: usize) -> usize {
        let size = *self
            .planned
            .get_or_insert_with(|| match self.policy.strategy {
                Strategy::None => usize::MAX,
                // max(1) keeps an unvalidated zero from looping forever.
                Strategy::Fixed { chunk } => chunk.max(1),
                Strategy::Random { min, max } => self.rng.usize(min.max(1)..=max.max(min).max(1)),
            });
        size.min(available)
    }
}

impl<S: AsyncWrite + Unpin> Segmented<S> {
    /// Drives the current chunk to completion: drain the tail, flush, observe,
    /// and arm the pause.
    fn poll_finish_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tail_pos < self.tail.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.tail[self.tail_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tail_pos += n;
        }
        self.tail.clear();
        self.tail_pos = 0;
        if let Some(size) = self.finishing {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            self.finishing = None;
            if let Some(observer) = &self.observer {
                observer(size);
            }
            if !self.policy.delay.is_zero() {
                self.pause = Some(Box::pin(tokio::time::sleep(self.policy.delay)));
            }
        }
        Poll::Ready(Ok(()))
    }

    fn take_error(&mut self) -> io::Result<()> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Segmented<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Segmented<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.fast {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.take_error()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_finish_chunk(cx))?;
        if let Some(pause) = this.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }

        let len = this.draw_chunk_size(buf.len());
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &buf[..len]))?;
        if n == 0 {
            // Inner is closed; report it as-is (callers turn it into WriteZero).
            return Poll::Ready(Ok(0));
        }
        this.planned = None;
        if n < len {
            this.tail.extend_from_slice(&buf[n..len]);
        }
        this.finishing = Some(len);
        // Finish eagerly so the flush, the observer and the pause's clock all
        // start now, not at the caller's next write. The chunk is accepted
        // either way; a late error is kept for the next call.
        if let Poll::Ready(Err(e)) = this.poll_finish_chunk(cx) {
            this.error = Some(e);
        }
        Poll::Ready(Ok(len))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.fast {
            this.take_error()?;
            ready!(this.poll_finish_chunk(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.fast {
            this.take_error()?;
            // A pending chunk goes out before the FIN; a pending pause does not
            // delay it (there is no next chunk to space out).
            ready!(this.poll_finish_chunk(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.fast {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        // Segmenting: one buffer at a time, like the default implementation.
        let buf = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        Pin::new(this).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        self.fast && self.inner.is_write_vectored()
    }
}

impl<S> fmt::Debug for Segmented<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segmented")
            .field("policy", &self.policy)
            .field("observer", &self.observer.is_some())
            .field("pending_tail", &(self.tail.len() - self.tail_pos))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn recorder() -> (ChunkObserver, Arc<Mutex<Vec<usize>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (Arc::new(move |n| s.lock().unwrap().push(n)), seen)
    }

    #[test]
    fn policy_validate_and_describe() {
        assert!(SegmentPolicy::none().is_passthrough());
        assert!(!SegmentPolicy {
            strategy: Strategy::None,
            delay: Duration::from_millis(1)
        }
        .is_passthrough());
        assert!(!SegmentPolicy::fixed(10, Duration::ZERO).is_passthrough());

        assert!(SegmentPolicy::none().validate().is_ok());
        assert!(SegmentPolicy::fixed(1, Duration::ZERO).validate().is_ok());
        assert!(SegmentPolicy::fixed(0, Duration::ZERO).validate().is_err());
        assert!(SegmentPolicy::random(1, 1, Duration::ZERO)
            .validate()
            .is_ok());
        assert!(SegmentPolicy::random(0, 5, Duration::ZERO)
            .validate()
            .is_err());
        assert!(SegmentPolicy::random(6, 5, Duration::ZERO)
            .validate()
            .is_err());

        assert_eq!(SegmentPolicy::none().describe(), "none");
        assert_eq!(
            SegmentPolicy::fixed(1024, Duration::from_millis(5)).describe(),
            "fixed chunk=1024 delay=5ms"
        );
        assert_eq!(
            SegmentPolicy::random(10, 100, Duration::ZERO).describe(),
            "random min=10 max=100 delay=0ms"
        );
        let none_delay = SegmentPolicy {
            strategy: Strategy::None,
            delay: Duration::from_millis(20),
        };
        assert_eq!(none_delay.describe(), "none delay=20ms");
        assert_eq!(none_delay.to_string(), "none delay=20ms");
    }

    /// Writes `data` in random-sized writes through `policy` over a duplex
    /// pipe with a small buffer (forcing partial inner writes) and checks the
    /// bytes arrive identical and the observed chunks obey the policy.
    async fn roundtrip(data: Vec<u8>, policy: SegmentPolicy, pipe: usize, seed: u64) {
        let (a, mut b) = tokio::io::duplex(pipe);
        let (obs, seen) = recorder();
        let expected = data.clone();
        let writer_policy = policy.clone();
        let writer = tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut w = Segmented::new(a, writer_policy, Some(obs));
            let mut write_sizes = Vec::new();
            let mut off = 0;
            while off < data.len() {
                let n = rng.usize(1..=70_000).min(data.len() - off);
                // write (not write_all) so we see each poll_write's result.
                let mut piece = &data[off..off + n];
                while !piece.is_empty() {
                    let k = w.write(piece).await.unwrap();
                    assert!(k > 0);
                    write_sizes.push(k);
                    piece = &piece[k..];
                }
                off += n;
            }
            w.shutdown().await.unwrap();
            write_sizes
        });
        let mut got = Vec::with_capacity(expected.len());
        b.read_to_end(&mut got).await.unwrap();
        let write_sizes = writer.await.unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes differ");

        let chunks = seen.lock().unwrap().clone();
        assert_eq!(chunks.iter().sum::<usize>(), expected.len());
        // Each accepted write is exactly one chunk.
        assert_eq!(chunks, write_sizes);
        for &c in &chunks {
            match policy.strategy {
                Strategy::None => {}
                Strategy::Fixed { chunk } => assert!(c <= chunk),
                Strategy::Random { max, .. } => assert!(c <= max),
            }
        }
    }

    #[tokio::test]
    async fn random_data_random_policies_roundtrip() {
        let mut rng = fastrand::Rng::with_seed(0x5e9);
        for (i, size) in [0usize, 1, 17, 4096, 65_537, 300_000, 1 << 20]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
            let policy = match rng.usize(0..3) {
                0 => SegmentPolicy::none(),
                1 => SegmentPolicy::fixed(rng.usize(1..5000), Duration::ZERO),
                _ => {
                    let min = rng.usize(1..3000);
                    SegmentPolicy::random(min, min + rng.usize(0..3000), Duration::ZERO)
                }
            };
            let pipe = [7, 1024, 64 * 1024][i % 3];
            roundtrip(data, policy, pipe, i as u64).await;
        }
        // Every strategy at least once, with a small pipe.
        let data: Vec<u8> = (0..200_000).map(|_| rng.u8(..)).collect();
        roundtrip(data.clone(), SegmentPolicy::none(), 999, 1).await;
        roundtrip(
            data.clone(),
            SegmentPolicy::fixed(1, Duration::ZERO),
            4096,
            2,
        )
        .await;
        roundtrip(
            data.clone(),
            SegmentPolicy::fixed(3000, Duration::ZERO),
            1000,
            3,
        )
        .await;
        roundtrip(data, SegmentPolicy::random(1, 4000, Duration::ZERO), 333, 4).await;
    }

    #[tokio::test]
    async fn fixed_chunks_split_each_write_and_never_span_writes() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (obs, seen) = recorder();
        let mut w = Segmented::new(a, SegmentPolicy::fixed(4, Duration::ZERO), Some(obs));
        w.write_all(b"0123456789").await.unwrap(); // 4 4 2
        w.write_all(b"abc").await.unwrap(); // 3: not merged with the 2 before
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"0123456789abc");
        assert_eq!(*seen.lock().unwrap(), vec![4, 4, 2, 3]);
    }

    #[tokio::test]
    async fn none_with_observer_is_one_chunk_per_write() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let (obs, seen) = recorder();
        let mut w = Segmented::new(a, SegmentPolicy::none(), Some(obs));
        w.write_all(&[1u8; 5000]).await.unwrap();
        w.write_all(&[2u8; 7]).await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 5007);
        assert_eq!(*seen.lock().unwrap(), vec![5000, 7]);
    }

    #[tokio::test]
    async fn passthrough_without_observer_is_untouched() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = Segmented::new(a, SegmentPolicy::none(), None);
        assert!(w.fast);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let expected = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Segmented::new(a, SegmentPolicy::fixed(1, Duration::from_millis(50)), None);
        b.write_all(b"hello world").await.unwrap();
        drop(b);
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
    }

    #[tokio::test]
    async fn shutdown_sends_pending_tail() {
        // A 2-byte pipe forces a partial inner write, leaving a buffered tail.
        let (a, mut b) = tokio::io::duplex(2);
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let obs: ChunkObserver = Arc::new(move |n| {
            c.fetch_add(n, Ordering::SeqCst);
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut w = Segmented::new(a, SegmentPolicy::fixed(100, Duration::ZERO), Some(obs));
        assert_eq!(w.write(&[9u8; 50]).await.unwrap(), 50);
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), vec![9u8; 50]);
        assert_eq!(count.load(Ordering::SeqCst), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_applies_between_chunks_and_across_writes() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = Segmented::new(
            a,
            SegmentPolicy::fixed(10, Duration::from_millis(100)),
            None,
        );
        let start = tokio::time::Instant::now();
        w.write_all(&[0u8; 30]).await.unwrap(); // 3 chunks: 2 pauses inside
        assert!(start.elapsed() >= Duration::from_millis(200));
        w.write_all(&[0u8; 5]).await.unwrap(); // waits for the 3rd chunk's pause
        assert!(start.elapsed() >= Duration::from_millis(300));
        w.shutdown().await.unwrap();
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 35);
    }

    /// Real loopback TCP: sender with TCP_NODELAY, fixed 1000-byte chunks
    /// 30 ms apart; the receiver sees 5 separate reads of 1000 bytes.
    #[tokio::test]
    async fn tcp_chunks_arrive_separately_with_gaps() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut reads = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                reads.push((n, Instant::now()));
            }
            reads
        });
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (obs, seen) = recorder();
        let mut w = Segmented::new(
            stream,
            SegmentPolicy::fixed(1000, Duration::from_millis(30)),
            Some(obs),
        );
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        let reads = tokio::time::timeout(Duration::from_secs(10), receiver)
            .await
            .unwrap()
            .unwrap();

        let sizes: Vec<usize> = reads.iter().map(|r| r.0).collect();
        assert_eq!(
            sizes,
            vec![1000; 5],
            "each chunk should arrive as its own read"
        );
        let first = reads[0].1;
        let last = reads[4].1;
        // 4 pauses of 30 ms between 5 chunks; allow scheduler slack.
        assert!(last.duration_since(first) >= Duration::from_millis(100));
        assert!(start.elapsed() >= Duration::from_millis(110));
        assert_eq!(*seen.lock().unwrap(), vec![1000; 5]);
    }

    /// An inner writer that accepts at most one byte per call and counts flushes.
    struct Trickle {
        out: Vec<u8>,
        flushes: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.out.push(buf[0]);
            Poll::Ready(Ok(1))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn chunk_is_fully_written_then_flushed() {
        let (obs, seen) = recorder();
        let mut w = Segmented::new(
            Trickle {
                out: Vec::new(),
                flushes: 0,
            },
            SegmentPolicy::fixed(3, Duration::ZERO),
            Some(obs),
        );
        w.write_all(b"abcdefg").await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(w.get_ref().out, b"abcdefg");
        assert_eq!(*seen.lock().unwrap(), vec![3, 3, 1]);
        // One flush per chunk, plus the caller's own flush.
        assert_eq!(w.get_ref().flushes, 4);
    }
}
