//! Flow records for experiments: per flow, its decision and every segmented chunk written
//! (direction, size, monotonic time). Opt-in, bounded in memory, optionally written as JSON lines.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::segment::ChunkObserver;

/// Most chunks kept per flow; later chunks are counted but not stored.
pub const MAX_CHUNKS_PER_FLOW: usize = 100_000;

#[derive(Clone, Debug, PartialEq)]
pub struct ChunkEvent {
    /// "up" (client -> destination) or "down".
    pub direction: &'static str,
    pub size: usize,
    /// Seconds since the recorder started (monotonic clock).
    pub t: f64,
}

#[derive(Clone, Debug, Default)]
pub struct FlowRecord {
    pub id: String,
    pub kind: String,
    pub method: String,
    pub target: String,
    pub rule: String,
    pub action: String,
    pub policy: String,
    pub direction: String,
    /// Seconds since the recorder started when the flow began and ended.
    pub start: f64,
    pub end: Option<f64>,
    pub chunks: Vec<ChunkEvent>,
    pub dropped_chunks: u64,
}

impl FlowRecord {
    pub fn to_json(&self) -> String {
        let chunks: Vec<String> = self
            .chunks
            .iter()
            .map(|c| format!("[\"{}\",{},{:.6}]", c.direction, c.size, c.t))
            .collect();
        format!(
            "{{\"id\":{},\"kind\":{},\"method\":{},\"target\":{},\"rule\":{},\"action\":{},\"policy\":{},\"direction\":{},\"start\":{:.6},\"end\":{},\"dropped_chunks\":{},\"chunks\":[{}]}}",
            json_str(&self.id),
            json_str(&self.kind),
            json_str(&self.method),
            json_str(&self.target),
            json_str(&self.rule),
            json_str(&self.action),
            json_str(&self.policy),
            json_str(&self.direction),
            self.start,
            self.end.map(|e| format!("{e:.6}")).unwrap_or_else(|| "null".into()),
            self.dropped_chunks,
            chunks.join(",")
        )
    }
}

pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Keeps the last `capacity` finished flows; one flow in progress is a `FlowHandle`.
pub struct FlowRecorder {
    epoch: Instant,
    capacity: usize,
    done: Mutex<VecDeque<FlowRecord>>,
    file: Option<Mutex<LineWriter<File>>>,
}

impl FlowRecorder {
    pub fn new(capacity: usize, path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(Mutex::new(LineWriter::new(File::create(p)?))),
            None => None,
        };
        Ok(FlowRecorder { epoch: Instant::now(), capacity: capacity.max(1), done: Mutex::new(VecDeque::new()), file })
    }

    pub fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    pub fn begin(self: &Arc<Self>, mut record: FlowRecord) -> FlowHandle {
        record.start = self.now();
        FlowHandle { recorder: self.clone(), record: Arc::new(Mutex::new(record)) }
    }

    fn finish(&self, mut record: FlowRecord) {
        record.end = Some(self.now());
        if let Some(f) = &self.file {
            let _ = writeln!(f.lock().unwrap(), "{}", record.to_json());
        }
        let mut done = self.done.lock().unwrap();
        if done.len() >= self.capacity {
            done.pop_front();
        }
        done.push_back(record);
    }

    pub fn flows(&self) -> Vec<FlowRecord> {
        self.done.lock().unwrap().iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.done.lock().unwrap().clear();
    }
}

/// A flow being recorded. Finished (and stored) when the last clone is dropped or on `finish`.
#[derive(Clone)]
pub struct FlowHandle {
    recorder: Arc<FlowRecorder>,
    record: Arc<Mutex<FlowRecord>>,
}

impl FlowHandle {
    pub fn update(&self, f: impl FnOnce(&mut FlowRecord)) {
        f(&mut self.record.lock().unwrap());
    }

    /// An observer for the segmenting writer of one direction.
    pub fn observer(&self, direction: &'static str) -> ChunkObserver {
        let handle = self.clone();
        Arc::new(move |size| {
            let t = handle.recorder.now();
            let mut r = handle.record.lock().unwrap();
            if r.chunks.len() < MAX_CHUNKS_PER_FLOW {
                r.chunks.push(ChunkEvent { direction, size, t });
            } else {
                r.dropped_chunks += 1;
            }
        })
    }

    pub fn finish(self) {
        let record = std::mem::take(&mut *self.record.lock().unwrap());
        self.recorder.finish(record);
    }
}
