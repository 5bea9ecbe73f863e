//! Access records: one per forwarded request or tunnel, written as a log line and kept in a
//! bounded in-memory ring for programs (and notebooks) to read.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::flows::FlowHandle;

/// What happened to a flow, as its access and flow records say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// Still running (never seen in a written record).
    #[default]
    Unfinished,
    /// The exchange completed, or the tunnel ended with both sides closing.
    Ok,
    /// A rule, the handler or the destination filter refused it (403).
    Blocked,
    /// The request could not be accepted as sent (400, 408, 431).
    Rejected,
    /// The server was at its connection limit (503).
    RefusedLimit,
    /// The proxy answered an error (502, 504...) or a tunnel failed.
    Error,
    /// The client went away before the exchange completed.
    ClientAborted,
    /// The destination cut the response after it had started.
    OriginAborted,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// The server shut down and cut it at the shutdown deadline.
    CutAtShutdown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Unfinished => "unfinished",
            Outcome::Ok => "ok",
            Outcome::Blocked => "blocked",
            Outcome::Rejected => "rejected",
            Outcome::RefusedLimit => "refused_limit",
            Outcome::Error => "error",
            Outcome::ClientAborted => "client_aborted",
            Outcome::OriginAborted => "origin_aborted",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::CutAtShutdown => "cut_at_shutdown",
        }
    }

    /// The outcome of an error answer with this status.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            403 => Outcome::Blocked,
            503 => Outcome::RefusedLimit,
            400..=499 => Outcome::Rejected,
            _ => Outcome::Error,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct AccessRecord {
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
    /// "tunnel", "forward", "intercept", "block", "error".
    pub kind: String,
    pub rule: String,
    pub action: String,
    pub policy: String,
    pub dns: String,
    pub error: Option<String>,
    /// Seconds since the Unix epoch when the exchange started.
    pub started: f64,
    pub outcome: Outcome,
}

impl AccessRecord {
    pub fn to_line(&self) -> String {
        let client = self.client.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        let mut line = format!(
            "{id} {client} {method} {target} {status} up={up} down={down} {ms:.1}ms kind={kind} rule={rule} action={action} policy=\"{policy}\" dns={dns}",
            id = self.id,
            method = self.method,
            target = self.target,
            status = self.status,
            up = self.bytes_up,
            down = self.bytes_down,
            ms = self.duration.as_secs_f64() * 1000.0,
            kind = self.kind,
            rule = or_dash(&self.rule),
            action = or_dash(&self.action),
            policy = self.policy,
            dns = or_dash(&self.dns),
        );
        line.push_str(" outcome=");
        line.push_str(self.outcome.as_str());
        if let Some(e) = &self.error {
            line.push_str(&format!(" error=\"{}\"", e.replace('"', "'")));
        }
        line
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn now_epoch() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
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
    recent: Mutex<VecDeque<AccessRecord>>,
    capacity: usize,
}

impl AccessLog {
    /// `capacity` records are kept in memory (0 keeps none); `path` also appends lines to a file
    /// (`/dev/stdout` and `/dev/stderr` mean the process's own streams).
    pub fn new(path: Option<&Path>, capacity: usize) -> std::io::Result<Self> {
        let file = match path {
            Some(p) if p == Path::new("/dev/stdout") => Some(Mutex::new(Sink::Stdout)),
            Some(p) if p == Path::new("/dev/stderr") => Some(Mutex::new(Sink::Stderr)),
            Some(p) => Some(Mutex::new(Sink::File(LineWriter::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p)?,
            )))),
            None => None,
        };
        Ok(AccessLog { file, recent: Mutex::new(VecDeque::new()), capacity })
    }

    pub fn record(&self, record: AccessRecord) {
        if let Some(sink) = &self.file {
            let line = record.to_line();
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
    pub fn new(log: &'a AccessLog, closing: &'a watch::Receiver<bool>, record: AccessRecord) -> Self {
        PendingRecord { log, closing, record, flow: None, written: false }
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
            record.outcome = if *self.closing.borrow() { Outcome::CutAtShutdown } else { Outcome::ClientAborted };
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
