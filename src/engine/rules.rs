//! The rules engine: SegmentedProxy's rule syntax, parsing with `file:line`
//! errors, and the decision by SegmentedProxy's score.
//!
//! # Syntax
//!
//! One rule per line; in files, blank lines and lines starting with `#` are
//! ignored:
//!
//! ```text
//! HOST_GLOB=MODE[,key=value]...
//! ```
//!
//! - `HOST_GLOB`: a host name or a shell-style glob (`*` any run of characters,
//!   dots included; `?` exactly one character), matched case-insensitively.
//!   No character classes. A trailing dot and IPv6 brackets are ignored.
//! - `MODE`: `direct` (no segmentation) or `segment_upstream` (segment as the
//!   keys say).
//! - Keys (case-insensitive; empty `,,` segments are skipped; a repeated key
//!   keeps its last value, as in SegmentedProxy):
//!   - `strategy=none|fixed|random`, `chunk=N`, `min=N` (alias `chunk_min`),
//!     `max=N` (alias `chunk_max`), `delay=MS`. Without `strategy`, `chunk` or
//!     `delay` mean fixed and `min`/`max` mean random (SegmentedProxy forwards
//!     such lines unsegmented; we do what they say); with none of them the
//!     rule does not segment. Fixed without `chunk` uses SegmentedProxy's
//!     default of 1024 bytes.
//!   - `action=direct|upstream|block` (default direct).
//!   - `upstream=[USER:PASS@]HOST:PORT` (IPv6 hosts in brackets), used by
//!     `action=upstream`: an HTTP proxy. Credentials are sent as Basic `Proxy-Authorization`;
//!     `upstream=socks5://[USER:PASS@]HOST:PORT` is a SOCKS5 proxy (RFC 1928, credentials by
//!     RFC 1929), asked for destination names, which it resolves. Credentials are masked (`user:***@`) in [`Rule::text`], descriptions,
//!     explanations and `Debug` output.
//!   - `reason=TEXT`: the block message (`action=block`). It may contain
//!     anything except a comma, which always separates keys.
//!   - `scheme=http|https`, `method=M` (any HTTP token, `CONNECT` included,
//!     matched case-insensitively), `path_prefix=/p` (plain byte prefix of the
//!     request path, case-sensitive, a missing leading `/` added; an opaque
//!     CONNECT has no path, so such rules never match it), `port=N`.
//!   - Ours: `direction=up|down|both` (which way bytes are segmented; `up` is
//!     client→destination; default: the rule set's default, normally up),
//!     `intercept=yes|no` (unset: the engine default), `capture=yes|no` (also
//!     `true|false`, `1|0`, `on|off`: keep the flows' heads, bodies and phase times in
//!     their records; unset: the server's `capture_bodies` decides) and
//!     `h2c=yes|no` (plain `http://` requests to the origin in HTTP/2 over cleartext, prior
//!     knowledge; default no).
//!
//! Every line SegmentedProxy accepts is accepted, with its meaning, and every line it
//! rejects is rejected with its reason. What it accepts but does nothing or looks wrong (an
//! unknown mode word, an empty host glob, an out-of-range upstream port, segmentation keys
//! under mode `direct`, `upstream=` without `action=upstream`, ...) is noted on the rule;
//! [`RuleSet::warnings`] lists the notes as `FILE:LINE: note`. Host globs have Python
//! `fnmatch`'s syntax (`*`, `?`, `[seq]`, `[!seq]`), matched case-insensitively.
//!
//! # Which rule wins
//!
//! SegmentedProxy's score ([`sp_score`]): +1000 for a glob other than `*`, +500 for a glob
//! without `*` or `?` (else +200 for `*.` globs), +100 each for `scheme=` and `method=` (and
//! our `port=`), plus the path prefix length. The highest score wins; on equal scores a block
//! rule, then the earlier rule. No match: the default policy with action direct.
//!
//! # Speed
//!
//! Exact hosts are indexed in a `HashMap`, `*.suffix` rules by their suffix (one lookup per
//! dot of the host), and each list is kept sorted best first, so the first rule of a list
//! whose conditions match is its best. The remaining globs, also sorted best first, are
//! scanned only down to the best score found so far.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;

use super::outcome::Text;
pub use super::segment::DEFAULT_CHUNK;
use super::segment::{SegmentPolicy, Strategy};
use super::shaping::{Fault, Shaping};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which direction of a flow is segmented.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → destination (SegmentedProxy's only direction).
    #[default]
    Up,
    /// Destination → client.
    Down,
    Both,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Both => "both",
        }
    }

    /// True if client → destination bytes are segmented.
    pub fn segments_up(self) -> bool {
        matches!(self, Direction::Up | Direction::Both)
    }

    /// True if destination → client bytes are segmented.
    pub fn segments_down(self) -> bool {
        matches!(self, Direction::Down | Direction::Both)
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a CONNECT is intercepted (TLS terminated) or tunnelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Intercept {
    /// The rule does not say; the engine's setting applies.
    #[default]
    Default,
    Yes,
    No,
}

impl Intercept {
    pub fn as_str(self) -> &'static str {
        match self {
            Intercept::Default => "default",
            Intercept::Yes => "yes",
            Intercept::No => "no",
        }
    }
}

impl fmt::Display for Intercept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol an upstream proxy speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// An HTTP proxy: CONNECT for tunnels, absolute-form requests for plain HTTP.
    #[default]
    Http,
    /// A SOCKS5 proxy (`socks5://`): a SOCKS CONNECT for every destination.
    Socks5,
}

/// The scheme prefix of a SOCKS5 upstream.
const SOCKS5_PREFIX: &str = "socks5://";

/// A peer proxy to forward through.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamProxy {
    pub protocol: UpstreamProtocol,
    /// Host name or IP, IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// `(user, password)`: Basic `Proxy-Authorization` for an HTTP proxy, RFC 1929 for SOCKS5.
    pub credentials: Option<(String, String)>,
}

/// Splits a `socks5://` prefix (any case) off an `upstream=` value.
fn split_protocol(value: &str) -> (UpstreamProtocol, &str) {
    match value.get(..SOCKS5_PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(SOCKS5_PREFIX) => {
            (UpstreamProtocol::Socks5, &value[SOCKS5_PREFIX.len()..])
        }
        _ => (UpstreamProtocol::Http, value),
    }
}

impl UpstreamProxy {
    /// `host:port`, with brackets around an IPv6 host.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `host:port` for an HTTP proxy, `socks5://host:port` for a SOCKS5 one (no credentials).
    pub fn address(&self) -> String {
        match self.protocol {
            UpstreamProtocol::Http => self.authority(),
            UpstreamProtocol::Socks5 => format!("{SOCKS5_PREFIX}{}", self.authority()),
        }
    }

    /// The `Proxy-Authorization` value (`Basic base64(user:pass)`), if any.
    pub fn basic_auth_header(&self) -> Option<String> {
        self.credentials.as_ref().map(|(user, pass)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            format!("Basic {token}")
        })
    }

    /// Parses `[socks5://][USER:PASS@]HOST:PORT`. Error messages never echo the password.
    pub fn parse(value: &str) -> Result<Self, String> {
        let (protocol, value) = split_protocol(value);
        let (credentials, hostport) = match value.rsplit_once('@') {
            Some((creds, hostport)) => {
                let (user, pass) = creds
                    .split_once(':')
                    .ok_or("upstream credentials must be USER:PASS@HOST:PORT")?;
                if user.is_empty() {
                    return Err("upstream credentials have an empty user name".into());
                }
                (Some((user.to_string(), pass.to_string())), hostport)
            }
            None => (None, value),
        };
        let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("upstream '{hostport}' must be [IPV6]:PORT"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("upstream '{hostport}' has an invalid IPv6 address"));
            }
            (host, port)
        } else {
            let (host, port) = hostport
                .rsplit_once(':')
                .ok_or_else(|| format!("upstream '{hostport}' must be HOST:PORT"))?;
            if host.contains(':') {
                return Err(format!(
                    "upstream '{hostport}': put an IPv6 host in brackets"
                ));
            }
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(format!("upstream '{hostport}' has an invalid host"));
            }
            (host, port)
        };
        let port = parse_port(port).map_err(|e| format!("upstream '{hostport}': {e}"))?;
        Ok(Self {
            protocol,
            host: host.to_ascii_lowercase(),
            port,
            credentials,
        })
    }
}

impl UpstreamProxy {
    /// Reads `upstream=` as a rule line gives it: every value SegmentedProxy accepts
    /// (`HOST:PORT` split at the last colon, any non-empty host, any whole-number port) is
    /// accepted, with a note when it cannot work (a port out of 1-65535 is kept as 0, which
    /// no connection reaches: the flow gets a 502 naming the hop). Rejected values get
    /// SegmentedProxy's reason.
    pub fn parse_lenient(value: &str, notes: &mut Vec<String>) -> Result<Self, String> {
        if let Ok(up) = Self::parse(value) {
            return Ok(up);
        }
        let (protocol, value) = split_protocol(value);
        // Credentials as ours (`USER:PASS@`) when they are well formed, so that no password
        // ends up in a host name or a note.
        let (credentials, hostport) = match value.rsplit_once('@') {
            Some((creds, hostport)) => match creds.split_once(':') {
                Some((user, pass)) if !user.is_empty() => {
                    (Some((user.to_string(), pass.to_string())), hostport)
                }
                _ => (None, value),
            },
            None => (None, value),
        };
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return Err(format!("upstream must be host:port (got '{hostport}')"));
        };
        let host = host.trim();
        if host.is_empty() {
            return Err("upstream must include host".into());
        }
        let Some(port) = py_int(port) else {
            return Err(format!("invalid upstream port '{port}'"));
        };
        let port = match u16::try_from(port) {
            Ok(p) if p > 0 => p,
            _ => {
                notes.push(format!(
                    "upstream port {port} is out of range (1-65535): flows sent to this upstream get 502"
                ));
                0
            }
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        {
            notes.push(format!(
                "upstream host '{host}' is not a host name: flows sent to it get 502"
            ));
        }
        Ok(Self {
            protocol,
            host: host.to_ascii_lowercase(),
            port,
            credentials,
        })
    }
}

/// Shows `[socks5://]user:***@host:port`: the password never reaches logs.
impl fmt::Display for UpstreamProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.protocol == UpstreamProtocol::Socks5 {
            f.write_str(SOCKS5_PREFIX)?;
        }
        if let Some((user, _)) = &self.credentials {
            write!(f, "{user}:***@")?;
        }
        f.write_str(&self.authority())
    }
}

impl fmt::Debug for UpstreamProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpstreamProxy({self})")
    }
}

/// What to do with a matching request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Direct,
    Upstream(UpstreamProxy),
    Block { reason: String },
}

impl Action {
    pub fn is_block(&self) -> bool {
        matches!(self, Action::Block { .. })
    }

    /// `direct`, `upstream` or `block`.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Direct => "direct",
            Action::Upstream(_) => "upstream",
            Action::Block { .. } => "block",
        }
    }
}

/// `direct`, `upstream=user:***@host:port`, `block reason=...`.
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Direct => f.write_str("direct"),
            Action::Upstream(up) => write!(f, "upstream={up}"),
            Action::Block { reason } => write!(f, "block reason={reason}"),
        }
    }
}

/// Where a rule was written: a file name (or `<cli>`, `<text>`) and a 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSource {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Lower-cased glob (or exact host).
    pub host_glob: String,
    pub scheme: Option<Scheme>,
    /// Upper-cased.
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub port: Option<u16>,
    pub action: Action,
    pub policy: SegmentPolicy,
    /// `direction=` or, when absent, the rule set's default.
    pub direction: Direction,
    pub intercept: Intercept,
    /// `capture=`: whether the rule's flows capture heads, bodies and phase times (None:
    /// as the server's `capture_bodies` says).
    pub capture: Option<bool>,
    /// `h2c=yes`: plain `http://` requests go to the origin in HTTP/2 over cleartext, with
    /// prior knowledge (no upgrade).
    pub h2c: bool,
    pub source: RuleSource,
    /// The mode word as written (`direct`, `segment_upstream`, or any other word, which
    /// SegmentedProxy accepts and treats as direct).
    pub mode: String,
    /// The segmentation keys as written, for SegmentedProxy's `--validate-rules` listing.
    pub written: WrittenPolicy,
    /// SegmentedProxy's score of the rule (see [`sp_score`]); the highest matching wins.
    pub score: u32,
    /// The rule line as written (trimmed), with any upstream password masked.
    pub text: String,
    /// What the line says that has no effect or looks wrong (SegmentedProxy accepts such
    /// lines; so do we, and `--validate-rules` warns about each, naming the line).
    pub notes: Vec<String>,
    /// `reason=` as written, if given and not empty (SegmentedProxy lists it whatever the action).
    pub written_reason: Option<String>,
    /// `upstream=` as written (password masked), shown whatever the action, as SegmentedProxy
    /// lists it.
    pub written_upstream: Option<String>,
}

/// A rule's segmentation keys as written (SegmentedProxy's defaults where absent), shown
/// by `--validate-rules` as SegmentedProxy shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenPolicy {
    pub strategy: Option<String>,
    pub chunk: Option<i64>,
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub delay: Option<i64>,
}

/// SegmentedProxy's rule score (its `segmentation.py`, `_rule_score`): +1000 when the host
/// glob is not empty and not `*`; +500 when it has no `*` or `?`, otherwise +200 when it
/// starts with `*.`; +100 for `scheme=`, +100 for `method=`, + the length of `path_prefix`.
/// Ours: +100 for `port=` (a file without `port=` decides exactly as in SegmentedProxy).
pub fn sp_score(
    host_glob: &str,
    scheme: bool,
    method: bool,
    path_prefix: Option<&str>,
    port: bool,
) -> u32 {
    let mut score = 0u32;
    if !host_glob.is_empty() && host_glob != "*" {
        score += 1000;
    }
    if !host_glob.contains(['*', '?']) {
        score += 500;
    } else if host_glob.starts_with("*.") {
        score += 200;
    }
    if scheme {
        score += 100;
    }
    if method {
        score += 100;
    }
    if port {
        score += 100;
    }
    // SegmentedProxy counts characters (Python `len`), not bytes.
    score += path_prefix.map_or(0, |p| p.chars().count() as u32);
    score
}

impl Rule {
    /// True if everything but the host matches.
    fn conditions_match(&self, method: &str, scheme: Scheme, port: u16, path: &str) -> bool {
        self.scheme.is_none_or(|s| s == scheme)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self.port.is_none_or(|p| p == port)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
    }

    /// One rule as SegmentedProxy's `--validate-rules` shows it (`host=... [scheme=...]
    /// [method=...] [path=...] action=... [upstream=...] [reason=...] mode=... strategy=...
    /// chunk=... delay=... [min=...] [max=...]`), then ours: `source=FILE:LINE` and
    /// `port=`, `direction=`, `intercept=` when set, and `policy=` (what segproxy does).
    pub fn describe(&self) -> String {
        let mut out = format!("host={}", self.host_glob);
        if let Some(s) = self.scheme {
            out += &format!(" scheme={s}");
        }
        if let Some(m) = &self.method {
            out += &format!(" method={m}");
        }
        if let Some(p) = &self.path_prefix {
            out += &format!(" path={}", shorten(p));
        }
        out += &format!(" action={}", self.action.name());
        if let Some(up) = &self.written_upstream {
            out += &format!(" upstream={up}");
        }
        if let Some(reason) = &self.written_reason {
            out += &format!(" reason={}", shorten(reason));
        }
        let w = &self.written;
        let strategy = w
            .strategy
            .clone()
            .unwrap_or_else(|| self.policy.strategy.name().into());
        out += &format!(
            " mode={} strategy={strategy} chunk={} delay={}",
            self.mode,
            w.chunk.unwrap_or(DEFAULT_CHUNK as i64),
            w.delay.unwrap_or(0)
        );
        if let Some(min) = w.min {
            out += &format!(" min={min}");
        }
        if let Some(max) = w.max {
            out += &format!(" max={max}");
        }
        out += &format!(" source={}", self.source);
        if let Some(p) = self.port {
            out += &format!(" port={p}");
        }
        if self.direction != Direction::Up {
            out += &format!(" direction={}", self.direction);
        }
        if self.intercept != Intercept::Default {
            out += &format!(" intercept={}", self.intercept);
        }
        if let Some(capture) = self.capture {
            out += &format!(" capture={}", if capture { "yes" } else { "no" });
        }
        if self.h2c {
            out += " h2c=yes";
        }
        out += &format!(" policy=\"{}\"", self.policy);
        out
    }
}

/// SegmentedProxy's `_shorten`: at most 24 characters, `...` ending a longer value.
fn shorten(value: &str) -> String {
    if value.chars().count() <= 24 {
        value.to_string()
    } else {
        value.chars().take(21).collect::<String>() + "..."
    }
}

/// A parse error, shown as `FILE:LINE: message` (`FILE: message` for line 0,
/// used when the file itself cannot be read). When a text has several bad lines, the first
/// is this error and the others are in `more`, shown one a line after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    pub source: String,
    pub line: usize,
    pub message: String,
    pub more: Vec<RuleError>,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.source, self.message)?;
        } else {
            write!(f, "{}:{}: {}", self.source, self.line, self.message)?;
        }
        for other in &self.more {
            write!(f, "\n{other}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleError {}

/// The outcome of [`RuleSet::decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Index into [`RuleSet::rules`] of the winning rule.
    pub rule: Option<usize>,
    pub action: Action,
    pub policy: SegmentPolicy,
    pub direction: Direction,
    pub intercept: Intercept,
    /// The winning rule's `capture=` (None: as the server says).
    pub capture: Option<bool>,
    /// The winning rule's `h2c=yes`.
    pub h2c: bool,
    /// SegmentedProxy's score of the winning rule; `None` when no rule matched (SegmentedProxy
    /// shows -1).
    pub score: Option<u32>,
    /// The mode word of the winning rule, or the default policy's mode.
    pub mode: Text,
    /// One line, SegmentedProxy's explain line (`matched host_glob=...; ctx host=...;
    /// score=N; action=A`) followed by which rule of ours it was, or
    /// `no rule matched; using default policy`.
    pub explanation: Text,
}

/// The order of matching rules: SegmentedProxy's score, then on equal scores a block rule
/// before others, then the earlier rule. Greater wins; a total order, so the winner is unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Specificity {
    score: u32,
    block: bool,
    earlier: Reverse<usize>,
}

/// How a glob is indexed (not how it ranks: that is the score).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostClass {
    /// No wildcard: looked up by the host.
    Exact,
    /// `*.suffix` with no other wildcard: looked up by each suffix of the host.
    Suffix,
    /// Anything else: scanned.
    Glob,
}

impl HostClass {
    fn of(glob: &str) -> HostClass {
        if !glob.contains(['*', '?', '[']) {
            HostClass::Exact
        } else if glob.starts_with("*.") && !glob[1..].contains(['*', '?', '[']) {
            HostClass::Suffix
        } else {
            HostClass::Glob
        }
    }
}

/// Rules plus the indexes that make [`RuleSet::decide`] fast.
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    keys: Vec<Specificity>,
    default_policy: SegmentPolicy,
    default_direction: Direction,
    /// The default mode word, when given (`--segmentation`).
    default_mode: Option<String>,
    /// Exact host → rule indexes, best first.
    exact: HashMap<String, Vec<usize>>,
    /// Suffix including its leading dot (`.example.com`) → rule indexes, best first.
    suffix: HashMap<String, Vec<usize>>,
    /// All other globs, best first.
    globs: Vec<usize>,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self::new(SegmentPolicy::none(), Direction::Up)
    }
}

impl RuleSet {
    /// An empty set; `default_policy` applies when no rule matches and
    /// `default_direction` to rules without `direction=`.
    pub fn new(default_policy: SegmentPolicy, default_direction: Direction) -> Self {
        Self {
            rules: Vec::new(),
            keys: Vec::new(),
            default_policy,
            default_direction,
            default_mode: None,
            exact: HashMap::new(),
            suffix: HashMap::new(),
            globs: Vec::new(),
        }
    }

    /// Parses a rules text with no segmentation by default.
    pub fn parse(text: &str, source: &str) -> Result<Self, RuleError> {
        let mut set = Self::default();
        set.add_text(text, source)?;
        Ok(set)
    }

    /// Adds every rule of a multi-line text (comments and blank lines
    /// skipped). All or nothing: on error no rule of `text` is added.
    pub fn add_text(&mut self, text: &str, source: &str) -> Result<(), RuleError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut parsed = Vec::new();
        let mut errors: Vec<RuleError> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            // Every bad line is reported, not only the first.
            match self.parse_line(trimmed, source, i + 1) {
                Ok(rule) => parsed.push(rule),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            let mut first = errors.remove(0);
            first.more = errors;
            return Err(first);
        }
        for rule in parsed {
            self.push(rule);
        }
        Ok(())
    }

    /// Adds one rule (e.g. a `--segment-rule` value, with source `<cli>`).
    pub fn add_rule_line(
        &mut self,
        line: &str,
        source: &str,
        line_no: usize,
    ) -> Result<(), RuleError> {
        let rule = self.parse_line(line.trim(), source, line_no)?;
        self.push(rule);
        Ok(())
    }

    /// Adds a rules file; errors name the file as given.
    pub fn add_file(&mut self, path: &Path) -> Result<(), RuleError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RuleError {
            source: name.clone(),
            line: 0,
            message: format!("cannot read rules file: {e}"),
            more: Vec::new(),
        })?;
        self.add_text(&text, &name)
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn default_policy(&self) -> &SegmentPolicy {
        &self.default_policy
    }

    pub fn default_direction(&self) -> Direction {
        self.default_direction
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn parse_line(&self, line: &str, source: &str, line_no: usize) -> Result<Rule, RuleError> {
        let src = RuleSource {
            file: source.to_string(),
            line: line_no,
        };
        parse_rule(line, src, self.default_direction).map_err(|message| RuleError {
            source: source.to_string(),
            line: line_no,
            message,
            more: Vec::new(),
        })
    }

    fn push(&mut self, rule: Rule) {
        let index = self.rules.len();
        let host_class = HostClass::of(&rule.host_glob);
        let key = Specificity {
            score: rule.score,
            block: rule.action.is_block(),
            earlier: Reverse(index),
        };
        let list = match host_class {
            HostClass::Exact => self.exact.entry(rule.host_glob.clone()).or_default(),
            HostClass::Suffix => self
                .suffix
                .entry(rule.host_glob[1..].to_string())
                .or_default(),
            HostClass::Glob => &mut self.globs,
        };
        self.keys.push(key);
        self.rules.push(rule);
        // Keep each list sorted best first so the first match wins.
        let keys = &self.keys;
        let at = list.partition_point(|&i| keys[i] > key);
        list.insert(at, index);
    }

    /// Exact and suffix candidate lists for `host`, each sorted best first.
    fn indexed_lists<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Vec<usize>> + 'a {
        let exact = self.exact.get(host).into_iter();
        let suffixes = host
            .match_indices('.')
            .filter_map(move |(i, _)| self.suffix.get(&host[i..]));
        exact.chain(suffixes)
    }

    /// Picks the matching rule with SegmentedProxy's highest score (a block rule wins a tie,
    /// then the earlier rule). For a CONNECT pass method `CONNECT` and an empty path. `host`
    /// may be any case, with or without IPv6 brackets or a trailing dot.
    pub fn decide(
        &self,
        method: &str,
        scheme: Scheme,
        host: &str,
        port: u16,
        path: &str,
    ) -> Decision {
        let host = normalize_host(host);
        let host = host.as_ref();
        let fits = |i: usize| self.rules[i].conditions_match(method, scheme, port, path);
        let mut best: Option<usize> = None;
        let better =
            |i: usize, best: Option<usize>| best.is_none_or(|b| self.keys[i] > self.keys[b]);
        // Each indexed list is sorted best first: its first fitting rule is its best.
        for list in self.indexed_lists(host) {
            if let Some(&i) = list.iter().find(|&&i| fits(i)) {
                if better(i, best) {
                    best = Some(i);
                }
            }
        }
        // Other globs, best first, down to the best found so far.
        for &i in &self.globs {
            if !better(i, best) {
                break;
            }
            if fits(i) && glob_match(&self.rules[i].host_glob, host) {
                best = Some(i);
                break;
            }
        }
        let Some(w) = best else {
            return Decision {
                rule: None,
                action: Action::Direct,
                policy: self.default_policy.clone(),
                direction: self.default_direction,
                intercept: Intercept::Default,
                capture: None,
                h2c: false,
                score: None,
                mode: mode_text(self.default_mode()),
                explanation: "no rule matched; using default policy".into(),
            };
        };
        let rule = &self.rules[w];
        Decision {
            rule: Some(w),
            action: rule.action.clone(),
            policy: rule.policy.clone(),
            direction: rule.direction,
            intercept: rule.intercept,
            capture: rule.capture,
            h2c: rule.h2c,
            score: Some(rule.score),
            mode: mode_text(&rule.mode),
            explanation: self.explain(w, method, scheme, host, port, path).into(),
        }
    }

    /// Sets the default policy's mode word as given (`--segmentation`), for listings and
    /// records; the policy alone decides what is segmented.
    pub fn set_default_mode(&mut self, mode: &str) {
        self.default_mode = Some(mode.to_string());
    }

    /// The default policy's mode word: as set, else `segment_upstream` if it segments, else
    /// `direct`.
    pub fn default_mode(&self) -> &str {
        if let Some(mode) = &self.default_mode {
            mode
        } else if self.default_policy.is_passthrough() {
            "direct"
        } else {
            "segment_upstream"
        }
    }

    /// SegmentedProxy's explain line, then ours: which rule (number, FILE:LINE, text).
    fn explain(
        &self,
        w: usize,
        method: &str,
        scheme: Scheme,
        host: &str,
        port: u16,
        path: &str,
    ) -> String {
        let rule = &self.rules[w];
        let mut out = format!("matched host_glob={}", rule.host_glob);
        if let Some(s) = rule.scheme {
            out += &format!(" scheme={s}");
        }
        if let Some(m) = &rule.method {
            out += &format!(" method={m}");
        }
        if let Some(p) = &rule.path_prefix {
            out += &format!(" path_prefix={p}");
        }
        if let Some(p) = rule.port {
            out += &format!(" port={p}");
        }
        out += &format!(
            "; ctx host={host} scheme={scheme} method={} path={path}",
            method.to_ascii_uppercase()
        );
        if rule.port.is_some() {
            out += &format!(" port={port}");
        }
        out += &format!(
            "; score={}; action={}; rule {} at {} `{}`",
            rule.score,
            rule.action.name(),
            w + 1,
            rule.source,
            rule.text
        );
        out
    }

    /// The `--validate-rules` listing in SegmentedProxy's format: `Default policy: ...`, then
    /// `Rules:` and one numbered line per rule (`01. host=... action=... mode=... strategy=...
    /// chunk=... delay=...`), or `Rules: (none)`. Our fields follow SegmentedProxy's on each
    /// line: `source=FILE:LINE`, then `port=`, `direction=`, `intercept=` when set.
    pub fn describe(&self) -> String {
        let p = &self.default_policy;
        let ms = p.delay.as_millis();
        let mut out = match p.strategy {
            Strategy::None => format!("Default policy: mode={} strategy=none chunk={DEFAULT_CHUNK} delay={ms}", self.default_mode()),
            Strategy::Fixed { chunk } => format!("Default policy: mode={} strategy=fixed chunk={chunk} delay={ms}", self.default_mode()),
            Strategy::Random { min, max } => format!(
                "Default policy: mode={} strategy=random chunk={DEFAULT_CHUNK} delay={ms} min={min} max={max}",
                self.default_mode()
            ),
        };
        if let Some(rate) = p.rate {
            out += &format!(" rate={rate}B/s");
        }
        if let Some(t) = p.ttfb {
            out += &format!(" ttfb={}ms", t.as_millis());
        }
        out += &format!(" direction={}\n", self.default_direction);
        if self.rules.is_empty() {
            out += "Rules: (none)\n";
            return out;
        }
        out += "Rules:\n";
        for (i, rule) in self.rules.iter().enumerate() {
            out += &format!("{:02}. {}\n", i + 1, rule.describe());
        }
        out
    }

    /// What the rules say that has no effect or looks wrong, one `FILE:LINE: note` each:
    /// lines SegmentedProxy accepts and so do we (`--validate-rules` prints them as warnings).
    pub fn warnings(&self) -> Vec<String> {
        self.rules
            .iter()
            .flat_map(|r| r.notes.iter().map(move |n| format!("{}: {n}", r.source)))
            .collect()
    }
}

/// Lower-cases and strips IPv6 brackets and a trailing dot, borrowing when
/// nothing changes (the common case).
fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// Shell-style matching with Python `fnmatch`'s syntax: `*`, `?`, `[seq]` and `[!seq]` (with
/// ranges such as `a-z`); a `[` without its closing `]` is a literal. Both sides are already
/// lower-cased.
fn glob_match(pattern: &str, text: &str) -> bool {
    if pattern.contains('[') {
        let tokens = glob_tokens(pattern);
        let text: Vec<char> = text.chars().collect();
        wildcard_match(
            &tokens,
            &text,
            |t, c| t.matches(c),
            |t| matches!(t, GlobToken::Star),
        )
    } else {
        wildcard_match(
            pattern.as_bytes(),
            text.as_bytes(),
            |p, t| *p == b'?' || p == t,
            |p| *p == b'*',
        )
    }
}

/// One element of a glob with character classes.
#[derive(Debug)]
enum GlobToken {
    Star,
    Any,
    Literal(char),
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
}

impl GlobToken {
    fn matches(&self, c: &char) -> bool {
        match self {
            GlobToken::Star => true,
            GlobToken::Any => true,
            GlobToken::Literal(l) => l == c,
            GlobToken::Class { negated, items } => {
                items.iter().any(|(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

/// Splits a glob as Python's `fnmatch.translate` does.
fn glob_tokens(pattern: &str) -> Vec<GlobToken> {
    let p: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let c = p[i];
        i += 1;
        match c {
            '*' => out.push(GlobToken::Star),
            '?' => out.push(GlobToken::Any),
            '[' => {
                let mut j = i;
                if j < p.len() && p[j] == '!' {
                    j += 1;
                }
                if j < p.len() && p[j] == ']' {
                    j += 1;
                }
                while j < p.len() && p[j] != ']' {
                    j += 1;
                }
                if j >= p.len() {
                    out.push(GlobToken::Literal('['));
                    continue;
                }
                let mut stuff = &p[i..j];
                i = j + 1;
                let negated = stuff.first() == Some(&'!');
                if negated {
                    stuff = &stuff[1..];
                }
                let mut items = Vec::new();
                let mut k = 0;
                while k < stuff.len() {
                    if k + 2 < stuff.len() && stuff[k + 1] == '-' {
                        items.push((stuff[k], stuff[k + 2]));
                        k += 3;
                    } else {
                        items.push((stuff[k], stuff[k]));
                        k += 1;
                    }
                }
                out.push(GlobToken::Class { negated, items });
            }
            c => out.push(GlobToken::Literal(c)),
        }
    }
    out
}

/// Wildcard matching where every non-star element matches exactly one item: linear, with
/// backtracking to the last star only.
fn wildcard_match<P, T>(
    pattern: &[P],
    text: &[T],
    one: impl Fn(&P, &T) -> bool,
    star: impl Fn(&P) -> bool,
) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && star(&pattern[p]) {
            last_star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && one(&pattern[p], &text[t]) {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = last_star {
            // Let the last `*` swallow one more item and retry.
            p = sp + 1;
            t = st + 1;
            last_star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(star)
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("invalid port '{value}' (expected 1-65535)")),
        Ok(p) => Ok(p),
    }
}

/// A whole number as Python's `int()` reads it: an optional sign, digits, single `_`
/// between digits.
pub fn py_int(value: &str) -> Option<i64> {
    let value = value.trim();
    let (negative, digits) = match value.as_bytes().first()? {
        b'+' => (false, &value[1..]),
        b'-' => (true, &value[1..]),
        _ => (false, value),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    let n: i64 = digits.replace('_', "").parse().ok()?;
    Some(if negative { -n } else { n })
}

/// SegmentedProxy's `_parse_int`, with its message.
fn parse_int(key: &str, value: &str) -> Result<i64, String> {
    py_int(value).ok_or_else(|| format!("invalid int for '{key}': '{value}'"))
}

fn is_http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The keys a rule line may carry, as written (after alias resolution).
#[derive(Default)]
struct Keys<'a> {
    strategy: Option<&'a str>,
    chunk: Option<i64>,
    min: Option<i64>,
    max: Option<i64>,
    delay: Option<i64>,
    /// `rate=` in bytes per second (ours: shaping applies in every mode).
    rate: Option<u64>,
    /// `ttfb=` in milliseconds (ours, every mode like `rate=`).
    ttfb: Option<i64>,
    /// `latency=`, `jitter=`, `fault=`, `fault_rate=`, `seed=` (ours, every mode).
    shaping: Shaping,
    action: Option<&'a str>,
    upstream: Option<UpstreamProxy>,
    /// `upstream=` as listed: the proxy, or the value as written when its port is out of range.
    upstream_text: Option<String>,
    reason: Option<&'a str>,
    scheme: Option<Scheme>,
    method: Option<String>,
    path_prefix: Option<String>,
    port: Option<u16>,
    direction: Option<Direction>,
    intercept: Option<Intercept>,
    capture: Option<bool>,
    h2c: Option<bool>,
}

/// A mode word for a decision: the two meaningful words are not copied on every decision.
fn mode_text(mode: &str) -> Text {
    match mode {
        "direct" => Text::Borrowed("direct"),
        "segment_upstream" => Text::Borrowed("segment_upstream"),
        other => Text::Owned(other.to_string()),
    }
}

/// Parses one rule line. It accepts exactly the lines SegmentedProxy accepts, with their
/// meaning, and rejects the others with SegmentedProxy's reason (our hint after it); what
/// it accepts but looks wrong or does nothing is noted.
fn parse_rule(
    line: &str,
    source: RuleSource,
    default_direction: Direction,
) -> Result<Rule, String> {
    const SHAPE: &str = "expected HOST_GLOB=MODE[,key=value]...";
    if line.is_empty() {
        return Err(format!("empty rule; {SHAPE}"));
    }
    let (glob, rest) = line
        .split_once('=')
        .ok_or_else(|| format!("segment rule must contain '=' ({SHAPE})"))?;
    let mut notes: Vec<String> = Vec::new();
    let host_glob = parse_host_glob(glob.trim(), &mut notes);
    let mut parts = rest.split(',').map(str::trim).filter(|p| !p.is_empty());
    let mode = parts
        .next()
        .ok_or_else(|| format!("segment rule missing mode ({SHAPE})"))?;
    // Case-sensitive, as in SegmentedProxy: any other word is accepted there and means direct.
    let segmenting = mode == "segment_upstream";
    if mode != "direct" && !segmenting {
        let lower = mode.to_ascii_lowercase();
        if lower == "direct" || lower == "segment_upstream" {
            notes.push(format!(
                "mode '{mode}' is not '{lower}' (modes are case-sensitive in SegmentedProxy): treated as direct, no segmentation"
            ));
        } else {
            notes.push(format!(
                "unknown mode '{mode}' treated as direct, no segmentation, as SegmentedProxy does (modes: direct, segment_upstream)"
            ));
        }
    }

    let mut keys = Keys::default();
    let mut seen: Vec<&str> = Vec::new();
    let mut text_parts: Vec<String> = Vec::new();
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("invalid rule token '{part}', expected key=value"))?;
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        let canonical = match key.as_str() {
            "chunk_min" => "min",
            "chunk_max" => "max",
            k => KNOWN_KEYS
                .iter()
                .copied()
                .find(|known| *known == k)
                .ok_or_else(|| {
                    format!("unknown rule key '{k}' (known: {})", KNOWN_KEYS.join(", "))
                })?,
        };
        if seen.contains(&canonical) {
            // SegmentedProxy takes the last value; so do we, and say so.
            notes.push(format!("{canonical} given twice, the last value counts"));
            text_parts.retain(|p| canonical_key(p) != canonical);
        } else {
            seen.push(canonical);
        }
        let lower = value.to_ascii_lowercase();
        let mut shown = part.to_string();
        match canonical {
            "strategy" => keys.strategy = Some(value),
            "chunk" | "min" | "max" | "delay" => {
                let n = Some(parse_int(
                    if key.starts_with("chunk_") {
                        &key
                    } else {
                        canonical
                    },
                    value,
                )?);
                match canonical {
                    "chunk" => keys.chunk = n,
                    "min" => keys.min = n,
                    "max" => keys.max = n,
                    _ => keys.delay = n,
                }
            }
            "rate" => keys.rate = Some(SegmentPolicy::parse_rate(value)?),
            "ttfb" => keys.ttfb = Some(parse_int("ttfb", value)?),
            "latency" => keys.shaping.latency = Shaping::parse_ms("latency", value)?,
            "jitter" => keys.shaping.jitter = Shaping::parse_ms("jitter", value)?,
            "fault" => keys.shaping.fault = Some(Fault::parse(value)?),
            "fault_rate" => keys.shaping.fault_rate_ppm = Shaping::parse_fault_rate(value)?,
            "seed" => {
                keys.shaping.seed = Some(
                    value
                        .parse()
                        .map_err(|_| format!("invalid seed '{value}' (a whole number 0..2^64)"))?,
                )
            }
            "action" => keys.action = Some(value),
            "upstream" => {
                let up = UpstreamProxy::parse_lenient(value, &mut notes)?;
                if up.credentials.is_some() {
                    shown = format!("upstream={up}");
                }
                keys.upstream_text = Some(match value.rsplit_once('@') {
                    _ if up.port != 0 => up.to_string(),
                    Some((_, hostport)) if up.credentials.is_some() => {
                        let user = up.credentials.as_ref().map_or("", |(u, _)| u.as_str());
                        let scheme = match up.protocol {
                            UpstreamProtocol::Socks5 => SOCKS5_PREFIX,
                            UpstreamProtocol::Http => "",
                        };
                        format!("{scheme}{user}:***@{hostport}")
                    }
                    _ => value.to_string(),
                });
                keys.upstream = Some(up);
            }
            "reason" => keys.reason = Some(value),
            "scheme" => {
                keys.scheme = Some(match lower.as_str() {
                    "http" => Scheme::Http,
                    "https" => Scheme::Https,
                    _ => return Err(format!("unknown scheme '{value}' (expected http or https)")),
                })
            }
            "method" => {
                if value.is_empty() {
                    return Err("method must be non-empty".into());
                }
                if !is_http_token(value) {
                    notes.push(format!(
                        "method '{value}' is not an HTTP method: this rule matches no request"
                    ));
                }
                keys.method = Some(value.to_ascii_uppercase());
            }
            "path_prefix" => {
                if value.is_empty() {
                    return Err("path_prefix must be non-empty".into());
                }
                // As SegmentedProxy: `api` means `/api`.
                let prefix = if value.starts_with('/') {
                    value.to_string()
                } else {
                    format!("/{value}")
                };
                shown = format!("path_prefix={prefix}");
                keys.path_prefix = Some(prefix);
            }
            "port" => keys.port = Some(parse_port(value)?),
            "direction" => {
                keys.direction = Some(match lower.as_str() {
                    "up" => Direction::Up,
                    "down" => Direction::Down,
                    "both" => Direction::Both,
                    _ => {
                        return Err(format!(
                            "invalid direction '{value}' (expected up, down or both)"
                        ))
                    }
                })
            }
            "intercept" => {
                keys.intercept = Some(match lower.as_str() {
                    "yes" => Intercept::Yes,
                    "no" => Intercept::No,
                    _ => return Err(format!("invalid intercept '{value}' (expected yes or no)")),
                })
            }
            "capture" => {
                keys.capture = Some(match lower.as_str() {
                    "yes" | "true" | "1" | "on" => true,
                    "no" | "false" | "0" | "off" => false,
                    _ => {
                        return Err(format!(
                            "invalid capture '{value}' (expected yes or no, true or false, 1 or 0)"
                        ))
                    }
                })
            }
            "h2c" => {
                keys.h2c = Some(match lower.as_str() {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(format!("invalid h2c '{value}' (expected yes or no)")),
                })
            }
            _ => unreachable!("every known key is handled"),
        }
        text_parts.push(shown);
    }

    // SegmentedProxy's order: the policy, the delay, then the action.
    let policy = build_policy(segmenting, &keys, &mut notes)?;
    let written_reason = keys.reason.filter(|r| !r.is_empty()).map(str::to_string);
    let written_upstream = keys.upstream_text.take();
    let action = build_action(&mut keys, &mut notes)?;
    // The stored text is rebuilt from the parts so a password cannot survive in it.
    let mut text = format!("{}={}", glob.trim(), mode);
    for part in &text_parts {
        text.push(',');
        text.push_str(part);
    }
    let score = sp_score(
        glob.trim(),
        keys.scheme.is_some(),
        keys.method.is_some(),
        keys.path_prefix.as_deref(),
        keys.port.is_some(),
    );
    Ok(Rule {
        host_glob,
        scheme: keys.scheme,
        method: keys.method,
        path_prefix: keys.path_prefix,
        port: keys.port,
        action,
        policy,
        direction: keys.direction.unwrap_or(default_direction),
        intercept: keys.intercept.unwrap_or_default(),
        capture: keys.capture,
        h2c: keys.h2c.unwrap_or(false),
        source,
        mode: mode.to_string(),
        written: WrittenPolicy {
            strategy: keys.strategy.map(str::to_ascii_lowercase),
            chunk: keys.chunk,
            min: keys.min,
            max: keys.max,
            delay: keys.delay,
        },
        score,
        text,
        notes,
        written_reason,
        written_upstream,
    })
}

/// The canonical key of a `key=value` part already accepted.
fn canonical_key(part: &str) -> &str {
    let key = part.split_once('=').map_or(part, |(k, _)| k).trim();
    if key.eq_ignore_ascii_case("chunk_min") {
        "min"
    } else if key.eq_ignore_ascii_case("chunk_max") {
        "max"
    } else {
        KNOWN_KEYS
            .iter()
            .copied()
            .find(|k| k.eq_ignore_ascii_case(key))
            .unwrap_or(key)
    }
}

const KNOWN_KEYS: &[&str] = &[
    "strategy",
    "chunk",
    "min",
    "max",
    "delay",
    "rate",
    "ttfb",
    "latency",
    "jitter",
    "fault",
    "fault_rate",
    "seed",
    "action",
    "upstream",
    "reason",
    "scheme",
    "method",
    "path_prefix",
    "port",
    "direction",
    "intercept",
    "capture",
    "h2c",
];

/// The host glob, lower-cased (hosts are matched case-insensitively). Any glob SegmentedProxy
/// accepts is accepted; an IPv6 address in brackets means the address, and a trailing dot
/// after a name is dropped (hosts are compared without theirs).
fn parse_host_glob(glob: &str, notes: &mut Vec<String>) -> String {
    let glob = match glob.strip_prefix('[').and_then(|g| g.strip_suffix(']')) {
        Some(inner) if inner.parse::<std::net::Ipv6Addr>().is_ok() => inner,
        _ => glob,
    };
    let glob = match glob.strip_suffix('.') {
        Some(g) if g.ends_with(|c: char| c.is_ascii_alphanumeric()) => g,
        _ => glob,
    };
    if glob.is_empty() {
        notes.push("empty host glob: this rule matches no host".into());
    } else if glob.contains(char::is_whitespace) {
        notes.push(format!(
            "host glob '{glob}' contains a space: it matches no host"
        ));
    }
    glob.to_lowercase()
}

/// The segmentation policy of a rule, validated as SegmentedProxy validates it (whatever the
/// mode, with its messages):
/// - mode `direct` (or any word but `segment_upstream`) never segments;
/// - no `strategy`: a valid `chunk` or a `delay` means fixed, a valid `min`/`max` pair random
///   (SegmentedProxy forwards such lines unsegmented; we do what they say), anything else none;
/// - sizes that the strategy does not use are ignored, and noted.
fn build_policy(
    segmenting: bool,
    k: &Keys<'_>,
    notes: &mut Vec<String>,
) -> Result<SegmentPolicy, String> {
    let random_keys = k.min.is_some() || k.max.is_some();
    let valid_pair = matches!((k.min, k.max), (Some(min), Some(max)) if 0 < min && min <= max);
    let strategy_name = match k.strategy.map(str::to_ascii_lowercase) {
        Some(s) => s,
        None if k.chunk.is_some_and(|c| c > 0) => "fixed".to_string(),
        None if k.chunk.is_some() => {
            notes.push(format!(
                "chunk={} is not a chunk size: no segmentation (strategy none)",
                k.chunk.unwrap_or(0)
            ));
            "none".to_string()
        }
        None if random_keys && valid_pair => "random".to_string(),
        None if random_keys => {
            notes.push("min/max are not a valid pair (0 < min <= max, both given): no segmentation (strategy none)".into());
            "none".to_string()
        }
        None if k.delay.is_some() => "fixed".to_string(),
        None => "none".to_string(),
    };
    // The one policy parser validates (and says why not); the notes are this syntax's own.
    let policy = SegmentPolicy::parse(
        &strategy_name,
        k.chunk,
        k.min,
        k.max,
        k.delay.unwrap_or(0) as f64,
    )?;
    let strategy = policy.strategy;
    match strategy {
        Strategy::None if k.strategy.is_some() && (k.chunk.is_some() || random_keys) => {
            notes.push("chunk/min/max ignored with strategy=none".into());
        }
        Strategy::Fixed { .. } if random_keys => {
            notes.push("min/max ignored by strategy=fixed (it uses chunk)".into());
        }
        Strategy::Random { .. } if k.chunk.is_some() => {
            notes.push("chunk ignored by strategy=random (it uses min and max)".into());
        }
        _ => {}
    }
    let policy = if strategy == Strategy::None && !policy.delay.is_zero() {
        // SegmentedProxy relays strategy=none unsegmented, delay or not.
        notes.push("delay ignored with strategy=none (nothing is segmented)".into());
        SegmentPolicy::none()
    } else {
        policy
    };
    if segmenting && k.strategy.is_none() && strategy != Strategy::None {
        // Our reading, said out loud so that no SegmentedProxy user meets it by surprise.
        notes.push(format!(
            "no strategy=: segmented as strategy={strategy_name} (SegmentedProxy does not segment a line without strategy=)"
        ));
    }
    if !segmenting {
        if policy != SegmentPolicy::none() {
            notes.push("mode direct does not segment: strategy/chunk/min/max/delay ignored (use segment_upstream)".into());
        }
        // A rate shapes in every mode: it paces, it does not segment as SegmentedProxy does.
        return SegmentPolicy::none()
            .with_rate(k.rate)?
            .with_ttfb(k.ttfb)?
            .with_shaping(k.shaping.clone());
    }
    policy
        .with_rate(k.rate)?
        .with_ttfb(k.ttfb)?
        .with_shaping(k.shaping.clone())
}

/// The action of a rule (default direct), with SegmentedProxy's checks and messages. As
/// there, `upstream=` takes effect only with `action=upstream` and `reason=` only with
/// `action=block`; otherwise they are noted.
fn build_action(k: &mut Keys<'_>, notes: &mut Vec<String>) -> Result<Action, String> {
    let name = k
        .action
        .map(str::to_ascii_lowercase)
        .unwrap_or_else(|| "direct".to_string());
    if name != "block" && k.reason.is_some_and(|r| !r.is_empty()) {
        notes.push("reason= ignored (it is the message of action=block)".into());
    }
    match name.as_str() {
        "block" if k.upstream.is_some() => Err("block action cannot include upstream".into()),
        "direct" => {
            if k.upstream.is_some() {
                notes.push("upstream= ignored: the action is direct (add action=upstream)".into());
            }
            Ok(Action::Direct)
        }
        "block" => Ok(Action::Block {
            reason: k
                .reason
                .filter(|r| !r.is_empty())
                .unwrap_or("blocked by rule")
                .to_string(),
        }),
        "upstream" => match k.upstream.take() {
            Some(up) => Ok(Action::Upstream(up)),
            None => Err("upstream action requires upstream=HOST:PORT".into()),
        },
        _ => Err(format!(
            "unknown action '{}' (expected direct, upstream or block)",
            k.action.unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn one(line: &str) -> Rule {
        RuleSet::parse(line, "<text>")
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .rules()[0]
            .clone()
    }

    fn err(line: &str) -> String {
        RuleSet::parse(line, "rules.txt")
            .expect_err(line)
            .to_string()
    }

    #[test]
    fn capture_key() {
        assert_eq!(one("a=direct,capture=yes").capture, Some(true));
        assert_eq!(one("a=direct,capture=TRUE").capture, Some(true));
        assert_eq!(one("a=direct,capture=1").capture, Some(true));
        assert_eq!(one("a=direct,capture=off").capture, Some(false));
        assert_eq!(one("a=direct").capture, None);
        let err = RuleSet::parse("a=direct,capture=maybe", "r.txt")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid capture 'maybe'"), "{err}");
        let set = RuleSet::parse("a=direct,capture=1", "r.txt").unwrap();
        assert!(
            set.describe().contains(" capture=yes "),
            "{}",
            set.describe()
        );
        let d = set.decide("GET", Scheme::Http, "a", 80, "/");
        assert_eq!(d.capture, Some(true));
        assert_eq!(set.decide("GET", Scheme::Http, "b", 80, "/").capture, None);
    }

    #[test]
    fn segmentedproxy_examples() {
        let r = one("*.example.com=segment_upstream,strategy=fixed,chunk=512,delay=10");
        assert_eq!(r.host_glob, "*.example.com");
        assert_eq!(r.policy, SegmentPolicy::fixed(512, ms(10)));
        assert_eq!(r.action, Action::Direct);
        assert_eq!(r.direction, Direction::Up);
        assert_eq!(r.intercept, Intercept::Default);

        let r = one("blocked.test=direct,action=block,reason=no thanks");
        assert_eq!(
            r.action,
            Action::Block {
                reason: "no thanks".into()
            }
        );
        assert!(r.policy.is_passthrough());

        let r = one("*=direct,action=upstream,upstream=127.0.0.1:3128");
        assert_eq!(
            r.action,
            Action::Upstream(UpstreamProxy {
                protocol: UpstreamProtocol::Http,
                host: "127.0.0.1".into(),
                port: 3128,
                credentials: None
            })
        );

        let r = one("*=direct,action=upstream,upstream=SOCKS5://user:secret@[::1]:1080");
        assert_eq!(
            r.action,
            Action::Upstream(UpstreamProxy {
                protocol: UpstreamProtocol::Socks5,
                host: "::1".into(),
                port: 1080,
                credentials: Some(("user".into(), "secret".into()))
            })
        );
        assert_eq!(
            r.action.to_string(),
            "upstream=socks5://user:***@[::1]:1080"
        );
        assert!(!r.text.contains("secret"), "{}", r.text);

        let r = one("*.example.com=segment_upstream,chunk=512,delay=5");
        assert_eq!(r.policy, SegmentPolicy::fixed(512, ms(5)));

        let r = one("*.example.com=segment_upstream,scheme=https,method=CONNECT,strategy=random,min=256,max=1024,delay=5");
        assert_eq!(r.policy, SegmentPolicy::random(256, 1024, ms(5)));
        assert_eq!(r.scheme, Some(Scheme::Https));
        assert_eq!(r.method.as_deref(), Some("CONNECT"));

        // A bare segment_upstream gives no strategy, size or delay: no segmentation, as in
        // SegmentedProxy.
        let r = one("*.example.com=segment_upstream,action=upstream,upstream=127.0.0.1:3128");
        assert_eq!(r.policy, SegmentPolicy::none());
        assert!(matches!(r.action, Action::Upstream(_)));
        assert!(r.notes.is_empty());

        let r = one("example.com=direct");
        assert!(r.policy.is_passthrough());
        assert_eq!(r.action, Action::Direct);
    }

    #[test]
    fn strategy_inference_and_keys() {
        assert_eq!(
            one("a=segment_upstream,min=10,max=20").policy,
            SegmentPolicy::random(10, 20, Duration::ZERO)
        );
        assert_eq!(
            one("a=segment_upstream,chunk_min=10,chunk_max=20").policy,
            SegmentPolicy::random(10, 20, Duration::ZERO)
        );
        assert_eq!(
            one("a=segment_upstream,delay=7").policy,
            SegmentPolicy::fixed(DEFAULT_CHUNK, ms(7))
        );
        // As in SegmentedProxy, strategy=none relays unsegmented, delay or not.
        let r = one("a=segment_upstream,strategy=none,delay=7");
        assert_eq!(r.policy, SegmentPolicy::none());
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("delay ignored with strategy=none")),
            "{:?}",
            r.notes
        );
        assert_eq!(
            one("a=segment_upstream,Strategy=FIXED,CHUNK=9").policy,
            SegmentPolicy::fixed(9, Duration::ZERO)
        );
        let r = one(" A.Example.COM = segment_upstream , chunk = 3 ,, port=8443, direction=both, intercept=no, method=get, path_prefix=/api ");
        assert_eq!(r.host_glob, "a.example.com");
        assert_eq!(r.port, Some(8443));
        assert_eq!(r.direction, Direction::Both);
        assert_eq!(r.intercept, Intercept::No);
        assert_eq!(r.method.as_deref(), Some("GET"));
        assert_eq!(r.path_prefix.as_deref(), Some("/api"));
        assert_eq!(
            one("a=direct,intercept=yes,direction=down").intercept,
            Intercept::Yes
        );
        assert!(one("a=direct,h2c=yes").h2c && !one("a=direct,h2c=no").h2c);
        assert!(!one("a=direct").h2c);
        // As in SegmentedProxy, upstream= needs action=upstream; alone it is noted, not used.
        let r = one("a=direct,upstream=proxy.local:8080");
        assert_eq!(r.action, Action::Direct);
        assert!(
            r.notes.iter().any(|n| n.contains("upstream= ignored")),
            "{:?}",
            r.notes
        );
        // reason may contain '=' and '#'.
        assert_eq!(
            one("a=direct,action=block,reason=policy #4: a=b").action,
            Action::Block {
                reason: "policy #4: a=b".into()
            }
        );
        assert_eq!(
            one("a=direct,action=block").action,
            Action::Block {
                reason: "blocked by rule".into()
            }
        );
    }

    #[test]
    fn lines_segmentedproxy_accepts_are_accepted_and_their_dead_keys_noted() {
        let note = |line: &str, needle: &str| {
            let r = one(line);
            assert!(
                r.notes.iter().any(|n| n.contains(needle)),
                "{line}: {:?}",
                r.notes
            );
            r
        };
        let r = note(
            "x=direct,strategy=fixed,chunk=10",
            "mode direct does not segment",
        );
        assert_eq!(r.policy, SegmentPolicy::none());
        let r = note("x=direct,reason=foo", "reason= ignored");
        assert_eq!(r.action, Action::Direct);
        let r = note("x=direct,action=direct,upstream=h:1", "upstream= ignored");
        assert_eq!(r.action, Action::Direct);
        let r = note(
            "x=direct,action=upstream,upstream=h:1,reason=r",
            "reason= ignored",
        );
        assert!(matches!(r.action, Action::Upstream(_)));
        let r = note(
            "x=segment_upstream,strategy=random,min=1,max=5,chunk=10",
            "chunk ignored",
        );
        assert_eq!(r.policy, SegmentPolicy::random(1, 5, Duration::ZERO));
        let r = note(
            "x=segment_upstream,strategy=fixed,chunk=7,min=1",
            "min/max ignored",
        );
        assert_eq!(r.policy, SegmentPolicy::fixed(7, Duration::ZERO));
        let r = note(
            "x=segment_upstream,strategy=none,chunk=1",
            "ignored with strategy=none",
        );
        assert_eq!(r.policy, SegmentPolicy::none());
        // A chunk size with min/max and no strategy: the chunk size decides (fixed).
        let r = note("x=segment_upstream,chunk=5,min=1,max=2", "min/max ignored");
        assert_eq!(r.policy, SegmentPolicy::fixed(5, Duration::ZERO));
        // Repeated keys: the last value counts, and the shown text keeps only that one.
        let r = note("x=direct,action=block,action=direct", "action given twice");
        assert_eq!(r.action, Action::Direct);
        assert_eq!(r.text, "x=direct,action=direct");
        let r = note(
            "x=segment_upstream,min=1,chunk_min=2,max=3",
            "min given twice",
        );
        assert_eq!(r.policy, SegmentPolicy::random(2, 3, Duration::ZERO));
        // path_prefix without its slash gets one, as in SegmentedProxy.
        let r = one("x=direct,path_prefix=api");
        assert_eq!(r.path_prefix.as_deref(), Some("/api"));
        assert!(r.notes.is_empty());
        // Plain rules carry no note; a size without strategy= is noted (our reading).
        assert!(one("x=segment_upstream,strategy=fixed,chunk=5,delay=1")
            .notes
            .is_empty());
        let r = note(
            "x=segment_upstream,chunk=5,delay=1",
            "segmented as strategy=fixed (SegmentedProxy does not",
        );
        assert_eq!(r.policy, SegmentPolicy::fixed(5, ms(1)));
    }

    #[test]
    fn errors_name_file_and_line() {
        let text = "# comment\n\nok.test=direct\nbad.test=segment_upstream,chunk=abc\n";
        let e = RuleSet::parse(text, "rules.txt").unwrap_err();
        assert_eq!(e.source, "rules.txt");
        assert_eq!(e.line, 4);
        assert_eq!(e.to_string(), "rules.txt:4: invalid int for 'chunk': 'abc'");

        // Every bad line is named, in order.
        let e = RuleSet::parse(
            "a=direct,strategy=zigzag\nok=direct\nb=direct,colour=red\n",
            "r.txt",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "r.txt:1: unknown strategy 'zigzag' (expected none, fixed or random)\nr.txt:3: unknown rule key 'colour' (known: strategy, chunk, min, max, delay, rate, ttfb, latency, jitter, fault, fault_rate, seed, action, upstream, reason, scheme, method, path_prefix, port, direction, intercept, capture, h2c)"
        );

        // All or nothing.
        let mut set = RuleSet::default();
        assert!(set.add_text(text, "rules.txt").is_err());
        assert!(set.rules().is_empty());

        // Lines SegmentedProxy rejects, with its reason.
        for (line, needle) in [
            ("nomode", "segment rule must contain '='"),
            ("a=", "segment rule missing mode"),
            ("a=direct,colour=red", "unknown rule key 'colour'"),
            (
                "a=direct,action",
                "invalid rule token 'action', expected key=value",
            ),
            ("a=direct,action=", "unknown action ''"),
            ("a=direct,chunk=", "invalid int for 'chunk': ''"),
            ("a=direct,chunk_min=x", "invalid int for 'chunk_min': 'x'"),
            (
                "a=segment_upstream,strategy=fixed,chunk=0",
                "fixed strategy requires chunk > 0",
            ),
            (
                "a=segment_upstream,strategy=random,min=5",
                "random strategy requires both min and max",
            ),
            (
                "a=segment_upstream,strategy=random",
                "random strategy requires both min and max",
            ),
            (
                "a=segment_upstream,strategy=random,min=9,max=5",
                "requires min <= max",
            ),
            (
                "a=segment_upstream,strategy=random,min=0,max=5",
                "requires min/max > 0",
            ),
            (
                "a=segment_upstream,strategy=zigzag",
                "unknown strategy 'zigzag'",
            ),
            (
                "a=segment_upstream,delay=1.5",
                "invalid int for 'delay': '1.5'",
            ),
            ("a=segment_upstream,delay=-1", "delay must be >= 0"),
            (
                "a=direct,action=upstream",
                "upstream action requires upstream=HOST:PORT",
            ),
            (
                "a=direct,action=block,upstream=h:1",
                "block action cannot include upstream",
            ),
            // Validated whatever the mode, as SegmentedProxy does.
            (
                "a=direct,strategy=random,min=5",
                "requires both min and max",
            ),
            ("a=direct,strategy=fixed,chunk=0", "chunk > 0"),
            ("a=direct,action=teleport", "unknown action 'teleport'"),
            ("a=direct,upstream=nohost", "upstream must be host:port"),
            ("a=direct,upstream=:80", "upstream must include host"),
            ("a=direct,upstream=h:x", "invalid upstream port 'x'"),
            ("a=direct,scheme=ftp", "unknown scheme 'ftp'"),
            ("a=direct,method=", "method must be non-empty"),
            ("a=direct,path_prefix=", "path_prefix must be non-empty"),
            ("a=direct,port=0", "invalid port"),
            ("a=direct,direction=sideways", "invalid direction"),
            ("a=direct,intercept=maybe", "invalid intercept"),
            ("a=direct,h2c=maybe", "invalid h2c"),
        ] {
            let e = err(line);
            assert!(e.starts_with("rules.txt:1: "), "{line}: {e}");
            assert!(e.contains(needle), "{line}: expected '{needle}' in '{e}'");
        }

        // Lines SegmentedProxy accepts though they look wrong: accepted, with its meaning,
        // and a note that --validate-rules prints as a warning naming the line.
        for (line, needle) in [
            ("a=fast", "unknown mode 'fast' treated as direct"),
            ("a=SEGMENT_UPSTREAM,chunk=5", "modes are case-sensitive"),
            ("=direct", "empty host glob"),
            ("a b=direct", "contains a space"),
            (
                "a=direct,action=upstream,upstream=h:70000",
                "upstream port 70000 is out of range",
            ),
            (
                "a=direct,action=upstream,upstream=h:0",
                "upstream port 0 is out of range",
            ),
            (
                "a=direct,action=upstream,upstream=h:-3",
                "upstream port -3 is out of range",
            ),
            (
                "a=direct,action=upstream,upstream=bad host:1",
                "is not a host name",
            ),
            ("a=direct,method=GE T", "not an HTTP method"),
            (
                "a=segment_upstream,chunk=-1",
                "chunk=-1 is not a chunk size",
            ),
            ("a=segment_upstream,chunk=0", "chunk=0 is not a chunk size"),
            ("a=segment_upstream,min=9,max=5", "not a valid pair"),
            ("a=segment_upstream,min=5", "not a valid pair"),
        ] {
            let set = RuleSet::parse(line, "w.txt").unwrap_or_else(|e| panic!("{line}: {e}"));
            let warnings = set.warnings();
            assert!(
                warnings
                    .iter()
                    .any(|w| w.starts_with("w.txt:1: ") && w.contains(needle)),
                "{line}: {warnings:?}"
            );
            assert_eq!(set.rules()[0].policy, SegmentPolicy::none(), "{line}");
        }
        // Their meaning: an out-of-range upstream port is kept as 0 (a 502 when used), an
        // unknown mode does not segment, an empty glob matches nothing.
        let set = RuleSet::parse(
            "a=direct,action=upstream,upstream=h:70000\n=direct,action=block",
            "t",
        )
        .unwrap();
        let Action::Upstream(up) = &set.rules()[0].action else {
            panic!("not upstream")
        };
        assert_eq!((up.host.as_str(), up.port), ("h", 0));
        assert_eq!(set.decide("GET", Scheme::Http, "b", 80, "/").rule, None);
        // Python's int(): sign, underscores.
        assert_eq!(
            one("a=segment_upstream,chunk=+1_000").policy,
            SegmentPolicy::fixed(1000, Duration::ZERO)
        );
        // Credentials never reach a note.
        let set = RuleSet::parse(
            "a=direct,action=upstream,upstream=carol:hunter2@bad host:1",
            "t",
        )
        .unwrap();
        assert!(
            !set.warnings().concat().contains("hunter2"),
            "{:?}",
            set.warnings()
        );

        let mut set = RuleSet::default();
        let e = set.add_rule_line("", "<cli>", 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "<cli>:2: empty rule; expected HOST_GLOB=MODE[,key=value]..."
        );
    }

    #[test]
    fn unreadable_file_is_line_zero() {
        let mut set = RuleSet::default();
        let e = set
            .add_file(Path::new("/nonexistent/rules.txt"))
            .unwrap_err();
        assert_eq!(e.line, 0);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/rules.txt: cannot read rules file"),
            "{e}"
        );
    }

    #[test]
    fn add_file_reads_rules_with_lines() {
        let path = std::env::temp_dir().join(format!("segproxy-rules-{}.txt", std::process::id()));
        std::fs::write(&path, "\u{feff}# header\r\n*.a.test=direct\r\n\r\n  # indented comment\nb.test=direct,action=block\n").unwrap();
        let mut set = RuleSet::default();
        set.add_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<usize> = set.rules().iter().map(|r| r.source.line).collect();
        assert_eq!(lines, vec![2, 5]);
        assert_eq!(set.rules()[0].source.file, path.display().to_string());
    }

    #[test]
    fn credentials_are_kept_but_masked() {
        let set = RuleSet::parse(
            "*.corp=direct,action=upstream,upstream=alice:s3cr3t@Proxy.Corp:3128",
            "f",
        )
        .unwrap();
        let rule = &set.rules()[0];
        let Action::Upstream(up) = &rule.action else {
            panic!("not upstream")
        };
        assert_eq!(up.credentials, Some(("alice".into(), "s3cr3t".into())));
        assert_eq!(up.authority(), "proxy.corp:3128");
        assert_eq!(up.to_string(), "alice:***@proxy.corp:3128");
        // base64("alice:s3cr3t")
        assert_eq!(
            up.basic_auth_header().as_deref(),
            Some("Basic YWxpY2U6czNjcjN0")
        );
        assert_eq!(
            rule.text,
            "*.corp=direct,action=upstream,upstream=alice:***@proxy.corp:3128"
        );
        let d = set.decide("GET", Scheme::Http, "x.corp", 80, "/");
        for shown in [
            set.describe(),
            d.explanation.to_string(),
            format!("{rule:?}"),
            format!("{d:?}"),
        ] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(shown.contains("alice:***@proxy.corp:3128"), "{shown}");
        }
        // Password containing '@' and ':'; IPv6 upstream.
        let up = UpstreamProxy::parse("bob:p@ss:w@[::1]:8080").unwrap();
        assert_eq!(up.credentials, Some(("bob".into(), "p@ss:w".into())));
        assert_eq!(up.host, "::1");
        assert_eq!(up.authority(), "[::1]:8080");
        assert_eq!(up.to_string(), "bob:***@[::1]:8080");
        assert!(UpstreamProxy::parse("h:1")
            .unwrap()
            .basic_auth_header()
            .is_none());
        // Errors never echo the password.
        let e = err("a=direct,upstream=carol:hunter2@bad host:x");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn glob_matching() {
        for (p, t, ok) in [
            ("*", "", true),
            ("*", "anything.at.all", true),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "aexample.com", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*a", "bbba", true),
            ("**", "x", true),
            ("api-*.svc", "api-1.svc", true),
            ("api-*.svc", "api-1.svc.x", false),
            // fnmatch's classes, as SegmentedProxy reads them.
            ("h[0-9].test", "h7.test", true),
            ("h[0-9].test", "hx.test", false),
            ("h[!0-9].test", "hx.test", true),
            ("h[!0-9].test", "h7.test", false),
            ("[ab]*", "bee", true),
            ("[ab]*", "cee", false),
            ("a[-x]", "a-", true),
            ("a[]]", "a]", true),
            ("a[", "a[", true),
            ("a[b", "a[b", true),
            ("*[.]com", "x.com", true),
            ("h[z-a]", "hm", false),
            ("h[!z-a]", "hm", true),
        ] {
            assert_eq!(glob_match(p, t), ok, "{p} vs {t}");
        }
        assert_eq!(HostClass::of("example.com"), HostClass::Exact);
        assert_eq!(HostClass::of("*.example.com"), HostClass::Suffix);
        assert_eq!(HostClass::of("*.ex*.com"), HostClass::Glob);
        assert_eq!(HostClass::of("*.ex[ab].com"), HostClass::Glob);
        assert_eq!(HostClass::of("h[0-9].test"), HostClass::Glob);
        assert_eq!(HostClass::of("*"), HostClass::Glob);
    }

    const ORDER: &str = "\
*=direct,action=upstream,upstream=127.0.0.1:3128
*.com=segment_upstream,chunk=1
*.example.com=segment_upstream,chunk=2
*.api.example.com=segment_upstream,chunk=3
api.example.com=segment_upstream,chunk=4
a*.example.com=segment_upstream,chunk=5
";

    fn chunk_of(d: &Decision) -> usize {
        match d.policy.strategy {
            Strategy::Fixed { chunk } => chunk,
            _ => 0,
        }
    }

    #[test]
    fn segmentedproxy_scores() {
        let set = RuleSet::parse(ORDER, "order.rules").unwrap();
        let scores: Vec<u32> = set.rules().iter().map(|r| r.score).collect();
        assert_eq!(scores, vec![0, 1200, 1200, 1200, 1500, 1000]);
        assert_eq!(
            one("x.test=direct,scheme=http,method=GET,path_prefix=/abc").score,
            1704
        );
        assert_eq!(one("x.test=direct,port=8080").score, 1600); // ours: port= counts as scheme=
        assert_eq!(one("=direct").score, 500); // SegmentedProxy's arithmetic, empty glob
        assert_eq!(one("h[0-9].test=direct").score, 1500); // no * or ?: as exact
        assert_eq!(one("x?.test=direct").score, 1000);
    }

    #[test]
    fn highest_score_wins_then_block_then_earlier() {
        let set = RuleSet::parse(ORDER, "order.rules").unwrap();
        let pick = |h: &str| chunk_of(&set.decide("GET", Scheme::Https, h, 443, "/"));
        assert_eq!(pick("api.example.com"), 4); // 1500
        assert_eq!(pick("API.Example.com."), 4); // normalised
                                                 // *.com, *.example.com and *.api.example.com all score 1200: the earliest wins.
        assert_eq!(pick("v1.api.example.com"), 1);
        assert_eq!(pick("www.example.com"), 1);
        assert_eq!(pick("abc.example.com"), 1); // 1200 beats a*.example.com's 1000
        assert_eq!(pick("other.com"), 1);
        let d = set.decide("GET", Scheme::Https, "example.org", 443, "/");
        assert_eq!(d.rule, Some(0)); // catch-all
        assert!(matches!(d.action, Action::Upstream(_)));

        // The issue's two examples, as SegmentedProxy decides them.
        let set = RuleSet::parse(
            "*=direct,method=POST,action=block,reason=A\n*=direct,path_prefix=/x,reason=B",
            "t",
        )
        .unwrap();
        let d = set.decide("POST", Scheme::Http, "h.test", 80, "/xyz");
        assert_eq!(d.rule, Some(0));
        assert_eq!(d.action, Action::Block { reason: "A".into() });
        let set = RuleSet::parse(
            "*.b.example.com=direct\n*.example.com=direct,action=block",
            "t",
        )
        .unwrap();
        let d = set.decide("GET", Scheme::Https, "x.b.example.com", 443, "/");
        assert_eq!(d.rule, Some(1));
        assert!(d.action.is_block());

        // A long path prefix outweighs a host class.
        let long = "/".to_string() + &"p".repeat(1600);
        let set = RuleSet::parse(
            &format!("exact.test=direct\n*=direct,action=block,path_prefix={long}"),
            "t",
        )
        .unwrap();
        assert_eq!(
            set.decide("GET", Scheme::Http, "exact.test", 80, &format!("{long}/x"))
                .rule,
            Some(1)
        );
        assert_eq!(
            set.decide("GET", Scheme::Http, "exact.test", 80, "/").rule,
            Some(0)
        );

        // Globs with equal scores: the earlier.
        let set = RuleSet::parse("*=direct\nex*.org=direct,action=block", "t").unwrap();
        assert_eq!(
            set.decide("GET", Scheme::Http, "example.org", 80, "/").rule,
            Some(1)
        );
        let set = RuleSet::parse("e*.org=direct\n*ple.org=direct\nex*.org=direct", "t").unwrap();
        assert_eq!(
            set.decide("GET", Scheme::Http, "example.org", 80, "/").rule,
            Some(0)
        );
    }

    #[test]
    fn conditions_path_and_ties() {
        let text = "\
h.test=segment_upstream,chunk=1
h.test=segment_upstream,chunk=2,method=post
h.test=segment_upstream,chunk=3,method=post,scheme=https
h.test=segment_upstream,chunk=4,path_prefix=/a
h.test=segment_upstream,chunk=5,path_prefix=/a/b
h.test=segment_upstream,chunk=6,port=8443,scheme=http
";
        let set = RuleSet::parse(text, "t").unwrap();
        let pick = |m: &str, s: Scheme, port: u16, path: &str| {
            chunk_of(&set.decide(m, s, "h.test", port, path))
        };
        assert_eq!(pick("GET", Scheme::Https, 443, "/"), 1);
        assert_eq!(pick("post", Scheme::Http, 80, "/"), 2);
        assert_eq!(pick("POST", Scheme::Https, 443, "/"), 3);
        assert_eq!(pick("GET", Scheme::Https, 443, "/a/x"), 4);
        assert_eq!(pick("GET", Scheme::Https, 443, "/a/b/c"), 5);
        assert_eq!(pick("GET", Scheme::Http, 8443, "/a/b/c"), 6); // 1700 > 1504
        assert_eq!(pick("POST", Scheme::Https, 443, "/a/b/c"), 3); // 1700 > 1504

        // Equal scores: block wins, then the earlier rule.
        let set = RuleSet::parse(
            "t.test=direct\nt.test=direct,action=block\nt.test=direct,action=block,reason=2nd",
            "t",
        )
        .unwrap();
        let d = set.decide("GET", Scheme::Http, "t.test", 80, "/");
        assert_eq!(d.rule, Some(1));
        assert_eq!(
            d.action,
            Action::Block {
                reason: "blocked by rule".into()
            }
        );
        let set = RuleSet::parse("t.test=direct\nt.test=segment_upstream", "t").unwrap();
        assert_eq!(
            set.decide("GET", Scheme::Http, "t.test", 80, "/").rule,
            Some(0)
        );
    }

    #[test]
    fn connect_and_method_matching() {
        let text = "*.example.com=segment_upstream,scheme=https,method=CONNECT,strategy=random,min=256,max=1024,delay=5\n*.example.com=direct,path_prefix=/x";
        let set = RuleSet::parse(text, "t").unwrap();
        let d = set.decide("connect", Scheme::Https, "www.example.com", 443, "");
        assert_eq!(d.rule, Some(0));
        assert_eq!(d.policy, SegmentPolicy::random(256, 1024, ms(5)));
        // A path-prefix rule never matches an opaque CONNECT.
        let set = RuleSet::parse("*.example.com=direct,path_prefix=/", "t").unwrap();
        assert_eq!(
            set.decide("CONNECT", Scheme::Https, "a.example.com", 443, "")
                .rule,
            None
        );
        assert_eq!(
            set.decide("GET", Scheme::Https, "a.example.com", 443, "/z")
                .rule,
            Some(0)
        );
    }

    #[test]
    fn no_match_uses_defaults() {
        let mut set = RuleSet::new(SegmentPolicy::fixed(100, ms(3)), Direction::Both);
        set.add_rule_line("only.test=direct", "<cli>", 1).unwrap();
        set.add_rule_line("dir.test=segment_upstream", "<cli>", 2)
            .unwrap();
        let d = set.decide("GET", Scheme::Http, "other.test", 80, "/");
        assert_eq!(d.rule, None);
        assert_eq!(d.action, Action::Direct);
        assert_eq!(d.policy, SegmentPolicy::fixed(100, ms(3)));
        assert_eq!(d.direction, Direction::Both);
        assert_eq!(d.intercept, Intercept::Default);
        assert_eq!(d.explanation, "no rule matched; using default policy");
        // A matching `direct` rule turns segmentation off.
        assert!(set
            .decide("GET", Scheme::Http, "only.test", 80, "/")
            .policy
            .is_passthrough());
        // Rules without direction= take the set's default.
        assert_eq!(set.rules()[1].direction, Direction::Both);
        assert!(RuleSet::parse("", "t").unwrap().is_empty());
    }

    #[test]
    fn explanations() {
        let set = RuleSet::parse(ORDER, "order.rules").unwrap();
        let d = set.decide("GET", Scheme::Https, "api.example.com", 443, "/");
        assert_eq!(d.score, Some(1500));
        assert_eq!(
            d.explanation,
            "matched host_glob=api.example.com; ctx host=api.example.com scheme=https method=GET path=/; \
             score=1500; action=direct; rule 5 at order.rules:5 `api.example.com=segment_upstream,chunk=4`"
        );
        let set = RuleSet::parse(
            "x.test=direct,method=get,port=80,scheme=http,path_prefix=/p,action=block",
            "t",
        )
        .unwrap();
        let d = set.decide("get", Scheme::Http, "X.test", 80, "/p/q");
        assert_eq!(
            d.explanation,
            "matched host_glob=x.test scheme=http method=GET path_prefix=/p port=80; \
             ctx host=x.test scheme=http method=GET path=/p/q port=80; score=1802; action=block; \
             rule 1 at t:1 `x.test=direct,method=get,port=80,scheme=http,path_prefix=/p,action=block`"
        );
        let d = set.decide("GET", Scheme::Http, "y.test", 80, "/");
        assert_eq!(d.score, None);
        assert_eq!(d.explanation, "no rule matched; using default policy");
        assert_eq!(d.mode, "direct");
    }

    #[test]
    fn describe_listing() {
        let text = "*.example.com=segment_upstream,strategy=fixed,chunk=512,delay=10\nblocked.test=direct,action=block,reason=no thanks\n*=direct,action=upstream,upstream=127.0.0.1:3128,intercept=yes\napi.test=segment_upstream,chunk=100,method=post,scheme=http,path_prefix=/a-very-long-upload-path/x,port=81,direction=both\nr.test=segment_upstream,strategy=random,min=1,max=9\nw.test=fast,reason=a reason longer than twenty-four characters\n";
        let set = RuleSet::parse(text, "rules.txt").unwrap();
        assert_eq!(
            set.describe(),
            "Default policy: mode=direct strategy=none chunk=1024 delay=0 direction=up\n\
             Rules:\n\
             01. host=*.example.com action=direct mode=segment_upstream strategy=fixed chunk=512 delay=10 source=rules.txt:1 policy=\"fixed chunk=512 delay=10ms\"\n\
             02. host=blocked.test action=block reason=no thanks mode=direct strategy=none chunk=1024 delay=0 source=rules.txt:2 policy=\"none\"\n\
             03. host=* action=upstream upstream=127.0.0.1:3128 mode=direct strategy=none chunk=1024 delay=0 source=rules.txt:3 intercept=yes policy=\"none\"\n\
             04. host=api.test scheme=http method=POST path=/a-very-long-upload-p... action=direct mode=segment_upstream strategy=fixed chunk=100 delay=0 source=rules.txt:4 port=81 direction=both policy=\"fixed chunk=100 delay=0ms\"\n\
             05. host=r.test action=direct mode=segment_upstream strategy=random chunk=1024 delay=0 min=1 max=9 source=rules.txt:5 policy=\"random min=1 max=9 delay=0ms\"\n\
             06. host=w.test action=direct reason=a reason longer than ... mode=fast strategy=none chunk=1024 delay=0 source=rules.txt:6 policy=\"none\"\n"
        );
        assert_eq!(
            RuleSet::default().describe(),
            "Default policy: mode=direct strategy=none chunk=1024 delay=0 direction=up\nRules: (none)\n"
        );
        let set = RuleSet::new(SegmentPolicy::fixed(300, ms(5)), Direction::Up);
        assert!(set.describe().starts_with(
            "Default policy: mode=segment_upstream strategy=fixed chunk=300 delay=5 direction=up\n"
        ));
        assert_eq!(set.warnings(), Vec::<String>::new());
    }

    #[test]
    fn many_rules_decide_matches_brute_force() {
        // 1,000 mixed rules; the indexed decision equals a linear max over all rules.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut text = String::new();
        for i in 0..1000 {
            let d = rng.usize(0..30);
            let cond = match rng.usize(0..5) {
                0 => ",method=GET".to_string(),
                1 => ",scheme=https".to_string(),
                2 => format!(",path_prefix=/{}", "p".repeat(rng.usize(0..3))),
                3 => ",port=443".to_string(),
                _ => String::new(),
            };
            let action = if rng.bool() { ",action=block" } else { "" };
            let host = match rng.usize(0..5) {
                0 => format!("h{d}.d{}.test", d % 7),
                1 => format!("*.d{}.test", d % 7),
                2 => "*.test".to_string(),
                3 => format!("h{}*", d % 5),
                _ => "*".to_string(),
            };
            text += &format!("{host}=direct{cond}{action}\n");
            let _ = i;
        }
        let set = RuleSet::parse(&text, "gen").unwrap();
        assert_eq!(set.rules().len(), 1000);
        for _ in 0..2000 {
            let d = rng.usize(0..35);
            let host = format!("h{d}.d{}.test", rng.usize(0..8));
            let method = if rng.bool() { "GET" } else { "POST" };
            let scheme = if rng.bool() {
                Scheme::Https
            } else {
                Scheme::Http
            };
            let port = if rng.bool() { 443 } else { 80 };
            let path = ["/", "/p", "/pp", "/ppp", ""][rng.usize(0..5)];
            let got = set.decide(method, scheme, &host, port, path).rule;
            let want = (0..set.rules().len())
                .filter(|&i| {
                    let r = &set.rules()[i];
                    glob_match(&r.host_glob, &host)
                        && r.conditions_match(method, scheme, port, path)
                })
                .max_by_key(|&i| set.keys[i]);
            assert_eq!(got, want, "{method} {scheme} {host}:{port}{path}");
        }
    }

    /// Builds `count` mixed rules (exact, suffix, glob, catch-all) and returns the
    /// mean `decide` time over a spread of hosts. For benches and the ignored
    /// timing test; build with `--release` for meaningful numbers.
    fn bench_decide(count: usize, iterations: usize) -> Duration {
        let mut text = String::new();
        for i in 0..count {
            let line = match i % 10 {
                0..=5 => format!(
                    "host{i}.example.com=segment_upstream,chunk={},delay=1\n",
                    100 + i
                ),
                6..=8 => format!("*.zone{i}.example.net=direct,method=GET\n"),
                _ => format!("api{i}-*.example.org=direct,action=block,reason=r{i}\n"),
            };
            text.push_str(&line);
        }
        text.push_str("*=direct\n");
        let set = RuleSet::parse(&text, "<bench>").expect("bench rules parse");
        let hosts: Vec<String> = (0..count.max(1))
            .map(|i| match i % 4 {
                0 => format!("host{i}.example.com"),
                1 => format!("a.b.zone{}.example.net", i / 10 * 10 + 6),
                2 => format!("api{}-x.example.org", i / 10 * 10 + 9),
                _ => format!("nomatch{i}.test"),
            })
            .collect();
        let start = std::time::Instant::now();
        let mut hits = 0usize;
        for n in 0..iterations {
            let host = &hosts[n % hosts.len()];
            if set
                .decide("GET", Scheme::Https, host, 443, "/")
                .rule
                .is_some()
            {
                hits += 1;
            }
        }
        assert!(hits > 0);
        start.elapsed() / iterations.max(1) as u32
    }

    #[test]
    fn bench_decide_runs() {
        assert!(bench_decide(1000, 200) > Duration::ZERO);
    }

    /// `cargo test --release --no-default-features --lib -- --ignored --nocapture decide_timing`
    #[test]
    #[ignore]
    fn decide_timing() {
        let per = bench_decide(1000, 200_000);
        println!("decide() with 1,000 rules: {per:?} per call");
    }
}
