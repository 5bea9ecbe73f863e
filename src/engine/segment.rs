//! Segmentation: the one adapter every output path puts in front of its writer.
//!
//! [`Segmented`] wraps an `AsyncWrite` and re-groups the bytes written through it into chunks
//! chosen by a [`SegmentPolicy`], spacing chunk starts by the policy's delay. It changes
//! timing and grouping only: no byte is ever altered, dropped, duplicated or reordered.
//! TCP_NODELAY is the caller's job: without it the kernel may coalesce chunks.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::shaping::{Fault, FaultKind, Shaping, ALWAYS_PPM};
use super::timer::{self, PreciseSleep};

/// How writes are cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Every caller write is one chunk.
    None,
    /// Chunks of exactly `chunk` bytes (only a flush or the end of the stream makes a shorter one).
    Fixed { chunk: usize },
    /// Each chunk has a fresh uniform size in `[min, max]`.
    Random { min: usize, max: usize },
}

impl Strategy {
    /// Every strategy's name, as rules, `Rules(...)`, `set_segmentation` and the command line
    /// spell it ([`SegmentPolicy::parse`] reads them).
    pub const NAMES: [&'static str; 3] = ["none", "fixed", "random"];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Fixed { .. } => "fixed",
            Strategy::Random { .. } => "random",
        }
    }
}

/// SegmentedProxy's chunk size for the fixed strategy when none is given.
pub const DEFAULT_CHUNK: usize = 1024;

/// A segmentation strategy plus the pause between chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentPolicy {
    pub strategy: Strategy,
    pub delay: Duration,
    /// Bytes per second (`rate=`): after a chunk of n bytes, the next waits at least n / rate
    /// (and at least `delay`). A burst is at most one chunk.
    pub rate: Option<u64>,
    /// `ttfb=`: the first byte of each response (a tunnel's first byte toward the client)
    /// is held this long. Not segmentation: applied by the response's writer
    /// ([`Segmented::hold_first`]), whatever the direction.
    pub ttfb: Option<Duration>,
    /// Latency, jitter and faults (`latency=`, `jitter=`, `fault=`, `fault_rate=`, `seed=`);
    /// None when none is set.
    pub shaping: Option<Arc<Shaping>>,
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
            rate: None,
            ttfb: None,
            shaping: None,
        }
    }

    /// Shorthand for a fixed-size policy.
    pub fn fixed(chunk: usize, delay: Duration) -> Self {
        Self {
            strategy: Strategy::Fixed { chunk },
            delay,
            rate: None,
            ttfb: None,
            shaping: None,
        }
    }

    /// Shorthand for a random-size policy.
    pub fn random(min: usize, max: usize, delay: Duration) -> Self {
        Self {
            strategy: Strategy::Random { min, max },
            delay,
            rate: None,
            ttfb: None,
            shaping: None,
        }
    }

    /// True when the policy cannot change timing or grouping at all.
    pub fn is_passthrough(&self) -> bool {
        self.strategy == Strategy::None
            && self.delay.is_zero()
            && self.rate.is_none()
            && self.shaping.as_ref().is_none_or(|s| !s.acts())
    }

    /// This policy with its shaping keys, checked (an empty shaping sets nothing).
    pub fn with_shaping(mut self, shaping: Shaping) -> Result<Self, String> {
        if shaping.fault_rate_ppm < ALWAYS_PPM && shaping.fault.is_none() {
            return Err("fault_rate needs a fault= to apply".into());
        }
        self.shaping = (!shaping.is_empty()).then(|| Arc::new(shaping));
        Ok(self)
    }

    /// The policy for one flow: its shaping drawn (fault or not, its seed); the same policy
    /// when it has no shaping.
    pub fn for_flow(&self) -> SegmentPolicy {
        match &self.shaping {
            None => self.clone(),
            Some(s) => SegmentPolicy {
                shaping: Some(Arc::new(s.for_flow())),
                ..self.clone()
            },
        }
    }

    /// The fault this flow's writers inject, if it was drawn.
    pub fn fault(&self) -> Option<Fault> {
        self.shaping.as_ref().and_then(|s| s.fault)
    }

    /// This policy with a time to first byte (`ttfb=`, milliseconds), checked.
    pub fn with_ttfb(mut self, ttfb_ms: Option<i64>) -> Result<Self, String> {
        self.ttfb = match ttfb_ms {
            None => None,
            Some(ms) if (0..=3_600_000).contains(&ms) => Some(Duration::from_millis(ms as u64)),
            Some(ms) => return Err(format!("ttfb must be 0..3600000 ms, got {ms}")),
        };
        Ok(self)
    }

    /// This policy with a rate limit in bytes per second (`rate=`), checked.
    pub fn with_rate(mut self, rate: Option<u64>) -> Result<Self, String> {
        if rate == Some(0) {
            return Err("rate must be > 0 bytes per second".into());
        }
        self.rate = rate;
        Ok(self)
    }

    /// The chunk a rate-limited stream without a strategy is cut into: a hundredth of a
    /// second's worth, between 512 bytes and 16 KiB, so the pace is smooth.
    fn rate_chunk(rate: u64) -> usize {
        (rate / 100).clamp(512, 16 * 1024) as usize
    }

    /// Parses `rate=` values: bytes per second, with an optional `k` (1,000) or `M`
    /// (1,000,000) suffix: `100k`, `1.5M`, `64000`.
    pub fn parse_rate(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let (number, scale) = match t.char_indices().last() {
            Some((i, 'k' | 'K')) => (&t[..i], 1e3),
            Some((i, 'm' | 'M')) => (&t[..i], 1e6),
            _ => (t, 1.0),
        };
        let value: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("invalid rate '{text}' (bytes per second, e.g. 100k or 1M)"))?;
        let bytes = value * scale;
        if !(bytes.is_finite() && bytes >= 1.0) {
            return Err(format!(
                "rate must be at least 1 byte per second, got '{text}'"
            ));
        }
        Ok(bytes.round() as u64)
    }

    /// The one parser of a segmentation policy, whoever gives it (a rule line, `Rules(...)`, a
    /// hook's `set_segmentation`, the command line's default policy): a strategy by name, the
    /// sizes it uses (`chunk` for fixed, default [`DEFAULT_CHUNK`]; `min` and `max` for random)
    /// and the pause between chunks in milliseconds. Sizes a strategy does not use are ignored.
    /// Errors are SegmentedProxy's messages.
    pub fn parse(
        strategy: &str,
        chunk: Option<i64>,
        min: Option<i64>,
        max: Option<i64>,
        delay_ms: f64,
    ) -> Result<SegmentPolicy, String> {
        let size = |n: i64| usize::try_from(n).map_err(|_| format!("size {n} is out of range"));
        let strategy = match strategy {
            "none" => Strategy::None,
            "fixed" => {
                let chunk = chunk.unwrap_or(DEFAULT_CHUNK as i64);
                if chunk <= 0 {
                    return Err("fixed strategy requires chunk > 0".into());
                }
                Strategy::Fixed {
                    chunk: size(chunk)?,
                }
            }
            "random" => {
                let (Some(min), Some(max)) = (min, max) else {
                    return Err("random strategy requires both min and max".into());
                };
                if min <= 0 || max <= 0 {
                    return Err("random strategy requires min/max > 0".into());
                }
                if min > max {
                    return Err(format!(
                        "random strategy requires min <= max (min={min} max={max})"
                    ));
                }
                Strategy::Random {
                    min: size(min)?,
                    max: size(max)?,
                }
            }
            other => {
                let (last, first) = Strategy::NAMES.split_last().expect("strategies");
                return Err(format!(
                    "unknown strategy '{other}' (expected {} or {last})",
                    first.join(", ")
                ));
            }
        };
        if !(delay_ms.is_finite() && delay_ms >= 0.0) {
            return Err("delay must be >= 0".into());
        }
        // Whole milliseconds exactly (a rule's delay), a fraction to the nanosecond.
        let delay = Duration::from_millis(delay_ms.trunc() as u64)
            .saturating_add(Duration::from_nanos((delay_ms.fract() * 1e6).round() as u64));
        Ok(SegmentPolicy {
            strategy,
            delay,
            rate: None,
            ttfb: None,
            shaping: None,
        })
    }

    /// One-line summary, e.g. `none`, `fixed chunk=1024 delay=5ms`,
    /// `random min=10 max=100 delay=0ms`, `none delay=20ms`.
    pub fn describe(&self) -> String {
        let ms = self.delay.as_millis();
        let words = match self.strategy {
            Strategy::None if self.delay.is_zero() => "none".to_string(),
            Strategy::None => format!("none delay={ms}ms"),
            Strategy::Fixed { chunk } => format!("fixed chunk={chunk} delay={ms}ms"),
            Strategy::Random { min, max } => format!("random min={min} max={max} delay={ms}ms"),
        };
        let words = match self.rate {
            Some(rate) => format!("{words} rate={rate}B/s"),
            None => words,
        };
        let words = match self.ttfb {
            Some(t) => format!("{words} ttfb={}ms", t.as_millis()),
            None => words,
        };
        match &self.shaping {
            Some(s) => format!("{words} {}", s.describe()),
            None => words,
        }
    }
}

impl fmt::Display for SegmentPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Why a chunk is shorter than the policy asked (see [`Segmented`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShortChunk {
    /// The writer was flushed: the message ended (an HTTP body, a TLS flight) and its last
    /// bytes go out rather than wait for bytes that may never come.
    Flush,
    /// The source had nothing more for [`IDLE_FLUSH`]: the held bytes went out.
    Idle,
    /// The stream ended (shutdown).
    End,
}

impl ShortChunk {
    pub fn as_str(self) -> &'static str {
        match self {
            ShortChunk::Flush => "flush",
            ShortChunk::Idle => "idle",
            ShortChunk::End => "end",
        }
    }
}

/// How long a source must stay quiet before the bytes of a chunk not yet complete go out
/// short. The relays (tunnels, HTTP bodies) wait this long for more input, then flush.
pub const IDLE_FLUSH: Duration = Duration::from_millis(1);

/// Called once per chunk as it starts, with its size, why it is short (for a short chunk) and
/// the time its first write began.
pub type ChunkObserver = Arc<dyn Fn(usize, Option<ShortChunk>, Instant) + Send + Sync>;

/// Bytes and schedule handed from one [`Segmented`] to the next on the same stream (a
/// request head's writer to its body's), so the stream is chunked as one.
#[derive(Debug, Default)]
pub struct Carry {
    pending: Vec<u8>,
    next_at: Option<Instant>,
    planned: Option<usize>,
    /// The delay line and the fault's count go on too: the stream is one.
    line: Option<Box<DelayLine>>,
    fault: Option<Box<FaultState>>,
}

/// An `AsyncWrite` that segments what is written through it; reads pass through.
///
/// Chunks are exact: with `fixed` every chunk has exactly the policy's size and with `random`
/// every chunk's size is drawn in `[min, max]`, whatever the sizes of the caller's writes. A
/// chunk that is not complete yet is held (at most one chunk's bytes) until more bytes
/// complete it. The one exception is a short chunk at a flush ([`ShortChunk`]): the caller
/// flushes at the end of a message, and the relays flush when their source has been quiet for
/// [`IDLE_FLUSH`]; `poll_shutdown` sends the stream's last bytes.
///
/// Delays are kept by deadline: chunk k+1 starts no earlier than chunk k's start plus the
/// delay (a timer precise to tens of microseconds, [`super::timer`]), so errors never add up.
/// When bytes arrive late, the chunk starts when they arrive.
pub struct Segmented<S> {
    inner: S,
    policy: SegmentPolicy,
    observer: Option<ChunkObserver>,
    /// Passthrough policy and no observer: forward every call untouched.
    fast: bool,
    rng: fastrand::Rng,
    /// Size drawn for the next chunk (kept until that chunk starts).
    planned: Option<usize>,
    /// Accepted bytes not yet written: the start of the next chunk, or the rest of the chunk
    /// being written (its first `in_flight` bytes).
    pending: Vec<u8>,
    in_flight: usize,
    /// A chunk whose bytes are all written but the inner writer not yet flushed.
    unflushed: bool,
    /// The earliest start of the next chunk.
    next_at: Option<Instant>,
    /// A chunk begun whose first byte is not written yet: its size and why it is short.
    starting: Option<(usize, Option<ShortChunk>)>,
    sleep: Option<PreciseSleep>,
    /// `ttfb=`: how long the first bytes wait, until they come.
    hold_first: Option<Duration>,
    /// What a short chunk at the next flush is called.
    flush_reason: ShortChunk,
    /// An error hit while finishing a chunk after its bytes were already reported as
    /// accepted; returned by the next call.
    error: Option<io::Error>,
    /// `latency=` / `jitter=`: writes wait here until their time, then are chunked.
    line: Option<Box<DelayLine>>,
    /// `fault=`: the fault and the bytes written before it.
    fault: Option<Box<FaultState>>,
}

impl<S> Segmented<S> {
    pub fn new(inner: S, policy: SegmentPolicy, observer: Option<ChunkObserver>) -> Self {
        let fast = policy.is_passthrough() && observer.is_none();
        let shaping = policy.shaping.as_deref();
        // A seeded flow's random numbers repeat run after run.
        let seed = shaping.and_then(|s| s.flow.map(|d| d.seed));
        let line = shaping
            .filter(|s| s.has_delay_line())
            .map(|s| Box::new(DelayLine::new(s.latency, s.jitter, seed)));
        let fault = shaping.and_then(|s| s.fault).map(|fault| {
            Box::new(FaultState {
                fault,
                written: 0,
                fired: false,
                stall: None,
                reset_fd: None,
                observer: None,
            })
        });
        Self {
            inner,
            policy,
            observer,
            fast,
            rng: seed.map_or_else(fastrand::Rng::new, |s| fastrand::Rng::with_seed(s ^ 0x5e6)),
            planned: None,
            pending: Vec::new(),
            in_flight: 0,
            unflushed: false,
            next_at: None,
            starting: None,
            sleep: None,
            hold_first: None,
            flush_reason: ShortChunk::Flush,
            error: None,
            line,
            fault,
        }
    }

    /// The socket a `fault=reset@N` resets (its raw descriptor); without one a reset is
    /// made a clean close.
    pub fn reset_via(mut self, fd: Option<RawSocket>) -> Self {
        if let Some(f) = self.fault.as_deref_mut() {
            f.reset_fd = fd;
        }
        self
    }

    /// Where a fault reports that it struck (the flow record).
    pub fn on_fault(mut self, observer: Option<FaultObserver>) -> Self {
        if let Some(f) = self.fault.as_deref_mut() {
            f.observer = observer;
        }
        self
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Writing to the inner stream directly bypasses segmentation (and any held bytes):
    /// flush the wrapper first.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Returns the inner stream. Held bytes are lost: flush first.
    pub fn into_inner(self) -> S {
        self.inner
    }

    pub fn policy(&self) -> &SegmentPolicy {
        &self.policy
    }

    /// True when writes go straight to the inner writer (nothing is ever held).
    pub fn is_passthrough(&self) -> bool {
        self.fast
    }

    /// True while bytes are accepted but not yet written.
    pub fn holds_bytes(&self) -> bool {
        !self.pending.is_empty()
            || self.unflushed
            || self.line.as_ref().is_some_and(|l| !l.items.is_empty())
    }

    /// Takes the held bytes and the schedule, for a new wrapper writing the rest of the
    /// same stream ([`Segmented::with_carry`]). Drive [`Segmented::progress`] first, so no
    /// chunk is half written.
    pub fn take_carry(&mut self) -> Carry {
        debug_assert_eq!(self.in_flight, 0, "a chunk is half written");
        Carry {
            pending: std::mem::take(&mut self.pending),
            next_at: self.next_at.take(),
            planned: self.planned.take(),
            line: self.line.take(),
            fault: self.fault.take(),
        }
    }

    /// Goes on from where the previous wrapper on the same stream stopped.
    /// Holds the first bytes written `hold` long (`ttfb=`); None holds nothing.
    pub fn hold_first(mut self, hold: Option<Duration>) -> Self {
        if let Some(hold) = hold {
            self.hold_first = Some(hold);
            self.fast = false;
        }
        self
    }

    pub fn with_carry(mut self, carry: Carry) -> Self {
        if carry.line.is_some() {
            self.line = carry.line;
        }
        if let Some(mut carried) = carry.fault {
            // The writer's own fault settings (socket, observer) with the count so far.
            if let Some(own) = self.fault.take() {
                carried.reset_fd = carried.reset_fd.or(own.reset_fd);
                carried.observer = carried.observer.or(own.observer);
            }
            self.fault = Some(carried);
        }
        if self.fast {
            debug_assert!(
                carry.pending.is_empty(),
                "held bytes given to a passthrough writer"
            );
            self.pending = carry.pending;
            self.fast = self.pending.is_empty();
            return self;
        }
        self.pending = carry.pending;
        self.next_at = carry.next_at;
        self.planned = carry.planned;
        self
    }

    /// The size of the next chunk, given that `offered` more bytes are at hand.
    fn chunk_size(&mut self, offered: usize) -> usize {
        match self.policy.strategy {
            // Every write is one chunk (with the bytes held from before, if a carry brought any);
            // at a rate, at most a hundredth of a second's worth.
            Strategy::None => match self.policy.rate {
                Some(rate) => (self.pending.len() + offered).min(SegmentPolicy::rate_chunk(rate)),
                None => self.pending.len() + offered,
            },
            // max(1) keeps an unvalidated zero from looping forever.
            Strategy::Fixed { chunk } => chunk.max(1),
            Strategy::Random { min, max } => {
                let rng = &mut self.rng;
                *self
                    .planned
                    .get_or_insert_with(|| rng.usize(min.max(1)..=max.max(min).max(1)))
            }
        }
    }

    /// Begins a chunk: its size is settled; it starts with its first written byte.
    fn begin_chunk(&mut self, size: usize, short: Option<ShortChunk>) {
        self.planned = None;
        self.starting = Some((size, short));
    }

    /// When the write about to start begins, if anything needs to know (a delay to schedule
    /// or an observer); chunking without either never reads the clock.
    fn clock(&self) -> Option<Instant> {
        (!self.policy.delay.is_zero() || self.policy.rate.is_some() || self.observer.is_some())
            .then(Instant::now)
    }

    /// The chunk's first bytes were just written by a write that began at `at`: the next
    /// chunk's deadline counts from there (the write's own duration is not added to the gap).
    fn mark_started(&mut self, at: Option<Instant>) {
        if let (Some((size, short)), Some(at)) = (self.starting.take(), at) {
            // The pause after this chunk: the delay, or the chunk's time at the rate if longer.
            let pace = self.policy.rate.map_or(Duration::ZERO, |rate| {
                Duration::from_secs_f64(size as f64 / rate as f64)
            });
            let pause = self.policy.delay.max(pace);
            if !pause.is_zero() {
                self.next_at = Some(at + pause);
            }
            if let Some(observer) = &self.observer {
                observer(size, short, at);
            }
        }
    }

    /// Ready once the next chunk may start.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(at) = self.next_at {
            let sleep = self.sleep.get_or_insert_with(|| timer::sleep_until(at));
            ready!(Pin::new(sleep).poll(cx));
            self.sleep = None;
            self.next_at = None;
        }
        Poll::Ready(())
    }
}

impl<S: AsyncWrite + Unpin> Segmented<S> {
    /// Writes what can go now: the rest of a chunk in flight, then every complete chunk whose
    /// time has come; with `all`, also the held bytes of a chunk not yet complete (short).
    fn poll_progress(&mut self, cx: &mut Context<'_>, all: bool) -> Poll<io::Result<()>> {
        if self.line.is_some() {
            let goal = if all { LineGoal::Empty } else { LineGoal::Due };
            ready!(self.poll_line(cx, goal))?;
        }
        self.poll_chunks(cx, all)
    }

    /// The chunker's part of [`Segmented::poll_progress`] (the delay line aside).
    fn poll_chunks(&mut self, cx: &mut Context<'_>, all: bool) -> Poll<io::Result<()>> {
        loop {
            while self.in_flight > 0 {
                let at = self.clock();
                let n = ready!(poll_out(
                    &mut self.inner,
                    &mut self.fault,
                    cx,
                    &self.pending[..self.in_flight]
                ))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.mark_started(at);
                self.pending.drain(..n);
                self.in_flight -= n;
                self.unflushed = true;
            }
            if self.unflushed {
                ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
                self.unflushed = false;
            }
            let held = self.pending.len();
            if held == 0 {
                return Poll::Ready(Ok(()));
            }
            let size = self.chunk_size(0);
            if held < size && !all {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_deadline(cx));
            let short = (held < size).then_some(self.flush_reason);
            let size = size.min(held);
            self.begin_chunk(size, short);
            self.in_flight = size;
        }
    }

    /// Writes what can go now without waiting for more input (see `poll_progress`); the
    /// relays call it after each write, so a chunk the socket took only part of goes on.
    pub async fn progress(&mut self) -> io::Result<()> {
        if self.fast {
            return Ok(());
        }
        std::future::poll_fn(|cx| self.poll_progress(cx, false)).await
    }

    /// What a relay does while its source is quiet: passes the delay line's writes on as
    /// their time comes, then, once the source has been quiet for [`IDLE_FLUSH`], sends the
    /// held bytes of a chunk not yet complete ([`Segmented::idle_flush`]). Cancel-safe: a
    /// relay drops it when its read completes.
    pub async fn idle_work(&mut self) -> io::Result<()> {
        if self.line.as_ref().is_some_and(|l| !l.items.is_empty()) {
            std::future::poll_fn(|cx| self.poll_line(cx, LineGoal::Empty)).await?;
        }
        tokio::time::sleep(IDLE_FLUSH).await;
        self.idle_flush().await
    }

    /// Sends the held bytes as a short chunk marked [`ShortChunk::Idle`]: the source has
    /// been quiet for [`IDLE_FLUSH`].
    pub async fn idle_flush(&mut self) -> io::Result<()> {
        self.flush_reason = ShortChunk::Idle;
        let result = tokio::io::AsyncWriteExt::flush(self).await;
        self.flush_reason = ShortChunk::Flush;
        result
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
        if this.line.is_some() {
            return this.poll_line_write(cx, buf);
        }
        this.poll_chunk_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.fast {
            this.take_error()?;
            ready!(this.poll_progress(cx, true))?;
            ready!(poll_strike(&mut this.inner, &mut this.fault, cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.fast {
            this.take_error()?;
            this.flush_reason = ShortChunk::End;
            ready!(this.poll_progress(cx, true))?;
            ready!(poll_strike(&mut this.inner, &mut this.fault, cx))?;
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

impl<S: AsyncWrite + Unpin> Segmented<S> {
    /// A write into the delay line: it waits there until its time. Due writes go on first;
    /// a full line takes nothing until its oldest write has gone (the backpressure).
    fn poll_line_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // Pending here only means the chunker is busy; the new bytes can still queue.
        if let Poll::Ready(Err(e)) = self.poll_line(cx, LineGoal::Due) {
            return Poll::Ready(Err(e));
        }
        ready!(self.poll_line(cx, LineGoal::Room))?;
        let line = self.line.as_deref_mut().expect("a delay line");
        let take = buf.len().min(LINE_CAPACITY);
        line.push(&buf[..take]);
        Poll::Ready(Ok(take))
    }

    /// Passes the delay line's writes whose time has come on to the chunker; with `goal`
    /// Room or Empty, waits for them until the line has room or is empty.
    fn poll_line(&mut self, cx: &mut Context<'_>, goal: LineGoal) -> Poll<io::Result<()>> {
        let Some(mut line) = self.line.take() else {
            return Poll::Ready(Ok(()));
        };
        let result = loop {
            let done = match goal {
                LineGoal::Due | LineGoal::Empty => line.items.is_empty(),
                LineGoal::Room => !line.is_full(),
            };
            if done {
                break Poll::Ready(Ok(()));
            }
            let (at, bytes) = line.items.front().expect("not empty");
            if Instant::now() < *at {
                if goal == LineGoal::Due {
                    break Poll::Ready(Ok(()));
                }
                let at = *at;
                let sleep = line.sleep.get_or_insert_with(|| timer::sleep_until(at));
                if Pin::new(sleep).poll(cx).is_pending() {
                    break Poll::Pending;
                }
                line.sleep = None;
                continue;
            }
            line.sleep = None;
            let rest = &bytes[line.front_sent..];
            match self.poll_chunk_write(cx, rest) {
                Poll::Ready(Ok(n)) => line.passed(n),
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        self.line = Some(line);
        result
    }

    /// A write through the chunker (no delay line): accepts what can start as a chunk now.
    fn poll_chunk_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self;
        if let Some(hold) = this.hold_first.take() {
            // ttfb: the first bytes wait `hold` from when they were offered.
            this.next_at = Some(Instant::now() + hold);
        }
        // Complete chunks held from before go first, each at its time.
        ready!(this.poll_chunks(cx, false))?;
        let size = this.chunk_size(buf.len());
        let held = this.pending.len();
        if held + buf.len() < size {
            // Not a chunk yet: hold the bytes until more come or a flush.
            this.pending.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        // A chunk can start once its time has come; until then nothing is accepted, which is
        // the backpressure that keeps at most one chunk held.
        ready!(this.poll_deadline(cx));
        let accepted = if held == 0 {
            // The common case: the chunk goes straight from the caller's buffer.
            let at = this.clock();
            let n = ready!(poll_out(&mut this.inner, &mut this.fault, cx, &buf[..size]))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            this.begin_chunk(size, None);
            this.mark_started(at);
            this.pending.extend_from_slice(&buf[n..size]);
            this.in_flight = size - n;
            this.unflushed = true;
            size
        } else {
            let take = size - held;
            this.pending.extend_from_slice(&buf[..take]);
            this.begin_chunk(size, None);
            this.in_flight = size;
            take
        };
        // Finish the chunk eagerly; its bytes are accepted either way, and a late error is
        // kept for the next call.
        if let Poll::Ready(Err(e)) = this.poll_chunks(cx, false) {
            this.error = Some(e);
        }
        Poll::Ready(Ok(accepted))
    }
}

impl<S> fmt::Debug for Segmented<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segmented")
            .field("policy", &self.policy)
            .field("observer", &self.observer.is_some())
            .field("held", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// Most bytes a delay line holds; a full line takes no more until its oldest write has gone,
/// so a tunnel's throughput through it is at most this much per latency (40 MiB/s at 100 ms).
pub const LINE_CAPACITY: usize = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineGoal {
    /// Pass on what is due, wait for nothing.
    Due,
    /// Wait until the line has room for a write.
    Room,
    /// Wait until every write has passed.
    Empty,
}

/// `latency=` / `jitter=`: each write waits its latency from when it came, then goes to the
/// chunker. Reading goes on meanwhile (the relays drive the line while their source is quiet,
/// [`Segmented::idle_work`]), so a stream keeps its throughput, shifted by the latency.
#[derive(Debug)]
struct DelayLine {
    latency: Duration,
    jitter: Duration,
    rng: fastrand::Rng,
    /// Writes in order with the time each may leave.
    items: std::collections::VecDeque<(Instant, Vec<u8>)>,
    /// Bytes of the oldest write already passed on.
    front_sent: usize,
    bytes: usize,
    /// The latest leaving time so far: no write leaves before one that came earlier.
    last_leave: Option<Instant>,
    sleep: Option<PreciseSleep>,
}

impl DelayLine {
    fn new(latency: Duration, jitter: Duration, seed: Option<u64>) -> Self {
        DelayLine {
            latency,
            jitter,
            rng: seed.map_or_else(fastrand::Rng::new, |s| fastrand::Rng::with_seed(s ^ 0x11e)),
            items: Default::default(),
            front_sent: 0,
            bytes: 0,
            last_leave: None,
            sleep: None,
        }
    }

    fn is_full(&self) -> bool {
        self.bytes >= LINE_CAPACITY
    }

    /// Queues a write: it leaves after latency ± a uniform draw within jitter (never before
    /// it came, never before an earlier write).
    fn push(&mut self, buf: &[u8]) {
        let now = Instant::now();
        let mut wait = self.latency;
        if !self.jitter.is_zero() {
            let j = self.jitter.as_nanos() as u64;
            let drawn = self.rng.u64(0..=2 * j);
            let nanos = (self.latency.as_nanos() as u64 + drawn).saturating_sub(j);
            wait = Duration::from_nanos(nanos);
        }
        let leave = (now + wait).max(self.last_leave.unwrap_or(now));
        self.last_leave = Some(leave);
        self.items.push_back((leave, buf.to_vec()));
        self.bytes += buf.len();
    }

    /// `n` more bytes of the oldest write went on.
    fn passed(&mut self, n: usize) {
        self.front_sent += n;
        let len = self.items.front().map_or(0, |(_, b)| b.len());
        if self.front_sent >= len {
            self.items.pop_front();
            self.bytes -= len;
            self.front_sent = 0;
        }
    }
}

/// Called when a fault strikes, with the fault and when.
pub type FaultObserver = Arc<dyn Fn(Fault, Instant) + Send + Sync>;

/// A raw socket descriptor (a fault's reset sets its linger time to zero).
#[cfg(unix)]
pub type RawSocket = std::os::fd::RawFd;
#[cfg(not(unix))]
pub type RawSocket = i32;

/// The descriptor of a socket (for a fault's reset).
#[cfg(unix)]
pub fn raw_socket<T: std::os::fd::AsRawFd>(socket: &T) -> Option<RawSocket> {
    Some(socket.as_raw_fd())
}

#[cfg(not(unix))]
pub fn raw_socket<T>(_: &T) -> Option<RawSocket> {
    None
}

/// A writer's fault (`fault=`): counts the bytes written, and strikes once `after` are out.
struct FaultState {
    fault: Fault,
    written: u64,
    fired: bool,
    stall: Option<PreciseSleep>,
    reset_fd: Option<RawSocket>,
    observer: Option<FaultObserver>,
}

impl fmt::Debug for FaultState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultState")
            .field("fault", &self.fault)
            .field("written", &self.written)
            .field("fired", &self.fired)
            .finish_non_exhaustive()
    }
}

impl FaultState {
    fn error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("{FAULT_PREFIX}{} after {} bytes", self.fault, self.written),
        )
    }
}

/// The start of the message of an error a fault causes (flow records recognise it).
pub const FAULT_PREFIX: &str = "fault injected: ";

/// Writes to `inner`, never past a fault's byte count: at the count the fault strikes first.
fn poll_out<S: AsyncWrite + Unpin>(
    inner: &mut S,
    fault: &mut Option<Box<FaultState>>,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    if fault.is_none() {
        return Pin::new(inner).poll_write(cx, buf);
    }
    ready!(poll_strike(inner, fault, cx))?;
    let f = fault.as_deref_mut().expect("fault");
    let room = if f.fired {
        buf.len()
    } else {
        (f.fault.after - f.written).min(buf.len() as u64) as usize
    };
    let n = ready!(Pin::new(inner).poll_write(cx, &buf[..room]))?;
    f.written += n as u64;
    Poll::Ready(Ok(n))
}

/// Strikes the fault once its count is reached: a stall waits (once), a close ends the
/// stream cleanly, a reset makes the socket's close a reset; both then fail every write.
fn poll_strike<S: AsyncWrite + Unpin>(
    inner: &mut S,
    fault: &mut Option<Box<FaultState>>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let Some(f) = fault.as_deref_mut() else {
        return Poll::Ready(Ok(()));
    };
    if !f.fired {
        if f.written < f.fault.after {
            return Poll::Ready(Ok(()));
        }
        match f.fault.kind {
            FaultKind::Stall(pause) => {
                f.stall = Some(timer::sleep_until(Instant::now() + pause));
            }
            FaultKind::Close | FaultKind::Reset => {
                // What is written goes out first; the peer sees exactly `after` bytes.
                let _ = ready!(Pin::new(&mut *inner).poll_flush(cx));
                if f.fault.kind == FaultKind::Reset && f.reset_fd.is_some() {
                    reset_now(f.reset_fd);
                } else {
                    let _ = ready!(Pin::new(&mut *inner).poll_shutdown(cx));
                }
            }
        }
        f.fired = true;
        if let Some(observe) = &f.observer {
            observe(f.fault, Instant::now());
        }
    }
    match f.fault.kind {
        FaultKind::Stall(_) => {
            if let Some(sleep) = f.stall.as_mut() {
                ready!(Pin::new(sleep).poll(cx));
                f.stall = None;
            }
            Poll::Ready(Ok(()))
        }
        FaultKind::Close | FaultKind::Reset => Poll::Ready(Err(f.error())),
    }
}

/// Resets the connection now: the peer gets a TCP reset (RST) whoever still holds the
/// socket. Disconnecting a TCP socket (connect to AF_UNSPEC) aborts it with a reset, and the
/// descriptor stays valid (closed) until its owner drops it.
#[cfg(target_os = "linux")]
fn reset_now(fd: Option<RawSocket>) {
    if let Some(fd) = fd {
        // SAFETY: the descriptor belongs to a socket its owner keeps open during this call;
        // the address is a zeroed sockaddr with family AF_UNSPEC, of the size given.
        unsafe {
            let socket = std::os::fd::BorrowedFd::borrow_raw(fd);
            let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
            let mut addr: libc::sockaddr = std::mem::zeroed();
            addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
            libc::connect(
                fd,
                &addr,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn reset_now(_: Option<RawSocket>) {}

/// Awaits `read` (a read from the relay's source) while the writer may hold bytes
/// (`holding`), running `work` (the writer's [`Segmented::idle_work`]: the delay line, then
/// the idle flush) meanwhile, so a quiet source never keeps bytes back. The read itself is
/// never cancelled; `work` is dropped when the read completes, and only polled when holding.
pub async fn read_flushing<T, R, F>(read: R, work: F, holding: bool) -> io::Result<T>
where
    R: Future<Output = T>,
    F: Future<Output = io::Result<()>>,
{
    if !holding {
        return Ok(read.await);
    }
    tokio::pin!(read);
    tokio::select! {
        biased;
        r = &mut read => return Ok(r),
        done = work => done?,
    }
    Ok(read.await)
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
        (Arc::new(move |n, _, _| s.lock().unwrap().push(n)), seen)
    }

    #[test]
    fn policy_parse_and_describe() {
        assert!(SegmentPolicy::none().is_passthrough());
        assert!(!SegmentPolicy {
            strategy: Strategy::None,
            delay: Duration::from_millis(1),
            rate: None,
            ttfb: None,
            shaping: None,
        }
        .is_passthrough());
        assert!(!SegmentPolicy::fixed(10, Duration::ZERO).is_passthrough());

        let parse = |strategy, chunk, min, max, delay| {
            SegmentPolicy::parse(strategy, chunk, min, max, delay)
        };
        assert_eq!(
            parse("none", None, None, None, 0.0),
            Ok(SegmentPolicy::none())
        );
        assert_eq!(
            parse("fixed", None, Some(9), None, 5.0),
            Ok(SegmentPolicy::fixed(
                DEFAULT_CHUNK,
                Duration::from_millis(5)
            ))
        );
        assert_eq!(
            parse("random", Some(0), Some(1), Some(1), 0.25),
            Ok(SegmentPolicy::random(1, 1, Duration::from_micros(250)))
        );
        // A delay with strategy none is kept: every write is a chunk, spaced by it.
        assert_eq!(
            parse("none", None, None, None, 20.0).unwrap().describe(),
            "none delay=20ms"
        );
        for (strategy, chunk, min, max, delay, error) in [
            (
                "fixed",
                Some(0),
                None,
                None,
                0.0,
                "fixed strategy requires chunk > 0",
            ),
            (
                "fixed",
                Some(-3),
                None,
                None,
                0.0,
                "fixed strategy requires chunk > 0",
            ),
            (
                "random",
                None,
                Some(5),
                None,
                0.0,
                "random strategy requires both min and max",
            ),
            (
                "random",
                None,
                Some(0),
                Some(5),
                0.0,
                "random strategy requires min/max > 0",
            ),
            (
                "random",
                None,
                Some(6),
                Some(5),
                0.0,
                "random strategy requires min <= max (min=6 max=5)",
            ),
            (
                "zigzag",
                None,
                None,
                None,
                0.0,
                "unknown strategy 'zigzag' (expected none, fixed or random)",
            ),
            // Names are exact: a rule line lowercases its own before it asks.
            (
                "Fixed",
                None,
                None,
                None,
                0.0,
                "unknown strategy 'Fixed' (expected none, fixed or random)",
            ),
            ("fixed", Some(1), None, None, -1.0, "delay must be >= 0"),
            ("none", None, None, None, f64::NAN, "delay must be >= 0"),
            (
                "none",
                None,
                None,
                None,
                f64::INFINITY,
                "delay must be >= 0",
            ),
        ] {
            assert_eq!(
                parse(strategy, chunk, min, max, delay),
                Err(error.to_string()),
                "{strategy} {chunk:?} {min:?} {max:?} {delay}"
            );
        }
        for name in Strategy::NAMES {
            let policy = parse(name, None, Some(1), Some(2), 0.0).unwrap();
            assert_eq!(policy.strategy.name(), name);
        }

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
            rate: None,
            ttfb: None,
            shaping: None,
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
        assert_eq!(write_sizes.iter().sum::<usize>(), expected.len());
        // Every chunk but the stream's last has exactly the policy's size, whatever the writes.
        let (_, whole) = chunks.split_last().unwrap_or((&0, &[]));
        for &c in whole {
            match policy.strategy {
                Strategy::None => {}
                Strategy::Fixed { chunk } => assert_eq!(c, chunk),
                Strategy::Random { min, max } => {
                    assert!((min..=max).contains(&c), "{c} not in {min}..={max}")
                }
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
    async fn fixed_chunks_span_writes_and_only_a_flush_or_the_end_is_short() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let obs: ChunkObserver = Arc::new(move |n, short, _| s.lock().unwrap().push((n, short)));
        let mut w = Segmented::new(a, SegmentPolicy::fixed(4, Duration::ZERO), Some(obs));
        w.write_all(b"0123456789").await.unwrap(); // 4 4, "89" held
        w.write_all(b"abc").await.unwrap(); // "89ab" completes a chunk, "c" held
        w.flush().await.unwrap(); // "c" goes short
        w.write_all(b"defgh").await.unwrap(); // 4, "h" held
        w.idle_flush().await.unwrap();
        w.write_all(b"ij").await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"0123456789abcdefghij");
        use ShortChunk::*;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (4, None),
                (4, None),
                (4, None),
                (1, Some(Flush)),
                (4, None),
                (1, Some(Idle)),
                (2, Some(End))
            ]
        );
    }

    #[tokio::test]
    async fn exact_sizes_across_tiny_writes() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        let mut rng = fastrand::Rng::with_seed(7);
        for policy in [
            SegmentPolicy::fixed(100, Duration::ZERO),
            SegmentPolicy::random(50, 150, Duration::ZERO),
        ] {
            let (a, mut b) = tokio::io::duplex(1 << 20);
            let (obs, seen) = recorder();
            let mut w = Segmented::new(a, policy.clone(), Some(obs));
            let mut off = 0;
            while off < data.len() {
                let n = rng.usize(1..=37).min(data.len() - off);
                w.write_all(&data[off..off + n]).await.unwrap();
                off += n;
            }
            w.shutdown().await.unwrap();
            drop(w);
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            assert!(got == data);
            let chunks = seen.lock().unwrap().clone();
            let (_, whole) = chunks.split_last().unwrap();
            match policy.strategy {
                Strategy::Fixed { chunk } => {
                    assert!(whole.iter().all(|&c| c == chunk), "{whole:?}")
                }
                Strategy::Random { min, max } => {
                    assert!(whole.iter().all(|c| (min..=max).contains(c)), "{whole:?}")
                }
                Strategy::None => unreachable!(),
            }
        }
    }

    /// A head written through one wrapper and a body through the next are chunked as one
    /// stream: the carry moves the held bytes and the schedule.
    #[tokio::test]
    async fn carry_continues_the_stream_in_a_new_writer() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let (obs, seen) = recorder();
        let policy = SegmentPolicy::fixed(10, Duration::from_millis(3));
        let start = Instant::now();
        let carry = {
            let mut head = Segmented::new(&mut a, policy.clone(), Some(obs.clone()));
            head.write_all(&[1u8; 25]).await.unwrap(); // 10 10, 5 held
            head.progress().await.unwrap();
            head.take_carry()
        };
        let mut body = Segmented::new(&mut a, policy, Some(obs)).with_carry(carry);
        body.write_all(&[2u8; 15]).await.unwrap(); // 5 + 5, then 10
        body.flush().await.unwrap();
        // Four chunks, three gaps of at least 3 ms, with no gap lost at the hand-over.
        assert!(start.elapsed() >= Duration::from_millis(9));
        drop(body);
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 40);
        assert_eq!(*seen.lock().unwrap(), vec![10, 10, 10, 10]);
    }

    /// While a relay's source is quiet, the bytes held for an incomplete chunk go out after
    /// IDLE_FLUSH, and the read goes on undisturbed.
    #[tokio::test]
    async fn read_flushing_sends_held_bytes_while_the_source_is_quiet() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = Segmented::new(a, SegmentPolicy::fixed(100, Duration::ZERO), None);
        w.write_all(&[5u8; 30]).await.unwrap();
        assert!(w.holds_bytes());
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let reader = tokio::spawn(async move {
            let mut got = [0u8; 30];
            b.read_exact(&mut got).await.unwrap();
            let _ = tx.send(got[0]);
            b
        });
        // The "source" answers only once the held bytes have reached the other side.
        let answered = read_flushing(rx, w.idle_work(), true).await.unwrap();
        assert_eq!(answered, Ok(5));
        assert!(!w.holds_bytes());
        drop(reader.await.unwrap());
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
        let obs: ChunkObserver = Arc::new(move |n, _, _| {
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

    #[tokio::test]
    async fn delay_spaces_chunk_starts_by_deadline_across_writes() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let (obs, seen) = recorder();
        let mut w = Segmented::new(
            a,
            SegmentPolicy::fixed(10, Duration::from_millis(20)),
            Some(obs),
        );
        let start = Instant::now();
        w.write_all(&[0u8; 30]).await.unwrap(); // chunks start at 0, 20, 40 ms
        assert!(start.elapsed() >= Duration::from_millis(40));
        w.write_all(&[0u8; 5]).await.unwrap(); // held
        w.shutdown().await.unwrap(); // the short last chunk waits for its time too: 60 ms
        assert!(start.elapsed() >= Duration::from_millis(60));
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 35);
        assert_eq!(*seen.lock().unwrap(), vec![10, 10, 10, 5]);
    }

    /// Deadlines are absolute: 50 chunks 2 ms apart take 98 ms and more, never less, and the
    /// time spent writing does not add up from gap to gap.
    #[tokio::test]
    async fn gaps_are_never_shorter_than_asked() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let starts = Arc::new(Mutex::new(Vec::new()));
        let s = starts.clone();
        let obs: ChunkObserver = Arc::new(move |_, _, at| s.lock().unwrap().push(at));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        let mut w = Segmented::new(
            a,
            SegmentPolicy::fixed(3, Duration::from_millis(2)),
            Some(obs),
        );
        w.write_all(&[9u8; 150]).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap(), 150);
        let starts = starts.lock().unwrap();
        assert_eq!(starts.len(), 50);
        for pair in starts.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(2),
                "gap {:?}",
                pair[1] - pair[0]
            );
        }
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
