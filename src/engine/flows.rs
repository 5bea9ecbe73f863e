//! Flow records for experiments: every flow with its chunks (direction, size, monotonic
//! time), kept in memory for Python (bounded) and/or written as JSON lines. Both are sinks.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::flow::{Chunks, Flow, FlowSink, FlowView};

pub use super::flow::MAX_CHUNKS_PER_FLOW;

/// Most chunks kept across the finished flows held in memory (32 bytes each, so about
/// 32 MiB); the oldest flows are let go first.
pub const MAX_STORED_CHUNKS: usize = 1_000_000;

/// What `start_server` asks of flow recording: the last `capacity` flows kept in memory
/// (0 keeps none) and/or every flow written to a file as a JSON line.
pub struct FlowRecorder {
    lines: Option<Arc<FlowLines>>,
    store: Arc<FlowStore>,
}

impl FlowRecorder {
    pub fn new(capacity: usize, path: Option<&Path>) -> std::io::Result<Self> {
        let lines = match path {
            Some(p) => Some(Arc::new(FlowLines(Mutex::new(LineWriter::new(
                File::create(p)?,
            ))))),
            None => None,
        };
        Ok(FlowRecorder {
            lines,
            store: Arc::new(FlowStore {
                capacity,
                done: Mutex::default(),
            }),
        })
    }

    /// Its sinks: the file's lines (if any) and the memory store.
    pub fn parts(&self) -> (Option<Arc<dyn FlowSink>>, Arc<FlowStore>) {
        (
            self.lines.clone().map(|l| l as Arc<dyn FlowSink>),
            self.store.clone(),
        )
    }
}

/// Flow records as JSON lines (`--record-flows FILE`).
pub struct FlowLines(Mutex<LineWriter<File>>);

impl FlowSink for FlowLines {
    fn wants_chunks(&self) -> bool {
        true
    }

    fn finished(&self, flow: &Arc<Flow>, chunks: Option<&Arc<Chunks>>) {
        let empty = Chunks::default();
        let line = FlowView::for_json(flow, chunks.map_or(&empty, |c| c)).to_json();
        let _ = writeln!(self.0.lock().unwrap_or_else(|e| e.into_inner()), "{line}");
    }
}

/// The last finished flows with their chunks, for `server.flows()`: at most `capacity`
/// flows and `MAX_STORED_CHUNKS` chunks among them.
pub struct FlowStore {
    capacity: usize,
    done: Mutex<Finished>,
}

#[derive(Default)]
struct Finished {
    flows: VecDeque<(Arc<Flow>, Arc<Chunks>)>,
    chunks: usize,
}

impl FlowStore {
    pub fn flows(&self) -> Vec<(Arc<Flow>, Arc<Chunks>)> {
        self.lock().flows.iter().cloned().collect()
    }

    pub fn clear(&self) {
        *self.lock() = Finished::default();
    }

    /// Whether finished flows are kept (a store of capacity 0 serves a flows file only).
    pub fn keeps_flows(&self) -> bool {
        self.capacity > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Finished> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FlowSink for FlowStore {
    fn wants_chunks(&self) -> bool {
        self.capacity > 0
    }

    fn finished(&self, flow: &Arc<Flow>, chunks: Option<&Arc<Chunks>>) {
        if self.capacity == 0 {
            return;
        }
        let chunks = chunks.cloned().unwrap_or_default();
        let mut done = self.lock();
        done.chunks += chunks.events.len();
        done.flows.push_back((flow.clone(), chunks));
        while done.flows.len() > self.capacity
            || (done.chunks > MAX_STORED_CHUNKS && done.flows.len() > 1)
        {
            if let Some((_, old)) = done.flows.pop_front() {
                done.chunks -= old.events.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::flow::ChunkEvent;

    fn finish(store: &FlowStore, id: &str, chunks: usize) {
        let flow = Arc::new(Flow {
            id: id.into(),
            ..Default::default()
        });
        let event = ChunkEvent {
            direction: "up",
            size: 10,
            t: 0.0,
            short: None,
        };
        let chunks = Arc::new(Chunks {
            events: vec![event; chunks.min(MAX_CHUNKS_PER_FLOW)],
            dropped: chunks.saturating_sub(MAX_CHUNKS_PER_FLOW) as u64,
        });
        store.finished(&flow, Some(&chunks));
    }

    #[test]
    fn memory_stays_bounded() {
        let (_, store) = FlowRecorder::new(3, None).unwrap().parts();
        for i in 0..5 {
            finish(&store, &i.to_string(), 2);
        }
        let ids: Vec<String> = store.flows().iter().map(|(f, _)| f.id.clone()).collect();
        assert_eq!(ids, ["2", "3", "4"]);

        // The chunk budget lets old flows go before the flow count does.
        let (_, store) = FlowRecorder::new(1000, None).unwrap().parts();
        for i in 0..3 {
            finish(&store, &i.to_string(), MAX_CHUNKS_PER_FLOW + 5);
        }
        let kept = store.flows();
        assert!(kept.iter().map(|(_, c)| c.events.len()).sum::<usize>() <= MAX_STORED_CHUNKS);
        assert_eq!(kept.last().unwrap().0.id, "2");
        assert_eq!(kept.last().unwrap().1.dropped, 5);

        let (_, file_only) = FlowRecorder::new(0, None).unwrap().parts();
        finish(&file_only, "x", 1);
        assert!(file_only.flows().is_empty());
        assert!(!file_only.wants_chunks());
    }
}
