//! The shared state of one server (`Engine`) and its builder: everything a connection needs,
//! made once from the configuration and the parts built outside the engine.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
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
    /// The rules in force: swapped whole while the server runs (`set_rules`); each flow
    /// decides once, on the set it loaded, and keeps that decision.
    pub rules: ArcSwap<RuleSet>,
    /// The destination filter in force, swapped whole like the rules.
    pub filter: Arc<ArcSwap<DomainFilter>>,
    /// With a CA, CONNECTs are intercepted unless a rule or the handler says otherwise.
    pub ca: Option<Arc<CertificateAuthority>>,
    /// How origins of intercepted flows are verified.
    pub origin_tls: Arc<rustls::ClientConfig>,
    /// The HTTP/2 connections to origins that chose it, shared by the exchanges going there.
    pub h2_origins: Arc<super::h2_client::H2Origins>,
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
        check_interception(&rules, parts.ca.is_some())?;
        let origin_tls = origin_client_config(&parts.origin_trust)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let filter = Arc::new(ArcSwap::from_pointee(parts.filter.unwrap_or_default()));
        let mut connector = parts
            .connector
            .unwrap_or_else(|| Connector::new(config.connect_timeout));
        // The filter may be swapped later (deny_private turned on): the check reads the one
        // in force at each connection.
        let f = filter.clone();
        connector.addr_check = Some(Box::new(move |ip| f.load().check_addr(ip)));
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
            rules: ArcSwap::from_pointee(rules),
            filter,
            ca: parts.ca,
            origin_tls,
            h2_origins: Arc::default(),
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

    /// Puts `rules` in force for every decision from now on: new connections and new
    /// requests on kept-alive ones. Flows already decided keep their policy.
    pub fn set_rules(&self, rules: RuleSet) -> io::Result<()> {
        check_interception(&rules, self.ca.is_some())?;
        self.rules.store(Arc::new(rules));
        Ok(())
    }

    /// Puts `filter` in force for every destination checked from now on.
    pub fn set_filter(&self, filter: DomainFilter) {
        self.filter.store(Arc::new(filter));
    }

    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}

/// A rule that says `intercept=yes` needs a CA to intercept with.
fn check_interception(rules: &RuleSet, has_ca: bool) -> io::Result<()> {
    if has_ca {
        return Ok(());
    }
    match rules.rules().iter().find(|r| r.intercept == Intercept::Yes) {
        Some(rule) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "rule {} says intercept=yes but no CA is configured (--ca-dir or tls_store)",
                rule.source
            ),
        )),
        None => Ok(()),
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
