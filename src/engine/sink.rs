//! Where finished flows go. Every consumer of flow records (the access log, the flows file,
//! the in-memory stores Python reads, the counters) is a `FlowSink`; a new export (HAR, a
//! database) is one more implementation, added to `Sinks::new`.

use std::sync::Arc;
use std::time::Instant;

use super::access::{AccessLog, AccessRing};
use super::flow::{Chunks, Flow};
use super::flows::{FlowRecorder, FlowStore};
use super::stats::Stats;

/// A consumer of finished flows.
pub trait FlowSink: Send + Sync {
    /// Whether this sink wants every chunk of every flow (recording them costs memory and a
    /// lock per chunk, so flows record chunks only when some sink wants them).
    fn wants_chunks(&self) -> bool {
        false
    }

    /// A flow finished; `chunks` are its chunks when some sink wants them.
    fn finished(&self, flow: &Arc<Flow>, chunks: Option<&Arc<Chunks>>);
}

/// The sinks of one server, and the stores among them that the binding reads.
pub struct Sinks {
    all: Vec<Arc<dyn FlowSink>>,
    /// Recent flows as access records (`server.access_records()`).
    pub access: Arc<AccessRing>,
    /// Recent flows with their chunks (`server.flows()`), when flows are recorded.
    pub flows: Option<Arc<FlowStore>>,
    /// The server's counters, counted from the same flows as the records.
    pub stats: Arc<Stats>,
    records_chunks: bool,
    epoch: Instant,
}

impl Sinks {
    pub fn new(access: AccessLog, flows: Option<Arc<FlowRecorder>>) -> Self {
        let stats = Arc::new(Stats::default());
        let (access_lines, ring) = access.into_parts();
        let ring = Arc::new(ring);
        let mut all: Vec<Arc<dyn FlowSink>> =
            vec![stats.clone(), ring.clone(), Arc::new(access_lines)];
        let mut store = None;
        if let Some(recorder) = flows {
            let (lines, memory) = recorder.parts();
            if let Some(lines) = lines {
                all.push(lines);
            }
            all.push(memory.clone());
            store = Some(memory);
        }
        let records_chunks = all.iter().any(|s| s.wants_chunks());
        Sinks {
            all,
            access: ring,
            flows: store,
            stats,
            records_chunks,
            epoch: Instant::now(),
        }
    }

    /// Whether flows record their chunks.
    pub fn records_chunks(&self) -> bool {
        self.records_chunks
    }

    /// The clock flow records count from.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Seconds on the flow records' clock, now.
    pub fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Hands a finished flow to every sink.
    pub fn finish(&self, flow: Flow, chunks: Option<Chunks>) {
        let flow = Arc::new(flow);
        let chunks = chunks.map(Arc::new);
        for sink in &self.all {
            sink.finished(&flow, chunks.as_ref());
        }
    }
}
