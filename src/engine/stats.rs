//! What a running server has done, counted with atomics (no lock on the traffic path): open
//! connections, tunnels and interceptions, requests, bytes each way, and finished exchanges by
//! outcome. `server.stats()` reads a [`StatsSnapshot`]; `/metrics` (see
//! [`super::metrics_http`]) encodes one in Prometheus text format with `prometheus-client`.
//!
//! Requests, bytes and outcomes are all counted in one place, when an access record is
//! written ([`Stats::record_finished`], called as the counters' flow sink): every
//! exchange leaves exactly one record, whatever path it ends on, so the counts agree with the
//! access log. Gauges of what is open now are RAII guards held while it is open
//! ([`Stats::tunnel_opened`], [`Stats::intercept_opened`]); open client connections are the
//! server's own count (`Engine::active_connections`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::outcome::Outcome;

/// Every outcome that is not `ok`, in the order `errors` lists them.
pub const ERROR_OUTCOMES: [Outcome; 9] = [
    Outcome::Blocked,
    Outcome::Rejected,
    Outcome::RefusedLimit,
    Outcome::Error,
    Outcome::ClientAborted,
    Outcome::OriginAborted,
    Outcome::IdleTimeout,
    Outcome::CutAtShutdown,
    Outcome::Fault,
];

/// The counters of one server. Held by its access log, which every finished exchange passes
/// through; reached as `engine.stats()`.
#[derive(Default)]
pub struct Stats {
    connections_total: AtomicU64,
    requests_total: AtomicU64,
    tunnels_open: AtomicU64,
    tunnels_total: AtomicU64,
    intercepts_open: AtomicU64,
    intercepts_total: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    errors: [AtomicU64; ERROR_OUTCOMES.len()],
    /// Where `/metrics` is served, with the task serving it (see [`super::metrics_http`]).
    pub(super) endpoint: Mutex<Option<(SocketAddr, tokio::task::JoinHandle<()>)>>,
}

/// Keeps a gauge one higher while it lives.
#[must_use = "the gauge goes back down when this guard is dropped"]
pub struct Open<'a>(&'a AtomicU64);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn open<'a>(gauge: &'a AtomicU64, total: &AtomicU64) -> Open<'a> {
    total.fetch_add(1, Ordering::Relaxed);
    gauge.fetch_add(1, Ordering::Relaxed);
    Open(gauge)
}

impl Stats {
    /// A client connection was accepted (including one then refused at the limit).
    pub fn connection_accepted(&self) {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A CONNECT tunnel was established (its 200 sent); open until the guard drops.
    pub fn tunnel_opened(&self) -> Open<'_> {
        open(&self.tunnels_open, &self.tunnels_total)
    }

    /// A CONNECT is being intercepted (its 200 sent, TLS to be terminated here); open until
    /// the guard drops.
    pub fn intercept_opened(&self) -> Open<'_> {
        open(&self.intercepts_open, &self.intercepts_total)
    }

    /// One access record was written: one request (or CONNECT, or refused connection)
    /// finished, with its bytes and outcome.
    pub fn record_finished(&self, outcome: Outcome, bytes_up: u64, bytes_down: u64) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        self.bytes_up.fetch_add(bytes_up, Ordering::Relaxed);
        self.bytes_down.fetch_add(bytes_down, Ordering::Relaxed);
        if let Some(i) = ERROR_OUTCOMES.iter().position(|o| *o == outcome) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters now, with `connections_open` as given (the server counts those).
    pub fn snapshot(&self, connections_open: usize) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            connections_open: connections_open as u64,
            connections_total: get(&self.connections_total),
            requests_total: get(&self.requests_total),
            tunnels_open: get(&self.tunnels_open),
            tunnels_total: get(&self.tunnels_total),
            intercepts_open: get(&self.intercepts_open),
            intercepts_total: get(&self.intercepts_total),
            bytes_up: get(&self.bytes_up),
            bytes_down: get(&self.bytes_down),
            errors: std::array::from_fn(|i| (ERROR_OUTCOMES[i], get(&self.errors[i]))),
        }
    }

    /// Where `/metrics` is served, if it is (None once the server has shut down).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(addr, _)| *addr)
    }
}

/// The counters at one moment (the fields of `server.stats()`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Client connections open now.
    pub connections_open: u64,
    /// Client connections accepted, including those refused at the connection limit.
    pub connections_total: u64,
    /// Access records written: requests forwarded, answered or rejected (inside intercepted
    /// connections too), CONNECTs, and connections refused at the limit.
    pub requests_total: u64,
    pub tunnels_open: u64,
    pub tunnels_total: u64,
    pub intercepts_open: u64,
    pub intercepts_total: u64,
    /// Bytes client -> destination, as access records count them (request bodies; all bytes
    /// of a tunnel), added when each record is written.
    pub bytes_up: u64,
    /// Bytes destination -> client, likewise (response bodies; all bytes of a tunnel).
    pub bytes_down: u64,
    /// Finished records by outcome, for every outcome but `ok`.
    pub errors: [(Outcome, u64); ERROR_OUTCOMES.len()],
}

/// The Content-Type of [`StatsSnapshot::to_prometheus_text`].
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl StatsSnapshot {
    /// The snapshot in the Prometheus text exposition format (version 0.0.4), every metric
    /// named `segproxy_...`.
    pub fn to_prometheus_text(&self) -> String {
        let mut registry = Registry::with_prefix("segproxy");
        registry.register_collector(Box::new(self.clone()));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value as i64);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A counter with one label, one sample per value.
fn labelled_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    samples: &[(&'static str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for &(value, n) in samples {
        let labels = [(label, value)];
        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StatsSnapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Counters are named without `_total`: the encoder adds it.
        gauge(
            &mut e,
            "connections_open",
            "Client connections open now.",
            self.connections_open,
        )?;
        counter(
            &mut e,
            "connections",
            "Client connections accepted, including those refused at the connection limit.",
            self.connections_total,
        )?;
        counter(
            &mut e,
            "requests",
            "Requests finished, one per access record: forwarded or answered requests (also inside intercepted connections), CONNECTs, rejected requests and connections refused at the limit.",
            self.requests_total,
        )?;
        gauge(
            &mut e,
            "tunnels_open",
            "CONNECT tunnels open now (bytes relayed untouched).",
            self.tunnels_open,
        )?;
        counter(
            &mut e,
            "tunnels",
            "CONNECT tunnels established.",
            self.tunnels_total,
        )?;
        gauge(
            &mut e,
            "intercepts_open",
            "Intercepted CONNECTs open now (TLS terminated by the proxy).",
            self.intercepts_open,
        )?;
        counter(
            &mut e,
            "intercepts",
            "CONNECTs intercepted (TLS terminated by the proxy).",
            self.intercepts_total,
        )?;
        labelled_counter(
            &mut e,
            "bytes",
            "Bytes relayed as access records count them (request and response bodies, all bytes of a tunnel), by direction: up is client to destination, down destination to client; added when a request or tunnel finishes.",
            "direction",
            &[("up", self.bytes_up), ("down", self.bytes_down)],
        )?;
        let errors: Vec<(&'static str, u64)> =
            self.errors.iter().map(|(o, n)| (o.as_str(), *n)).collect();
        labelled_counter(
            &mut e,
            "errors",
            "Requests that did not finish ok, by outcome (as in the access record).",
            "outcome",
            &errors,
        )
    }
}

impl super::flow::FlowSink for Stats {
    fn finished(
        &self,
        flow: &std::sync::Arc<super::flow::Flow>,
        _chunks: Option<&std::sync::Arc<super::flow::Chunks>>,
    ) {
        self.record_finished(flow.outcome, flow.bytes_up, flow.bytes_down);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_count_requests_bytes_and_outcomes() {
        let stats = Stats::default();
        stats.connection_accepted();
        stats.connection_accepted();
        stats.record_finished(Outcome::Ok, 10, 1000);
        stats.record_finished(Outcome::Blocked, 0, 0);
        stats.record_finished(Outcome::Rejected, 0, 0);
        stats.record_finished(Outcome::Rejected, 3, 0);
        let s = stats.snapshot(1);
        assert_eq!(s.connections_open, 1);
        assert_eq!(s.connections_total, 2);
        assert_eq!(s.requests_total, 4);
        assert_eq!((s.bytes_up, s.bytes_down), (13, 1000));
        let count = |o: Outcome| s.errors.iter().find(|(x, _)| *x == o).unwrap().1;
        assert_eq!(count(Outcome::Blocked), 1);
        assert_eq!(count(Outcome::Rejected), 2);
        assert_eq!(count(Outcome::Error), 0);
        assert_eq!(s.errors.iter().map(|(_, n)| n).sum::<u64>(), 3);
    }

    #[test]
    fn gauges_follow_their_guards() {
        let stats = Stats::default();
        let a = stats.tunnel_opened();
        let b = stats.tunnel_opened();
        let i = stats.intercept_opened();
        let s = stats.snapshot(0);
        assert_eq!((s.tunnels_open, s.tunnels_total), (2, 2));
        assert_eq!((s.intercepts_open, s.intercepts_total), (1, 1));
        drop(a);
        drop(i);
        let s = stats.snapshot(0);
        assert_eq!((s.tunnels_open, s.tunnels_total), (1, 2));
        assert_eq!((s.intercepts_open, s.intercepts_total), (0, 1));
        drop(b);
        assert_eq!(stats.snapshot(0).tunnels_open, 0);
    }

    #[test]
    fn prometheus_text_names_every_metric_with_help_and_type() {
        let stats = Stats::default();
        stats.connection_accepted();
        stats.record_finished(Outcome::Ok, 5, 70);
        stats.record_finished(Outcome::CutAtShutdown, 0, 2);
        let _t = stats.tunnel_opened();
        let text = stats.snapshot(3).to_prometheus_text();
        let expected = "\
# HELP segproxy_connections_open Client connections open now.
# TYPE segproxy_connections_open gauge
segproxy_connections_open 3
# HELP segproxy_connections_total Client connections accepted, including those refused at the connection limit.
# TYPE segproxy_connections_total counter
segproxy_connections_total 1
";
        assert!(text.starts_with(expected), "{text}");
        for line in [
            "# TYPE segproxy_requests_total counter",
            "segproxy_requests_total 2",
            "# TYPE segproxy_tunnels_open gauge",
            "segproxy_tunnels_open 1",
            "segproxy_tunnels_total 1",
            "segproxy_intercepts_open 0",
            "segproxy_intercepts_total 0",
            "# TYPE segproxy_bytes_total counter",
            "segproxy_bytes_total{direction=\"up\"} 5",
            "segproxy_bytes_total{direction=\"down\"} 72",
            "# TYPE segproxy_errors_total counter",
            "segproxy_errors_total{outcome=\"blocked\"} 0",
            "segproxy_errors_total{outcome=\"refused_limit\"} 0",
            "segproxy_errors_total{outcome=\"cut_at_shutdown\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        // Every sample has HELP and TYPE; every counter ends in _total; no OpenMetrics EOF.
        let mut families = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families += 1;
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(name.starts_with("segproxy_"), "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
                assert!(text.contains(&format!("# HELP {name} ")), "{name}: no HELP");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(text.contains(&format!("# TYPE {name} ")), "{line}: no TYPE");
            }
        }
        assert_eq!(families, 9, "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("segproxy_errors_total{"))
                .count(),
            ERROR_OUTCOMES.len()
        );
    }
}
