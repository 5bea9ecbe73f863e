//! The rules engine: SegmentedProxy's rule syntax, parsing with `file:line`
//! errors, and the "most specific rule wins" decision.
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
//!     `action=upstream`. Credentials are sent as Basic `Proxy-Authorization`;
//!     they are masked (`user:***@`) in [`Rule::text`], descriptions,
//!     explanations and `Debug` output.
//!   - `reason=TEXT`: the block message (`action=block`). It may contain
//!     anything except a comma, which always separates keys.
//!   - `scheme=http|https`, `method=M` (any HTTP token, `CONNECT` included,
//!     matched case-insensitively), `path_prefix=/p` (plain byte prefix of the
//!     request path, case-sensitive, a missing leading `/` added; an opaque
//!     CONNECT has no path, so such rules never match it), `port=N`.
//!   - Ours: `direction=up|down|both` (which way bytes are segmented; `up` is
//!     client→destination; default: the rule set's default, normally up) and
//!     `intercept=yes|no` (unset: the engine default).
//!
//! Every line SegmentedProxy accepts is accepted. Keys that have no effect
//! there have none here either (segmentation keys under mode `direct`,
//! `upstream=` without `action=upstream`, `reason=` without `action=block`,
//! sizes the strategy does not use); [`Rule::describe`] notes them. Unknown
//! keys or modes, bad numbers, invalid policies (validated whatever the mode)
//! and `action=block` with `upstream=` are errors reported as
//! `FILE:LINE: message`.
//!
//! # Specificity
//!
//! Among the rules whose host glob and conditions all match, the winner has
//! the greatest key, compared field by field (lexicographically):
//!
//! 1. host class: exact host (3) > `*.suffix` glob, i.e. `*` followed by a
//!    literal starting with `.` (2) > any other glob (1) > a glob of only `*` (0);
//! 2. literal host characters (for `*.suffix` the suffix length, so a longer
//!    suffix wins; for other globs the count of non-wildcard characters);
//! 3. number of conditions given among scheme, method, port and path prefix;
//! 4. path prefix length;
//! 5. `action=block` beats any other action;
//! 6. the earlier rule (lower index) wins.
//!
//! The key is a total order, so the winner is unique. No match: the default
//! policy with action direct.
//!
//! # Speed
//!
//! Exact hosts are indexed in a `HashMap`, `*.suffix` rules by their suffix
//! (one lookup per dot of the host), and each list is kept sorted by key so
//! the first rule whose conditions match wins. Only the remaining globs are
//! scanned, and only when no exact or suffix rule matched.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;

use super::segment::{SegmentPolicy, Strategy};

/// SegmentedProxy's default chunk size for fixed segmentation without `chunk=`.
pub const DEFAULT_CHUNK: usize = 1024;

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

/// A peer proxy to forward through.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamProxy {
    /// Host name or IP, IPv6 without brackets.
    pub host: String,
    pub port: u16,
    /// `(user, password)` for Basic `Proxy-Authorization`.
    pub credentials: Option<(String, String)>,
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

    /// The `Proxy-Authorization` value (`Basic base64(user:pass)`), if any.
    pub fn basic_auth_header(&self) -> Option<String> {
        self.credentials.as_ref().map(|(user, pass)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            format!("Basic {token}")
        })
    }

    /// Parses `[USER:PASS@]HOST:PORT`. Error messages never echo the password.
    pub fn parse(value: &str) -> Result<Self, String> {
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
            host: host.to_ascii_lowercase(),
            port,
            credentials,
        })
    }
}

/// Shows `user:***@host:port`: the password never reaches logs.
impl fmt::Display for UpstreamProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
    pub source: RuleSource,
    /// The rule line as written (trimmed), with any upstream password masked.
    pub text: String,
    /// What the line says that has no effect (SegmentedProxy accepts such lines; we accept
    /// them too and say so in `describe`).
    pub notes: Vec<String>,
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

    /// `host=... [scheme=...] ... action=... policy=... direction=...`
    pub fn describe(&self) -> String {
        let mut out = format!("host={}", self.host_glob);
        if let Some(s) = self.scheme {
            out += &format!(" scheme={s}");
        }
        if let Some(m) = &self.method {
            out += &format!(" method={m}");
        }
        if let Some(p) = self.port {
            out += &format!(" port={p}");
        }
        if let Some(p) = &self.path_prefix {
            out += &format!(" path_prefix={p}");
        }
        out += &format!(
            " action={} policy={} direction={}",
            self.action, self.policy, self.direction
        );
        if self.intercept != Intercept::Default {
            out += &format!(" intercept={}", self.intercept);
        }
        if !self.notes.is_empty() {
            out += &format!(" (note: {})", self.notes.join("; "));
        }
        out
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
    /// One line: which rule matched and why it won, or
    /// `no rule matched; default policy`.
    pub explanation: String,
}

/// The specificity key of a rule; see the module docs. Greater wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Specificity {
    host_class: HostClass,
    host_literal: usize,
    conditions: u8,
    path_len: usize,
    block: bool,
    earlier: Reverse<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HostClass {
    CatchAll,
    Glob,
    Suffix,
    Exact,
}

impl HostClass {
    fn name(self) -> &'static str {
        match self {
            HostClass::CatchAll => "catch-all *",
            HostClass::Glob => "wildcard glob",
            HostClass::Suffix => "*.suffix glob",
            HostClass::Exact => "exact host",
        }
    }

    fn of(glob: &str) -> (HostClass, usize) {
        let literal = glob.bytes().filter(|b| *b != b'*' && *b != b'?').count();
        let class = if !glob.contains(['*', '?']) {
            HostClass::Exact
        } else if glob.bytes().all(|b| b == b'*') {
            HostClass::CatchAll
        } else if glob.starts_with("*.") && !glob[1..].contains(['*', '?']) {
            HostClass::Suffix
        } else {
            HostClass::Glob
        };
        (class, literal)
    }
}

/// Rules plus the indexes that make [`RuleSet::decide`] fast.
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    keys: Vec<Specificity>,
    default_policy: SegmentPolicy,
    default_direction: Direction,
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
        let (host_class, host_literal) = HostClass::of(&rule.host_glob);
        let conditions = [
            rule.scheme.is_some(),
            rule.method.is_some(),
            rule.port.is_some(),
            rule.path_prefix.is_some(),
        ]
        .iter()
        .filter(|c| **c)
        .count() as u8;
        let key = Specificity {
            host_class,
            host_literal,
            conditions,
            path_len: rule.path_prefix.as_ref().map_or(0, String::len),
            block: rule.action.is_block(),
            earlier: Reverse(index),
        };
        let list = match host_class {
            HostClass::Exact => self.exact.entry(rule.host_glob.clone()).or_default(),
            HostClass::Suffix => self
                .suffix
                .entry(rule.host_glob[1..].to_string())
                .or_default(),
            HostClass::Glob | HostClass::CatchAll => &mut self.globs,
        };
        self.keys.push(key);
        self.rules.push(rule);
        // Keep each list sorted best first so the first match wins.
        let keys = &self.keys;
        let at = list.partition_point(|&i| keys[i] > key);
        list.insert(at, index);
    }

    /// Exact and suffix candidates for `host`, best first.
    fn indexed_candidates<'a>(&'a self, host: &'a str) -> impl Iterator<Item = usize> + 'a {
        let exact = self.exact.get(host).into_iter().flatten().copied();
        // Leftmost dot first: the longest suffix is the most specific.
        let suffixes = host
            .match_indices('.')
            .filter_map(move |(i, _)| self.suffix.get(&host[i..]))
            .flatten()
            .copied();
        exact.chain(suffixes)
    }

    fn glob_candidates<'a>(&'a self, host: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.globs
            .iter()
            .copied()
            .filter(move |&i| glob_match(self.rules[i].host_glob.as_bytes(), host.as_bytes()))
    }

    /// Picks the most specific matching rule for a request. For a CONNECT pass
    /// method `CONNECT` and an empty path. `host` may be any case, with or
    /// without IPv6 brackets or a trailing dot.
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
        let fits = |&i: &usize| self.rules[i].conditions_match(method, scheme, port, path);

        let mut indexed = self.indexed_candidates(host).filter(fits);
        let (winner, runner_up, full_scan) = match indexed.next() {
            // Exact and suffix rules outrank every other glob: leave those unscanned.
            Some(w) => (Some(w), indexed.next(), false),
            None => {
                let mut globs = self.glob_candidates(host).filter(fits);
                (globs.next(), globs.next(), true)
            }
        };
        let Some(w) = winner else {
            return Decision {
                rule: None,
                action: Action::Direct,
                policy: self.default_policy.clone(),
                direction: self.default_direction,
                intercept: Intercept::Default,
                explanation: "no rule matched; default policy".to_string(),
            };
        };
        let rule = &self.rules[w];
        Decision {
            rule: Some(w),
            action: rule.action.clone(),
            policy: rule.policy.clone(),
            direction: rule.direction,
            intercept: rule.intercept,
            explanation: self.explain(w, runner_up, full_scan),
        }
    }

    fn explain(&self, w: usize, runner_up: Option<usize>, full_scan: bool) -> String {
        let rule = &self.rules[w];
        let key = self.keys[w];
        let mut out = format!(
            "rule {} at {} `{}` matched: {} {}",
            w + 1,
            rule.source,
            rule.text,
            key.host_class.name(),
            rule.host_glob
        );
        if let Some(s) = rule.scheme {
            out += &format!(", scheme {s}");
        }
        if let Some(m) = &rule.method {
            out += &format!(", method {m}");
        }
        if let Some(p) = rule.port {
            out += &format!(", port {p}");
        }
        if let Some(p) = &rule.path_prefix {
            out += &format!(", path prefix {p}");
        }
        match runner_up {
            Some(r) => {
                let why = why_beats(&key, &self.keys[r]);
                out += &format!("; beat {} ({why})", self.rules[r].source);
            }
            None if full_scan => out += "; the only matching rule",
            // Not scanned: nothing in a lower host class can win.
            None if key.host_class == HostClass::Exact => out += "; exact hosts outrank all globs",
            None => out += "; *.suffix globs outrank all other globs",
        }
        out
    }

    /// The `--validate-rules` listing: the default policy, then one numbered
    /// line per rule (`1. FILE:LINE host=... action=... policy=...`).
    pub fn describe(&self) -> String {
        let mut out = format!(
            "default: action=direct policy={} direction={}\n",
            self.default_policy, self.default_direction
        );
        if self.rules.is_empty() {
            out += "rules: (none)\n";
        }
        for (i, rule) in self.rules.iter().enumerate() {
            out += &format!("{}. {} {}\n", i + 1, rule.source, rule.describe());
        }
        out
    }
}

/// Names the first specificity field where `w` beats `r`.
fn why_beats(w: &Specificity, r: &Specificity) -> String {
    if w.host_class != r.host_class {
        format!("{} beats {}", w.host_class.name(), r.host_class.name())
    } else if w.host_literal != r.host_literal {
        if w.host_class == HostClass::Suffix {
            format!(
                "longer host suffix, {} > {} chars",
                w.host_literal, r.host_literal
            )
        } else {
            format!(
                "more literal host characters, {} > {}",
                w.host_literal, r.host_literal
            )
        }
    } else if w.conditions != r.conditions {
        format!("more conditions, {} > {}", w.conditions, r.conditions)
    } else if w.path_len != r.path_len {
        format!("longer path prefix, {} > {} chars", w.path_len, r.path_len)
    } else if w.block != r.block {
        "block wins a tie".to_string()
    } else {
        "earlier rule wins a tie".to_string()
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

/// Shell-style `*` / `?` matching on bytes, linear with single backtracking.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more byte and retry.
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("invalid port '{value}' (expected 1-65535)")),
        Ok(p) => Ok(p),
    }
}

fn parse_number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse::<T>()
        .map_err(|_| format!("invalid number for {key}: '{value}'"))
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
    chunk: Option<usize>,
    min: Option<usize>,
    max: Option<usize>,
    delay: Option<u64>,
    action: Option<&'a str>,
    upstream: Option<UpstreamProxy>,
    reason: Option<&'a str>,
    scheme: Option<Scheme>,
    method: Option<String>,
    path_prefix: Option<String>,
    port: Option<u16>,
    direction: Option<Direction>,
    intercept: Option<Intercept>,
}

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
        .ok_or_else(|| format!("missing '='; {SHAPE}"))?;
    let host_glob = parse_host_glob(glob.trim())?;
    let mut parts = rest.split(',').map(str::trim).filter(|p| !p.is_empty());
    let mode = parts
        .next()
        .ok_or_else(|| format!("missing mode; {SHAPE}"))?;
    let segmenting = match mode.to_ascii_lowercase().as_str() {
        "direct" => false,
        "segment_upstream" => true,
        _ => {
            return Err(format!(
                "unknown mode '{mode}' (expected direct or segment_upstream)"
            ))
        }
    };

    let mut keys = Keys::default();
    let mut seen: Vec<&str> = Vec::new();
    let mut text_parts: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got '{part}'"))?;
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        let canonical = match key.as_str() {
            "chunk_min" => "min",
            "chunk_max" => "max",
            k => KNOWN_KEYS
                .iter()
                .copied()
                .find(|known| *known == k)
                .ok_or_else(|| format!("unknown key '{k}' (known: {})", KNOWN_KEYS.join(", ")))?,
        };
        if seen.contains(&canonical) {
            // SegmentedProxy takes the last value; so do we, and say so.
            notes.push(format!("{canonical} given twice, the last value counts"));
            text_parts.retain(|p| canonical_key(p) != canonical);
        } else {
            seen.push(canonical);
        }
        if value.is_empty() {
            return Err(format!("empty value for {canonical}"));
        }
        let lower = value.to_ascii_lowercase();
        let mut shown = part.to_string();
        match canonical {
            "strategy" => keys.strategy = Some(value),
            "chunk" => keys.chunk = Some(parse_number(canonical, value)?),
            "min" => keys.min = Some(parse_number(canonical, value)?),
            "max" => keys.max = Some(parse_number(canonical, value)?),
            "delay" => keys.delay = Some(parse_number(canonical, value)?),
            "action" => keys.action = Some(value),
            "upstream" => {
                let up = UpstreamProxy::parse(value)?;
                if up.credentials.is_some() {
                    shown = format!("upstream={up}");
                }
                keys.upstream = Some(up);
            }
            "reason" => keys.reason = Some(value),
            "scheme" => {
                keys.scheme = Some(match lower.as_str() {
                    "http" => Scheme::Http,
                    "https" => Scheme::Https,
                    _ => return Err(format!("invalid scheme '{value}' (expected http or https)")),
                })
            }
            "method" => {
                if !is_http_token(value) {
                    return Err(format!("invalid method '{value}'"));
                }
                keys.method = Some(value.to_ascii_uppercase());
            }
            "path_prefix" => {
                // As SegmentedProxy: `api` means `/api`.
                let prefix = if value.starts_with('/') { value.to_string() } else { format!("/{value}") };
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
            _ => unreachable!("every known key is handled"),
        }
        text_parts.push(shown);
    }

    let policy = build_policy(segmenting, &keys, &mut notes)?;
    let action = build_action(&mut keys, &mut notes)?;
    // The stored text is rebuilt from the parts so a password cannot survive in it.
    let mut text = format!("{}={}", glob.trim(), mode);
    for part in &text_parts {
        text.push(',');
        text.push_str(part);
    }
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
        source,
        text,
        notes,
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
        KNOWN_KEYS.iter().copied().find(|k| k.eq_ignore_ascii_case(key)).unwrap_or(key)
    }
}

const KNOWN_KEYS: &[&str] = &[
    "strategy",
    "chunk",
    "min",
    "max",
    "delay",
    "action",
    "upstream",
    "reason",
    "scheme",
    "method",
    "path_prefix",
    "port",
    "direction",
    "intercept",
];

fn parse_host_glob(glob: &str) -> Result<String, String> {
    let glob = glob
        .strip_prefix('[')
        .and_then(|g| g.strip_suffix(']'))
        .unwrap_or(glob);
    let glob = glob.strip_suffix('.').unwrap_or(glob);
    if glob.is_empty() {
        return Err("empty host glob".into());
    }
    if let Some(bad) = glob
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._:*?".contains(*c)))
    {
        return Err(format!(
            "invalid character '{bad}' in host glob '{glob}' (only * and ? are wildcards)"
        ));
    }
    Ok(glob.to_ascii_lowercase())
}

/// The segmentation policy of a rule. Lines SegmentedProxy accepts are accepted, validated
/// as it validates them (whatever the mode), and keys that do nothing are noted:
/// - mode `direct` never segments;
/// - no `strategy`: `chunk` or `delay` means fixed, `min`/`max` mean random (SegmentedProxy
///   silently forwards those unsegmented; we do what the line says), nothing means none;
/// - sizes that the strategy does not use are ignored.
fn build_policy(segmenting: bool, k: &Keys<'_>, notes: &mut Vec<String>) -> Result<SegmentPolicy, String> {
    let random_keys = k.min.is_some() || k.max.is_some();
    let strategy_name = match k.strategy.map(str::to_ascii_lowercase) {
        Some(s) => s,
        None if k.chunk.is_some() || (k.delay.is_some() && !random_keys) => "fixed".to_string(),
        None if random_keys => "random".to_string(),
        None => "none".to_string(),
    };
    let strategy = match strategy_name.as_str() {
        "none" => {
            if k.chunk.is_some() || random_keys {
                notes.push("chunk/min/max ignored with strategy=none".into());
            }
            Strategy::None
        }
        "fixed" => {
            if random_keys {
                notes.push("min/max ignored by strategy=fixed (it uses chunk)".into());
            }
            Strategy::Fixed { chunk: k.chunk.unwrap_or(DEFAULT_CHUNK) }
        }
        "random" => {
            if k.chunk.is_some() {
                notes.push("chunk ignored by strategy=random (it uses min and max)".into());
            }
            match (k.min, k.max) {
                (Some(min), Some(max)) => Strategy::Random { min, max },
                _ => return Err("strategy=random needs both min and max".into()),
            }
        }
        other => return Err(format!("unknown strategy '{other}' (expected none, fixed or random)")),
    };
    let policy = SegmentPolicy { strategy, delay: Duration::from_millis(k.delay.unwrap_or(0)) };
    policy.validate()?;
    if !segmenting {
        if policy != SegmentPolicy::none() {
            notes.push("mode direct does not segment: strategy/chunk/min/max/delay ignored (use segment_upstream)".into());
        }
        return Ok(SegmentPolicy::none());
    }
    Ok(policy)
}

/// The action of a rule (default direct). As in SegmentedProxy, `upstream=` takes effect only
/// with `action=upstream` and `reason=` only with `action=block`; otherwise they are noted.
fn build_action(k: &mut Keys<'_>, notes: &mut Vec<String>) -> Result<Action, String> {
    let name = k.action.map(str::to_ascii_lowercase).unwrap_or_else(|| "direct".to_string());
    if name != "block" && k.reason.is_some() {
        notes.push("reason= ignored (it is the message of action=block)".into());
    }
    match name.as_str() {
        "block" if k.upstream.is_some() => Err("action=block cannot have upstream=".into()),
        "direct" => {
            if k.upstream.is_some() {
                notes.push("upstream= ignored: the action is direct (add action=upstream)".into());
            }
            Ok(Action::Direct)
        }
        "block" => Ok(Action::Block { reason: k.reason.unwrap_or("blocked by rule").to_string() }),
        "upstream" => match k.upstream.take() {
            Some(up) => Ok(Action::Upstream(up)),
            None => Err("action=upstream needs upstream=HOST:PORT".into()),
        },
        other => Err(format!("unknown action '{other}' (expected direct, upstream or block)")),
    }
}

/// Builds `count` mixed rules (exact, suffix, glob, catch-all) and returns the
/// mean `decide` time over a spread of hosts. For benches and the ignored
/// timing test; build with `--release` for meaningful numbers.
pub fn bench_decide(count: usize, iterations: usize) -> Duration {
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

#[cfg(test)]
mod tests {
    use super::*;

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
                host: "127.0.0.1".into(),
                port: 3128,
                credentials: None
            })
        );

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
        assert_eq!(
            one("a=segment_upstream,strategy=none,delay=7").policy,
            SegmentPolicy {
                strategy: Strategy::None,
                delay: ms(7)
            }
        );
        assert_eq!(
            one("a=SEGMENT_UPSTREAM,Strategy=FIXED,CHUNK=9").policy,
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
        // As in SegmentedProxy, upstream= needs action=upstream; alone it is noted, not used.
        let r = one("a=direct,upstream=proxy.local:8080");
        assert_eq!(r.action, Action::Direct);
        assert!(r.describe().contains("upstream= ignored"), "{}", r.describe());
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
            assert!(r.notes.iter().any(|n| n.contains(needle)), "{line}: {:?}", r.notes);
            r
        };
        let r = note("x=direct,strategy=fixed,chunk=10", "mode direct does not segment");
        assert_eq!(r.policy, SegmentPolicy::none());
        assert!(r.describe().contains("(note: mode direct"), "{}", r.describe());
        let r = note("x=direct,reason=foo", "reason= ignored");
        assert_eq!(r.action, Action::Direct);
        let r = note("x=direct,action=direct,upstream=h:1", "upstream= ignored");
        assert_eq!(r.action, Action::Direct);
        let r = note("x=direct,action=upstream,upstream=h:1,reason=r", "reason= ignored");
        assert!(matches!(r.action, Action::Upstream(_)));
        let r = note("x=segment_upstream,strategy=random,min=1,max=5,chunk=10", "chunk ignored");
        assert_eq!(r.policy, SegmentPolicy::random(1, 5, Duration::ZERO));
        let r = note("x=segment_upstream,strategy=fixed,chunk=7,min=1", "min/max ignored");
        assert_eq!(r.policy, SegmentPolicy::fixed(7, Duration::ZERO));
        let r = note("x=segment_upstream,strategy=none,chunk=1", "ignored with strategy=none");
        assert_eq!(r.policy, SegmentPolicy::none());
        // A chunk size with min/max and no strategy: the chunk size decides (fixed).
        let r = note("x=segment_upstream,chunk=5,min=1,max=2", "min/max ignored");
        assert_eq!(r.policy, SegmentPolicy::fixed(5, Duration::ZERO));
        // Repeated keys: the last value counts, and the shown text keeps only that one.
        let r = note("x=direct,action=block,action=direct", "action given twice");
        assert_eq!(r.action, Action::Direct);
        assert_eq!(r.text, "x=direct,action=direct");
        let r = note("x=segment_upstream,min=1,chunk_min=2,max=3", "min given twice");
        assert_eq!(r.policy, SegmentPolicy::random(2, 3, Duration::ZERO));
        // path_prefix without its slash gets one, as in SegmentedProxy.
        let r = one("x=direct,path_prefix=api");
        assert_eq!(r.path_prefix.as_deref(), Some("/api"));
        assert!(r.notes.is_empty());
        // Plain rules carry no note.
        assert!(one("x=segment_upstream,chunk=5,delay=1").notes.is_empty());
    }

    #[test]
    fn errors_name_file_and_line() {
        let text = "# comment\n\nok.test=direct\nbad.test=segment_upstream,chunk=abc\n";
        let e = RuleSet::parse(text, "rules.txt").unwrap_err();
        assert_eq!(e.source, "rules.txt");
        assert_eq!(e.line, 4);
        assert_eq!(
            e.to_string(),
            "rules.txt:4: invalid number for chunk: 'abc'"
        );

        // Every bad line is named, in order.
        let e = RuleSet::parse("a=fast\nok=direct\nb=direct,colour=red\n", "r.txt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "r.txt:1: unknown mode 'fast' (expected direct or segment_upstream)\nr.txt:3: unknown key 'colour' (known: strategy, chunk, min, max, delay, action, upstream, reason, scheme, method, path_prefix, port, direction, intercept)"
        );

        // All or nothing.
        let mut set = RuleSet::default();
        assert!(set.add_text(text, "rules.txt").is_err());
        assert!(set.rules().is_empty());

        for (line, needle) in [
            ("nomode", "missing '='"),
            ("a=", "missing mode"),
            ("a=fast", "unknown mode 'fast'"),
            ("a=direct,colour=red", "unknown key 'colour'"),
            ("a=direct,action", "expected key=value"),
            ("a=direct,action=", "empty value for action"),
            ("a=segment_upstream,chunk=-1", "invalid number for chunk"),
            (
                "a=segment_upstream,chunk=0",
                "fixed strategy needs chunk > 0",
            ),
            (
                "a=segment_upstream,strategy=random,min=5",
                "needs both min and max",
            ),
            ("a=segment_upstream,min=9,max=5", "min <= max"),
            ("a=segment_upstream,min=0,max=5", "min > 0"),
            (
                "a=segment_upstream,strategy=zigzag",
                "unknown strategy 'zigzag'",
            ),
            ("a=segment_upstream,delay=1.5", "invalid number for delay"),
            ("a=direct,action=upstream", "needs upstream=HOST:PORT"),
            ("a=direct,action=block,upstream=h:1", "cannot have upstream="),
            // Validated whatever the mode, as SegmentedProxy does.
            ("a=direct,strategy=random,min=5", "needs both min and max"),
            ("a=direct,strategy=fixed,chunk=0", "chunk > 0"),
            ("a=direct,action=teleport", "unknown action 'teleport'"),
            ("a=direct,upstream=nohost", "must be HOST:PORT"),
            ("a=direct,upstream=h:0", "invalid port"),
            ("a=direct,upstream=h:70000", "invalid port"),
            ("a=direct,upstream=::1:80", "brackets"),
            ("a=direct,upstream=u@h:1", "USER:PASS@"),
            ("a=direct,scheme=ftp", "invalid scheme 'ftp'"),
            ("a=direct,method=GE T", "invalid method"),
            ("a=direct,port=0", "invalid port"),
            ("a=direct,direction=sideways", "invalid direction"),
            ("a=direct,intercept=maybe", "invalid intercept"),
            ("a b=direct", "invalid character ' '"),
            ("a/b=direct", "invalid character '/'"),
            ("=direct", "empty host glob"),
        ] {
            let e = err(line);
            assert!(e.starts_with("rules.txt:1: "), "{line}: {e}");
            assert!(e.contains(needle), "{line}: expected '{needle}' in '{e}'");
        }

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
            d.explanation.clone(),
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
        let e = err("a=direct,upstream=carol:hunter2@bad host:1");
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
        ] {
            assert_eq!(glob_match(p.as_bytes(), t.as_bytes()), ok, "{p} vs {t}");
        }
        assert_eq!(HostClass::of("example.com"), (HostClass::Exact, 11));
        assert_eq!(HostClass::of("*.example.com"), (HostClass::Suffix, 12));
        assert_eq!(HostClass::of("*.ex*.com"), (HostClass::Glob, 7));
        assert_eq!(HostClass::of("*example.com"), (HostClass::Glob, 11));
        assert_eq!(HostClass::of("*"), (HostClass::CatchAll, 0));
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
    fn specificity_host_order() {
        let set = RuleSet::parse(ORDER, "order.rules").unwrap();
        let pick = |h: &str| chunk_of(&set.decide("GET", Scheme::Https, h, 443, "/"));
        assert_eq!(pick("api.example.com"), 4); // exact
        assert_eq!(pick("API.Example.com."), 4); // normalised
        assert_eq!(pick("v1.api.example.com"), 3); // longer suffix
        assert_eq!(pick("www.example.com"), 2);
        assert_eq!(pick("abc.example.com"), 2); // suffix beats `a*.example.com`
        assert_eq!(pick("other.com"), 1);
        let d = set.decide("GET", Scheme::Https, "example.org", 443, "/");
        assert_eq!(d.rule, Some(0)); // catch-all
        assert!(matches!(d.action, Action::Upstream(_)));

        // Other glob beats catch-all.
        let set = RuleSet::parse("*=direct\nex*.org=direct,action=block", "t").unwrap();
        assert_eq!(
            set.decide("GET", Scheme::Http, "example.org", 80, "/").rule,
            Some(1)
        );
        // Between other globs, more literal characters win.
        let set = RuleSet::parse("e*.org=direct\n*ple.org=direct\nex*.org=direct", "t").unwrap();
        assert_eq!(
            set.decide("GET", Scheme::Http, "example.org", 80, "/").rule,
            Some(1)
        );
    }

    #[test]
    fn specificity_conditions_path_and_ties() {
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
        // Two conditions (port+scheme) beat one path prefix, however long.
        assert_eq!(pick("GET", Scheme::Http, 8443, "/a/b/c"), 6);
        // method+scheme (2) vs path /a/b (1): conditions count first.
        assert_eq!(pick("POST", Scheme::Https, 443, "/a/b/c"), 3);

        // Full tie: block wins, then the earlier rule.
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
        assert!(
            d.explanation.contains("beat t:3 (earlier rule wins a tie)"),
            "{}",
            d.explanation
        );
        let set = RuleSet::parse("t.test=direct\nt.test=direct,action=block", "t").unwrap();
        let d = set.decide("GET", Scheme::Http, "t.test", 80, "/");
        assert_eq!(d.rule, Some(1));
        assert!(
            d.explanation.contains("beat t:1 (block wins a tie)"),
            "{}",
            d.explanation
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
        assert_eq!(d.explanation, "no rule matched; default policy");
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
        assert_eq!(
            d.explanation,
            "rule 5 at order.rules:5 `api.example.com=segment_upstream,chunk=4` matched: exact host api.example.com; \
             beat order.rules:3 (exact host beats *.suffix glob)"
        );
        let d = set.decide("GET", Scheme::Https, "v1.api.example.com", 443, "/");
        assert!(d.explanation.contains("matched: *.suffix glob *.api.example.com; beat order.rules:3 (longer host suffix, 16 > 12 chars)"), "{}", d.explanation);
        let d = set.decide("GET", Scheme::Https, "example.org", 443, "/");
        assert!(
            d.explanation
                .ends_with("matched: catch-all * *; the only matching rule"),
            "{}",
            d.explanation
        );

        let set = RuleSet::parse(
            "x.test=direct,method=GET,port=80,scheme=http,path_prefix=/p",
            "t",
        )
        .unwrap();
        let d = set.decide("GET", Scheme::Http, "x.test", 80, "/p/q");
        assert!(d.explanation.ends_with(
            "matched: exact host x.test, scheme http, method GET, port 80, path prefix /p; exact hosts outrank all globs"
        ), "{}", d.explanation);

        let set = RuleSet::parse("*.a.test=direct\n*.a.test=direct,method=GET", "t").unwrap();
        let d = set.decide("GET", Scheme::Http, "b.a.test", 80, "/");
        assert_eq!(d.rule, Some(1));
        assert!(
            d.explanation.contains("beat t:1 (more conditions, 1 > 0)"),
            "{}",
            d.explanation
        );
        let set = RuleSet::parse("x*=direct\nxy*=direct", "t").unwrap();
        let d = set.decide("GET", Scheme::Http, "xyz", 80, "/");
        assert!(
            d.explanation
                .contains("beat t:1 (more literal host characters, 2 > 1)"),
            "{}",
            d.explanation
        );
        let set = RuleSet::parse(
            "x.test=direct,path_prefix=/a\nx.test=direct,path_prefix=/ab",
            "t",
        )
        .unwrap();
        let d = set.decide("GET", Scheme::Http, "x.test", 80, "/abc");
        assert!(
            d.explanation
                .contains("beat t:1 (longer path prefix, 3 > 2 chars)"),
            "{}",
            d.explanation
        );
    }

    #[test]
    fn describe_listing() {
        let text = "*.example.com=segment_upstream,strategy=fixed,chunk=512,delay=10\nblocked.test=direct,action=block,reason=no thanks\n*=direct,action=upstream,upstream=127.0.0.1:3128,intercept=yes\n";
        let set = RuleSet::parse(text, "rules.txt").unwrap();
        assert_eq!(
            set.describe(),
            "default: action=direct policy=none direction=up\n\
             1. rules.txt:1 host=*.example.com action=direct policy=fixed chunk=512 delay=10ms direction=up\n\
             2. rules.txt:2 host=blocked.test action=block reason=no thanks policy=none direction=up\n\
             3. rules.txt:3 host=* action=upstream=127.0.0.1:3128 policy=none direction=up intercept=yes\n"
        );
        assert_eq!(
            RuleSet::default().describe(),
            "default: action=direct policy=none direction=up\nrules: (none)\n"
        );
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
                    glob_match(r.host_glob.as_bytes(), host.as_bytes())
                        && r.conditions_match(method, scheme, port, path)
                })
                .max_by_key(|&i| set.keys[i]);
            assert_eq!(got, want, "{method} {scheme} {host}:{port}{path}");
        }
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
