//! Flow records for experiments: per flow, its decision and every segmented chunk written
//! (direction, size, monotonic time). Opt-in, bounded in memory, optionally written as JSON lines.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::ser::SerializeTuple;
use serde::{Serialize, Serializer};

use super::outcome::{Kind, Outcome, Text};
use super::segment::{ChunkObserver, ShortChunk};

/// Most chunks kept per flow; later chunks are counted but not stored.
pub const MAX_CHUNKS_PER_FLOW: usize = 100_000;
/// Most chunks kept across the finished flows held in memory (32 bytes each, so about
/// 32 MiB); the oldest flows are let go first.
pub const MAX_STORED_CHUNKS: usize = 1_000_000;

#[derive(Clone, Debug, PartialEq)]
pub struct ChunkEvent {
    /// "up" (client -> destination) or "down".
    pub direction: &'static str,
    pub size: usize,
    /// Seconds since the recorder started (monotonic clock) when the chunk started.
    pub t: f64,
    /// Set when the chunk is shorter than the policy asked, and why.
    pub short: Option<ShortChunk>,
}

/// One flow record; serialised (serde) as a line of the flows file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlowRecord {
    pub id: String,
    pub kind: Kind,
    pub method: String,
    pub target: String,
    pub rule: Text,
    pub action: Text,
    pub policy: Text,
    pub direction: String,
    /// Seconds since the recorder started when the flow began and ended.
    #[serde(serialize_with = "micro_seconds")]
    pub start: f64,
    #[serde(serialize_with = "micro_seconds_opt")]
    pub end: Option<f64>,
    pub chunks: Vec<ChunkEvent>,
    pub dropped_chunks: u64,
    /// The status the client got (0 if none: the connection ended first).
    pub status: u16,
    /// Why the flow failed, if it did.
    pub error: Option<String>,
    pub outcome: Outcome,
}

impl FlowRecord {
    /// The record as its consumers see it: its fields and `short_chunks` as `[index, why]`.
    pub fn view(&self) -> FlowView<'_> {
        let short_chunks = self
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.short.map(|why| (i, why.as_str())))
            .collect();
        FlowView {
            record: self,
            short_chunks,
        }
    }

    /// The record as one JSON object (a line of the flows file).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.view()).unwrap_or_default()
    }
}

/// A flow record with its short chunks listed: what JSON lines and Python's dicts hold.
#[derive(Serialize)]
pub struct FlowView<'a> {
    #[serde(flatten)]
    record: &'a FlowRecord,
    short_chunks: Vec<(usize, &'static str)>,
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

/// Keeps the last `capacity` finished flows (and at most `MAX_STORED_CHUNKS` chunks among
/// them); one flow in progress is a `FlowHandle`. Capacity 0 keeps none in memory (a
/// recorder that only writes its file).
pub struct FlowRecorder {
    epoch: Instant,
    capacity: usize,
    done: Mutex<Finished>,
    file: Option<Mutex<LineWriter<File>>>,
}

#[derive(Default)]
struct Finished {
    flows: VecDeque<FlowRecord>,
    chunks: usize,
}

impl FlowRecorder {
    pub fn new(capacity: usize, path: Option<&Path>) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(Mutex::new(LineWriter::new(File::create(p)?))),
            None => None,
        };
        Ok(FlowRecorder {
            epoch: Instant::now(),
            capacity,
            done: Mutex::new(Finished::default()),
            file,
        })
    }

    pub fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    pub fn begin(self: &Arc<Self>, mut record: FlowRecord) -> FlowHandle {
        record.start = self.now();
        FlowHandle {
            inner: Arc::new(InProgress {
                recorder: self.clone(),
                record: Mutex::new(record),
            }),
        }
    }

    fn finish(&self, mut record: FlowRecord) {
        record.end = Some(self.now());
        if let Some(f) = &self.file {
            let _ = writeln!(
                f.lock().unwrap_or_else(|e| e.into_inner()),
                "{}",
                record.to_json()
            );
        }
        if self.capacity == 0 {
            return;
        }
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.chunks += record.chunks.len();
        done.flows.push_back(record);
        while done.flows.len() > self.capacity
            || (done.chunks > MAX_STORED_CHUNKS && done.flows.len() > 1)
        {
            if let Some(old) = done.flows.pop_front() {
                done.chunks -= old.chunks.len();
            }
        }
    }

    pub fn flows(&self) -> Vec<FlowRecord> {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flows
            .iter()
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Finished::default();
    }
}

/// A flow being recorded. Finished (and stored) when the last clone is dropped, whatever
/// path the flow ended on, or on `finish`.
#[derive(Clone)]
pub struct FlowHandle {
    inner: Arc<InProgress>,
}

struct InProgress {
    recorder: Arc<FlowRecorder>,
    record: Mutex<FlowRecord>,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let record = std::mem::take(&mut *self.record.lock().unwrap_or_else(|e| e.into_inner()));
        self.recorder.finish(record);
    }
}

impl FlowHandle {
    pub fn update(&self, f: impl FnOnce(&mut FlowRecord)) {
        f(&mut self.inner.record.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// An observer for the segmenting writer of one direction.
    pub fn observer(&self, direction: &'static str) -> ChunkObserver {
        let handle = self.clone();
        Arc::new(move |size, short, at: Instant| {
            let t = at
                .saturating_duration_since(handle.inner.recorder.epoch)
                .as_secs_f64();
            let mut r = handle
                .inner
                .record
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if r.chunks.len() < MAX_CHUNKS_PER_FLOW {
                r.chunks.push(ChunkEvent {
                    direction,
                    size,
                    t,
                    short,
                });
            } else {
                r.dropped_chunks += 1;
            }
        })
    }

    /// Ends the flow now (observers still held elsewhere keep it open until they go).
    pub fn finish(self) {
        drop(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(recorder: &Arc<FlowRecorder>, id: &str, chunks: usize) {
        let f = recorder.begin(FlowRecord {
            id: id.into(),
            ..Default::default()
        });
        let observe = f.observer("up");
        for _ in 0..chunks {
            observe(10, None, Instant::now());
        }
    }

    #[test]
    fn dropped_handles_finish_their_flow_and_memory_stays_bounded() {
        let recorder = Arc::new(FlowRecorder::new(3, None).unwrap());
        for i in 0..5 {
            flow(&recorder, &i.to_string(), 2);
        }
        let ids: Vec<String> = recorder.flows().into_iter().map(|f| f.id).collect();
        assert_eq!(ids, ["2", "3", "4"]);
        assert!(recorder
            .flows()
            .iter()
            .all(|f| f.end.is_some() && f.chunks.len() == 2));

        // The chunk budget lets old flows go before the flow count does.
        let recorder = Arc::new(FlowRecorder::new(1000, None).unwrap());
        for i in 0..3 {
            flow(&recorder, &i.to_string(), MAX_CHUNKS_PER_FLOW + 5);
        }
        let kept = recorder.flows();
        assert!(kept.iter().map(|f| f.chunks.len()).sum::<usize>() <= MAX_STORED_CHUNKS);
        assert_eq!(kept.last().unwrap().id, "2");
        assert_eq!(kept.last().unwrap().dropped_chunks, 5);

        let file_only = Arc::new(FlowRecorder::new(0, None).unwrap());
        flow(&file_only, "x", 1);
        assert!(file_only.flows().is_empty());
    }
}
