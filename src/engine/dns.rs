//! Name resolution for the connector: the system resolver, or one given DNS
//! server (UDP with TCP fallback, or TCP only), behind our own TTL cache.
//!
//! - IP literals (`127.0.0.1`, `::1`, `[::1]`) never reach DNS.
//! - `DnsConfig::System` asks the operating system (`getaddrinfo` through
//!   `tokio::net::lookup_host`), so `/etc/hosts`, `localhost` and nsswitch
//!   behave exactly as for every other program on the machine. The system gives
//!   no TTL, so its answers are cached for [`SYSTEM_TTL`].
//! - `DnsConfig::Custom` asks exactly the configured server with
//!   hickory-resolver: no hosts file, no search domains. With
//!   `DnsTransport::Udp` the query goes over UDP first and is retried over TCP
//!   when the answer is truncated (hickory does that), when the UDP exchange
//!   fails with an I/O error, or when UDP gets no answer within half the
//!   timeout (we do that: a dropped datagram gives no I/O error); with
//!   `DnsTransport::Tcp` only TCP is used. Answers are cached for their record
//!   TTL (TTL 0 is not cached); failures are not cached.
//! - The cache is ours (hickory's own is off), keyed by host name, bounded by
//!   `cache_size` entries; every answer says whether it was a hit or a miss.
//! - `timeout` bounds one whole `resolve` call.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
    ResolverOpts, ServerOrderingStrategy,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, ResolveErrorKind, TokioResolver};

/// How long an answer from the system resolver stays in the cache (the system
/// does not tell us the record TTL).
pub const SYSTEM_TTL: Duration = Duration::from_secs(30);

/// Transport used to reach a custom DNS server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsTransport {
    /// UDP first, TCP when the UDP answer is truncated or UDP fails.
    Udp,
    /// TCP only.
    Tcp,
}

/// Which resolver answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsConfig {
    /// The operating system's resolver (`getaddrinfo`).
    System,
    /// Exactly this DNS server.
    Custom {
        server: IpAddr,
        port: u16,
        transport: DnsTransport,
    },
}

/// Everything the resolver needs.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    pub config: DnsConfig,
    /// Maximum number of cached host names; 0 turns the cache off.
    pub cache_size: usize,
    /// Upper bound for one `resolve` call.
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            config: DnsConfig::System,
            cache_size: 1024,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Whether an answer came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Answered from the cache.
    Hit,
    /// Asked the resolver (and cached the answer if its TTL allows).
    Miss,
    /// The cache is off (`cache_size == 0`).
    Off,
    /// The host was an IP literal; no lookup at all.
    Literal,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Off => "off",
            CacheOutcome::Literal => "literal",
        }
    }
}

/// The addresses for a host, with where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Every address found, in resolver order, each with the requested port.
    pub addrs: Vec<SocketAddr>,
    /// `"system"` or `"custom"` (also for literals: the configured resolver).
    pub source: &'static str,
    pub cache: CacheOutcome,
}

/// What kind of failure a [`DnsError`] is, for choosing a response (502 / 504).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsErrorKind {
    /// The name does not exist or has no address records.
    NotFound,
    /// No answer within the timeout.
    Timeout,
    /// The server refused, failed, or could not be reached.
    Failed,
    /// The settings are unusable (from `DnsResolver::new`).
    Config,
}

/// A failed resolution. Displays as one line: `cannot resolve NAME: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsError {
    host: String,
    kind: DnsErrorKind,
    reason: String,
    /// Could not talk to the server at all (worth retrying over TCP).
    io: bool,
}

impl DnsError {
    fn new(host: &str, kind: DnsErrorKind, reason: impl Into<String>) -> Self {
        DnsError {
            host: host.to_string(),
            kind,
            reason: reason.into(),
            io: false,
        }
    }

    /// The host name that could not be resolved (empty for a `Config` error).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn kind(&self) -> DnsErrorKind {
        self.kind
    }

    /// Why, without the host name.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == DnsErrorKind::Config {
            write!(f, "invalid DNS settings: {}", self.reason)
        } else {
            write!(f, "cannot resolve {}: {}", self.host, self.reason)
        }
    }
}

impl std::error::Error for DnsError {}

/// Parse an IP literal host, bracketed IPv6 included.
pub fn parse_ip_literal(host: &str) -> Option<IpAddr> {
    let inner = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    inner.parse().ok()
}

struct CacheEntry {
    ips: Vec<IpAddr>,
    expires: Instant,
}

/// Bounded host -> addresses map; expired entries are dropped on read and
/// before any eviction; when full, the entry closest to expiry goes.
struct Cache {
    capacity: usize,
    map: HashMap<String, CacheEntry>,
}

impl Cache {
    fn get(&mut self, key: &str, now: Instant) -> Option<Vec<IpAddr>> {
        match self.map.get(key) {
            Some(e) if e.expires > now => Some(e.ips.clone()),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: String, ips: Vec<IpAddr>, expires: Instant, now: Instant) {
        if self.capacity == 0 || expires <= now || ips.is_empty() {
            return;
        }
        if !self.map.contains_key(&key) && self.map.len() >= self.capacity {
            self.map.retain(|_, e| e.expires > now);
            if self.map.len() >= self.capacity {
                if let Some(victim) = self
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone())
                {
                    self.map.remove(&victim);
                }
            }
        }
        self.map.insert(key, CacheEntry { ips, expires });
    }
}

enum Backend {
    System,
    Custom {
        /// UDP then TCP (hickory retries a truncated or I/O-failed UDP
        /// exchange over TCP), or TCP only.
        primary: Box<TokioResolver>,
        /// For `DnsTransport::Udp`: TCP only, asked when the UDP exchange
        /// timed out (a lost datagram or a filtered UDP port gives no I/O
        /// error, so hickory would not fall back by itself).
        tcp_fallback: Option<Box<TokioResolver>>,
    },
}

/// Resolves host names for the connector. `Send + Sync`; share it behind `Arc`.
pub struct DnsResolver {
    backend: Backend,
    cache: Option<Mutex<Cache>>,
    timeout: Duration,
}

impl fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsResolver")
            .field("source", &self.source())
            .field("cache", &self.cache.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl DnsResolver {
    pub fn new(settings: DnsSettings) -> Result<Self, DnsError> {
        if settings.timeout.is_zero() {
            return Err(DnsError::new(
                "",
                DnsErrorKind::Config,
                "timeout must be > 0",
            ));
        }
        let backend = match settings.config {
            DnsConfig::System => Backend::System,
            DnsConfig::Custom {
                server,
                port,
                transport,
            } => {
                if port == 0 {
                    return Err(DnsError::new(
                        "",
                        DnsErrorKind::Config,
                        format!("DNS server {server} needs a port other than 0"),
                    ));
                }
                let addr = SocketAddr::new(server, port);
                match transport {
                    DnsTransport::Udp => Backend::Custom {
                        // UDP gets half the budget, TCP the rest.
                        primary: Box::new(build_hickory(addr, true, settings.timeout / 2)),
                        tcp_fallback: Some(Box::new(build_hickory(
                            addr,
                            false,
                            settings.timeout / 2,
                        ))),
                    },
                    DnsTransport::Tcp => Backend::Custom {
                        primary: Box::new(build_hickory(addr, false, settings.timeout)),
                        tcp_fallback: None,
                    },
                }
            }
        };
        let cache = (settings.cache_size > 0).then(|| {
            Mutex::new(Cache {
                capacity: settings.cache_size,
                map: HashMap::new(),
            })
        });
        Ok(DnsResolver {
            backend,
            cache,
            timeout: settings.timeout,
        })
    }

    /// `"system"` or `"custom"`.
    pub fn source(&self) -> &'static str {
        match self.backend {
            Backend::System => "system",
            Backend::Custom { .. } => "custom",
        }
    }

    /// Every address of `host`, each with `port`.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Resolved, DnsError> {
        let source = self.source();
        if let Some(ip) = parse_ip_literal(host) {
            return Ok(Resolved {
                addrs: vec![SocketAddr::new(ip, port)],
                source,
                cache: CacheOutcome::Literal,
            });
        }
        if host.is_empty() {
            return Err(DnsError::new(
                host,
                DnsErrorKind::NotFound,
                "empty host name",
            ));
        }
        let key = host.to_ascii_lowercase();
        let with_port = |ips: Vec<IpAddr>| {
            ips.into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()
        };

        if let Some(cache) = &self.cache {
            let hit = cache.lock().unwrap().get(&key, Instant::now());
            if let Some(ips) = hit {
                return Ok(Resolved {
                    addrs: with_port(ips),
                    source,
                    cache: CacheOutcome::Hit,
                });
            }
        }

        let lookup = async {
            match &self.backend {
                Backend::System => lookup_system(host).await,
                Backend::Custom {
                    primary,
                    tcp_fallback,
                } => match (
                    lookup_custom(primary, host, self.timeout / 2).await,
                    tcp_fallback,
                ) {
                    (Err(e), Some(tcp)) if e.kind() == DnsErrorKind::Timeout || e.io => {
                        lookup_custom(tcp, host, self.timeout)
                            .await
                            .map_err(|tcp_err| DnsError {
                                reason: format!(
                                    "{} (over UDP), then {} (over TCP)",
                                    e.reason, tcp_err.reason
                                ),
                                ..tcp_err
                            })
                    }
                    (res, _) => res,
                },
            }
        };
        let (ips, expires) = match tokio::time::timeout(self.timeout, lookup).await {
            Ok(res) => res?,
            Err(_) => {
                return Err(DnsError::new(
                    host,
                    DnsErrorKind::Timeout,
                    format!("timed out after {}", fmt_duration(self.timeout)),
                ))
            }
        };
        if ips.is_empty() {
            return Err(DnsError::new(host, DnsErrorKind::NotFound, "no addresses"));
        }

        let outcome = match &self.cache {
            Some(cache) => {
                let now = Instant::now();
                cache.lock().unwrap().insert(key, ips.clone(), expires, now);
                CacheOutcome::Miss
            }
            None => CacheOutcome::Off,
        };
        Ok(Resolved {
            addrs: with_port(ips),
            source,
            cache: outcome,
        })
    }

    /// Drop every cached answer.
    pub fn clear_cache(&self) {
        if let Some(cache) = &self.cache {
            cache.lock().unwrap().map.clear();
        }
    }
}

/// A hickory resolver asking exactly `addr`; `budget` bounds one lookup.
fn build_hickory(addr: SocketAddr, udp: bool, budget: Duration) -> TokioResolver {
    let mut group = NameServerConfigGroup::new();
    // The pool asks the UDP servers first and falls back to the TCP ones on a
    // truncated answer, or on an I/O error with `try_tcp_on_error`.
    if udp {
        group.push(NameServerConfig::new(addr, Protocol::Udp));
    }
    group.push(NameServerConfig::new(addr, Protocol::Tcp));
    let config = ResolverConfig::from_parts(None, vec![], group);

    let mut opts = ResolverOpts::default();
    // Two tries per query inside our overall bound.
    opts.attempts = 2;
    opts.timeout = (budget / 2).max(Duration::from_millis(25));
    opts.cache_size = 0; // our cache reports hit/miss
    opts.use_hosts_file = ResolveHosts::Never; // exactly the given server
    opts.try_tcp_on_error = true;
    opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.num_concurrent_reqs = 1;
    opts.ndots = 0;

    let mut builder =
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
    *builder.options_mut() = opts;
    builder.build()
}

async fn lookup_system(host: &str) -> Result<(Vec<IpAddr>, Instant), DnsError> {
    // getaddrinfo wants a port; the real one is attached later.
    match tokio::net::lookup_host((host, 0u16)).await {
        Ok(addrs) => {
            let mut ips: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !ips.contains(&a.ip()) {
                    ips.push(a.ip());
                }
            }
            Ok((ips, Instant::now() + SYSTEM_TTL))
        }
        Err(e) => {
            let msg = e.to_string();
            let lower = msg.to_ascii_lowercase();
            let kind = if lower.contains("not known")
                || lower.contains("no address")
                || lower.contains("nodename nor servname")
            {
                DnsErrorKind::NotFound
            } else {
                DnsErrorKind::Failed
            };
            Err(DnsError::new(host, kind, format!("system resolver: {msg}")))
        }
    }
}

async fn lookup_custom(
    r: &TokioResolver,
    host: &str,
    budget: Duration,
) -> Result<(Vec<IpAddr>, Instant), DnsError> {
    let answer = match tokio::time::timeout(budget, r.lookup_ip(host)).await {
        Ok(answer) => answer,
        Err(_) => {
            return Err(DnsError::new(
                host,
                DnsErrorKind::Timeout,
                "DNS query timed out",
            ))
        }
    };
    match answer {
        Ok(lookup) => {
            let ips: Vec<IpAddr> = lookup.iter().collect();
            Ok((ips, lookup.valid_until()))
        }
        Err(e) => Err(map_hickory_error(host, &e)),
    }
}

fn map_hickory_error(host: &str, e: &ResolveError) -> DnsError {
    let proto = match e.kind() {
        ResolveErrorKind::Proto(p) => p,
        _ => return DnsError::new(host, DnsErrorKind::Failed, e.to_string()),
    };
    match proto.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => match *response_code {
            ResponseCode::NXDomain => {
                DnsError::new(host, DnsErrorKind::NotFound, "no such name (NXDOMAIN)")
            }
            ResponseCode::NoError => {
                DnsError::new(host, DnsErrorKind::NotFound, "no address records")
            }
            ResponseCode::Refused => DnsError::new(
                host,
                DnsErrorKind::Failed,
                "the DNS server refused the query (REFUSED)",
            ),
            ResponseCode::ServFail => DnsError::new(
                host,
                DnsErrorKind::Failed,
                "the DNS server failed (SERVFAIL)",
            ),
            code => DnsError::new(
                host,
                DnsErrorKind::Failed,
                format!("DNS error response {code}"),
            ),
        },
        ProtoErrorKind::Timeout => {
            DnsError::new(host, DnsErrorKind::Timeout, "DNS query timed out")
        }
        ProtoErrorKind::Io(io) => DnsError {
            io: true,
            ..DnsError::new(
                host,
                DnsErrorKind::Failed,
                format!("cannot reach the DNS server: {io}"),
            )
        },
        ProtoErrorKind::NoConnections => DnsError {
            io: true,
            ..DnsError::new(host, DnsErrorKind::Failed, "cannot reach the DNS server")
        },
        _ => DnsError::new(host, DnsErrorKind::Failed, proto.to_string()),
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn resolver_is_send_sync() {
        assert_send_sync::<DnsResolver>();
        assert_send_sync::<Arc<DnsResolver>>();
    }

    #[test]
    fn literal_parsing() {
        assert_eq!(
            parse_ip_literal("127.0.0.1"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(parse_ip_literal("::1"), Some("::1".parse().unwrap()));
        assert_eq!(parse_ip_literal("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(
            parse_ip_literal("[fe80::1]"),
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(parse_ip_literal("example.com"), None);
        assert_eq!(parse_ip_literal("[example.com]"), None);
        assert_eq!(parse_ip_literal("[::1"), None);
    }

    #[test]
    fn cache_is_bounded_and_respects_expiry() {
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut c = Cache {
            capacity: 2,
            map: HashMap::new(),
        };
        c.insert("a".into(), vec![ip], now + Duration::from_secs(10), now);
        c.insert("b".into(), vec![ip], now + Duration::from_secs(20), now);
        c.insert("c".into(), vec![ip], now + Duration::from_secs(30), now);
        assert_eq!(c.map.len(), 2);
        assert!(c.get("a", now).is_none(), "closest to expiry is evicted");
        assert!(c.get("b", now).is_some());
        assert!(c.get("c", now + Duration::from_secs(25)).is_some());
        assert!(
            c.get("b", now + Duration::from_secs(25)).is_none(),
            "expired"
        );
        c.insert("zero".into(), vec![ip], now, now);
        assert!(c.get("zero", now).is_none(), "TTL 0 is not cached");
    }

    #[test]
    fn error_display_is_one_line_naming_the_host() {
        let e = DnsError::new(
            "x.example",
            DnsErrorKind::NotFound,
            "no such name (NXDOMAIN)",
        );
        assert_eq!(
            e.to_string(),
            "cannot resolve x.example: no such name (NXDOMAIN)"
        );
        assert_eq!(e.host(), "x.example");
    }

    #[test]
    fn bad_settings_are_refused() {
        let s = DnsSettings {
            config: DnsConfig::Custom {
                server: "127.0.0.1".parse().unwrap(),
                port: 0,
                transport: DnsTransport::Udp,
            },
            cache_size: 0,
            timeout: Duration::from_secs(1),
        };
        let e = DnsResolver::new(s).unwrap_err();
        assert_eq!(e.kind(), DnsErrorKind::Config);
        assert!(e.to_string().contains("port"));
    }

    fn settings(config: DnsConfig, cache_size: usize) -> DnsSettings {
        DnsSettings {
            config,
            cache_size,
            timeout: Duration::from_secs(3),
        }
    }

    #[tokio::test]
    async fn literals_never_hit_dns() {
        // A custom server that does not exist: literals must not need it.
        let r = DnsResolver::new(settings(
            DnsConfig::Custom {
                server: "127.0.0.1".parse().unwrap(),
                port: 9,
                transport: DnsTransport::Udp,
            },
            16,
        ))
        .unwrap();
        for (host, ip) in [
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[2001:db8::5]", "2001:db8::5"),
        ] {
            let res = r.resolve(host, 8443).await.unwrap();
            assert_eq!(res.cache, CacheOutcome::Literal);
            assert_eq!(res.source, "custom");
            assert_eq!(res.addrs, vec![SocketAddr::new(ip.parse().unwrap(), 8443)]);
        }
    }

    #[tokio::test]
    async fn system_resolves_localhost_and_caches() {
        let r = DnsResolver::new(settings(DnsConfig::System, 16)).unwrap();
        let first = r.resolve("localhost", 80).await.unwrap();
        assert_eq!(first.source, "system");
        assert_eq!(first.cache, CacheOutcome::Miss);
        assert!(
            first
                .addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 80),
            "{first:?}"
        );
        let second = r.resolve("LOCALHOST", 81).await.unwrap();
        assert_eq!(second.cache, CacheOutcome::Hit);
        assert!(second.addrs.iter().all(|a| a.port() == 81));

        let off = DnsResolver::new(settings(DnsConfig::System, 0)).unwrap();
        assert_eq!(
            off.resolve("localhost", 80).await.unwrap().cache,
            CacheOutcome::Off
        );
    }

    // ---- custom server: a real dnsmasq on loopback ------------------------

    /// A dnsmasq child on 127.0.0.1, killed by pid on drop.
    struct Dnsmasq {
        child: Child,
        port: u16,
    }

    impl Drop for Dnsmasq {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn dnsmasq_path() -> Option<std::path::PathBuf> {
        ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
    }

    /// A port free for both UDP and TCP on 127.0.0.1.
    fn free_port() -> u16 {
        loop {
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = tcp.local_addr().unwrap().port();
            if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }

    /// Start dnsmasq answering 127.0.0.1 for `*.test.zone` (TTL `ttl`),
    /// NXDOMAIN for `*.bad.zone`, refusing everything else. `None` (test
    /// skipped) if dnsmasq is not installed.
    fn start_dnsmasq(ttl: u32) -> Option<Dnsmasq> {
        let Some(bin) = dnsmasq_path() else {
            eprintln!(
                "SKIPPED: dnsmasq is not installed (Debian package dnsmasq-base); custom DNS tests not run"
            );
            return None;
        };
        for _attempt in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args([
                    format!("--port={port}"),
                    "--listen-address=127.0.0.1".into(),
                    "--bind-interfaces".into(),
                    "--no-resolv".into(),
                    "--no-hosts".into(),
                    "--address=/test.zone/127.0.0.1".into(),
                    "--address=/bad.zone/".into(),
                    format!("--local-ttl={ttl}"),
                    "--keep-in-foreground".into(),
                    "--user=root".into(),
                    "--pid-file=".into(),
                    "--log-facility=-".into(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn dnsmasq");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: port taken in the meantime; try another
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Dnsmasq { child, port });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dnsmasq did not start listening");
    }

    fn custom(d: &Dnsmasq, transport: DnsTransport, cache_size: usize) -> DnsResolver {
        DnsResolver::new(settings(
            DnsConfig::Custom {
                server: "127.0.0.1".parse().unwrap(),
                port: d.port,
                transport,
            },
            cache_size,
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn custom_udp_resolves_and_caches() {
        let Some(d) = start_dnsmasq(60) else { return };
        let r = custom(&d, DnsTransport::Udp, 16);
        let first = r.resolve("www.test.zone", 8080).await.unwrap();
        assert_eq!(first.source, "custom");
        assert_eq!(first.cache, CacheOutcome::Miss);
        assert_eq!(first.addrs, vec!["127.0.0.1:8080".parse().unwrap()]);
        let second = r.resolve("www.test.zone", 443).await.unwrap();
        assert_eq!(second.cache, CacheOutcome::Hit);
        assert_eq!(second.addrs, vec!["127.0.0.1:443".parse().unwrap()]);
        // Another name is its own entry.
        assert_eq!(
            r.resolve("api.test.zone", 1).await.unwrap().cache,
            CacheOutcome::Miss
        );
        r.clear_cache();
        assert_eq!(
            r.resolve("www.test.zone", 1).await.unwrap().cache,
            CacheOutcome::Miss
        );
    }

    #[tokio::test]
    async fn custom_cache_off() {
        let Some(d) = start_dnsmasq(60) else { return };
        let r = custom(&d, DnsTransport::Udp, 0);
        for _ in 0..2 {
            let res = r.resolve("www.test.zone", 80).await.unwrap();
            assert_eq!(res.cache, CacheOutcome::Off);
            assert_eq!(res.addrs, vec!["127.0.0.1:80".parse().unwrap()]);
        }
    }

    #[tokio::test]
    async fn custom_cache_respects_ttl() {
        let Some(d) = start_dnsmasq(1) else { return };
        let r = custom(&d, DnsTransport::Udp, 16);
        assert_eq!(
            r.resolve("a.test.zone", 80).await.unwrap().cache,
            CacheOutcome::Miss
        );
        assert_eq!(
            r.resolve("a.test.zone", 80).await.unwrap().cache,
            CacheOutcome::Hit
        );
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            r.resolve("a.test.zone", 80).await.unwrap().cache,
            CacheOutcome::Miss
        );
    }

    #[tokio::test]
    async fn custom_tcp_transport() {
        let Some(d) = start_dnsmasq(60) else { return };
        let r = custom(&d, DnsTransport::Tcp, 16);
        let res = r.resolve("tcp.test.zone", 80).await.unwrap();
        assert_eq!(res.addrs, vec!["127.0.0.1:80".parse().unwrap()]);
        assert_eq!(res.cache, CacheOutcome::Miss);
    }

    /// A TCP-only relay to dnsmasq's TCP port: nothing listens on UDP at the
    /// returned port, so an answer proves the query went over TCP.
    async fn tcp_only_relay(d: &Dnsmasq) -> u16 {
        let listener = loop {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            // Make sure no UDP socket holds this port number.
            if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
                break l;
            }
        };
        let port = listener.local_addr().unwrap().port();
        let upstream = d.port;
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn custom_tcp_transport_uses_tcp_only() {
        let Some(d) = start_dnsmasq(60) else { return };
        let port = tcp_only_relay(&d).await;
        let r = DnsResolver::new(settings(
            DnsConfig::Custom {
                server: "127.0.0.1".parse().unwrap(),
                port,
                transport: DnsTransport::Tcp,
            },
            16,
        ))
        .unwrap();
        let res = r.resolve("relay.test.zone", 80).await.unwrap();
        assert_eq!(res.addrs, vec!["127.0.0.1:80".parse().unwrap()]);
    }

    #[tokio::test]
    async fn custom_udp_falls_back_to_tcp() {
        // UDP to the relay port is refused (nothing bound): the query must be
        // retried over TCP and succeed.
        let Some(d) = start_dnsmasq(60) else { return };
        let port = tcp_only_relay(&d).await;
        let r = DnsResolver::new(settings(
            DnsConfig::Custom {
                server: "127.0.0.1".parse().unwrap(),
                port,
                transport: DnsTransport::Udp,
            },
            16,
        ))
        .unwrap();
        let res = r.resolve("fallback.test.zone", 80).await.unwrap();
        assert_eq!(res.addrs, vec!["127.0.0.1:80".parse().unwrap()]);
    }

    #[tokio::test]
    async fn custom_nxdomain_names_the_host() {
        let Some(d) = start_dnsmasq(60) else { return };
        let r = custom(&d, DnsTransport::Udp, 16);
        let e = r.resolve("nope.bad.zone", 80).await.unwrap_err();
        assert_eq!(e.kind(), DnsErrorKind::NotFound, "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("cannot resolve nope.bad.zone: "), "{msg}");
        assert!(msg.contains("NXDOMAIN"), "{msg}");
        assert!(!msg.contains('\n'));
        // Failures are not cached as successes.
        assert!(r.resolve("nope.bad.zone", 80).await.is_err());
    }

    #[tokio::test]
    async fn custom_unanswerable_name_fails_cleanly() {
        // Outside every --address zone with --no-resolv: dnsmasq has no
        // upstream and refuses.
        let Some(d) = start_dnsmasq(60) else { return };
        let r = custom(&d, DnsTransport::Udp, 16);
        let e = r.resolve("example.org", 80).await.unwrap_err();
        eprintln!("unanswerable: {e}");
        assert!(
            e.to_string().starts_with("cannot resolve example.org: "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn custom_server_that_never_answers_times_out() {
        // A UDP socket that reads nothing; no TCP listener on that port.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let r = DnsResolver::new(DnsSettings {
            config: DnsConfig::Custom {
                server: "127.0.0.1".parse().unwrap(),
                port,
                transport: DnsTransport::Udp,
            },
            cache_size: 16,
            timeout: Duration::from_millis(400),
        })
        .unwrap();
        let started = Instant::now();
        let e = r.resolve("slow.test.zone", 80).await.unwrap_err();
        eprintln!("silent server: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "bounded by the timeout"
        );
        assert!(
            e.to_string().starts_with("cannot resolve slow.test.zone: "),
            "{e}"
        );
        assert!(
            matches!(e.kind(), DnsErrorKind::Timeout | DnsErrorKind::Failed),
            "{e}"
        );
    }
}
