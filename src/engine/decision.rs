//! The rule decision for one flow (request or CONNECT), its debug lines, and the route it
//! gives the connector.

use super::connector::{HopProtocol, Route, UpstreamHop};
use super::flow::{Flow, FlowAction};
use super::rules::{Action, Decision, RuleSet, Scheme, UpstreamProtocol};
use super::segment::SegmentPolicy;
use super::state::Engine;

/// The rule decision for a flow, written into its access record.
pub fn decide(
    engine: &Engine,
    method: &str,
    scheme: Scheme,
    host: &str,
    port: u16,
    path: &str,
    record: &mut Flow,
) -> Decision {
    // One snapshot of the rules for the whole decision (they may be swapped meanwhile).
    let rules = engine.rules.load();
    let mut decision = rules.decide(method, scheme, host, port, path);
    // Shaping is drawn once per flow (its fault or not, its seed), for both directions.
    if decision.policy.shaping.is_some() {
        decision.policy = decision.policy.for_flow();
    }
    record.host = host.to_string();
    record.port = port;
    record.scheme = scheme.as_str().into();
    record.mode = decision.mode.clone();
    record.direction = decision.direction.as_str().into();
    if log::log_enabled!(log::Level::Debug) {
        log_decision(&rules, method, host, port, path, &decision, &record.id);
    }
    record.rule = match decision.rule {
        Some(i) => rules.rules()[i].source.to_string().into(),
        None => "default".into(),
    };
    record.action = match &decision.action {
        Action::Direct => FlowAction::Direct,
        Action::Upstream(u) => FlowAction::Upstream(u.address()),
        Action::Block { .. } => FlowAction::Block,
    };
    // "none" only for the policy that changes nothing (no segmentation, rate or ttfb).
    record.policy = if decision.policy == SegmentPolicy::none() {
        "none".into()
    } else {
        format!(
            "{} dir={}",
            decision.policy.describe(),
            decision.direction.as_str()
        )
        .into()
    };
    decision
}

/// SegmentedProxy's two debug lines for a decision (the rule, its score, the policy; then the
/// explain line), with our request id as `rid`.
fn log_decision(
    rules: &RuleSet,
    method: &str,
    host: &str,
    port: u16,
    path: &str,
    d: &Decision,
    rid: &str,
) {
    use crate::engine::segment::Strategy;
    let rule = d
        .rule
        .map_or("<default>", |i| rules.rules()[i].host_glob.as_str());
    let score = d.score.map_or(-1, i64::from);
    let strategy = d.policy.strategy.name();
    if method.eq_ignore_ascii_case("CONNECT") {
        let chunk = match d.policy.strategy {
            Strategy::Fixed { chunk } => chunk,
            _ => crate::engine::rules::DEFAULT_CHUNK,
        };
        log::debug!(
            "CONNECT tunnel {host}:{port} (rule={rule} score={score} action={} mode={} strategy={strategy} chunk={chunk} delay_ms={} rid={rid})",
            d.action.name(), d.mode, d.policy.delay.as_millis()
        );
        log::debug!("CONNECT decision: {} rid={rid}", d.explanation);
    } else {
        log::debug!(
            "HTTP forward {host}:{port} {path} (rule={rule} score={score} action={} mode={} strategy={strategy} rid={rid})",
            d.action.name(), d.mode
        );
        log::debug!("HTTP forward decision: {} rid={rid}", d.explanation);
    }
}

/// The connector's route for a rule action (credentials become a ready header).
pub fn route_for(action: &Action) -> Route {
    match action {
        Action::Upstream(u) => Route::Upstream(UpstreamHop {
            host: u.host.clone(),
            port: u.port,
            protocol: match u.protocol {
                UpstreamProtocol::Http => HopProtocol::Http {
                    authorization: u.basic_auth_header(),
                },
                UpstreamProtocol::Socks5 => HopProtocol::Socks5 {
                    credentials: u.credentials.clone(),
                },
            },
        }),
        _ => Route::Direct,
    }
}
