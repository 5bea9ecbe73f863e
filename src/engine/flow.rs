//! The one flow record: what a request, CONNECT or refused connection was and how it ended,
//! filled in as the flow goes (`FlowGuard`) and handed to the sinks once, when it is
//! committed or dropped. The access line, the access JSON, the flow JSON and Python's dicts
//! are views of it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::ser::SerializeTuple;
use serde::{Serialize, Serializer};

use super::capture::{BodyBytes, BodyTee, Capture, PhaseTimes};
pub use super::outcome::{Kind, Outcome, Text};
use super::segment::{ChunkObserver, FaultObserver, SegmentPolicy, ShortChunk, FAULT_PREFIX};
use super::shaping::{Fault, FaultKind};

/// Most chunks kept per flow; later chunks are counted but not stored.
pub const MAX_CHUNKS_PER_FLOW: usize = 100_000;

/// What the rules (or the handler) chose to do with a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FlowAction {
    /// Not decided yet (a refused connection, a head that could not be read).
    #[default]
    Undecided,
    Direct,
    /// Through the upstream proxy at this authority.
    Upstream(String),
    Block,
}

impl FlowAction {
    /// The word records use: "direct", "upstream:HOST:PORT", "block", or "" undecided.
    pub fn as_text(&self) -> Text {
        match self {
            FlowAction::Undecided => "".into(),
            FlowAction::Direct => "direct".into(),
            FlowAction::Upstream(hop) => format!("upstream:{hop}").into(),
            FlowAction::Block => "block".into(),
        }
    }
}

impl Serialize for FlowAction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_text())
    }
}

/// One flow. Every connection the proxy touches leaves exactly one: a forwarded or answered
/// request, a CONNECT (tunnel or interception), a rejected head, a refused connection.
#[derive(Clone, Debug, Default)]
pub struct Flow {
    /// Connection id, then request number on that connection: "12.3".
    pub id: String,
    pub client: Option<SocketAddr>,
    pub method: String,
    pub target: String,
    /// Status sent to the client (200 for an established tunnel), 0 if none was sent.
    pub status: u16,
    /// Body bytes client -> destination (tunnel: all bytes).
    pub bytes_up: u64,
    /// Body bytes destination -> client (tunnel: all bytes).
    pub bytes_down: u64,
    pub duration: Duration,
    pub kind: Kind,
    /// The rule that decided ("FILE:LINE", "default"), "" before a decision.
    pub rule: Text,
    pub action: FlowAction,
    /// The segmentation policy applied, as `describe()` words plus `dir=`.
    pub policy: Text,
    /// How the destination's name was resolved ("system/miss", "literal", "via HOP").
    pub dns: Text,
    pub error: Option<String>,
    /// Seconds since the Unix epoch when the flow started.
    pub started: f64,
    pub outcome: Outcome,
    /// The destination as the rules saw it ("" and 0 before it was known).
    pub host: String,
    pub port: u16,
    /// "http" or "https" ("" before it was known).
    pub scheme: Text,
    /// The mode word of the rule that decided ("direct", "segment_upstream", ...).
    pub mode: Text,
    /// Which directions the policy segments ("up", "down", "both"; "" before a decision).
    pub direction: Text,
    /// Seconds on the engine's monotonic clock when the flow began and ended.
    pub start: f64,
    pub end: Option<f64>,
    /// Where the flow's chunks are recorded while it runs (only when a sink wants them).
    pub chunk_log: Option<ChunkLog>,
    /// Where injected faults report while the flow runs (only for a flow that drew one).
    pub fault_log: Option<FaultLog>,
    /// The faults that struck, in order (filled when the flow is finished).
    pub faults: Vec<FaultEvent>,
    /// An upgraded WebSocket relayed message by message (for handlers with the message hook):
    /// the messages sent on each way, changed or not, and those injected; dropped ones are
    /// not there. Listed only when a sink records chunks, at most half of
    /// [`MAX_CHUNKS_PER_FLOW`] each way; the counts are of all of them.
    pub websocket_messages: Vec<WebSocketMessageEvent>,
    pub websocket_up: u64,
    pub websocket_down: u64,
    /// Heads, bodies and phase times, when the flow captures them (`capture=`,
    /// `capture_bodies`); None costs nothing.
    pub capture: Option<Box<Capture>>,
}

impl Flow {
    /// An observer that records one direction's chunks into this flow (None when no sink
    /// records chunks).
    pub fn observer(&self, direction: &'static str) -> Option<ChunkObserver> {
        self.chunk_log.as_ref().map(|log| log.observer(direction))
    }

    /// An observer for the fault of `policy` in one direction (None when it has none).
    pub fn fault_observer(
        &mut self,
        direction: &'static str,
        policy: &SegmentPolicy,
    ) -> Option<FaultObserver> {
        policy.fault()?;
        let log = self.fault_log.get_or_insert_with(FaultLog::default).clone();
        Some(Arc::new(move |fault, at| {
            log.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((direction, fault, at));
        }))
    }

    /// Moves the faults that struck into `faults` (times on the records' clock, from
    /// `epoch`); a reset or close that struck is the flow's outcome and error.
    pub fn settle_faults(&mut self, epoch: Instant) {
        let Some(log) = self.fault_log.take() else {
            return;
        };
        let struck = std::mem::take(&mut *log.0.lock().unwrap_or_else(|e| e.into_inner()));
        for (direction, fault, at) in struck {
            if !matches!(fault.kind, FaultKind::Stall(_)) {
                self.outcome = Outcome::Fault;
                self.error = Some(format!(
                    "{FAULT_PREFIX}{fault} ({})",
                    if direction == "down" {
                        "toward the client"
                    } else {
                        "toward the destination"
                    }
                ));
            }
            self.faults.push(FaultEvent {
                direction,
                fault: fault.to_string(),
                t: at.saturating_duration_since(epoch).as_secs_f64(),
            });
        }
    }

    /// Whether this flow records its chunks (some sink wants them).
    pub fn records_chunks(&self) -> bool {
        self.chunk_log.is_some()
    }

    /// Marks a phase of the exchange as happening now, when the flow captures.
    pub fn mark(&mut self, phase: super::capture::Phase) {
        if let Some(capture) = &mut self.capture {
            capture.mark(phase);
        }
    }

    /// SegmentedProxy's access line, its fields in its order (`ACCESS rid= method= host=
    /// port= scheme= action= mode= strategy= dur_ms=`, then `dns= cache= transport=
    /// fallback=` when a name was resolved, `bytes_up= bytes_down=`), then ours: `status=
    /// client= target= kind= rule= [upstream=] policy="..." [via=] [error="..."]`.
    pub fn to_line(&self) -> String {
        use std::fmt::Write as _;
        let (action, upstream) = match &self.action {
            FlowAction::Upstream(hop) => ("upstream", Some(hop.as_str())),
            FlowAction::Undecided => ("-", None),
            FlowAction::Direct => ("direct", None),
            FlowAction::Block => ("block", None),
        };
        let strategy = self.policy.split_whitespace().next().unwrap_or("none");
        let mut line = format!(
            "ACCESS rid={id} method={method} host={host} port={port} scheme={scheme} action={action} mode={mode} strategy={strategy} dur_ms={ms}",
            id = self.id,
            method = self.method,
            host = or_dash(&self.host),
            port = self.port,
            scheme = or_dash(&self.scheme),
            mode = if self.mode.is_empty() { "direct" } else { &self.mode },
            ms = self.duration.as_millis(),
        );
        let via = self.dns.strip_prefix("via ");
        if via.is_none() && !self.dns.is_empty() {
            // Ours is "SOURCE/CACHE" ("system/miss", "custom/hit") or "literal"; the
            // transport is known for the system resolver only (SegmentedProxy says udp, 0).
            let (dns, cache) = self.dns.split_once('/').unwrap_or((&self.dns, "-"));
            let (transport, fallback) = if dns == "system" {
                ("udp", "0")
            } else {
                ("-", "-")
            };
            let _ = write!(
                line,
                " dns={dns} cache={cache} transport={transport} fallback={fallback}"
            );
        }
        let client = self
            .client
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = write!(
            line,
            " bytes_up={} bytes_down={} status={} client={client} target={} kind={} rule={}",
            self.bytes_up,
            self.bytes_down,
            self.status,
            or_dash(&self.target),
            self.kind.as_str(),
            or_dash(&self.rule),
        );
        if let Some(hop) = upstream {
            let _ = write!(line, " upstream={hop}");
        }
        let _ = write!(line, " policy=\"{}\"", self.policy);
        if let Some(hop) = via {
            let _ = write!(line, " via={hop}");
        }
        let _ = write!(line, " outcome={}", self.outcome.as_str());
        if let Some(e) = &self.error {
            let _ = write!(line, " error=\"{}\"", e.replace('"', "'"));
        }
        line
    }

    /// The flow as an access record (`server.access_records()`, `--access-log-format json`).
    pub fn access_view(&self) -> AccessView<'_> {
        AccessView {
            id: &self.id,
            client: self.client.map(|c| c.to_string()),
            method: &self.method,
            target: &self.target,
            status: self.status,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration: self.duration.as_secs_f64(),
            kind: self.kind,
            rule: &self.rule,
            action: &self.action,
            policy: &self.policy,
            dns: &self.dns,
            error: self.error.as_deref(),
            started: self.started,
            outcome: self.outcome,
            host: &self.host,
            port: self.port,
            scheme: &self.scheme,
            mode: &self.mode,
            line: self.to_line(),
        }
    }

    /// One JSON object with the fields of `server.access_records()`.
    pub fn to_access_json(&self) -> String {
        serde_json::to_string(&self.access_view()).unwrap_or_default()
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A flow as an access record: its facts and the text line as `line`.
#[derive(Serialize)]
pub struct AccessView<'a> {
    id: &'a str,
    client: Option<String>,
    method: &'a str,
    target: &'a str,
    status: u16,
    bytes_up: u64,
    bytes_down: u64,
    duration: f64,
    kind: Kind,
    rule: &'a str,
    action: &'a FlowAction,
    policy: &'a str,
    dns: &'a str,
    error: Option<&'a str>,
    started: f64,
    outcome: Outcome,
    host: &'a str,
    port: u16,
    scheme: &'a str,
    mode: &'a str,
    line: String,
}

/// A finished flow with its chunks, as flow records show it (`server.flows()`, the flows
/// file): the decision, the chunks as `[direction, size, t]` and the short ones as
/// `[index, why]`.
#[derive(Serialize)]
pub struct FlowView<'a> {
    id: &'a str,
    kind: Kind,
    method: &'a str,
    target: &'a str,
    rule: &'a str,
    action: &'a FlowAction,
    policy: &'a str,
    direction: &'a str,
    #[serde(serialize_with = "micro_seconds")]
    start: f64,
    #[serde(serialize_with = "micro_seconds_opt")]
    end: Option<f64>,
    chunks: &'a [ChunkEvent],
    dropped_chunks: u64,
    status: u16,
    bytes_up: u64,
    bytes_down: u64,
    error: Option<&'a str>,
    outcome: Outcome,
    short_chunks: Vec<(usize, &'static str)>,
    faults: &'a [FaultEvent],
    websocket_messages: &'a [WebSocketMessageEvent],
    websocket_up: u64,
    websocket_down: u64,
    /// Seconds since the Unix epoch when the flow started.
    started: f64,
    /// The captured request, response and phase times (null when the flow captured none).
    request: Option<RequestView<'a>>,
    response: Option<ResponseView<'a>>,
    timings: Option<PhaseTimes<'a>>,
    /// The address the origin connection went to ("IP:PORT"; an upstream proxy's when
    /// through one), when captured.
    server_address: Option<String>,
}

/// A captured request: its head as sent to the origin and its body's first bytes.
#[derive(Serialize)]
struct RequestView<'a> {
    method: &'a str,
    url: &'a str,
    http_version: String,
    headers: &'a [(String, String)],
    #[serde(flatten)]
    body: BodyView<'a>,
}

/// A captured response: its head as the client got it and its body's first bytes.
#[derive(Serialize)]
struct ResponseView<'a> {
    status: u16,
    reason: &'a str,
    http_version: String,
    headers: &'a [(String, String)],
    #[serde(flatten)]
    body: BodyView<'a>,
}

#[derive(Serialize)]
struct BodyView<'a> {
    /// The body's first bytes (at most the capture's limit).
    body: BodyBytes<'a>,
    /// The body's size in all.
    body_size: u64,
    body_truncated: bool,
}

impl<'a> BodyView<'a> {
    fn new(tee: &'a BodyTee, as_base64: bool) -> Self {
        BodyView {
            body: BodyBytes {
                bytes: &tee.bytes,
                as_base64,
            },
            body_size: tee.total,
            body_truncated: tee.truncated(),
        }
    }
}

impl<'a> FlowView<'a> {
    /// The view Python gets: captured bodies as bytes.
    pub fn new(flow: &'a Flow, chunks: &'a Chunks) -> Self {
        Self::build(flow, chunks, false)
    }

    /// The view of flow JSON lines: captured bodies as base64 text.
    pub fn for_json(flow: &'a Flow, chunks: &'a Chunks) -> Self {
        Self::build(flow, chunks, true)
    }

    fn build(flow: &'a Flow, chunks: &'a Chunks, as_base64: bool) -> Self {
        let capture = flow.capture.as_deref();
        FlowView {
            id: &flow.id,
            kind: flow.kind,
            method: &flow.method,
            target: &flow.target,
            rule: &flow.rule,
            action: &flow.action,
            policy: &flow.policy,
            direction: &flow.direction,
            start: flow.start,
            end: flow.end,
            chunks: &chunks.events,
            dropped_chunks: chunks.dropped,
            status: flow.status,
            bytes_up: flow.bytes_up,
            bytes_down: flow.bytes_down,
            error: flow.error.as_deref(),
            outcome: flow.outcome,
            short_chunks: chunks
                .events
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.short.map(|why| (i, why.as_str())))
                .collect(),
            faults: &flow.faults,
            websocket_messages: &flow.websocket_messages,
            websocket_up: flow.websocket_up,
            websocket_down: flow.websocket_down,
            started: flow.started,
            request: capture.and_then(|c| {
                c.request.as_ref().map(|r| RequestView {
                    method: &r.method,
                    url: &r.url,
                    http_version: format!("HTTP/1.{}", r.version),
                    headers: &r.headers,
                    body: BodyView::new(&c.request_body, as_base64),
                })
            }),
            response: capture.and_then(|c| {
                c.response.as_ref().map(|r| ResponseView {
                    status: r.status,
                    reason: &r.reason,
                    http_version: format!("HTTP/1.{}", r.version),
                    headers: &r.headers,
                    body: BodyView::new(&c.response_body, as_base64),
                })
            }),
            timings: capture.map(PhaseTimes),
            server_address: capture.and_then(|c| c.server).map(|a| a.to_string()),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Times to the microsecond: the clock's resolution in records.
fn round_micros(t: f64) -> f64 {
    (t * 1e6).round() / 1e6
}

fn micro_seconds<S: Serializer>(t: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_micros(*t))
}

fn micro_seconds_opt<S: Serializer>(t: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_f64(round_micros(*t)),
        None => s.serialize_none(),
    }
}

/// One chunk written for a flow.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkEvent {
    /// "up" (client -> destination) or "down".
    pub direction: &'static str,
    pub size: usize,
    /// Seconds on the engine's monotonic clock when the chunk started.
    pub t: f64,
    /// Set when the chunk is shorter than the policy asked, and why.
    pub short: Option<ShortChunk>,
}

/// A chunk in JSON: `[direction, size, t]`.
impl Serialize for ChunkEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(self.direction)?;
        t.serialize_element(&self.size)?;
        t.serialize_element(&round_micros(self.t))?;
        t.end()
    }
}

/// Where a running flow's faults report (shared with the writers that inject them).
#[derive(Clone, Default)]
pub struct FaultLog(Arc<Mutex<Vec<StruckFault>>>);

/// A fault as it struck: direction, fault, when.
type StruckFault = (&'static str, Fault, Instant);

impl fmt::Debug for FaultLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultLog")
    }
}

/// A fault that struck: its direction, what (`reset@1000`, `stall@0:300`) and when (seconds
/// on the records' clock, like chunks). In JSON: `[direction, fault, t]`.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultEvent {
    pub direction: &'static str,
    pub fault: String,
    pub t: f64,
}

impl Serialize for FaultEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(self.direction)?;
        t.serialize_element(&self.fault)?;
        t.serialize_element(&round_micros(self.t))?;
        t.end()
    }
}

/// One WebSocket message sent on: `[direction, size, t, is_text]` in JSON, `size` being the
/// content's length as the hook saw it (inflated).
#[derive(Clone, Debug, PartialEq)]
pub struct WebSocketMessageEvent {
    /// "up" (client -> server) or "down".
    pub direction: &'static str,
    pub size: usize,
    /// Seconds on the engine's monotonic clock when it went on.
    pub t: f64,
    pub is_text: bool,
}

impl Serialize for WebSocketMessageEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(4)?;
        t.serialize_element(self.direction)?;
        t.serialize_element(&self.size)?;
        t.serialize_element(&round_micros(self.t))?;
        t.serialize_element(&self.is_text)?;
        t.end()
    }
}

/// A flow's chunks: those kept (at most [`MAX_CHUNKS_PER_FLOW`]) and how many were not.
#[derive(Clone, Debug, Default)]
pub struct Chunks {
    pub events: Vec<ChunkEvent>,
    pub dropped: u64,
}

/// Where a running flow's chunks go; its observers are held by segmenting writers, which
/// may be anywhere (a tunnel's two directions, below an intercepted TLS session).
#[derive(Clone)]
pub struct ChunkLog {
    epoch: Instant,
    chunks: Arc<Mutex<Chunks>>,
}

impl fmt::Debug for ChunkLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkLog")
    }
}

impl ChunkLog {
    pub fn new(epoch: Instant) -> Self {
        ChunkLog {
            epoch,
            chunks: Arc::default(),
        }
    }

    fn observer(&self, direction: &'static str) -> ChunkObserver {
        let log = self.clone();
        Arc::new(move |size, short, at: Instant| {
            let t = at.saturating_duration_since(log.epoch).as_secs_f64();
            let mut chunks = log.chunks.lock().unwrap_or_else(|e| e.into_inner());
            if chunks.events.len() < MAX_CHUNKS_PER_FLOW {
                chunks.events.push(ChunkEvent {
                    direction,
                    size,
                    t,
                    short,
                });
            } else {
                chunks.dropped += 1;
            }
        })
    }

    /// The chunks recorded so far, leaving none.
    pub fn take(&self) -> Chunks {
        std::mem::take(&mut *self.chunks.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A consumer of finished flows: the access log, the flow records, the counters, Python's
/// stores; a new export (HAR, a database) is one more implementation, added to
/// [`super::sink::Sinks::new`].
pub trait FlowSink: Send + Sync {
    /// Whether this sink wants every chunk of every flow (recording them costs memory and a
    /// lock per chunk, so flows record chunks only when some sink wants them).
    fn wants_chunks(&self) -> bool {
        false
    }

    /// A flow finished; `chunks` are its chunks when some sink wants them.
    fn finished(&self, flow: &Arc<Flow>, chunks: Option<&Arc<Chunks>>);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow {
            id: "3.1".into(),
            client: Some("127.0.0.1:5555".parse().unwrap()),
            method: "GET".into(),
            target: "http://a.test:8080/x".into(),
            status: 200,
            bytes_up: 5,
            bytes_down: 1000,
            duration: Duration::from_micros(12_900),
            kind: Kind::Forward,
            rule: "r.txt:2".into(),
            action: FlowAction::Upstream("127.0.0.1:3128".into()),
            policy: "fixed chunk=512 delay=0ms dir=up".into(),
            dns: "system/miss".into(),
            error: None,
            started: 1.5,
            host: "a.test".into(),
            port: 8080,
            scheme: "http".into(),
            mode: "segment_upstream".into(),
            outcome: Outcome::Ok,
            ..Default::default()
        }
    }

    #[test]
    fn segmentedproxy_access_line_then_ours() {
        assert_eq!(
            flow().to_line(),
            "ACCESS rid=3.1 method=GET host=a.test port=8080 scheme=http action=upstream mode=segment_upstream strategy=fixed dur_ms=12 \
             dns=system cache=miss transport=udp fallback=0 bytes_up=5 bytes_down=1000 status=200 client=127.0.0.1:5555 \
             target=http://a.test:8080/x kind=forward rule=r.txt:2 upstream=127.0.0.1:3128 policy=\"fixed chunk=512 delay=0ms dir=up\" \
             outcome=ok"
        );
        // Refused before a decision: SegmentedProxy's placeholders; no DNS fields.
        let r = Flow {
            id: "1.1".into(),
            method: "-".into(),
            status: 400,
            kind: Kind::Error,
            policy: "none".into(),
            error: Some("bad \"head\"".into()),
            outcome: Outcome::Rejected,
            ..Default::default()
        };
        assert_eq!(
            r.to_line(),
            "ACCESS rid=1.1 method=- host=- port=0 scheme=- action=- mode=direct strategy=none dur_ms=0 bytes_up=0 bytes_down=0 \
             status=400 client=- target=- kind=error rule=- policy=\"none\" outcome=rejected error=\"bad 'head'\""
        );
        let r = Flow {
            dns: "via 127.0.0.1:3128".into(),
            ..flow()
        };
        assert!(
            r.to_line().contains(" bytes_up=5 ") && r.to_line().contains(" via=127.0.0.1:3128"),
            "{}",
            r.to_line()
        );
        assert!(!r.to_line().contains(" dns="));
        let r = Flow {
            dns: "custom/hit".into(),
            ..flow()
        };
        assert!(
            r.to_line()
                .contains(" dns=custom cache=hit transport=- fallback=- "),
            "{}",
            r.to_line()
        );
    }

    #[test]
    fn access_json() {
        let j = flow().to_access_json();
        assert!(
            j.starts_with("{\"id\":\"3.1\",\"client\":\"127.0.0.1:5555\",\"method\":\"GET\","),
            "{j}"
        );
        assert!(
            j.contains("\"duration\":0.0129,")
                && j.contains("\"error\":null,")
                && j.contains("\"port\":8080,")
                && j.contains("\"action\":\"upstream:127.0.0.1:3128\""),
            "{j}"
        );
        assert!(
            j.contains("\"line\":\"ACCESS rid=3.1 ") && j.contains("policy=\\\"fixed"),
            "{j}"
        );
        let odd = Flow {
            error: Some("a\"b\\c\nd\u{1}".into()),
            ..flow()
        };
        let v: serde_json::Value = serde_json::from_str(&odd.to_access_json()).unwrap();
        assert_eq!(v["error"], "a\"b\\c\nd\u{1}");
        assert_eq!(v["kind"], "forward");
        assert_eq!(v["outcome"], "ok");
    }

    #[test]
    fn flow_json_lists_chunks_and_short_ones() {
        let chunks = Chunks {
            events: vec![
                ChunkEvent {
                    direction: "up",
                    size: 100,
                    t: 0.000_001_4,
                    short: None,
                },
                ChunkEvent {
                    direction: "up",
                    size: 7,
                    t: 0.5,
                    short: Some(ShortChunk::End),
                },
            ],
            dropped: 0,
        };
        let j = FlowView::new(&flow(), &chunks).to_json();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["chunks"][0], serde_json::json!(["up", 100, 0.000001]));
        assert_eq!(v["short_chunks"], serde_json::json!([[1, "end"]]));
        assert_eq!(v["action"], "upstream:127.0.0.1:3128");
    }
}
