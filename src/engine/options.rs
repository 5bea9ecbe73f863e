//! The engine's options: ONE table ([`OPTIONS`]: name, kind of value, default, help, place
//! on the command line) and ONE parser ([`build`]) from generic values ([`Value`]) to
//! everything a server is built from: its [`EngineConfig`] and [`EngineParts`] (resolver,
//! connector, access log, flow recorder, destination filter, origin trust, credentials),
//! after the open-relay check.
//!
//! The Python binding only converts values and calls [`build`]; Python's `ENGINE_OPTIONS`,
//! the command line's flags and the options table of docs/quickstart.md are made from
//! [`OPTIONS`]. Adding an option: its row here, where [`build`] reads it, and the field of
//! the module that uses it (say [`EngineConfig`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::access::AccessLog;
use super::auth::{open_relay_refusal, ProxyAuth};
use super::ca::CertificateAuthority;
use super::config::EngineConfig;
use super::connector::Connector;
use super::dns::{DnsConfig, DnsResolver, DnsSettings, DnsTransport};
use super::flows::FlowRecorder;
use super::hooks::Handler;
use super::rules::RuleSet;
use super::safety::DomainFilter;
use super::state::EngineParts;
use super::tls::OriginTrust;

/// An option's value as a caller gives it (the binding converts Python's values to these).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
}

impl Value {
    /// The value's type as messages name it (Python's names for the same values).
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "NoneType",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::List(_) => "list",
        }
    }
}

/// As Python writes the same value (`None`, `True`, `2.5`, `'text'`, `[1, 2]`).
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::None => f.write_str("None"),
            Value::Bool(true) => f.write_str("True"),
            Value::Bool(false) => f.write_str("False"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Str(s) => write!(f, "'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// What an option's value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Seconds, more than 0.
    Seconds,
    /// Seconds, 0 or more.
    SecondsOrZero,
    /// A whole number, 0 or more.
    Count,
    /// A whole number, 1 or more.
    PositiveCount,
    /// A port number, 0 to 65535.
    Port,
    Bool,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A file path.
    Path,
    /// An IP address.
    IpAddress,
    /// Strings: a list, or one.
    Strings,
    /// File paths: a list, or one.
    Paths,
    /// Credentials: `user:pass` strings or (user, password) pairs; a list, or one string.
    Credentials,
    /// A rule set: an object of its own ([`Objects::rules`]), never a value here. (Python
    /// also takes rule text, which it parses into one.)
    Rules,
}

impl Kind {
    /// The kind's name, as the binding shows it (`"seconds"`, `"choice"`...).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Seconds => "seconds",
            Kind::SecondsOrZero => "seconds_or_zero",
            Kind::Count => "count",
            Kind::PositiveCount => "positive_count",
            Kind::Port => "port",
            Kind::Bool => "bool",
            Kind::Choice(_) => "choice",
            Kind::Path => "path",
            Kind::IpAddress => "ip_address",
            Kind::Strings => "strings",
            Kind::Paths => "paths",
            Kind::Credentials => "credentials",
            Kind::Rules => "rules",
        }
    }

    /// The words a [`Kind::Choice`] allows (none for other kinds).
    pub fn choices(self) -> &'static [&'static str] {
        match self {
            Kind::Choice(words) => words,
            _ => &[],
        }
    }

    /// The command line's name for a value of this kind.
    const fn metavar(self) -> &'static str {
        match self {
            Kind::Seconds | Kind::SecondsOrZero => "SECONDS",
            Kind::Count | Kind::PositiveCount => "N",
            Kind::Port => "PORT",
            Kind::Path | Kind::Paths => "FILE",
            Kind::IpAddress => "IP",
            Kind::Strings => "TEXT",
            Kind::Credentials => "USER:PASS",
            Kind::Rules => "RULE",
            Kind::Bool | Kind::Choice(_) => "",
        }
    }
}

/// An option's default (a [`Value`] that can live in a constant table).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Preset {
    /// None: the option is optional, and its help says what none means.
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'static str),
    /// An empty list.
    Empty,
}

impl Preset {
    pub fn value(self) -> Value {
        match self {
            Preset::None => Value::None,
            Preset::Bool(b) => Value::Bool(b),
            Preset::Int(n) => Value::Int(n),
            Preset::Float(x) => Value::Float(x),
            Preset::Str(s) => Value::Str(s.to_string()),
            Preset::Empty => Value::List(Vec::new()),
        }
    }
}

/// Where an option is on the `segproxy` command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cli {
    /// `--` and its name with dashes (`--connect-timeout`), made from this table.
    Flag,
    /// Under this flag (without the dashes) instead, made from this table.
    Renamed(&'static str),
    /// Under this flag (without the dashes), which the command line shapes by hand: how.
    ByHand(&'static str, &'static str),
    /// Not on the command line: why.
    Absent(&'static str),
}

/// One option: everything anybody needs to know about it.
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub default: Preset,
    /// A heading it belongs under (the command line's argument groups).
    pub topic: &'static str,
    /// One line: what it does (the command line adds its default).
    pub help: &'static str,
    pub cli: Cli,
    /// The command line's name for its value (`SECONDS`, `FILE`...; empty for a switch).
    pub metavar: &'static str,
}

impl OptionSpec {
    const fn new(
        name: &'static str,
        kind: Kind,
        default: Preset,
        topic: &'static str,
        help: &'static str,
    ) -> Self {
        OptionSpec {
            name,
            kind,
            default,
            topic,
            help,
            cli: Cli::Flag,
            metavar: kind.metavar(),
        }
    }

    const fn cli(self, cli: Cli) -> Self {
        OptionSpec { cli, ..self }
    }

    const fn metavar(self, metavar: &'static str) -> Self {
        OptionSpec { metavar, ..self }
    }

    /// None is a value it takes (its default).
    pub fn optional(&self) -> bool {
        self.default == Preset::None
    }

    /// Its command-line flag (`--connect-timeout`), if it has one.
    pub fn cli_flag(&self) -> Option<String> {
        match self.cli {
            Cli::Flag => Some(format!("--{}", self.name.replace('_', "-"))),
            Cli::Renamed(flag) | Cli::ByHand(flag, _) => Some(format!("--{flag}")),
            Cli::Absent(_) => None,
        }
    }
}

const AUTH: &str = "client authentication";
const LIMITS: &str = "timeouts and limits";
const RULES: &str = "rules and segmentation";
const NET: &str = "DNS and destinations";
const TLS: &str = "HTTPS interception";
const LOGGING: &str = "logging";
const STATS: &str = "statistics";
const SOCKS: &str = "SOCKS5";

/// The options of a server, in the order the help and the docs list them.
pub static OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "proxy_auth",
        Kind::Credentials,
        Preset::Empty,
        AUTH,
        "Basic credentials clients must send on Proxy-Authorization (407 otherwise)",
    ),
    OptionSpec::new(
        "allow_open_proxy",
        Kind::Bool,
        Preset::Bool(false),
        AUTH,
        "listen on an address other than loopback without proxy credentials (refused \
         otherwise: anyone who reaches it could relay through it)",
    ),
    OptionSpec::new(
        "connect_timeout",
        Kind::Seconds,
        Preset::Float(10.0),
        LIMITS,
        "seconds to connect to a destination or upstream proxy",
    ),
    OptionSpec::new(
        "idle_timeout",
        Kind::Seconds,
        Preset::Float(60.0),
        LIMITS,
        "seconds a client connection (between requests) or tunnel may stay silent before it \
         is closed",
    ),
    OptionSpec::new(
        "header_timeout",
        Kind::Seconds,
        Preset::Float(30.0),
        LIMITS,
        "seconds a client may take to send a request head before it is dropped",
    ),
    OptionSpec::new(
        "response_timeout",
        Kind::Seconds,
        Preset::Float(60.0),
        LIMITS,
        "seconds to wait for the destination's response head; then the client gets 504",
    ),
    OptionSpec::new(
        "shutdown_timeout",
        Kind::SecondsOrZero,
        Preset::Float(5.0),
        LIMITS,
        "seconds exchanges in flight get to finish when the server closes (also on SIGTERM \
         or Ctrl-C), before they are cut",
    ),
    OptionSpec::new(
        "max_connections",
        Kind::PositiveCount,
        Preset::None,
        LIMITS,
        "most concurrent client connections, more get 503 (none given: from the open-file \
         limit, raised to its hard limit: two descriptors a connection plus headroom)",
    ),
    OptionSpec::new(
        "max_header_bytes",
        Kind::Count,
        Preset::Int(64 * 1024),
        LIMITS,
        "largest request or response head, 431 past it (at least 1024)",
    )
    .cli(Cli::Absent("a library tuning knob")),
    OptionSpec::new(
        "hook_timeout",
        Kind::Seconds,
        Preset::Float(30.0),
        LIMITS,
        "seconds a Python hook may take; then the flow is abandoned (504)",
    )
    .cli(Cli::Flag),
    OptionSpec::new(
        "pool_idle_timeout",
        Kind::Seconds,
        Preset::Float(30.0),
        LIMITS,
        "seconds an idle origin connection is kept for reuse",
    )
    .cli(Cli::Absent("a library tuning knob")),
    OptionSpec::new(
        "rules",
        Kind::Rules,
        Preset::None,
        RULES,
        "routing, blocking, interception and segmentation rules (a segproxy.Rules, or rule \
         text)",
    )
    .cli(Cli::ByHand(
        "segment-rule",
        "--segment-rule and --rules-file add rules; --segmentation and the --segment-* flags \
         set the default policy",
    )),
    OptionSpec::new(
        "flows_file",
        Kind::Path,
        Preset::None,
        RULES,
        "write one JSON line per flow to this file: its decision and per-chunk sizes and times",
    )
    .cli(Cli::Renamed("record-flows")),
    OptionSpec::new(
        "record_flows",
        Kind::Bool,
        Preset::Bool(false),
        RULES,
        "keep each flow's decision and per-chunk sizes and times in memory (server.flows())",
    )
    .cli(Cli::Absent(
        "the command line writes flows to a file (--record-flows FILE: flows_file)",
    )),
    OptionSpec::new(
        "capture_bodies",
        Kind::Count,
        Preset::Int(0),
        RULES,
        "keep every HTTP flow's request and response heads, phase times and bodies up to N \
         bytes each in its flow record (for HAR export); turns record_flows on unless a \
         flows_file is given (0: only rules with capture=yes, 64 KiB bodies)",
    )
    .cli(Cli::Flag),
    OptionSpec::new(
        "flows_capacity",
        Kind::Count,
        Preset::Int(1000),
        RULES,
        "most flow records kept in memory (the oldest go first)",
    )
    .cli(Cli::Absent("in-memory flows only")),
    OptionSpec::new(
        "dns_server",
        Kind::IpAddress,
        Preset::None,
        NET,
        "resolve names with this DNS server instead of the system resolver",
    ),
    OptionSpec::new(
        "dns_port",
        Kind::Port,
        Preset::Int(53),
        NET,
        "port of the DNS server",
    ),
    OptionSpec::new(
        "dns_transport",
        Kind::Choice(&["udp", "tcp"]),
        Preset::Str("udp"),
        NET,
        "how to ask the DNS server: udp (falls back to tcp) or tcp",
    ),
    OptionSpec::new(
        "dns_cache_size",
        Kind::Count,
        Preset::Int(1024),
        NET,
        "DNS cache entries (answers are kept for their TTL); 0 turns the cache off",
    ),
    OptionSpec::new(
        "allow_domains",
        Kind::Strings,
        Preset::Empty,
        NET,
        "only these destinations (.example.com includes its subdomains)",
    )
    .cli(Cli::Renamed("allow-domain"))
    .metavar("DOMAIN"),
    OptionSpec::new(
        "deny_domains",
        Kind::Strings,
        Preset::Empty,
        NET,
        "refuse these destinations with 403",
    )
    .cli(Cli::Renamed("deny-domain"))
    .metavar("DOMAIN"),
    OptionSpec::new(
        "deny_private",
        Kind::Bool,
        Preset::Bool(false),
        NET,
        "refuse destinations resolving to private, loopback, link-local or reserved addresses",
    ),
    OptionSpec::new(
        "upstream_ca",
        Kind::Paths,
        Preset::Empty,
        TLS,
        "also trust the CAs in these PEM files when verifying origins of intercepted flows",
    ),
    OptionSpec::new(
        "upstream_insecure",
        Kind::Bool,
        Preset::Bool(false),
        TLS,
        "do not verify origin certificates of intercepted flows",
    ),
    OptionSpec::new(
        "access_log",
        Kind::Path,
        Preset::None,
        LOGGING,
        "file to append one line per request or tunnel to (/dev/stderr, /dev/stdout: the \
         process's own streams)",
    )
    .cli(Cli::ByHand(
        "access-log",
        "FILE is optional: without it the lines go to stderr (SegmentedProxy's flag), - means \
         stdout",
    )),
    OptionSpec::new(
        "access_log_format",
        Kind::Choice(&["text", "json"]),
        Preset::Str("text"),
        LOGGING,
        "text: SegmentedProxy's ACCESS rid=... line, our fields after its fields; json: one \
         JSON object a line with the fields of the access records",
    ),
    OptionSpec::new(
        "access_records",
        Kind::Count,
        Preset::Int(10_000),
        LOGGING,
        "access records kept in memory (server.access_records())",
    )
    .cli(Cli::Absent(
        "the command line keeps no records in memory (it has no Python reader)",
    )),
    OptionSpec::new(
        "stats_port",
        Kind::Port,
        Preset::None,
        STATS,
        "serve the server's counters at /metrics in Prometheus text format on this port of \
         the proxy's address (0 picks a free port)",
    ),
    OptionSpec::new(
        "socks_port",
        Kind::Port,
        Preset::None,
        SOCKS,
        "also serve SOCKS5 (RFC 1928, CONNECT; username/password by RFC 1929 when \
         proxy_auth is set) on this port of the proxy's address (0 picks a free port); the \
         proxy port answers SOCKS5 too, told apart by the first byte",
    ),
];

/// The row of an option.
pub fn spec(name: &str) -> Option<&'static OptionSpec> {
    OPTIONS.iter().find(|o| o.name == name)
}

/// How an option was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such option (Python: TypeError).
    Unknown,
    /// A value of the wrong type (Python: TypeError).
    Type,
    /// A value of the right type out of its range (Python: ValueError).
    Value,
    /// A file or address that could not be used (Python: OSError).
    Io,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionError {
    pub kind: ErrorKind,
    pub message: String,
}

impl OptionError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        OptionError {
            kind,
            message: message.into(),
        }
    }

    fn value(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Value, message)
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OptionError {}

/// What a server is built with besides option values: objects the caller made.
#[derive(Default)]
pub struct Objects {
    pub rules: Option<RuleSet>,
    pub ca: Option<Arc<CertificateAuthority>>,
    pub handler: Option<Arc<dyn Handler>>,
}

/// Everything [`super::ProxyServer::bind`] takes.
pub struct Built {
    pub config: EngineConfig,
    pub parts: EngineParts,
}

/// The one parser of options: a server listening on `host:port` (port 0 picks a free one),
/// with `values` by option name (an option not given takes its default) and `objects`.
/// Every value is checked before any file is opened.
pub fn build(
    host: &str,
    port: u16,
    values: impl IntoIterator<Item = (String, Value)>,
    objects: Objects,
) -> Result<Built, OptionError> {
    let mut o = Reader::new(values)?;
    let listen = listen_addr(host, port)?;
    let proxy_auth = ProxyAuth::new(o.credentials("proxy_auth")?).map_err(OptionError::value)?;
    let hook_authenticates = objects
        .handler
        .as_ref()
        .is_some_and(|handler| handler.hooks().authenticate);
    open_relay_refusal(
        listen,
        proxy_auth.is_enabled() || hook_authenticates,
        o.flag("allow_open_proxy")?,
    )
    .map_err(OptionError::value)?;
    let mut config = EngineConfig {
        listen,
        connect_timeout: o.seconds("connect_timeout")?,
        idle_timeout: o.seconds("idle_timeout")?,
        header_timeout: o.seconds("header_timeout")?,
        response_timeout: o.seconds("response_timeout")?,
        shutdown_timeout: o.seconds("shutdown_timeout")?,
        // None: 0, which the engine derives from the open-file limit when it binds.
        max_connections: o.optional_count("max_connections")?.unwrap_or(0),
        max_header_bytes: o.count("max_header_bytes")?.max(1024),
        hook_timeout: o.seconds("hook_timeout")?,
        pool_idle_timeout: o.seconds("pool_idle_timeout")?,
        proxy_auth,
        stats_port: o.optional_port("stats_port")?,
        socks_port: o.optional_port("socks_port")?,
        ..EngineConfig::default()
    };

    let dns_server = o.ip_address("dns_server")?;
    let dns_port = o.port("dns_port")?;
    let dns_transport = match o.choice("dns_transport")? {
        "tcp" => DnsTransport::Tcp,
        _ => DnsTransport::Udp,
    };
    let resolver = DnsResolver::new(DnsSettings {
        config: match dns_server {
            None => DnsConfig::System,
            Some(server) => DnsConfig::Custom {
                server,
                port: dns_port,
                transport: dns_transport,
            },
        },
        cache_size: o.count("dns_cache_size")?,
        ..DnsSettings::default()
    })
    .map_err(|e| OptionError::value(e.to_string()))?;
    let filter = DomainFilter::new(
        o.strings("allow_domains")?,
        o.strings("deny_domains")?,
        o.flag("deny_private")?,
    );
    let origin_trust = OriginTrust {
        extra_ca_files: o.paths("upstream_ca")?,
        insecure: o.flag("upstream_insecure")?,
    };
    let capture_bodies = o.count("capture_bodies")?;
    let flows_file = o.path("flows_file")?;
    // Captures live in flow records: capturing everything keeps them in memory, unless they
    // go to a file.
    let record_flows = o.flag("record_flows")? || (capture_bodies > 0 && flows_file.is_none());
    config.capture_bodies = capture_bodies;
    let flows_capacity = o.count("flows_capacity")?;
    // Flows written to a file only (no record_flows) are not also kept in memory.
    let flows_capacity = if record_flows { flows_capacity } else { 0 };
    let access_log = o.path("access_log")?;
    let json_log = o.choice("access_log_format")? == "json";
    let access_records = o.count("access_records")?;
    o.finish();

    // Files last: nothing is created for a server that a bad value refuses.
    let flows = if record_flows || flows_file.is_some() {
        let recorder = FlowRecorder::new(flows_capacity, flows_file.as_deref()).map_err(|e| {
            OptionError::new(
                ErrorKind::Io,
                format!(
                    "cannot write flow records to {}: {e}",
                    shown(flows_file.as_deref())
                ),
            )
        })?;
        Some(Arc::new(recorder))
    } else {
        None
    };
    let access = AccessLog::new(access_log.as_deref(), access_records)
        .map_err(|e| {
            OptionError::new(
                ErrorKind::Io,
                format!(
                    "cannot open access log {}: {e}",
                    shown(access_log.as_deref())
                ),
            )
        })?
        .json(json_log);
    let connector = Connector {
        connect_timeout: config.connect_timeout,
        resolver,
        addr_check: None,
    };
    Ok(Built {
        config,
        parts: EngineParts {
            access: Some(access),
            connector: Some(connector),
            rules: objects.rules,
            filter: Some(filter),
            ca: objects.ca,
            origin_trust,
            handler: objects.handler,
            flows,
        },
    })
}

fn shown(path: Option<&Path>) -> std::path::Display<'_> {
    path.unwrap_or_else(|| Path::new("")).display()
}

/// The address to listen on: an IP literal (IPv6 with or without brackets) or a name.
fn listen_addr(host: &str, port: u16) -> Result<SocketAddr, OptionError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let io = |message: String| OptionError::new(ErrorKind::Io, message);
    (bare, port)
        .to_socket_addrs()
        .map_err(|e| io(format!("cannot resolve listen host {host:?}: {e}")))?
        .next()
        .ok_or_else(|| io(format!("listen host {host:?} has no address")))
}

/// Reads each option once, by name: the value given or its default, checked against its
/// kind. [`Reader::finish`] makes sure that [`build`] read every row of the table.
struct Reader {
    given: HashMap<String, Value>,
    read: BTreeSet<&'static str>,
}

impl Reader {
    fn new(values: impl IntoIterator<Item = (String, Value)>) -> Result<Self, OptionError> {
        let given: HashMap<String, Value> = values.into_iter().collect();
        let mut unknown: Vec<&str> = given
            .keys()
            .map(String::as_str)
            .filter(|name| spec(name).is_none())
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            let mut known: Vec<&str> = OPTIONS.iter().map(|o| o.name).collect();
            known.sort_unstable();
            return Err(OptionError::new(
                ErrorKind::Unknown,
                format!(
                    "unknown option(s) {}; known: {}",
                    unknown.join(", "),
                    known.join(", ")
                ),
            ));
        }
        if let Some(name) = given
            .keys()
            .find(|name| spec(name).map(|o| o.kind) == Some(Kind::Rules))
        {
            return Err(OptionError::new(
                ErrorKind::Type,
                format!("{name} is given as an object of its own, not as an option value"),
            ));
        }
        Ok(Reader {
            given,
            read: BTreeSet::new(),
        })
    }

    /// The option's row and its value (given, or the default).
    fn take(&mut self, name: &str) -> (&'static OptionSpec, Value) {
        let spec = spec(name).unwrap_or_else(|| panic!("{name} is not in the options table"));
        assert!(self.read.insert(spec.name), "{name} read twice");
        let value = self
            .given
            .remove(name)
            .unwrap_or_else(|| spec.default.value());
        (spec, value)
    }

    /// Every row was read (none forgotten by [`build`]); a programming error otherwise.
    fn finish(self) {
        let unread: Vec<&str> = OPTIONS
            .iter()
            .filter(|o| o.kind != Kind::Rules && !self.read.contains(o.name))
            .map(|o| o.name)
            .collect();
        debug_assert!(unread.is_empty(), "options never read: {unread:?}");
    }

    fn seconds(&mut self, name: &str) -> Result<Duration, OptionError> {
        let (spec, value) = self.take(name);
        let seconds = match value {
            Value::Int(n) => n as f64,
            Value::Float(x) => x,
            other => return Err(wrong_type(spec, "a number of seconds", &other)),
        };
        let (fits, needs) = match spec.kind {
            Kind::SecondsOrZero => (seconds >= 0.0, "a number of seconds >= 0"),
            _ => (seconds > 0.0, "a positive number of seconds"),
        };
        if !(fits && seconds.is_finite()) {
            return Err(OptionError::value(format!(
                "{name} must be {needs}, got {seconds}"
            )));
        }
        Duration::try_from_secs_f64(seconds)
            .map_err(|_| OptionError::value(format!("{name} is too long: {seconds} seconds")))
    }

    fn optional_count(&mut self, name: &str) -> Result<Option<usize>, OptionError> {
        let (spec, value) = self.take(name);
        let n = match value {
            Value::None if spec.optional() => return Ok(None),
            Value::Int(n) => n,
            other => return Err(wrong_type(spec, "a whole number", &other)),
        };
        let n = match spec.kind {
            Kind::PositiveCount if n < 1 => {
                return Err(OptionError::value(format!("{name} must be at least 1")))
            }
            _ if n < 0 => {
                return Err(OptionError::value(format!(
                    "{name} must be a whole number >= 0, got {n}"
                )))
            }
            _ => n,
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| OptionError::value(format!("{name} is too large: {n}")))
    }

    fn count(&mut self, name: &str) -> Result<usize, OptionError> {
        Ok(self.optional_count(name)?.expect("a count with a default"))
    }

    /// A port; any other value is out of range (a ValueError, as Python said before).
    fn optional_port(&mut self, name: &str) -> Result<Option<u16>, OptionError> {
        let (spec, value) = self.take(name);
        match value {
            Value::None if spec.optional() => Ok(None),
            Value::Int(n) if (0..=65535).contains(&n) => Ok(Some(n as u16)),
            other => Err(OptionError::value(format!(
                "{name} must be a port number 0..65535{}, not {other}",
                if spec.optional() { " or None" } else { "" }
            ))),
        }
    }

    fn port(&mut self, name: &str) -> Result<u16, OptionError> {
        Ok(self.optional_port(name)?.expect("a port with a default"))
    }

    fn flag(&mut self, name: &str) -> Result<bool, OptionError> {
        match self.take(name) {
            (_, Value::Bool(b)) => Ok(b),
            (spec, other) => Err(wrong_type(spec, "True or False", &other)),
        }
    }

    fn choice(&mut self, name: &str) -> Result<&'static str, OptionError> {
        let (spec, value) = self.take(name);
        let words = spec.kind.choices();
        let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
        let needs = match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, first)) => format!("{} or {last}", first.join(", ")),
            None => String::new(),
        };
        match value {
            Value::Str(s) => words
                .iter()
                .copied()
                .find(|w| *w == s)
                .ok_or_else(|| OptionError::value(format!("{name} must be {needs}, not {s:?}"))),
            other => Err(wrong_type(spec, &needs, &other)),
        }
    }

    fn path(&mut self, name: &str) -> Result<Option<PathBuf>, OptionError> {
        match self.take(name) {
            (spec, Value::None) if spec.optional() => Ok(None),
            (_, Value::Str(s)) => Ok(Some(PathBuf::from(s))),
            (spec, other) => Err(wrong_type(spec, "a path", &other)),
        }
    }

    fn ip_address(&mut self, name: &str) -> Result<Option<IpAddr>, OptionError> {
        match self.take(name) {
            (spec, Value::None) if spec.optional() => Ok(None),
            (_, Value::Str(s)) => s.parse().map(Some).map_err(|_| {
                OptionError::value(format!("{name} must be an IP address, got {s:?}"))
            }),
            (spec, other) => Err(wrong_type(spec, "an IP address", &other)),
        }
    }

    /// A list of strings, or one string.
    fn strings(&mut self, name: &str) -> Result<Vec<String>, OptionError> {
        let (spec, value) = self.take(name);
        match value {
            Value::Str(s) => Ok(vec![s]),
            Value::List(items) => items
                .into_iter()
                .map(|item| match item {
                    Value::Str(s) => Ok(s),
                    other => Err(OptionError::new(
                        ErrorKind::Type,
                        format!("{name} entries must be strings, not {}", other.type_name()),
                    )),
                })
                .collect(),
            other => Err(wrong_type(spec, "a string or a list of them", &other)),
        }
    }

    fn paths(&mut self, name: &str) -> Result<Vec<PathBuf>, OptionError> {
        Ok(self.strings(name)?.into_iter().map(PathBuf::from).collect())
    }

    /// `user:pass` strings, or (user, password) pairs made into them; a list, or one string.
    fn credentials(&mut self, name: &str) -> Result<Vec<String>, OptionError> {
        let (spec, value) = self.take(name);
        let items = match value {
            Value::Str(s) => vec![Value::Str(s)],
            Value::List(items) => items,
            other => return Err(wrong_type(spec, "a list of credentials", &other)),
        };
        items
            .into_iter()
            .map(|item| match item {
                Value::Str(s) => Ok(s),
                Value::List(pair) => match pair.as_slice() {
                    [Value::Str(user), Value::Str(password)] => {
                        if user.contains(':') {
                            return Err(OptionError::value(format!(
                                "{name}: a user name may not contain ':' ({})",
                                Value::Str(user.clone())
                            )));
                        }
                        Ok(format!("{user}:{password}"))
                    }
                    _ => Err(bad_credential(name, "list")),
                },
                other => Err(bad_credential(name, other.type_name())),
            })
            .collect()
    }
}

fn wrong_type(spec: &OptionSpec, needs: &str, got: &Value) -> OptionError {
    OptionError::new(
        ErrorKind::Type,
        format!(
            "{} must be {needs}{}, not {}",
            spec.name,
            if spec.optional() { " or None" } else { "" },
            got.type_name()
        ),
    )
}

fn bad_credential(name: &str, type_name: &str) -> OptionError {
    OptionError::new(
        ErrorKind::Type,
        format!(
            "{name} entries must be 'user:pass' strings or (user, password) tuples, not {type_name}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_with(values: &[(&str, Value)]) -> Result<Built, OptionError> {
        build(
            "127.0.0.1",
            0,
            values.iter().map(|(n, v)| (n.to_string(), v.clone())),
            Objects::default(),
        )
    }

    fn error(values: &[(&str, Value)]) -> OptionError {
        match build_with(values) {
            Ok(_) => panic!("{values:?} was accepted"),
            Err(e) => e,
        }
    }

    fn s(text: &str) -> Value {
        Value::Str(text.into())
    }

    #[test]
    fn names_are_unique_and_flags_exist_once() {
        let names: BTreeSet<&str> = OPTIONS.iter().map(|o| o.name).collect();
        assert_eq!(names.len(), OPTIONS.len());
        let flags: Vec<String> = OPTIONS.iter().filter_map(|o| o.cli_flag()).collect();
        assert_eq!(flags.iter().collect::<BTreeSet<_>>().len(), flags.len());
        for o in OPTIONS {
            assert!(!o.help.is_empty() && !o.help.contains('\n'), "{}", o.name);
            assert!(!o.help.contains("  "), "{}: {:?}", o.name, o.help);
            if o.kind != Kind::Bool && !matches!(o.kind, Kind::Choice(_)) {
                assert!(!o.metavar.is_empty(), "{}", o.name);
            }
        }
    }

    /// The table's defaults are the engine's: building from nothing gives `EngineConfig`'s
    /// defaults (and the resolver's cache size), so neither can drift from the other.
    #[test]
    fn defaults_are_the_engine_defaults() {
        let built = build_with(&[]).unwrap();
        let (c, d) = (built.config, EngineConfig::default());
        assert_eq!(c.connect_timeout, d.connect_timeout);
        assert_eq!(c.idle_timeout, d.idle_timeout);
        assert_eq!(c.header_timeout, d.header_timeout);
        assert_eq!(c.response_timeout, d.response_timeout);
        assert_eq!(c.shutdown_timeout, d.shutdown_timeout);
        assert_eq!(c.max_connections, d.max_connections);
        assert_eq!(c.max_header_bytes, d.max_header_bytes);
        assert_eq!(c.hook_timeout, d.hook_timeout);
        assert_eq!(c.pool_idle_timeout, d.pool_idle_timeout);
        assert_eq!(c.stats_port, d.stats_port);
        assert_eq!(c.socks_port, None);
        assert!(!c.proxy_auth.is_enabled());
        assert_eq!(
            spec("dns_cache_size").unwrap().default,
            Preset::Int(DnsSettings::default().cache_size as i64)
        );
        let parts = built.parts;
        assert!(parts.flows.is_none() && parts.rules.is_none() && parts.handler.is_none());
        assert!(!parts.origin_trust.insecure && parts.origin_trust.extra_ca_files.is_empty());
    }

    #[test]
    fn values_reach_their_settings() {
        let built = build_with(&[
            ("connect_timeout", Value::Int(3)),
            ("idle_timeout", Value::Float(0.5)),
            ("shutdown_timeout", Value::Int(0)),
            ("max_connections", Value::Int(7)),
            ("max_header_bytes", Value::Int(10)),
            ("stats_port", Value::Int(0)),
            ("socks_port", Value::Int(0)),
            (
                "proxy_auth",
                Value::List(vec![s("a:b"), Value::List(vec![s("c"), s("d")])]),
            ),
            ("upstream_ca", s("one.pem")),
            ("upstream_insecure", Value::Bool(true)),
            ("record_flows", Value::Bool(true)),
        ])
        .unwrap();
        let c = built.config;
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.idle_timeout, Duration::from_millis(500));
        assert_eq!(c.shutdown_timeout, Duration::ZERO);
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.max_header_bytes, 1024);
        assert_eq!(c.stats_port, Some(0));
        assert_eq!(c.socks_port, Some(0));
        assert!(c.proxy_auth.is_enabled());
        let trust = built.parts.origin_trust;
        assert_eq!(trust.extra_ca_files, vec![PathBuf::from("one.pem")]);
        assert!(trust.insecure);
        assert!(built.parts.flows.is_some());
    }

    #[test]
    fn unknown_names_are_refused_naming_the_known() {
        let e = error(&[("colour", s("red")), ("bogus", Value::Int(1))]);
        assert_eq!(e.kind, ErrorKind::Unknown);
        assert!(e
            .message
            .starts_with("unknown option(s) bogus, colour; known: "));
        for o in OPTIONS {
            assert!(e.message.contains(o.name), "{}", o.name);
        }
        let e = error(&[("rules", s("x=direct"))]);
        assert_eq!(e.kind, ErrorKind::Type);
    }

    #[test]
    fn bad_values_say_what_was_wanted() {
        for (values, kind, message) in [
            (
                vec![("idle_timeout", Value::Int(0))],
                ErrorKind::Value,
                "idle_timeout must be a positive number of seconds, got 0",
            ),
            (
                vec![("connect_timeout", Value::Float(f64::NAN))],
                ErrorKind::Value,
                "connect_timeout must be a positive number of seconds, got NaN",
            ),
            (
                vec![("hook_timeout", Value::Float(1e300))],
                ErrorKind::Value,
                "hook_timeout is too long",
            ),
            (
                vec![("shutdown_timeout", Value::Int(-1))],
                ErrorKind::Value,
                "shutdown_timeout must be a number of seconds >= 0, got -1",
            ),
            (
                vec![("idle_timeout", s("soon"))],
                ErrorKind::Type,
                "idle_timeout must be a number of seconds, not str",
            ),
            (
                vec![("max_connections", Value::Int(0))],
                ErrorKind::Value,
                "max_connections must be at least 1",
            ),
            (
                vec![("access_records", Value::Int(-1))],
                ErrorKind::Value,
                "access_records must be a whole number >= 0, got -1",
            ),
            (
                vec![("flows_capacity", Value::Float(1.5))],
                ErrorKind::Type,
                "flows_capacity must be a whole number, not float",
            ),
            (
                vec![("stats_port", Value::Int(70000))],
                ErrorKind::Value,
                "stats_port must be a port number 0..65535 or None, not 70000",
            ),
            (
                vec![("stats_port", s("80"))],
                ErrorKind::Value,
                "stats_port must be a port number 0..65535 or None, not '80'",
            ),
            (
                vec![("dns_port", Value::Int(-1))],
                ErrorKind::Value,
                "dns_port must be a port number 0..65535, not -1",
            ),
            (
                vec![("deny_private", Value::Int(1))],
                ErrorKind::Type,
                "deny_private must be True or False, not int",
            ),
            (
                vec![("access_log_format", s("xml"))],
                ErrorKind::Value,
                "access_log_format must be \"text\" or \"json\", not \"xml\"",
            ),
            (
                vec![("dns_transport", s("quic"))],
                ErrorKind::Value,
                "dns_transport must be \"udp\" or \"tcp\", not \"quic\"",
            ),
            (
                vec![("dns_server", s("dns.example"))],
                ErrorKind::Value,
                "dns_server must be an IP address, got \"dns.example\"",
            ),
            (
                vec![("allow_domains", Value::List(vec![Value::Int(1)]))],
                ErrorKind::Type,
                "allow_domains entries must be strings, not int",
            ),
            (
                vec![("proxy_auth", Value::List(vec![Value::Int(42)]))],
                ErrorKind::Type,
                "proxy_auth entries must be 'user:pass' strings or (user, password) tuples, not int",
            ),
            (
                vec![("proxy_auth", Value::List(vec![Value::List(vec![s("us:er"), s("p")])]))],
                ErrorKind::Value,
                "proxy_auth: a user name may not contain ':' ('us:er')",
            ),
            (
                vec![("proxy_auth", s("nocolon"))],
                ErrorKind::Value,
                "proxy credentials must be USER:PASS",
            ),
        ] {
            let e = error(&values);
            assert_eq!(e.kind, kind, "{values:?}: {e}");
            assert!(e.message.starts_with(message), "{values:?}: {e}");
        }
    }

    #[test]
    fn an_open_relay_is_refused_unless_allowed_or_authenticated() {
        let open = |values: &[(&str, Value)]| {
            build(
                "0.0.0.0",
                0,
                values.iter().map(|(n, v)| (n.to_string(), v.clone())),
                Objects::default(),
            )
        };
        let e = open(&[]).err().expect("refused");
        assert_eq!(e.kind, ErrorKind::Value);
        assert!(e.message.contains("--allow-open-proxy"), "{e}");
        assert!(open(&[("allow_open_proxy", Value::Bool(true))]).is_ok());
        assert!(open(&[("proxy_auth", s("u:p"))]).is_ok());
    }

    #[test]
    fn no_file_is_created_for_a_refused_server() {
        let dir = std::env::temp_dir().join(format!("segproxy-options-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let flows = dir.join("flows.jsonl");
        let access = dir.join("access.log");
        let e = error(&[
            ("flows_file", s(flows.to_str().unwrap())),
            ("access_log", s(access.to_str().unwrap())),
            ("access_records", Value::Int(-1)),
        ]);
        assert_eq!(e.kind, ErrorKind::Value);
        assert!(!flows.exists() && !access.exists());
        let e = error(&[(
            "access_log",
            s(dir.join("no/such/dir/a.log").to_str().unwrap()),
        )]);
        assert_eq!(e.kind, ErrorKind::Io);
        assert!(e.message.starts_with("cannot open access log "), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn values_print_as_python_writes_them() {
        let v = Value::List(vec![
            Value::None,
            Value::Bool(true),
            Value::Int(3),
            Value::Float(2.0),
            s("it's"),
        ]);
        assert_eq!(v.to_string(), r"[None, True, 3, 2.0, 'it\'s']");
    }
}
