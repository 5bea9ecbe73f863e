//! Where finished flows go: a server's `Sinks` (every consumer of flow records is a
//! [`FlowSink`]), and `FlowGuard`, a flow being filled in as it goes and handed to them once.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::access::{AccessLog, AccessRing};
use super::flow::{now_epoch, ChunkLog, Chunks, Flow, FlowSink, Outcome};
use super::flows::{FlowRecorder, FlowStore};
use super::stats::Stats;

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

/// A flow being filled as it goes; handed to the sinks once, when committed or dropped.
///
/// A flow dropped before its outcome was set was cut off (its future dropped), which
/// happens at the shutdown deadline ([`Outcome::CutAtShutdown`]) or when the client's
/// connection task ended under it ([`Outcome::ClientAborted`]).
pub struct FlowGuard<'a> {
    sinks: &'a Sinks,
    closing: &'a watch::Receiver<bool>,
    flow: Flow,
    written: bool,
}

impl<'a> FlowGuard<'a> {
    /// Starts a flow now (its `started` and `start` are set here).
    pub fn begin(sinks: &'a Sinks, closing: &'a watch::Receiver<bool>, mut flow: Flow) -> Self {
        flow.started = now_epoch();
        // The monotonic start and end (and the chunks) are for the flow records' sinks only:
        // without them a request reads no more clocks than it needs.
        if sinks.records_chunks() {
            flow.start = sinks.now();
            flow.chunk_log = Some(ChunkLog::new(sinks.epoch()));
        }
        FlowGuard {
            sinks,
            closing,
            flow,
            written: false,
        }
    }

    /// Hands the flow to the sinks now.
    pub fn commit(mut self) {
        self.write();
    }

    fn write(&mut self) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let mut flow = std::mem::take(&mut self.flow);
        if flow.outcome == Outcome::Unfinished {
            flow.outcome = if *self.closing.borrow() {
                Outcome::CutAtShutdown
            } else {
                Outcome::ClientAborted
            };
        }
        flow.settle_faults(self.sinks.epoch());
        // Chunks observed after this (by a writer that outlives its flow) are not recorded.
        let chunks = flow.chunk_log.take().map(|log| log.take());
        if chunks.is_some() {
            flow.end = Some(self.sinks.now());
        }
        self.sinks.finish(flow, chunks);
    }
}

impl Deref for FlowGuard<'_> {
    type Target = Flow;
    fn deref(&self) -> &Flow {
        &self.flow
    }
}

impl DerefMut for FlowGuard<'_> {
    fn deref_mut(&mut self) -> &mut Flow {
        &mut self.flow
    }
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        self.write();
    }
}
