//! What a flow captures when asked (`capture=` on its rule, the `capture_bodies` option): the
//! request and response heads, each body's first bytes up to a limit (copied as they pass, so
//! the relay never waits for them), and when each phase of the exchange happened, on the
//! flow records' monotonic clock. A flow that captures nothing carries none of this.

use std::net::SocketAddr;
use std::time::Instant;

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use super::http1::Headers;

/// The body limit of a rule's `capture=` when the server sets none (`capture_bodies`).
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// The moments of an exchange a capture marks, in the order they happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A new origin connection is started (name resolution begins).
    ConnectStart,
    /// The destination's name is resolved.
    DnsEnd,
    /// TCP is connected (through an upstream proxy: its CONNECT answered too).
    ConnectEnd,
    /// TLS toward the origin is established (intercepted flows).
    TlsEnd,
    /// The origin connection is ready and the request head starts out.
    SendStart,
    /// The request (head and body) is sent.
    Sent,
    /// The first byte of the response arrived.
    FirstByte,
    /// The response's last byte went to the client.
    Done,
}

const PHASES: [(Phase, &str); 8] = [
    (Phase::ConnectStart, "connect_start"),
    (Phase::DnsEnd, "dns_end"),
    (Phase::ConnectEnd, "connect_end"),
    (Phase::TlsEnd, "tls_end"),
    (Phase::SendStart, "send_start"),
    (Phase::Sent, "sent"),
    (Phase::FirstByte, "first_byte"),
    (Phase::Done, "done"),
];

/// The first bytes of a body, up to a limit, and how many bytes it had in all.
#[derive(Clone, Debug, Default)]
pub struct BodyTee {
    pub bytes: Vec<u8>,
    pub total: u64,
}

impl BodyTee {
    /// Keeps what fits of `piece` under `limit` and counts all of it.
    pub fn feed(&mut self, piece: &[u8], limit: usize) {
        self.total += piece.len() as u64;
        let room = limit.saturating_sub(self.bytes.len());
        self.bytes
            .extend_from_slice(&piece[..room.min(piece.len())]);
    }

    /// Whether bytes were left out.
    pub fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }
}

/// A request head as it went to the origin.
#[derive(Clone, Debug, Default)]
pub struct RequestHeadCapture {
    pub method: String,
    pub url: String,
    pub version: u8,
    pub headers: Vec<(String, String)>,
}

/// A response head as the client got it.
#[derive(Clone, Debug, Default)]
pub struct ResponseHeadCapture {
    pub status: u16,
    pub reason: String,
    pub version: u8,
    pub headers: Vec<(String, String)>,
}

/// One flow's capture.
#[derive(Clone, Debug)]
pub struct Capture {
    epoch: Instant,
    /// Most bytes kept of each body.
    pub limit: usize,
    pub request: Option<RequestHeadCapture>,
    pub response: Option<ResponseHeadCapture>,
    pub request_body: BodyTee,
    pub response_body: BodyTee,
    /// Where the origin connection went (an upstream proxy's address when through one).
    pub server: Option<SocketAddr>,
    /// Seconds on the flow records' clock of each [`Phase`], in `PHASES` order.
    marks: [Option<f64>; PHASES.len()],
}

impl Capture {
    /// A capture keeping up to `limit` bytes of each body; `epoch` is the flow records' clock.
    pub fn new(epoch: Instant, limit: usize) -> Self {
        Capture {
            epoch,
            limit,
            request: None,
            response: None,
            request_body: BodyTee::default(),
            response_body: BodyTee::default(),
            server: None,
            marks: [None; PHASES.len()],
        }
    }

    /// Marks `phase` as happening now.
    pub fn mark(&mut self, phase: Phase) {
        self.mark_at(phase, Instant::now());
    }

    /// Marks `phase` as happening at `at`.
    pub fn mark_at(&mut self, phase: Phase, at: Instant) {
        let index = PHASES.iter().position(|(p, _)| *p == phase).unwrap_or(0);
        self.marks[index] = Some(at.saturating_duration_since(self.epoch).as_secs_f64());
    }

    /// When `phase` happened, if it did.
    pub fn at(&self, phase: Phase) -> Option<f64> {
        let index = PHASES.iter().position(|(p, _)| *p == phase)?;
        self.marks[index]
    }

    pub fn request_body(&mut self, piece: &[u8]) {
        self.request_body.feed(piece, self.limit);
    }

    pub fn response_body(&mut self, piece: &[u8]) {
        self.response_body.feed(piece, self.limit);
    }
}

/// Header fields as text pairs (bytes that are not UTF-8 replaced).
pub fn header_pairs(headers: &Headers) -> Vec<(String, String)> {
    headers
        .0
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(&h.value).into_owned(),
            )
        })
        .collect()
}

/// The phase times of a capture as a record shows them: each phase's name and its seconds
/// (to the microsecond), null when it did not happen.
pub struct PhaseTimes<'a>(pub &'a Capture);

impl Serialize for PhaseTimes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = s.serialize_struct("PhaseTimes", PHASES.len())?;
        for (i, (_, name)) in PHASES.iter().enumerate() {
            out.serialize_field(name, &self.0.marks[i].map(|t| (t * 1e6).round() / 1e6))?;
        }
        out.end()
    }
}

/// A captured body as a record shows it: bytes for Python, base64 text in JSON lines.
pub struct BodyBytes<'a> {
    pub bytes: &'a [u8],
    pub as_base64: bool,
}

impl Serialize for BodyBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.as_base64 {
            use base64::Engine as _;
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(self.bytes))
        } else {
            s.serialize_bytes(self.bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_kept_up_to_the_limit_and_counted_whole() {
        let mut tee = BodyTee::default();
        tee.feed(b"hello ", 8);
        tee.feed(b"world", 8);
        assert_eq!(tee.bytes, b"hello wo");
        assert_eq!(tee.total, 11);
        assert!(tee.truncated());
        let mut whole = BodyTee::default();
        whole.feed(b"abc", 3);
        assert!(!whole.truncated());
    }

    #[test]
    fn phases_are_marked_on_the_records_clock() {
        let epoch = Instant::now();
        let mut c = Capture::new(epoch, 10);
        c.mark_at(Phase::Sent, epoch + std::time::Duration::from_millis(5));
        assert_eq!(c.at(Phase::Sent), Some(0.005));
        assert_eq!(c.at(Phase::DnsEnd), None);
        let j = serde_json::to_value(PhaseTimes(&c)).unwrap();
        assert_eq!(j["sent"], 0.005);
        assert!(j["first_byte"].is_null());
    }
}
