//! Access records: one per forwarded request or tunnel, written as a log line and kept in a
//! bounded in-memory ring for programs (and notebooks) to read.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use tokio::sync::watch;

use super::flows::FlowHandle;
pub use super::outcome::{Kind, Outcome, Text};
use super::stats::Stats;

/// One access record; serialised (serde) as the JSON object of `--access-log-format json`
/// and `server.access_records()`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AccessRecord {
    /// Connection id, then request number on that connection: "12.3".
    pub id: String,
    #[serde(serialize_with = "display_or_null")]
    pub client: Option<SocketAddr>,
    pub method: String,
    pub target: String,
    /// Status sent to the client (200 for an established tunnel), 0 if none was sent.
    pub status: u16,
    /// Body bytes client -> destination (tunnel: all bytes).
    pub bytes_up: u64,
    /// Body bytes destination -> client (tunnel: all bytes).
    pub bytes_down: u64,
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
    pub kind: Kind,
    pub rule: Text,
    pub action: Text,
    pub policy: Text,
    pub dns: Text,
    pub error: Option<String>,
    /// Seconds since the Unix epoch when the exchange started.
    pub started: f64,
    pub outcome: Outcome,
    /// The destination as the rules saw it ("-" and 0 before it was known).
    pub host: String,
    pub port: u16,
    /// "http" or "https" ("-" before it was known).
    pub scheme: Text,
    /// The mode word of the rule that decided ("direct", "segment_upstream", ...).
    pub mode: Text,
}

impl AccessRecord {
    /// SegmentedProxy's access line, its fields in its order (`ACCESS rid= method= host=
    /// port= scheme= action= mode= strategy= dur_ms=`, then `dns= cache= transport=
    /// fallback=` when a name was resolved, `bytes_up= bytes_down=`), then ours: `status=
    /// client= target= kind= rule= [upstream=] policy="..." [via=] [error="..."]`.
    pub fn to_line(&self) -> String {
        use std::fmt::Write as _;
        let (action, upstream) = match self.action.split_once(':') {
            Some((a, hop)) => (a, Some(hop)),
            None => (or_dash(&self.action), None),
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

    /// The record as its consumers see it: its fields and the text line as `line`.
    pub fn view(&self) -> AccessView<'_> {
        AccessView {
            record: self,
            line: self.to_line(),
        }
    }

    /// One JSON object with the fields of `server.access_records()` (`--access-log-format json`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.view()).unwrap_or_default()
    }
}

/// An access record with its text line: what JSON lines and Python's dicts hold.
#[derive(Serialize)]
pub struct AccessView<'a> {
    #[serde(flatten)]
    record: &'a AccessRecord,
    line: String,
}

fn display_or_null<S: Serializer, T: std::fmt::Display>(
    value: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Python logging's default `asctime` in local time (`2026-12-02 16:21:42,123`), which
/// starts SegmentedProxy's log lines.
pub fn asctime(epoch: f64) -> String {
    let secs = epoch.floor() as libc::time_t;
    let millis = ((epoch - epoch.floor()) * 1000.0) as u32;
    // SAFETY: localtime_r writes only into `tm`, which lives on this stack frame.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
    if !ok {
        return format!("{epoch:.3}");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02},{millis:03}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Where access lines go besides memory.
enum Sink {
    File(LineWriter<File>),
    /// The process's own stream, written through Rust's handle: reopening `/dev/stderr`
    /// would get a file offset of its own and overwrite other output sent to a file there.
    Stdout,
    Stderr,
}

pub struct AccessLog {
    file: Option<Mutex<Sink>>,
    /// One JSON object a line instead of SegmentedProxy's text line.
    json: bool,
    recent: Mutex<VecDeque<AccessRecord>>,
    capacity: usize,
    /// The server's counters: every record written is counted here (requests, bytes,
    /// outcomes), so they agree with the log.
    pub stats: Stats,
}

impl AccessLog {
    /// `capacity` records are kept in memory (0 keeps none); `path` also appends lines to a file
    /// (`/dev/stdout` and `/dev/stderr` mean the process's own streams).
    pub fn new(path: Option<&Path>, capacity: usize) -> std::io::Result<Self> {
        let file = match path {
            Some(p) if p == Path::new("/dev/stdout") => Some(Mutex::new(Sink::Stdout)),
            Some(p) if p == Path::new("/dev/stderr") => Some(Mutex::new(Sink::Stderr)),
            Some(p) => Some(Mutex::new(Sink::File(LineWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )))),
            None => None,
        };
        Ok(AccessLog {
            file,
            json: false,
            recent: Mutex::new(VecDeque::new()),
            capacity,
            stats: Stats::default(),
        })
    }

    /// Writes one JSON object a line (the fields of `access_records()`) instead of text.
    pub fn json(mut self, on: bool) -> Self {
        self.json = on;
        self
    }

    pub fn record(&self, record: AccessRecord) {
        self.stats
            .record_finished(record.outcome, record.bytes_up, record.bytes_down);
        if let Some(sink) = &self.file {
            let line = if self.json {
                record.to_json()
            } else {
                // As SegmentedProxy's logging prints it: time, level, message.
                format!("{} INFO {}", asctime(now_epoch()), record.to_line())
            };
            let _ = match &mut *sink.lock().unwrap_or_else(|e| e.into_inner()) {
                Sink::File(f) => writeln!(f, "{line}"),
                Sink::Stdout => writeln!(std::io::stdout().lock(), "{line}"),
                Sink::Stderr => writeln!(std::io::stderr().lock(), "{line}"),
            };
        }
        log::info!(target: "segproxy::access", "{}", record.to_line());
        if self.capacity > 0 {
            let mut recent = self.recent.lock().unwrap();
            if recent.len() >= self.capacity {
                recent.pop_front();
            }
            recent.push_back(record);
        }
    }

    pub fn recent(&self) -> Vec<AccessRecord> {
        self.recent.lock().unwrap().iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.recent.lock().unwrap().clear();
    }
}

/// An access record being filled as its flow goes; written once, when committed or dropped.
///
/// Every connection the proxy touches leaves exactly one record, whatever path it ends on: a
/// record dropped before its outcome was set was cut off (its future dropped), which happens
/// at the shutdown deadline ([`Outcome::CutAtShutdown`]) or when the client's connection task
/// ended under it ([`Outcome::ClientAborted`]). A flow record attached with
/// [`PendingRecord::attach_flow`] gets the same status, error and outcome.
pub struct PendingRecord<'a> {
    log: &'a AccessLog,
    closing: &'a watch::Receiver<bool>,
    record: AccessRecord,
    flow: Option<FlowHandle>,
    written: bool,
}

impl<'a> PendingRecord<'a> {
    pub fn new(
        log: &'a AccessLog,
        closing: &'a watch::Receiver<bool>,
        record: AccessRecord,
    ) -> Self {
        PendingRecord {
            log,
            closing,
            record,
            flow: None,
            written: false,
        }
    }

    pub fn attach_flow(&mut self, flow: FlowHandle) {
        self.flow = Some(flow);
    }

    /// Writes the record now (and finishes the attached flow's copy of its facts).
    pub fn commit(mut self) {
        self.write();
    }

    fn write(&mut self) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let record = &mut self.record;
        if record.outcome == Outcome::Unfinished {
            record.outcome = if *self.closing.borrow() {
                Outcome::CutAtShutdown
            } else {
                Outcome::ClientAborted
            };
        }
        if let Some(flow) = self.flow.take() {
            flow.update(|f| {
                f.target.clone_from(&record.target);
                f.rule.clone_from(&record.rule);
                f.action.clone_from(&record.action);
                f.policy.clone_from(&record.policy);
                f.status = record.status;
                f.error.clone_from(&record.error);
                f.outcome = record.outcome;
            });
        }
        self.log.record(std::mem::take(record));
    }
}

impl Deref for PendingRecord<'_> {
    type Target = AccessRecord;
    fn deref(&self) -> &AccessRecord {
        &self.record
    }
}

impl DerefMut for PendingRecord<'_> {
    fn deref_mut(&mut self) -> &mut AccessRecord {
        &mut self.record
    }
}

impl Drop for PendingRecord<'_> {
    fn drop(&mut self) {
        self.write();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        AccessRecord {
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
            action: "upstream:127.0.0.1:3128".into(),
            policy: "fixed chunk=512 delay=0ms dir=up".into(),
            dns: "system/miss".into(),
            error: None,
            started: 1.5,
            host: "a.test".into(),
            port: 8080,
            scheme: "http".into(),
            mode: "segment_upstream".into(),
            outcome: Outcome::Ok,
        }
    }

    #[test]
    fn segmentedproxy_access_line_then_ours() {
        assert_eq!(
            record().to_line(),
            "ACCESS rid=3.1 method=GET host=a.test port=8080 scheme=http action=upstream mode=segment_upstream strategy=fixed dur_ms=12 \
             dns=system cache=miss transport=udp fallback=0 bytes_up=5 bytes_down=1000 status=200 client=127.0.0.1:5555 \
             target=http://a.test:8080/x kind=forward rule=r.txt:2 upstream=127.0.0.1:3128 policy=\"fixed chunk=512 delay=0ms dir=up\" \
             outcome=ok"
        );
        // Refused before a decision: SegmentedProxy's placeholders; no DNS fields.
        let r = AccessRecord {
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
        let r = AccessRecord {
            dns: "via 127.0.0.1:3128".into(),
            ..record()
        };
        assert!(
            r.to_line().contains(" bytes_up=5 ") && r.to_line().contains(" via=127.0.0.1:3128"),
            "{}",
            r.to_line()
        );
        assert!(!r.to_line().contains(" dns="));
        let r = AccessRecord {
            dns: "custom/hit".into(),
            ..record()
        };
        assert!(
            r.to_line()
                .contains(" dns=custom cache=hit transport=- fallback=- "),
            "{}",
            r.to_line()
        );
    }

    #[test]
    fn json_lines() {
        let j = record().to_json();
        assert!(
            j.starts_with("{\"id\":\"3.1\",\"client\":\"127.0.0.1:5555\",\"method\":\"GET\","),
            "{j}"
        );
        assert!(
            j.contains("\"duration\":0.0129,")
                && j.contains("\"error\":null,")
                && j.contains("\"port\":8080,"),
            "{j}"
        );
        assert!(
            j.contains("\"line\":\"ACCESS rid=3.1 ") && j.contains("policy=\\\"fixed"),
            "{j}"
        );
        let odd = AccessRecord {
            error: Some("a\"b\\c\nd\u{1}".into()),
            ..record()
        };
        let v: serde_json::Value = serde_json::from_str(&odd.to_json()).unwrap();
        assert_eq!(v["error"], "a\"b\\c\nd\u{1}");
        assert_eq!(v["kind"], "forward");
        assert_eq!(v["outcome"], "ok");
    }

    #[test]
    fn asctime_shape() {
        let t = asctime(1_700_000_000.25);
        assert_eq!(t.len(), "2023-11-14 22:13:20,250".len(), "{t}");
        assert!(t.ends_with(",250"), "{t}");
    }
}
