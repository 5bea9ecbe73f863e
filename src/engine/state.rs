//! The shared state of one server (`Engine`) and its builder: everything a connection needs,
//! made once from the configuration and the parts built outside the engine.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

use super::access::AccessLog;
use super::ca::CertificateAuthority;
use super::config::EngineConfig;
use super::connector::Connector;
use super::flows::FlowRecorder;
use super::hooks::{Handler, HookSet, HookWaits};
use super::pool::Pool;
use super::rules::{Intercept, RuleSet};
use super::safety::DomainFilter;
use super::sink::Sinks;
use super::stats::{Stats, StatsSnapshot};
use super::tls::{origin_client_config, OriginTrust};

/// Everything a connection needs, shared by all connections of one server.
pub struct Engine {
    pub config: EngineConfig,
    pub connector: Connector,
    pub pool: Pool,
    /// Where finished flows go (access log, flow records, counters, Python's stores).
    pub sinks: Sinks,
    pub rules: RuleSet,
    pub filter: DomainFilter,
    /// With a CA, CONNECTs are intercepted unless a rule or the handler says otherwise.
    pub ca: Option<Arc<CertificateAuthority>>,
    /// How origins of intercepted flows are verified.
    pub origin_tls: Arc<rustls::ClientConfig>,
    pub handler: Option<Arc<dyn Handler>>,
    /// The hooks the handler implements, learnt once at start.
    pub hooks: HookSet,
    /// Waits for the handler's answers (a lone wait polls briefly before it parks).
    pub hook_waits: HookWaits,
    pub(crate) next_conn_id: AtomicU64,
    pub(crate) active: AtomicUsize,
    pub(crate) all_done: Notify,
    /// Becomes true when the server stops accepting: keep-alive connections then close
    /// after their current exchange.
    pub draining: watch::Receiver<bool>,
    /// Becomes true when in-flight exchanges are cut off.
    pub closing: watch::Receiver<bool>,
}

impl Engine {
    /// Builds the state from a configuration whose `max_connections` is already settled;
    /// also returns the senders that start draining and closing.
    pub fn build(
        config: EngineConfig,
        parts: EngineParts,
    ) -> io::Result<(Engine, watch::Sender<bool>, watch::Sender<bool>)> {
        let rules = parts.rules.unwrap_or_default();
        if parts.ca.is_none() {
            if let Some(rule) = rules.rules().iter().find(|r| r.intercept == Intercept::Yes) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("rule {} says intercept=yes but no CA is configured (--ca-dir or tls_store)", rule.source),
                ));
            }
        }
        let origin_tls = origin_client_config(&parts.origin_trust)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let filter = parts.filter.unwrap_or_default();
        let mut connector = parts
            .connector
            .unwrap_or_else(|| Connector::new(config.connect_timeout));
        if filter.deny_private {
            let f = filter.clone();
            connector.addr_check = Some(Box::new(move |ip| f.check_addr(ip)));
        }
        let hooks = parts
            .handler
            .as_ref()
            .map(|h| h.hooks())
            .unwrap_or_default();
        let (drain_tx, draining) = watch::channel(false);
        let (close_tx, closing) = watch::channel(false);
        let access = match parts.access {
            Some(a) => a,
            None => AccessLog::new(None, 10_000)?,
        };
        let engine = Engine {
            pool: Pool::new(config.pool_idle_timeout, config.pool_max_idle_per_host),
            config,
            connector,
            sinks: Sinks::new(access, parts.flows),
            rules,
            filter,
            ca: parts.ca,
            origin_tls,
            handler: parts.handler,
            hooks,
            hook_waits: HookWaits::default(),
            next_conn_id: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            all_done: Notify::new(),
            draining,
            closing,
        };
        Ok((engine, drain_tx, close_tx))
    }

    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}

/// Optional parts of an engine that are built outside it (by the binding or tests).
#[derive(Default)]
pub struct EngineParts {
    pub connector: Option<Connector>,
    pub access: Option<AccessLog>,
    pub rules: Option<RuleSet>,
    pub filter: Option<DomainFilter>,
    pub ca: Option<Arc<CertificateAuthority>>,
    pub origin_trust: OriginTrust,
    pub handler: Option<Arc<dyn Handler>>,
    pub flows: Option<Arc<FlowRecorder>>,
}

impl Engine {
    /// This server's counters.
    pub fn stats(&self) -> &Stats {
        &self.sinks.stats
    }

    /// This server's counters now.
    pub fn stats_snapshot(&self) -> StatsSnapshot {
        self.stats().snapshot(self.active_connections())
    }
}
