//! One client connection: the HTTP/1.1 request loop (keep-alive), forwarding of plain HTTP
//! requests with streamed bodies, CONNECT tunnels, and upgrades.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::access::{now_epoch, AccessRecord, Outcome, PendingRecord};
use super::auth::{self, Verdict};
use super::connector::{authority, ConnectError, Io, Rewind, Route, UpstreamHop};
use super::flows::{FlowHandle, FlowRecord};
use super::hooks::{
    ConnectionHandler, ConnectionMeta, ForwardOrder, HandlerCommand, Reply, RequestParts,
    ResponseParts,
};
use super::http1::{
    chunked_transfer_encoding, request_body_kind, response_body_kind, strip_hop_by_hop, BodyKind,
    BodyReader, BodyWriter, BufStream, HttpError, RawResponse, RequestHead, ResponseHead,
};
use super::pool::OriginConn;
use super::rules::{Action, Decision, Scheme};
use super::segment::{read_flushing, Carry, ChunkObserver, SegmentPolicy, Segmented};
use super::server::Engine;
use super::tls;
use super::tunnel::pump;
use super::tunnel::SEGMENTING_BUFFER;

/// Where requests on a connection come from, which fixes how their targets are read.
#[derive(Clone, Debug)]
pub enum Mode {
    /// A client talking to us as its proxy: absolute-form targets and CONNECT.
    Proxy,
    /// Requests inside an intercepted CONNECT: origin-form targets for this destination.
    /// `up_policy` segments the encrypted bytes of new origin connections;
    /// `down_segmenting` says whether the client's encrypted bytes are segmented below TLS.
    Intercepted {
        host: String,
        port: u16,
        up_policy: SegmentPolicy,
        down_segmenting: bool,
    },
}

/// Per-connection facts shared by its exchanges.
pub struct ConnInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub exchanges: u64,
}

impl ConnInfo {
    pub fn next_id(&mut self) -> String {
        self.exchanges += 1;
        format!("{}.{}", self.id, self.exchanges)
    }
}

/// A parsed request target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
    /// Path and query, origin form ("/" when empty).
    pub path: String,
}

impl Target {
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }
    /// Authority as a Host header writes it: the port only when not the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.scheme == "https" { 443 } else { 80 };
        if self.port == default {
            authority(&self.host, self.port)
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_default()
        } else {
            self.authority()
        }
    }
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host_header(), self.path)
    }
}

/// Splits `host[:port]` (IPv6 in brackets) into a host and a port.
pub fn split_authority(auth: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    if auth.is_empty() {
        return Err("empty host".into());
    }
    if auth.contains('@') {
        return Err("user information in a proxy target is not allowed".into());
    }
    let (host, port) = if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '[' in host")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("bad authority {auth:?}")),
        };
        (h.to_string(), port)
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
            Some(_) => return Err("IPv6 address must be in brackets".into()),
            None => (auth.to_string(), None),
        }
    };
    if host.is_empty()
        || host
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'?' || b == b'#')
    {
        return Err(format!("bad host {host:?}"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("bad port {p:?}"))?,
        None => default_port.ok_or("a port is required")?,
    };
    Ok((host.to_ascii_lowercase(), port))
}

/// Reads an absolute-form (`http://host/path`) target.
pub fn parse_absolute(target: &str) -> Result<Target, String> {
    let (scheme, rest) = target.split_once("://").ok_or("not an absolute URL")?;
    let scheme = if scheme.eq_ignore_ascii_case("http") {
        "http"
    } else if scheme.eq_ignore_ascii_case("https") {
        "https"
    } else {
        return Err(format!("unsupported scheme {scheme:?}"));
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(split);
    let (host, port) = split_authority(auth, Some(if scheme == "https" { 443 } else { 80 }))?;
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok(Target {
        scheme,
        host,
        port,
        path,
    })
}

/// The standard reason phrases (RFC 9110 and the registered extensions a proxy may send).
const STATUS_TEXT: &[(u16, &str)] = &[
    (100, "Continue"),
    (101, "Switching Protocols"),
    (200, "OK"),
    (201, "Created"),
    (202, "Accepted"),
    (204, "No Content"),
    (206, "Partial Content"),
    (301, "Moved Permanently"),
    (302, "Found"),
    (303, "See Other"),
    (304, "Not Modified"),
    (307, "Temporary Redirect"),
    (308, "Permanent Redirect"),
    (400, "Bad Request"),
    (401, "Unauthorized"),
    (403, "Forbidden"),
    (404, "Not Found"),
    (405, "Method Not Allowed"),
    (407, "Proxy Authentication Required"),
    (408, "Request Timeout"),
    (409, "Conflict"),
    (411, "Length Required"),
    (413, "Content Too Large"),
    (414, "URI Too Long"),
    (417, "Expectation Failed"),
    (421, "Misdirected Request"),
    (426, "Upgrade Required"),
    (429, "Too Many Requests"),
    (431, "Request Header Fields Too Large"),
    (500, "Internal Server Error"),
    (501, "Not Implemented"),
    (502, "Bad Gateway"),
    (503, "Service Unavailable"),
    (504, "Gateway Timeout"),
    (505, "HTTP Version Not Supported"),
];

/// The reason phrase of a status code; for a code without a standard phrase, its class's
/// name (RFC 9110 section 15).
pub fn reason_phrase(status: u16) -> &'static str {
    if let Some((_, r)) = STATUS_TEXT.iter().find(|(s, _)| *s == status) {
        return r;
    }
    match status / 100 {
        1 => "Informational",
        2 => "Success",
        3 => "Redirection",
        4 => "Client Error",
        _ => "Server Error",
    }
}

/// Writes a short plain-text response made by the proxy itself.
pub async fn send_error<W: AsyncWrite + Unpin>(
    client: &mut W,
    status: u16,
    message: &str,
    keep_alive: bool,
) -> io::Result<()> {
    send_error_with(client, status, message, keep_alive, "").await
}

/// `send_error` with extra header lines (each ending in CRLF).
pub async fn send_error_with<W: AsyncWrite + Unpin>(
    client: &mut W,
    status: u16,
    message: &str,
    keep_alive: bool,
    extra_headers: &str,
) -> io::Result<()> {
    let body = format!("segproxy: {message}\n");
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n{extra_headers}Content-Length: {}\r\nConnection: {}\r\n\r\n",
        reason_phrase(status),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    client.write_all(&out).await?;
    client.flush().await
}

/// Per-connection state: the user handler for this client connection, made on first need.
pub struct ConnState {
    pub info: ConnInfo,
    handler: Option<Box<dyn ConnectionHandler>>,
    /// The proxy address the client connected to (named in the answer to non-HTTP bytes).
    pub local: Option<SocketAddr>,
}

impl ConnState {
    pub fn new(id: u64, peer: SocketAddr) -> Self {
        ConnState {
            info: ConnInfo {
                id,
                peer,
                exchanges: 0,
            },
            handler: None,
            local: None,
        }
    }

    /// The connection's handler, created when a hook first applies.
    pub fn handler(&mut self, engine: &Engine) -> Option<&dyn ConnectionHandler> {
        let user = engine.handler.as_ref()?;
        if self.handler.is_none() {
            self.handler = Some(user.open(ConnectionMeta {
                id: self.info.id,
                client: self.info.peer,
            }));
        }
        self.handler.as_deref()
    }

    /// Reports a failure the engine saw (not one a hook raised, which the handler knows).
    pub fn report_error(&mut self, engine: &Engine, message: &str) {
        if engine.hooks.error || engine.hooks.any_response() || engine.hooks.request {
            if let Some(h) = self.handler(engine) {
                h.error(message.to_string());
            }
        }
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if let Some(h) = &self.handler {
            h.closed();
        }
    }
}

/// Serves one accepted client connection until it closes.
pub async fn serve_client(engine: &Arc<Engine>, stream: TcpStream, peer: SocketAddr, id: u64) {
    let mut conn = ConnState::new(id, peer);
    conn.local = stream.local_addr().ok();
    let client = BufStream::new(stream);
    // Boxed stages: a connection holds the state of the stage it is in, not of the largest.
    if let Some((head, client)) =
        Box::pin(serve_http(engine, client, &mut conn, &Mode::Proxy)).await
    {
        Box::pin(super::connect::handle_connect(
            engine, client, head, &mut conn,
        ))
        .await;
    }
}

/// What happened to a connection after one exchange.
enum Next {
    KeepAlive,
    Close,
}

/// The request loop. Returns the CONNECT head and the connection when a CONNECT arrives in
/// proxy mode, since a tunnel needs the concrete stream.
pub async fn serve_http<C: Io>(
    engine: &Arc<Engine>,
    mut client: BufStream<C>,
    conn: &mut ConnState,
    mode: &Mode,
) -> Option<(RequestHead, BufStream<C>)> {
    let cfg = &engine.config;
    let mut draining = engine.draining.clone();
    loop {
        // Wait for the next request's first byte: idle timeout, or shutdown for idle connections.
        if client.buf.is_empty() {
            let first = tokio::select! {
                r = tokio::time::timeout(cfg.idle_timeout, client.fill()) => r,
                _ = draining.wait_for(|d| *d) => return None,
            };
            match first {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
        // Bytes that cannot start an HTTP request (a TLS ClientHello from a client set to use
        // an HTTPS proxy, a SOCKS greeting, binary): answered at once, not after a timeout.
        if let Some(foreign) = sniff_foreign(&client.buf) {
            answer_foreign(engine, &mut client, conn, foreign).await;
            return None;
        }
        let head = match tokio::time::timeout(
            cfg.header_timeout,
            client.read_request_head(cfg.max_header_bytes),
        )
        .await
        {
            Err(_) => {
                let _ = send_error(
                    &mut client.io,
                    408,
                    "request head not received in time",
                    false,
                )
                .await;
                log_refusal(
                    engine,
                    &mut conn.info,
                    408,
                    "request head not received in time",
                );
                return None;
            }
            Ok(Err(HttpError::Closed)) | Ok(Err(HttpError::Io(_))) => return None,
            Ok(Err(HttpError::Malformed(m))) => {
                let _ = send_error(&mut client.io, 400, &m, false).await;
                log_refusal(engine, &mut conn.info, 400, &m);
                return None;
            }
            Ok(Err(HttpError::TooLarge(m))) => {
                let _ = send_error(&mut client.io, 431, &m, false).await;
                log_refusal(engine, &mut conn.info, 431, &m);
                return None;
            }
            Ok(Ok(head)) => head,
        };
        // Client authentication, for every request a client sends the proxy itself (inside an
        // intercepted CONNECT, the CONNECT was authenticated).
        let head = match mode {
            Mode::Proxy if cfg.proxy_auth.is_enabled() || engine.hooks.authenticate => {
                match authenticate(engine, &mut client, conn, head).await {
                    Ok(head) => head,
                    Err(Next::KeepAlive) => continue,
                    Err(Next::Close) => return None,
                }
            }
            _ => head,
        };
        if head.method.eq_ignore_ascii_case("CONNECT") {
            if matches!(mode, Mode::Proxy) {
                return Some((head, client));
            }
            let _ = send_error(
                &mut client.io,
                400,
                "CONNECT inside an intercepted connection is not supported",
                false,
            )
            .await;
            return None;
        }
        // Boxed: between requests a kept-alive connection holds only this loop's state.
        match Box::pin(forward(engine, &mut client, head, conn, mode)).await {
            Next::KeepAlive if !engine.is_draining() => continue,
            _ => {
                let _ = client.io.shutdown().await;
                return None;
            }
        }
    }
}

/// Checks a request's Proxy-Authorization: the request without that header when accepted;
/// else a 407 with the challenge is sent. The connection stays open for the client's retry
/// when the request had no body and the client keeps alive; otherwise it is shut down.
async fn authenticate<C: Io>(
    engine: &Engine,
    client: &mut BufStream<C>,
    conn: &mut ConnState,
    mut head: RequestHead,
) -> Result<RequestHead, Next> {
    let why = match engine.config.proxy_auth.check(&head.headers) {
        Verdict::Accepted => {
            head.headers.remove("proxy-authorization");
            return Ok(head);
        }
        Verdict::Missing => {
            "proxy authentication required: send Basic credentials on Proxy-Authorization"
        }
        Verdict::Other {
            scheme,
            credentials,
        } if engine.hooks.authenticate => {
            let handler = conn
                .handler(engine)
                .expect("a handler exists when hooks are set");
            let mut reply = handler.authenticate(scheme, credentials);
            let wait = engine.hook_waits.begin();
            match tokio::time::timeout(engine.config.hook_timeout, wait.reply(&mut reply)).await {
                Ok(Some(Ok(true))) => {
                    head.headers.remove("proxy-authorization");
                    return Ok(head);
                }
                Ok(Some(Ok(false))) => "proxy credentials not accepted",
                // A hook that fails or hangs lets nobody in (its exception went to on_error).
                Err(_) => {
                    "proxy credentials not accepted (hook on_authenticate did not return in time)"
                }
                Ok(_) => "proxy credentials not accepted (hook on_authenticate failed)",
            }
        }
        Verdict::Rejected | Verdict::Other { .. } => "proxy credentials not accepted",
    };
    let keep = head.wants_keep_alive()
        && matches!(request_body_kind(&head), Ok(BodyKind::Empty))
        && !engine.is_draining();
    let challenge = format!("Proxy-Authenticate: {}\r\n", auth::CHALLENGE);
    log_refusal(engine, &mut conn.info, 407, why);
    let sent = send_error_with(&mut client.io, 407, why, keep, &challenge).await;
    if keep && sent.is_ok() {
        return Err(Next::KeepAlive);
    }
    let _ = client.io.shutdown().await;
    Err(Next::Close)
}

/// What arrived instead of an HTTP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    /// A TLS record (0x16 0x03...): the client speaks TLS to the proxy itself.
    Tls,
    /// A SOCKS4 (0x04) or SOCKS5 (0x05) greeting.
    Socks4,
    Socks5,
    /// Anything else that cannot start a request line (a method is a token).
    Binary,
}

/// Recognises non-HTTP bytes from the first byte(s) a client sent.
pub fn sniff_foreign(buf: &[u8]) -> Option<Foreign> {
    let first = *buf.first()?;
    let token = first.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&first);
    // Leading empty lines before a request line are allowed (RFC 9112 section 2.2).
    if token || first == b'\r' || first == b'\n' {
        return None;
    }
    Some(match (first, buf.get(1)) {
        (0x16, Some(0x03) | None) => Foreign::Tls,
        (0x05, _) => Foreign::Socks5,
        (0x04, _) => Foreign::Socks4,
        _ => Foreign::Binary,
    })
}

/// Answers non-HTTP bytes the way their client can read: SOCKS with its own refusal, a TLS
/// client by closing (it cannot read plain text), anything else with a 400 that names the
/// proxy URL to use; and records it.
async fn answer_foreign<C: Io>(
    engine: &Engine,
    client: &mut BufStream<C>,
    conn: &mut ConnState,
    foreign: Foreign,
) {
    let url = conn
        .local
        .map(|a| format!("http://{a}"))
        .unwrap_or_else(|| "http://HOST:PORT".into());
    let hint = format!("this is an HTTP proxy; set the client's proxy to {url}");
    let (status, why) = match foreign {
        Foreign::Tls => (0, format!("TLS handshake on the HTTP proxy port (the client is set to use an HTTPS proxy): {hint}")),
        Foreign::Socks5 => {
            // Version 5, "no acceptable methods": the client reports a refused SOCKS proxy.
            let _ = client.io.write_all(&[0x05, 0xff]).await;
            (0, format!("SOCKS5 greeting on the HTTP proxy port: {hint}"))
        }
        Foreign::Socks4 => {
            // SOCKS4 reply: request rejected.
            let _ = client.io.write_all(&[0x00, 0x5b, 0, 0, 0, 0, 0, 0]).await;
            (0, format!("SOCKS4 request on the HTTP proxy port: {hint}"))
        }
        Foreign::Binary => {
            let why = format!("the bytes received are not an HTTP request: {hint}");
            let _ = send_error(&mut client.io, 400, &why, false).await;
            (400, why)
        }
    };
    let _ = client.io.flush().await;
    let _ = client.io.shutdown().await;
    log::info!("client {}: {why}", conn.info.peer);
    log_refusal(engine, &mut conn.info, status, &why);
}

fn log_refusal(engine: &Engine, info: &mut ConnInfo, status: u16, why: &str) {
    engine.access.record(AccessRecord {
        // Status 0: closed without an answer the client could read.
        outcome: if status == 0 {
            Outcome::Rejected
        } else {
            Outcome::of_status(status)
        },
        id: info.next_id(),
        client: Some(info.peer),
        method: "-".into(),
        target: "-".into(),
        status,
        kind: "error".into(),
        error: Some(why.to_string()),
        started: now_epoch(),
        policy: "none".into(),
        ..Default::default()
    });
}

/// Resolves the request's target for the connection's mode.
fn request_target(head: &RequestHead, mode: &Mode) -> Result<Target, String> {
    match mode {
        Mode::Proxy => {
            if head.target.starts_with('/') || head.target == "*" {
                return Err(format!(
                    "{} {} is not a proxy request: send the absolute URL (http://host/path) or CONNECT",
                    head.method, head.target
                ));
            }
            parse_absolute(&head.target)
        }
        Mode::Intercepted { host, port, .. } => {
            if head.target.contains("://") {
                let t = parse_absolute(&head.target)?;
                return Ok(Target {
                    scheme: "https",
                    ..t
                });
            }
            if !head.target.starts_with('/') {
                return Err(format!("bad request target {:?}", head.target));
            }
            Ok(Target {
                scheme: "https",
                host: host.clone(),
                port: *port,
                path: head.target.clone(),
            })
        }
    }
}

/// The rule decision for a flow, written into its access record.
pub fn decide(
    engine: &Engine,
    method: &str,
    scheme: Scheme,
    host: &str,
    port: u16,
    path: &str,
    record: &mut AccessRecord,
) -> Decision {
    let decision = engine.rules.decide(method, scheme, host, port, path);
    record.host = host.to_string();
    record.port = port;
    record.scheme = scheme.as_str().to_string();
    record.mode = decision.mode.clone();
    if log::log_enabled!(log::Level::Debug) {
        log_decision(engine, method, host, port, path, &decision, &record.id);
    }
    record.rule = match decision.rule {
        Some(i) => engine.rules.rules()[i].source.to_string(),
        None => "default".into(),
    };
    record.action = match &decision.action {
        Action::Direct => "direct".into(),
        Action::Upstream(u) => format!("upstream:{}", u.authority()),
        Action::Block { .. } => "block".into(),
    };
    record.policy = if decision.policy.is_passthrough() {
        "none".into()
    } else {
        format!(
            "{} dir={}",
            decision.policy.describe(),
            decision.direction.as_str()
        )
    };
    decision
}

/// SegmentedProxy's two debug lines for a decision (the rule, its score, the policy; then the
/// explain line), with our request id as `rid`.
fn log_decision(
    engine: &Engine,
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
        .map_or("<default>", |i| engine.rules.rules()[i].host_glob.as_str());
    let score = d.score.map_or(-1, i64::from);
    let strategy = match d.policy.strategy {
        Strategy::None => "none",
        Strategy::Fixed { .. } => "fixed",
        Strategy::Random { .. } => "random",
    };
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
            authorization: u.basic_auth_header(),
        }),
        _ => Route::Direct,
    }
}

/// One plain (or intercepted) HTTP exchange: request out, response back, bodies streamed.
async fn forward<C: Io>(
    engine: &Arc<Engine>,
    client: &mut BufStream<C>,
    head: RequestHead,
    conn: &mut ConnState,
    mode: &Mode,
) -> Next {
    let started = Instant::now();
    let mut record = PendingRecord::new(
        &engine.access,
        &engine.closing,
        AccessRecord {
            id: conn.info.next_id(),
            client: Some(conn.info.peer),
            method: head.method.clone(),
            target: head.target.clone(),
            kind: if matches!(mode, Mode::Proxy) {
                "forward".into()
            } else {
                "intercept".into()
            },
            action: "direct".into(),
            policy: "none".into(),
            started: now_epoch(),
            ..Default::default()
        },
    );
    let flow = engine.flows.as_ref().map(|f| {
        f.begin(FlowRecord {
            id: record.id.clone(),
            kind: record.kind.clone(),
            method: head.method.clone(),
            ..Default::default()
        })
    });
    if let Some(f) = &flow {
        record.attach_flow(f.clone());
    }
    // Intercepted flows record the encrypted chunks toward the origin (see `connect_origin`).
    let wire_up = flow
        .as_ref()
        .filter(|_| !matches!(mode, Mode::Proxy))
        .map(|f| f.observer("up"));
    let outcome = ORIGIN_WIRE_UP
        .scope(
            wire_up,
            exchange(engine, client, head, mode, conn, &mut record, flow.as_ref()),
        )
        .await;
    record.duration = started.elapsed();
    // The record is written before an error answer goes out, so whoever reads the answer
    // also finds its record.
    let mut answer = None;
    let next = match outcome {
        Ok(next) => {
            record.outcome = Outcome::Ok;
            next
        }
        Err(failure) => {
            record.error = Some(failure.message.clone());
            record.outcome = failure.outcome;
            if !failure.from_hook {
                conn.report_error(engine, &failure.message);
            }
            match failure.respond {
                Some(status) => {
                    record.status = status;
                    let keep = failure.client_reusable && !engine.is_draining();
                    answer = Some((status, failure.message, keep));
                    if keep {
                        Next::KeepAlive
                    } else {
                        Next::Close
                    }
                }
                None => Next::Close,
            }
        }
    };
    // The flow record takes the access record's facts as it is written.
    drop(flow);
    record.commit();
    if let Some((status, message, keep)) = answer {
        if send_error(&mut client.io, status, &message, keep)
            .await
            .is_err()
        {
            return Next::Close;
        }
    }
    next
}

/// Why an exchange stopped, and whether the client can still be answered.
struct Failure {
    /// What the records will say happened.
    outcome: Outcome,
    /// Status to answer with; None when the response had already started (just close).
    respond: Option<u16>,
    message: String,
    /// Whether the client's request was fully read, so its connection can carry on.
    client_reusable: bool,
    /// Raised by a user hook (the handler has already seen it).
    from_hook: bool,
}

impl Failure {
    fn answer(status: u16, message: impl Into<String>, client_reusable: bool) -> Self {
        Failure {
            respond: Some(status),
            message: message.into(),
            client_reusable,
            from_hook: false,
            outcome: Outcome::of_status(status),
        }
    }
    fn cut(message: impl Into<String>) -> Self {
        Failure {
            respond: None,
            message: message.into(),
            client_reusable: false,
            from_hook: false,
            outcome: Outcome::OriginAborted,
        }
    }
    /// The client went away: nothing can be answered.
    fn client_gone(message: impl Into<String>) -> Self {
        Failure {
            outcome: Outcome::ClientAborted,
            ..Failure::cut(message)
        }
    }
    /// The response had started when something other than the destination failed.
    fn cut_error(message: impl Into<String>) -> Self {
        Failure {
            outcome: Outcome::Error,
            ..Failure::cut(message)
        }
    }
    fn hook(mut self) -> Self {
        self.from_hook = true;
        self
    }
}

/// Writes a request head through its segmenting writer: flushed when it is the whole message,
/// else left for the body to complete its last chunk.
async fn write_head<W: AsyncWrite + Unpin>(
    w: &mut Segmented<W>,
    head: &[u8],
    whole_message: bool,
) -> io::Result<()> {
    w.write_all(head).await?;
    if whole_message {
        w.flush().await
    } else {
        w.progress().await
    }
}

/// A request body that could not be read: malformed framing is the client's error (400);
/// a client that went away mid-body was sent nothing and is recorded as gone.
fn body_read_failure(e: io::Error, what: &str) -> Failure {
    if e.kind() == io::ErrorKind::InvalidData {
        Failure::answer(400, format!("reading {what}: {e}"), false)
    } else {
        Failure::client_gone(format!("client went away while sending the {what}: {e}"))
    }
}

/// Waits for a hook's answer within the hook timeout.
async fn hook_reply<T>(
    engine: &Engine,
    reply: Reply<T>,
    hook: &str,
    started_response: bool,
) -> Result<T, Failure> {
    let fail = |status: u16, msg: String| {
        if started_response {
            Failure::cut_error(msg).hook()
        } else {
            Failure::answer(status, msg, false).hook()
        }
    };
    let mut reply = reply;
    let wait = engine.hook_waits.begin();
    match tokio::time::timeout(engine.config.hook_timeout, wait.reply(&mut reply)).await {
        Err(_) => Err(fail(
            504,
            format!(
                "hook {hook} did not return within {:?}",
                engine.config.hook_timeout
            ),
        )),
        Ok(None) => Err(fail(502, format!("hook {hook}: the handler went away"))),
        Ok(Some(Err(message))) => Err(fail(502, format!("hook {hook} failed: {message}"))),
        Ok(Some(Ok(value))) => Ok(value),
    }
}

fn parts_of(head: &RequestHead, target: &Target) -> RequestParts {
    RequestParts {
        method: head.method.clone(),
        scheme: target.scheme.to_string(),
        host: target.host.clone(),
        port: target.port,
        path: target.path.clone(),
        version: format!("HTTP/1.{}", head.version),
        headers: head.headers.clone(),
    }
}

async fn exchange<C: Io>(
    engine: &Arc<Engine>,
    client: &mut BufStream<C>,
    head: RequestHead,
    mode: &Mode,
    conn: &mut ConnState,
    record: &mut AccessRecord,
    flow: Option<&FlowHandle>,
) -> Result<Next, Failure> {
    let cfg = &engine.config;
    let hooks = engine.hooks;
    let body_kind = request_body_kind(&head).map_err(|m| Failure::answer(400, m, false))?;
    let body_empty = body_kind == BodyKind::Empty;
    let mut target =
        request_target(&head, mode).map_err(|m| Failure::answer(400, m, body_empty))?;
    record.target = target.url();
    if target.scheme == "https" && matches!(mode, Mode::Proxy) {
        return Err(Failure::answer(
            400,
            "https:// URLs must be requested through CONNECT",
            body_empty,
        ));
    }
    let client_keep_alive = head.wants_keep_alive();
    let mut request_body = BodyReader::new(body_kind);

    // The user's request hook decides first: forward (maybe changed), or answer itself.
    let mut order: Option<ForwardOrder> = None;
    let call_handler = hooks.request || hooks.any_response();
    if call_handler {
        let handler = conn
            .handler(engine)
            .expect("a handler exists when hooks are set");
        let mut commands = handler.request(parts_of(&head, &target));
        let mut wrote_raw = false;
        let mut raw = RawResponse::default();
        loop {
            let wait = engine.hook_waits.begin();
            let next = tokio::time::timeout(cfg.hook_timeout, wait.command(&mut commands)).await;
            drop(wait);
            let command = match next {
                Err(_) => {
                    let msg = format!(
                        "hook on_request_received did not return within {:?}",
                        cfg.hook_timeout
                    );
                    return Err(if wrote_raw {
                        Failure::cut_error(msg)
                    } else {
                        Failure::answer(504, msg, false)
                    });
                }
                Ok(None) => HandlerCommand::Fail("the handler went away".into()),
                Ok(Some(c)) => c,
            };
            match command {
                HandlerCommand::Forward(o) => {
                    order = Some(o);
                    break;
                }
                HandlerCommand::Write(bytes) => {
                    wrote_raw = true;
                    record.bytes_down += bytes.len() as u64;
                    raw.feed(&bytes);
                    record.status = raw.status();
                    client.io.write_all(&bytes).await.map_err(|e| {
                        Failure::client_gone(format!("writing to client failed: {e}"))
                    })?;
                }
                HandlerCommand::ReadBody(reply) => {
                    let piece =
                        tokio::time::timeout(cfg.idle_timeout, request_body.next(client)).await;
                    let piece = match piece {
                        Err(_) => Err("client stopped sending the request body".to_string()),
                        Ok(r) => r.map_err(|e| e.to_string()),
                    };
                    if let Ok(Some(p)) = &piece {
                        record.bytes_up += p.len() as u64;
                    }
                    let _ = reply.send(piece);
                }
                HandlerCommand::Finish => {
                    if wrote_raw {
                        // The handler wrote its own response: the connection carries on only
                        // if that response was complete and well framed.
                        let _ = client.io.flush().await;
                        record.kind = "handler".into();
                        let keep = raw.reusable(&head.method)
                            && request_body.is_done()
                            && client_keep_alive;
                        return Ok(if keep { Next::KeepAlive } else { Next::Close });
                    }
                    return Err(Failure::answer(
                        502,
                        "the handler returned without forwarding or answering the request",
                        request_body.is_done(),
                    )
                    .hook());
                }
                HandlerCommand::Fail(message) => {
                    let msg = format!("hook on_request_received failed: {message}");
                    return Err(if wrote_raw {
                        Failure::cut_error(msg).hook()
                    } else {
                        Failure::answer(502, msg, false).hook()
                    });
                }
            }
        }
    }

    // The request as it will be sent, after the handler's changes.
    let mut out = head.clone();
    let mut replacement_body = None;
    let mut policy_override = None;
    if let Some(order) = order {
        let r = order.request;
        out.method = r.method;
        out.headers = r.headers;
        target.host = r.host;
        target.port = r.port;
        target.path = if r.path.is_empty() {
            "/".into()
        } else {
            r.path
        };
        replacement_body = order.body;
        policy_override = order.policy;
        record.method = out.method.clone();
        record.target = target.url();
    }

    let scheme = if target.scheme == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    };
    let mut decision = decide(
        engine,
        &out.method,
        scheme,
        &target.host,
        target.port,
        &target.path,
        record,
    );
    if let Some(p) = policy_override {
        decision.policy = p;
        record.policy = format!(
            "{} dir={} (handler)",
            decision.policy.describe(),
            decision.direction.as_str()
        );
    }
    if let Action::Block { reason } = &decision.action {
        record.kind = "block".into();
        return Err(Failure::answer(
            403,
            format!("blocked by rule {}: {reason}", record.rule),
            body_empty,
        ));
    }
    engine.filter.check_host(&target.host).map_err(|reason| {
        Failure::answer(
            403,
            format!("destination {} denied: {reason}", target.host),
            body_empty,
        )
    })?;
    let route = route_for(&decision.action);
    // Plain HTTP is segmented here; intercepted flows were segmented below TLS at CONNECT.
    let plain = matches!(mode, Mode::Proxy);
    let up_policy = if plain && decision.direction.segments_up() {
        decision.policy.clone()
    } else {
        SegmentPolicy::none()
    };
    let down_policy = if plain && decision.direction.segments_down() {
        decision.policy.clone()
    } else {
        SegmentPolicy::none()
    };
    if let Some(f) = flow {
        f.update(|r| r.direction = decision.direction.as_str().to_string());
    }

    let is_upgrade =
        out.headers.contains("upgrade") && out.headers.has_token("connection", "upgrade");
    out.version = 1;
    strip_hop_by_hop(&mut out.headers, is_upgrade);
    if is_upgrade {
        out.headers.push("Connection", "Upgrade");
    }
    if plain || !out.headers.contains("host") {
        out.headers.set("Host", target.host_header());
    }
    let expects_continue = out
        .headers
        .get("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue {
        out.headers.remove("expect");
    }
    let body_out = match (&replacement_body, body_kind) {
        (Some(b), _) => {
            out.headers.remove("content-length");
            if !b.is_empty() || !matches!(out.method.as_str(), "GET" | "HEAD") {
                out.headers.set("Content-Length", b.len().to_string());
            }
            BodyKind::Length(b.len() as u64)
        }
        (None, BodyKind::Chunked) => {
            out.headers.push(
                "Transfer-Encoding",
                chunked_transfer_encoding(&head.headers),
            );
            BodyKind::Chunked
        }
        (None, k) => k,
    };
    let mode_key = match mode {
        Mode::Proxy => String::new(),
        Mode::Intercepted { up_policy, .. } => up_policy.describe(),
    };
    let pool_key = match &route {
        Route::Direct => {
            out.target = target.path.clone();
            format!("{}|{}|{mode_key}", target.scheme, target.authority())
        }
        Route::Upstream(hop) => {
            if target.scheme == "https" {
                out.target = target.path.clone();
                format!("https|{}|via {hop}|{mode_key}", target.authority())
            } else {
                out.target = target.url();
                if let Some(auth) = &hop.authorization {
                    out.headers.push("Proxy-Authorization", auth.clone());
                }
                format!("via|{hop}")
            }
        }
    };

    // Named in error messages; formatted only when one is written, not per request.
    let peer = Peer {
        route: &route,
        target: &target,
    };
    let via_upstream = matches!(route, Route::Upstream(_)) && target.scheme != "https";

    // An origin connection: a pooled one when there is one, else a new one.
    let encoded = out.encode();
    let up_observer = flow.filter(|_| plain).map(|f| f.observer("up"));
    let mut origin_conn = None;
    // The head and the body are one segmented stream: what the head's writer holds of an
    // incomplete chunk, and its schedule, go on in the body's writer. A request without a
    // body is complete with its head, so that is flushed.
    let head_is_message = body_empty && replacement_body.as_ref().is_none_or(|b| b.is_empty());
    let mut head_carry = Carry::default();
    if let Some(mut conn) = engine.pool.take(&pool_key) {
        // A pooled connection the origin closed meanwhile fails here; retry on a fresh one.
        let mut w = Segmented::new(&mut conn.io, up_policy.clone(), up_observer.clone());
        if write_head(&mut w, &encoded, head_is_message).await.is_ok() {
            head_carry = w.take_carry();
            drop(w);
            origin_conn = Some(conn);
        }
    }
    // A pooled connection the peer closed as we wrote reads as closed: a request without a
    // body is then sent again, once, on a fresh connection.
    let mut retry_fresh = origin_conn.is_some() && body_empty && replacement_body.is_none();
    let mut origin = match origin_conn {
        Some(c) => c,
        None => {
            let mut new = connect_origin(engine, &route, &target, mode, record)
                .await
                .map_err(|e| {
                    let status = e.status();
                    Failure::answer(status, e.to_string(), body_empty)
                })?;
            let mut w = Segmented::new(&mut new.io, up_policy.clone(), up_observer.clone());
            write_head(&mut w, &encoded, head_is_message)
                .await
                .map_err(|e| {
                    Failure::answer(502, format!("sending request to {peer} failed: {e}"), false)
                })?;
            head_carry = w.take_carry();
            drop(w);
            new
        }
    };

    // Request body, streamed (or the handler's replacement). An origin may answer early and
    // stop reading (413, 501...): a failed send is reported only if no response follows.
    let mut send_failure: Option<String> = None;
    {
        let mut w = Segmented::new(&mut origin.io, up_policy.clone(), up_observer.clone())
            .with_carry(head_carry);
        // Below TLS, an intercepted flow's writer may hold bytes too: flush it when idle.
        let segmenting = !w.is_passthrough()
            || matches!(mode, Mode::Intercepted { up_policy, .. } if !up_policy.is_passthrough());
        let mut writer = BodyWriter::new(body_out);
        if let Some(body) = &replacement_body {
            // What was sent up is the replacement, whatever the hook read of the client's.
            record.bytes_up = body.len() as u64;
            if let Err(e) = writer.write(&mut w, body).await {
                send_failure = Some(e.to_string());
            }
        } else {
            if expects_continue && !request_body.is_done() {
                let _ = client.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            }
            loop {
                let read = read_flushing(request_body.next(client), w.idle_flush(), segmenting);
                let piece = match tokio::time::timeout(cfg.idle_timeout, read).await {
                    Err(_) => {
                        let stalled = Failure::cut("client stopped sending the request body");
                        return Err(Failure {
                            outcome: Outcome::IdleTimeout,
                            ..stalled
                        });
                    }
                    Ok(Err(e)) => {
                        send_failure = Some(e.to_string());
                        break;
                    }
                    Ok(Ok(piece)) => piece.map_err(|e| body_read_failure(e, "request body"))?,
                };
                let Some(piece) = piece else { break };
                record.bytes_up += piece.len() as u64;
                if let Err(e) = writer.write(&mut w, &piece).await {
                    send_failure = Some(e.to_string());
                    break;
                }
            }
        }
        if send_failure.is_none() {
            if let Err(e) = writer.finish(&mut w).await {
                send_failure = Some(e.to_string());
            }
        }
        if let Err(e) = w.flush().await {
            send_failure.get_or_insert(e.to_string());
        }
    }
    // A body the handler replaced may still be unread: then this connection cannot carry on.
    let client_reusable = request_body.is_done() && send_failure.is_none();
    let sent_failed = |e: String| match &send_failure {
        Some(send) => Failure::answer(
            502,
            format!("sending request body to {peer} failed: {send}"),
            false,
        ),
        None => Failure::answer(502, e, client_reusable),
    };

    // Response head; interim 1xx answers (other than 101) are consumed.
    let response = loop {
        let r = tokio::time::timeout(
            cfg.response_timeout,
            origin.read_response_head(cfg.max_header_bytes),
        )
        .await
        .map_err(|_| {
            Failure::answer(
                504,
                format!("no response from {peer} within {:?}", cfg.response_timeout),
                client_reusable,
            )
        })?;
        let r = match r {
            Err(HttpError::Closed) | Err(HttpError::Io(_)) if retry_fresh => {
                retry_fresh = false;
                let mut new = connect_origin(engine, &route, &target, mode, record)
                    .await
                    .map_err(|e| Failure::answer(e.status(), e.to_string(), client_reusable))?;
                let mut w = Segmented::new(&mut new.io, up_policy.clone(), up_observer.clone());
                w.write_all(&encoded)
                    .await
                    .and(w.flush().await)
                    .map_err(|e| {
                        Failure::answer(
                            502,
                            format!("sending request to {peer} failed: {e}"),
                            client_reusable,
                        )
                    })?;
                drop(w);
                origin = new;
                continue;
            }
            r => r.map_err(|e| match e {
                HttpError::Closed => {
                    sent_failed(format!("{peer} closed the connection without a response"))
                }
                e => sent_failed(format!("bad response from {peer}: {e}")),
            })?,
        };
        retry_fresh = false;
        if (100..200).contains(&r.status) && r.status != 101 {
            continue;
        }
        break r;
    };
    if via_upstream && response.status == 407 {
        // The credentials come from the rule, not the client: the client cannot fix this.
        return Err(Failure::answer(
            502,
            format!(
                "{peer} answered 407 {}: check the credentials in the rule's upstream=",
                response.reason
            ),
            client_reusable,
        ));
    }
    record.status = response.status;

    if response.status == 101 && is_upgrade {
        let down_observer = flow.filter(|_| plain).map(|f| f.observer("down"));
        let segmenting = Segmenting {
            up: up_policy,
            down: down_policy,
            up_observer,
            down_observer,
        };
        return upgrade(engine, client, origin, response, record, segmenting).await;
    }

    let origin_kind = response_body_kind(&out.method, &response).map_err(|m| {
        Failure::answer(
            502,
            format!("bad response from {peer}: {m}"),
            client_reusable,
        )
    })?;
    let origin_keep_alive = send_failure.is_none()
        && origin_kind != BodyKind::CloseDelimited
        && !response.headers.has_token("connection", "close")
        && (response.version == 1 || response.headers.has_token("connection", "keep-alive"));

    // The response as the client gets it: re-framed as chunked when its length is unknown
    // or a chunk hook may change it.
    // Transfer codings other than chunked are the message's; stripping the hop-by-hop headers
    // removes them, so the re-chunked response names them again.
    let rechunked_te = response
        .headers
        .contains("transfer-encoding")
        .then(|| chunked_transfer_encoding(&response.headers));
    // Hooks see Transfer-Encoding as the origin sent it (asyncio-https-proxy shows it); the
    // body is re-framed whatever they do with it.
    let origin_te: Vec<_> = if hooks.response {
        response
            .headers
            .0
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let mut back = ResponseHead {
        version: 1,
        ..response
    };
    strip_hop_by_hop(&mut back.headers, false);
    if hooks.response {
        let handler = conn.handler(engine).expect("handler");
        let mut hook_headers = back.headers.clone();
        hook_headers.0.extend(origin_te);
        let parts = ResponseParts {
            version: format!("HTTP/1.{}", back.version),
            status: back.status,
            reason: back.reason.clone(),
            headers: hook_headers,
        };
        let changed = hook_reply(
            engine,
            handler.response(parts),
            "on_response_received",
            false,
        )
        .await?;
        back.status = changed.status;
        // A hook that leaves the reason empty gets the standard phrase on the status line.
        back.reason = if changed.reason.is_empty() {
            reason_phrase(changed.status).to_string()
        } else {
            changed.reason
        };
        back.headers = changed.headers;
        strip_hop_by_hop(&mut back.headers, false);
        record.status = back.status;
    }
    let mut keep_client = client_keep_alive && client_reusable && !engine.is_draining();
    let rewrites_body = hooks.response_chunk && origin_kind != BodyKind::Empty;
    let client_kind = match origin_kind {
        BodyKind::Length(n) if !rewrites_body => {
            back.headers.set("Content-Length", n.to_string());
            BodyKind::Length(n)
        }
        BodyKind::Empty => BodyKind::Empty,
        _ if head.version == 1 => {
            back.headers.remove("content-length");
            back.headers.push(
                "Transfer-Encoding",
                rechunked_te.unwrap_or_else(|| "chunked".into()),
            );
            BodyKind::Chunked
        }
        _ => {
            back.headers.remove("content-length");
            keep_client = false;
            BodyKind::CloseDelimited
        }
    };
    if head.version == 0 && keep_client {
        back.headers.push("Connection", "keep-alive");
    } else if !keep_client {
        back.headers.push("Connection", "close");
    }
    let down_observer = flow.map(|f| f.observer("down"));
    let mut to_client = Segmented::new(&mut client.io, down_policy, down_observer);
    let segmenting = !to_client.is_passthrough()
        || matches!(
            mode,
            Mode::Intercepted {
                down_segmenting: true,
                ..
            }
        );
    to_client
        .write_all(&back.encode())
        .await
        .map_err(|e| Failure::client_gone(format!("writing response to client failed: {e}")))?;

    let mut reader = BodyReader::new(origin_kind);
    let mut writer = BodyWriter::new(client_kind);
    loop {
        let read = read_flushing(reader.next(&mut origin), to_client.idle_flush(), segmenting);
        let piece = tokio::time::timeout(cfg.idle_timeout, read)
            .await
            .map_err(|_| {
                Failure::cut(format!("{peer} stalled in the middle of the response body"))
            })?
            .map_err(|e| Failure::client_gone(format!("writing response to client failed: {e}")))?
            .map_err(|e| Failure::cut(format!("reading response body from {peer}: {e}")))?;
        let Some(piece) = piece else { break };
        let piece = if rewrites_body {
            let handler = conn.handler(engine).expect("handler");
            match hook_reply(
                engine,
                handler.response_chunk(piece),
                "on_response_chunk",
                true,
            )
            .await?
            {
                Some(p) => p,
                None => continue,
            }
        } else {
            piece
        };
        record.bytes_down += piece.len() as u64;
        writer.write(&mut to_client, &piece).await.map_err(|e| {
            Failure::client_gone(format!("writing response body to client failed: {e}"))
        })?;
    }
    writer
        .finish(&mut to_client)
        .await
        .map_err(|e| Failure::client_gone(format!("writing response to client failed: {e}")))?;
    to_client
        .flush()
        .await
        .map_err(|e| Failure::client_gone(format!("writing response to client failed: {e}")))?;
    drop(to_client);

    if origin_keep_alive {
        engine.pool.put(pool_key, origin);
    }
    if hooks.any_response() {
        let handler = conn.handler(engine).expect("handler");
        hook_reply(
            engine,
            handler.response_complete(),
            "on_response_complete",
            true,
        )
        .await?;
    }
    Ok(if keep_client {
        Next::KeepAlive
    } else {
        Next::Close
    })
}

tokio::task_local! {
    /// The "up" chunk observer of the intercepted request being forwarded, if flows are recorded.
    static ORIGIN_WIRE_UP: Option<super::segment::ChunkObserver>;
}

/// A new connection to the destination: TCP (direct or through an upstream proxy), and TLS
/// for intercepted flows, with the intercepted flow's up-policy segmenting the encrypted bytes.
async fn connect_origin(
    engine: &Engine,
    route: &Route,
    target: &Target,
    mode: &Mode,
    record: &mut AccessRecord,
) -> Result<OriginConn, ConnectError> {
    if target.scheme != "https" {
        let stream: Box<dyn Io> = match route {
            Route::Direct => {
                let c = engine.connector.tcp(&target.host, target.port).await?;
                record.dns = c.dns;
                Box::new(c.stream)
            }
            Route::Upstream(hop) => {
                let c = engine.connector.tcp_to_hop(hop).await?;
                record.dns = format!("via {hop}");
                Box::new(c.stream)
            }
        };
        return Ok(BufStream::new(stream));
    }
    let (tcp, dns) = engine
        .connector
        .open_tunnel(route, &target.host, target.port)
        .await?;
    record.dns = dns;
    let up_policy = match mode {
        Mode::Intercepted { up_policy, .. } => up_policy.clone(),
        Mode::Proxy => SegmentPolicy::none(),
    };
    // A pooled connection serves later requests too: report chunks to whichever request's
    // flow is writing (the task-local set in `forward`), not to the one that opened it.
    let observer: Option<super::segment::ChunkObserver> = engine.flows.as_ref().map(|_| {
        Arc::new(|size, short, at| {
            let _ = ORIGIN_WIRE_UP.try_with(|o| o.as_ref().map(|o| o(size, short, at)));
        }) as super::segment::ChunkObserver
    });
    let io = Segmented::new(tcp.io, up_policy, observer);
    let tls = tokio::time::timeout(
        engine.config.connect_timeout,
        tls::connect_origin(io, engine.origin_tls.clone(), &target.host),
    )
    .await
    .map_err(|_| ConnectError::Timeout {
        target: format!("{} (TLS handshake)", target.authority()),
    })?
    .map_err(|e| ConnectError::Connect {
        target: target.authority(),
        reason: e.to_string(),
    })?;
    Ok(BufStream::new(Box::new(tls)))
}

/// After `101 Switching Protocols` the connection carries another protocol: relay bytes.
/// Who answers on an origin connection, as error messages name it: the destination, or the
/// upstream proxy when plain HTTP goes through one.
struct Peer<'a> {
    route: &'a Route,
    target: &'a Target,
}

impl std::fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.route {
            Route::Upstream(hop) if self.target.scheme != "https" => {
                write!(f, "upstream proxy {hop} (for {})", self.target.authority())
            }
            Route::Upstream(hop) => write!(
                f,
                "{} (through upstream proxy {hop})",
                self.target.authority()
            ),
            Route::Direct => f.write_str(&self.target.authority()),
        }
    }
}

/// How an upgraded connection's bytes are segmented each way, as the flow's policy says.
struct Segmenting {
    up: SegmentPolicy,
    down: SegmentPolicy,
    up_observer: Option<ChunkObserver>,
    down_observer: Option<ChunkObserver>,
}

async fn upgrade<C: Io>(
    engine: &Arc<Engine>,
    client: &mut BufStream<C>,
    origin: OriginConn,
    mut response: ResponseHead,
    record: &mut AccessRecord,
    segmenting: Segmenting,
) -> Result<Next, Failure> {
    response.version = 1;
    strip_hop_by_hop(&mut response.headers, true);
    response.headers.push("Connection", "Upgrade");
    // The 101 head and the bytes after it are one segmented stream toward the client.
    let head_carry = {
        let mut head = Segmented::new(
            &mut client.io,
            segmenting.down.clone(),
            segmenting.down_observer.clone(),
        );
        head.write_all(&response.encode())
            .await
            .and(head.progress().await)
            .map_err(|e| Failure::client_gone(e.to_string()))?;
        head.take_carry()
    };
    record.kind = "upgrade".into();
    let client_prefix = client.buf.split().freeze();
    let origin_prefix = origin.buf.clone().freeze();
    let client_side = Rewind::new(client_prefix, &mut client.io);
    let origin_side = Rewind::new(origin_prefix, origin.io);
    let (ar, aw) = tokio::io::split(client_side);
    let (br, bw) = tokio::io::split(origin_side);
    // The upgraded bytes are segmented like a tunnel's: toward the origin (up) and the client.
    let bw = Segmented::new(bw, segmenting.up, segmenting.up_observer);
    let aw = Segmented::new(aw, segmenting.down, segmenting.down_observer).with_carry(head_carry);
    let buffer = if aw.is_passthrough() && bw.is_passthrough() {
        engine.config.tunnel_buffer_bytes
    } else {
        SEGMENTING_BUFFER
    };
    let (totals, _err) = pump((ar, aw), (br, bw), buffer, engine.config.idle_timeout).await;
    record.bytes_up += totals.a_to_b;
    record.bytes_down += totals.b_to_a;
    Ok(Next::Close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed() {
        let t = parse_absolute("http://Example.test:8080/a/b?c=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("example.test", 8080, "/a/b?c=1")
        );
        let t = parse_absolute("http://[::1]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert_eq!(t.host_header(), "[::1]");
        let t = parse_absolute("http://a.test?x").unwrap();
        assert_eq!(t.path, "/?x");
        assert!(parse_absolute("ftp://a/").is_err());
        assert!(parse_absolute("http://u:p@a/").is_err());
        assert_eq!(
            split_authority("a.test:443", None).unwrap(),
            ("a.test".into(), 443)
        );
        assert!(split_authority("a.test", None).is_err());
        assert!(split_authority("a.test:0", None).is_err());
        assert_eq!(
            split_authority("[::1]:8443", None).unwrap(),
            ("::1".into(), 8443)
        );
    }

    #[test]
    fn non_http_first_bytes_are_recognised() {
        assert_eq!(sniff_foreign(b"\x16\x03\x01\x02\x00"), Some(Foreign::Tls));
        assert_eq!(sniff_foreign(b"\x16"), Some(Foreign::Tls));
        assert_eq!(sniff_foreign(b"\x05\x01\x00"), Some(Foreign::Socks5));
        assert_eq!(sniff_foreign(b"\x04\x01\x00\x50"), Some(Foreign::Socks4));
        assert_eq!(sniff_foreign(b"\x00\xff"), Some(Foreign::Binary));
        assert_eq!(sniff_foreign(b" GET"), Some(Foreign::Binary));
        for ok in [
            &b"GET http://a/ HTTP/1.1"[..],
            b"CONNECT a:443",
            b"\r\nGET",
            b"p",
            b"",
        ] {
            assert_eq!(sniff_foreign(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn every_status_has_a_reason_phrase() {
        assert_eq!(reason_phrase(408), "Request Timeout");
        assert_eq!(reason_phrase(502), "Bad Gateway");
        assert_eq!(reason_phrase(505), "HTTP Version Not Supported");
        assert_eq!(reason_phrase(499), "Client Error");
        assert_eq!(reason_phrase(599), "Server Error");
        assert!((100..600).all(|s| reason_phrase(s) != "Error"));
    }
}
