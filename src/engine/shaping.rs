//! Shaping and faults beside segmentation: a delay line (`latency=`, `jitter=`), injected
//! faults (`fault=`, drawn for a share of flows with `fault_rate=`, reproducibly with `seed=`).
//! The policy parts live here; [`super::segment::Segmented`] applies them, so every path
//! (tunnels, plain HTTP, both sides of intercepted TLS) gets them from one place.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What an injected fault does once `after` bytes have been written in its direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The peer sees a TCP reset (RST): the socket is closed with a zero linger time.
    Reset,
    /// The peer sees a clean end of stream (FIN, after a TLS close_notify where TLS is ours).
    Close,
    /// The stream pauses this long, then goes on.
    Stall(Duration),
}

/// `fault=KIND@N`: `reset@N`, `close@N` or `stall@N:MS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// Bytes written in the fault's direction before it strikes.
    pub after: u64,
}

impl Fault {
    /// Parses `reset@N`, `close@N`, `stall@N:MS` (N bytes, MS milliseconds).
    pub fn parse(text: &str) -> Result<Fault, String> {
        const SHAPE: &str = "expected reset@BYTES, close@BYTES or stall@BYTES:MS";
        let t = text.trim();
        let (kind, rest) = t
            .split_once('@')
            .ok_or_else(|| format!("invalid fault '{text}' ({SHAPE})"))?;
        let bytes = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("invalid fault '{text}': '{s}' is not a byte count ({SHAPE})"))
        };
        let kind_lower = kind.trim().to_ascii_lowercase();
        match kind_lower.as_str() {
            "reset" => Ok(Fault {
                kind: FaultKind::Reset,
                after: bytes(rest)?,
            }),
            "close" => Ok(Fault {
                kind: FaultKind::Close,
                after: bytes(rest)?,
            }),
            "stall" => {
                let (n, ms) = rest.split_once(':').ok_or_else(|| {
                    format!("invalid fault '{text}': stall needs a pause, stall@BYTES:MS")
                })?;
                let ms: u64 = ms.trim().parse().map_err(|_| {
                    format!("invalid fault '{text}': '{ms}' is not milliseconds ({SHAPE})")
                })?;
                if ms > 3_600_000 {
                    return Err(format!("invalid fault '{text}': stall at most 3600000 ms"));
                }
                Ok(Fault {
                    kind: FaultKind::Stall(Duration::from_millis(ms)),
                    after: bytes(n)?,
                })
            }
            other => Err(format!("unknown fault '{other}' ({SHAPE})")),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FaultKind::Reset => write!(f, "reset@{}", self.after),
            FaultKind::Close => write!(f, "close@{}", self.after),
            FaultKind::Stall(d) => write!(f, "stall@{}:{}", self.after, d.as_millis()),
        }
    }
}

/// Counts the flows a rule's shaping was drawn for, shared by every copy of the rule's policy:
/// flow k of a rule set gets draw k, so a seeded rule draws the same faults in the same order.
#[derive(Clone, Debug, Default)]
pub struct Draws(Arc<AtomicU64>);

impl PartialEq for Draws {
    /// Counters are state, not policy: two policies that say the same are equal.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Draws {}

/// The shaping keys of a policy. Present only when one of them is set, so the common
/// policy carries one empty pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shaping {
    /// `latency=`: every byte leaves this long after it came (a delay line: reading goes on
    /// meanwhile, so throughput is kept).
    pub latency: Duration,
    /// `jitter=`: each write's latency is drawn uniformly in latency ± jitter (never below
    /// zero); bytes never overtake earlier ones.
    pub jitter: Duration,
    pub fault: Option<Fault>,
    /// `fault_rate=`: the share of flows the fault is drawn for, in millionths.
    pub fault_rate_ppm: u32,
    /// `seed=`: fault draws, jitter and random chunk sizes repeat run after run.
    pub seed: Option<u64>,
    draws: Draws,
    /// Set for one flow by [`Shaping::for_flow`]: its draw number and seed.
    pub flow: Option<FlowDraw>,
    /// The rule's fault, for a flow that did not draw it (its `fault` is then None).
    pub skipped_fault: Option<Fault>,
}

/// What one flow drew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowDraw {
    pub index: u64,
    /// The seed of the flow's random numbers (jitter, random chunk sizes).
    pub seed: u64,
}

pub const ALWAYS_PPM: u32 = 1_000_000;

impl Default for Shaping {
    fn default() -> Self {
        Shaping {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            fault: None,
            fault_rate_ppm: ALWAYS_PPM,
            seed: None,
            draws: Draws::default(),
            flow: None,
            skipped_fault: None,
        }
    }
}

impl Shaping {
    pub fn new() -> Self {
        Self::default()
    }

    /// Nothing set: the policy needs no shaping part.
    pub fn is_empty(&self) -> bool {
        self.latency.is_zero()
            && self.jitter.is_zero()
            && self.fault.is_none()
            && self.seed.is_none()
    }

    /// True when it changes timing or cuts the stream (a seed alone changes nothing).
    pub fn acts(&self) -> bool {
        self.has_delay_line() || self.fault.is_some()
    }

    pub fn has_delay_line(&self) -> bool {
        !(self.latency.is_zero() && self.jitter.is_zero())
    }

    /// Parses `fault_rate=`: a fraction in [0, 1].
    pub fn parse_fault_rate(text: &str) -> Result<u32, String> {
        let v: f64 = text
            .trim()
            .parse()
            .map_err(|_| format!("invalid fault_rate '{text}' (a fraction 0..1, e.g. 0.25)"))?;
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("fault_rate must be between 0 and 1, got '{text}'"));
        }
        Ok((v * ALWAYS_PPM as f64).round() as u32)
    }

    /// Parses a `latency=` / `jitter=` value: milliseconds, fractions allowed.
    pub fn parse_ms(key: &str, text: &str) -> Result<Duration, String> {
        let v: f64 = text
            .trim()
            .parse()
            .map_err(|_| format!("invalid {key} '{text}' (milliseconds, e.g. 50 or 0.5)"))?;
        if !(v.is_finite() && (0.0..=3_600_000.0).contains(&v)) {
            return Err(format!("{key} must be 0..3600000 ms, got '{text}'"));
        }
        Ok(Duration::from_nanos((v * 1e6).round() as u64))
    }

    /// This shaping for one flow: the flow's draw (its number, its seed) and its fault, kept
    /// only if drawn.
    pub fn for_flow(&self) -> Shaping {
        let index = self.draws.0.fetch_add(1, Ordering::Relaxed);
        let seed = match self.seed {
            Some(s) => mix(s, index),
            None => fastrand::u64(..),
        };
        let mut flow = self.clone();
        let drawn = self.fault_rate_ppm >= ALWAYS_PPM
            || (mix(seed, 0x0066_6175_6c74) % ALWAYS_PPM as u64) < self.fault_rate_ppm as u64;
        if !drawn {
            flow.skipped_fault = flow.fault.take();
        }
        flow.flow = Some(FlowDraw { index, seed });
        flow
    }

    /// The shaping words of a policy's description (`latency=50ms jitter=10ms
    /// fault=reset@1000 fault_rate=0.5 seed=7`); empty when nothing is set.
    pub fn describe(&self) -> String {
        let skipped = self.skipped_fault.as_ref();
        let mut words = Vec::new();
        if !self.latency.is_zero() {
            words.push(format!("latency={}", ms_text(self.latency)));
        }
        if !self.jitter.is_zero() {
            words.push(format!("jitter={}", ms_text(self.jitter)));
        }
        match (&self.fault, skipped) {
            (Some(f), _) => words.push(format!("fault={f}")),
            (None, Some(f)) => words.push(format!("fault={f}(not drawn)")),
            (None, None) => {}
        }
        if self.fault_rate_ppm < ALWAYS_PPM && (self.fault.is_some() || skipped.is_some()) {
            words.push(format!(
                "fault_rate={}",
                self.fault_rate_ppm as f64 / ALWAYS_PPM as f64
            ));
        }
        if let Some(s) = self.seed {
            words.push(format!("seed={s}"));
        }
        words.join(" ")
    }
}

fn ms_text(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms.fract() == 0.0 {
        format!("{}ms", ms as u64)
    } else {
        format!("{ms}ms")
    }
}

/// splitmix64 of a seed and a counter: a well-spread, reproducible 64-bit draw.
pub fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_print_back() {
        for text in ["reset@0", "close@1000", "stall@5:250"] {
            assert_eq!(Fault::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Fault::parse("RESET@10").unwrap().kind,
            FaultKind::Reset,
            "kinds are case-insensitive"
        );
        for bad in [
            "reset",
            "reset@",
            "reset@-1",
            "stall@5",
            "stall@5:x",
            "boom@5",
        ] {
            assert!(Fault::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_seeded_rate_draws_the_same_flows_every_time() {
        let shaping = || Shaping {
            fault: Some(Fault::parse("reset@1").unwrap()),
            fault_rate_ppm: Shaping::parse_fault_rate("0.3").unwrap(),
            seed: Some(42),
            ..Shaping::new()
        };
        let run =
            |s: &Shaping| -> Vec<bool> { (0..200).map(|_| s.for_flow().fault.is_some()).collect() };
        let (a, b) = (shaping(), shaping());
        let (first, second) = (run(&a), run(&b));
        assert_eq!(first, second);
        let drawn = first.iter().filter(|d| **d).count();
        assert!((30..=90).contains(&drawn), "{drawn} of 200 at 0.3");
        let never = Shaping {
            fault_rate_ppm: 0,
            ..shaping()
        };
        assert!(run(&never).iter().all(|d| !d));
    }

    #[test]
    fn rates_and_times_are_checked() {
        assert_eq!(Shaping::parse_fault_rate("1").unwrap(), ALWAYS_PPM);
        assert!(Shaping::parse_fault_rate("1.5").is_err());
        assert!(Shaping::parse_fault_rate("x").is_err());
        assert_eq!(
            Shaping::parse_ms("latency", "0.5").unwrap(),
            Duration::from_micros(500)
        );
        assert!(Shaping::parse_ms("latency", "-1").is_err());
    }
}
