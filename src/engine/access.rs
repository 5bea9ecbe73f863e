//! The access log: a line per finished flow (SegmentedProxy's text line, or JSON), to a file
//! or the process's streams and the `segproxy::access` log target; and the ring of recent
//! flows that `server.access_records()` reads. Both are flow sinks.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::flow::{now_epoch, Chunks, Flow, FlowSink};

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

/// Where access lines go besides memory.
enum Target {
    File(LineWriter<File>),
    /// The process's own stream, written through Rust's handle: reopening `/dev/stderr`
    /// would get a file offset of its own and overwrite other output sent to a file there.
    Stdout,
    Stderr,
}

/// What `start_server` asks of the access log: a file (or stream) of lines, their format,
/// and how many recent records to keep in memory. `Sinks::new` splits it into its sinks.
pub struct AccessLog {
    lines: AccessLines,
    capacity: usize,
}

impl AccessLog {
    /// `capacity` records are kept in memory (0 keeps none); `path` also appends lines to a file
    /// (`/dev/stdout` and `/dev/stderr` mean the process's own streams).
    pub fn new(path: Option<&Path>, capacity: usize) -> std::io::Result<Self> {
        let target = match path {
            Some(p) if p == Path::new("/dev/stdout") => Some(Mutex::new(Target::Stdout)),
            Some(p) if p == Path::new("/dev/stderr") => Some(Mutex::new(Target::Stderr)),
            Some(p) => Some(Mutex::new(Target::File(LineWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )))),
            None => None,
        };
        Ok(AccessLog {
            lines: AccessLines {
                target,
                json: false,
            },
            capacity,
        })
    }

    /// Writes one JSON object a line (the fields of `access_records()`) instead of text.
    pub fn json(mut self, on: bool) -> Self {
        self.lines.json = on;
        self
    }

    /// The line writer (always: it also feeds the `segproxy::access` log target) and the ring.
    pub fn into_parts(self) -> (AccessLines, AccessRing) {
        (
            self.lines,
            AccessRing {
                recent: Mutex::new(VecDeque::new()),
                capacity: self.capacity,
            },
        )
    }
}

/// The access log's lines: to its file or stream, and to the `segproxy::access` log target.
pub struct AccessLines {
    target: Option<Mutex<Target>>,
    /// One JSON object a line instead of SegmentedProxy's text line.
    json: bool,
}

impl FlowSink for AccessLines {
    fn finished(&self, flow: &Arc<Flow>, _chunks: Option<&Arc<Chunks>>) {
        if let Some(target) = &self.target {
            let line = if self.json {
                flow.to_access_json()
            } else {
                // As SegmentedProxy's logging prints it: time, level, message.
                format!("{} INFO {}", asctime(now_epoch()), flow.to_line())
            };
            let _ = match &mut *target.lock().unwrap_or_else(|e| e.into_inner()) {
                Target::File(f) => writeln!(f, "{line}"),
                Target::Stdout => writeln!(std::io::stdout().lock(), "{line}"),
                Target::Stderr => writeln!(std::io::stderr().lock(), "{line}"),
            };
        }
        log::info!(target: "segproxy::access", "{}", flow.to_line());
    }
}

/// The most recent flows, for `server.access_records()`.
pub struct AccessRing {
    recent: Mutex<VecDeque<Arc<Flow>>>,
    capacity: usize,
}

impl AccessRing {
    pub fn recent(&self) -> Vec<Arc<Flow>> {
        self.lock().iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Flow>>> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FlowSink for AccessRing {
    fn finished(&self, flow: &Arc<Flow>, _chunks: Option<&Arc<Chunks>>) {
        if self.capacity == 0 {
            return;
        }
        let mut recent = self.lock();
        if recent.len() >= self.capacity {
            recent.pop_front();
        }
        recent.push_back(flow.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asctime_shape() {
        let t = asctime(1_700_000_000.25);
        assert_eq!(t.len(), "2023-11-14 22:13:20,250".len(), "{t}");
        assert!(t.ends_with(",250"), "{t}");
    }

    #[test]
    fn the_ring_keeps_the_latest() {
        let (_, ring) = AccessLog::new(None, 2).unwrap().into_parts();
        for id in ["1.1", "2.1", "3.1"] {
            let flow = Arc::new(Flow {
                id: id.into(),
                ..Default::default()
            });
            ring.finished(&flow, None);
        }
        let ids: Vec<_> = ring.recent().iter().map(|f| f.id.clone()).collect();
        assert_eq!(ids, ["2.1", "3.1"]);
    }
}
