//! What a flow was and how it ended: the one vocabulary of access records, flow records and
//! statistics.

use serde::Serialize;

/// A record's text field: most values are fixed words (`direct`, `none`, `default`), held
/// without an allocation.
pub type Text = std::borrow::Cow<'static, str>;

/// What kind of flow a record describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A plain HTTP request forwarded to its destination.
    #[default]
    Forward,
    /// A CONNECT, or a request inside one, whose TLS the proxy terminated.
    Intercept,
    /// A CONNECT relayed untouched.
    Tunnel,
    /// A request the handler answered itself.
    Handler,
    /// A request upgraded (101) to another protocol, then relayed.
    Upgrade,
    /// A request or CONNECT refused by a rule, the handler or the destination filter.
    Block,
    /// A connection refused at the connection limit.
    Refused,
    /// Bytes that could not become a request (bad head, timeout, not HTTP).
    Error,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Forward => "forward",
            Kind::Intercept => "intercept",
            Kind::Tunnel => "tunnel",
            Kind::Handler => "handler",
            Kind::Upgrade => "upgrade",
            Kind::Block => "block",
            Kind::Refused => "refused",
            Kind::Error => "error",
        }
    }
}

/// What happened to a flow, as its access and flow records say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still running (never seen in a written record).
    #[default]
    Unfinished,
    /// The exchange completed, or the tunnel ended with both sides closing.
    Ok,
    /// A rule, the handler or the destination filter refused it (403).
    Blocked,
    /// The request could not be accepted as sent (400, 408, 431).
    Rejected,
    /// The server was at its connection limit (503).
    RefusedLimit,
    /// The proxy answered an error (502, 504...) or a tunnel failed.
    Error,
    /// The client went away before the exchange completed.
    ClientAborted,
    /// The destination cut the response after it had started.
    OriginAborted,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// The server shut down and cut it at the shutdown deadline.
    CutAtShutdown,
    /// An injected fault (`fault=reset@N` or `close@N`) ended it, on purpose.
    Fault,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Unfinished => "unfinished",
            Outcome::Ok => "ok",
            Outcome::Blocked => "blocked",
            Outcome::Rejected => "rejected",
            Outcome::RefusedLimit => "refused_limit",
            Outcome::Error => "error",
            Outcome::ClientAborted => "client_aborted",
            Outcome::OriginAborted => "origin_aborted",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::CutAtShutdown => "cut_at_shutdown",
            Outcome::Fault => "fault",
        }
    }

    /// The outcome of an error answer with this status.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            403 => Outcome::Blocked,
            503 => Outcome::RefusedLimit,
            400..=499 => Outcome::Rejected,
            _ => Outcome::Error,
        }
    }
}
