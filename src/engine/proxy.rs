//! One client connection: the HTTP/1.1 request loop (keep-alive), forwarding of plain HTTP
//! requests with streamed bodies, CONNECT tunnels, and upgrades.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::access::{now_epoch, AccessRecord};
use super::connector::{authority, ConnectError, Io, Rewind, Route};
use super::http1::{
    request_body_kind, response_body_kind, strip_hop_by_hop, BodyKind, BodyReader, BodyWriter, BufStream, HttpError,
    RequestHead, ResponseHead,
};
use super::pool::OriginConn;
use super::server::Engine;
use super::tunnel::pump;

/// Where requests on a connection come from, which fixes how their targets are read.
#[derive(Clone, Debug)]
pub enum Mode {
    /// A client talking to us as its proxy: absolute-form targets and CONNECT.
    Proxy,
    /// Requests inside an intercepted CONNECT: origin-form targets for this destination.
    Intercepted { host: String, port: u16 },
}

/// Per-connection facts shared by its exchanges.
pub struct ConnInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub exchanges: u64,
}

impl ConnInfo {
    fn next_id(&mut self) -> String {
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
            authority(&self.host, self.port).rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_default()
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
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'?' || b == b'#') {
        return Err(format!("bad host {host:?}"));
    }
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("bad port {p:?}"))?,
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
    Ok(Target { scheme, host, port, path })
}

const STATUS_TEXT: &[(u16, &str)] = &[
    (400, "Bad Request"),
    (403, "Forbidden"),
    (404, "Not Found"),
    (407, "Proxy Authentication Required"),
    (431, "Request Header Fields Too Large"),
    (500, "Internal Server Error"),
    (502, "Bad Gateway"),
    (503, "Service Unavailable"),
    (504, "Gateway Timeout"),
];

pub fn reason_phrase(status: u16) -> &'static str {
    STATUS_TEXT.iter().find(|(s, _)| *s == status).map(|(_, r)| *r).unwrap_or("Error")
}

/// Writes a short plain-text response made by the proxy itself.
pub async fn send_error<W: AsyncWrite + Unpin>(client: &mut W, status: u16, message: &str, keep_alive: bool) -> io::Result<()> {
    let body = format!("segproxy: {message}\n");
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        reason_phrase(status),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    client.write_all(&out).await?;
    client.flush().await
}

/// Serves one accepted client connection until it closes.
pub async fn serve_client(engine: &Arc<Engine>, stream: TcpStream, peer: SocketAddr, id: u64) {
    let mut info = ConnInfo { id, peer, exchanges: 0 };
    let client = BufStream::new(stream);
    if let Some((head, client)) = serve_http(engine, client, &mut info, &Mode::Proxy).await {
        handle_connect(engine, client, head, &mut info).await;
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
    info: &mut ConnInfo,
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
        let head = match tokio::time::timeout(cfg.header_timeout, client.read_request_head(cfg.max_header_bytes)).await {
            Err(_) => {
                let _ = send_error(&mut client.io, 408, "request head not received in time", false).await;
                return None;
            }
            Ok(Err(HttpError::Closed)) | Ok(Err(HttpError::Io(_))) => return None,
            Ok(Err(HttpError::Malformed(m))) => {
                let _ = send_error(&mut client.io, 400, &m, false).await;
                log_refusal(engine, info, "-", "-", 400, &m);
                return None;
            }
            Ok(Err(HttpError::TooLarge(m))) => {
                let _ = send_error(&mut client.io, 431, &m, false).await;
                log_refusal(engine, info, "-", "-", 431, &m);
                return None;
            }
            Ok(Ok(head)) => head,
        };
        if head.method.eq_ignore_ascii_case("CONNECT") {
            if matches!(mode, Mode::Proxy) {
                return Some((head, client));
            }
            let _ = send_error(&mut client.io, 400, "CONNECT inside an intercepted connection is not supported", false).await;
            return None;
        }
        match forward(engine, &mut client, head, info, mode).await {
            Next::KeepAlive if !engine.is_draining() => continue,
            _ => {
                let _ = client.io.shutdown().await;
                return None;
            }
        }
    }
}

fn log_refusal(engine: &Engine, info: &mut ConnInfo, method: &str, target: &str, status: u16, why: &str) {
    engine.access.record(AccessRecord {
        id: info.next_id(),
        client: Some(info.peer),
        method: method.to_string(),
        target: target.to_string(),
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
        Mode::Intercepted { host, port } => {
            if head.target.contains("://") {
                let t = parse_absolute(&head.target)?;
                return Ok(Target { scheme: "https", ..t });
            }
            if !head.target.starts_with('/') {
                return Err(format!("bad request target {:?}", head.target));
            }
            Ok(Target { scheme: "https", host: host.clone(), port: *port, path: head.target.clone() })
        }
    }
}

/// One plain (or intercepted) HTTP exchange: request out, response back, bodies streamed.
async fn forward<C: Io>(engine: &Arc<Engine>, client: &mut BufStream<C>, head: RequestHead, info: &mut ConnInfo, mode: &Mode) -> Next {
    let started = Instant::now();
    let mut record = AccessRecord {
        id: info.next_id(),
        client: Some(info.peer),
        method: head.method.clone(),
        target: head.target.clone(),
        kind: if matches!(mode, Mode::Proxy) { "forward".into() } else { "intercept".into() },
        action: "direct".into(),
        policy: "none".into(),
        started: now_epoch(),
        ..Default::default()
    };
    let outcome = exchange(engine, client, head, mode, &mut record).await;
    record.duration = started.elapsed();
    let next = match outcome {
        Ok(next) => next,
        Err(failure) => {
            record.error = Some(failure.message.clone());
            if let Some(status) = failure.respond {
                record.status = status;
                let keep = failure.client_reusable;
                if send_error(&mut client.io, status, &failure.message, keep).await.is_err() || !keep {
                    Next::Close
                } else {
                    Next::KeepAlive
                }
            } else {
                Next::Close
            }
        }
    };
    engine.access.record(record);
    next
}

/// Why an exchange stopped, and whether the client can still be answered.
struct Failure {
    /// Status to answer with; None when the response had already started (just close).
    respond: Option<u16>,
    message: String,
    /// Whether the client's request was fully read, so its connection can carry on.
    client_reusable: bool,
}

impl Failure {
    fn answer(status: u16, message: impl Into<String>, client_reusable: bool) -> Self {
        Failure { respond: Some(status), message: message.into(), client_reusable }
    }
    fn cut(message: impl Into<String>) -> Self {
        Failure { respond: None, message: message.into(), client_reusable: false }
    }
}

async fn exchange<C: Io>(
    engine: &Arc<Engine>,
    client: &mut BufStream<C>,
    head: RequestHead,
    mode: &Mode,
    record: &mut AccessRecord,
) -> Result<Next, Failure> {
    let cfg = &engine.config;
    let body_kind = request_body_kind(&head).map_err(|m| Failure::answer(400, m, false))?;
    let target = request_target(&head, mode).map_err(|m| Failure::answer(400, m, body_kind == BodyKind::Empty))?;
    record.target = target.url();
    if target.scheme == "https" && matches!(mode, Mode::Proxy) {
        return Err(Failure::answer(400, "https:// URLs must be requested through CONNECT", body_kind == BodyKind::Empty));
    }
    let client_keep_alive = head.wants_keep_alive();
    let route = Route::Direct;

    // The request as the origin (or upstream proxy) gets it.
    let is_upgrade = head.headers.contains("upgrade") && head.headers.has_token("connection", "upgrade");
    let mut out = head.clone();
    out.version = 1;
    strip_hop_by_hop(&mut out.headers, is_upgrade);
    if is_upgrade {
        out.headers.push("Connection", "Upgrade");
    }
    if matches!(mode, Mode::Proxy) {
        out.headers.set("Host", target.host_header());
    } else if !out.headers.contains("host") {
        out.headers.push("Host", target.host_header());
    }
    let expects_continue = out.headers.get("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue {
        out.headers.remove("expect");
    }
    let body_out = match body_kind {
        BodyKind::Chunked => {
            out.headers.push("Transfer-Encoding", "chunked");
            BodyKind::Chunked
        }
        k => k,
    };
    let pool_key;
    match &route {
        Route::Direct => {
            out.target = target.path.clone();
            pool_key = format!("{}|{}", target.scheme, target.authority());
        }
        Route::Upstream(hop) => {
            out.target = target.url();
            if let Some(auth) = &hop.authorization {
                out.headers.push("Proxy-Authorization", auth.clone());
            }
            pool_key = format!("via|{hop}");
        }
    }

    // An origin connection: a pooled one when there is one, else a new one.
    let encoded = out.encode();
    let mut origin_conn = None;
    if let Some(mut conn) = engine.pool.take(&pool_key) {
        // A pooled connection the origin closed meanwhile fails here; retry on a fresh one.
        if conn.io.write_all(&encoded).await.is_ok() {
            origin_conn = Some(conn);
        }
    }
    let mut origin = match origin_conn {
        Some(c) => c,
        None => {
            let mut conn = connect_origin(engine, &route, &target, record).await.map_err(|e| {
                Failure::answer(e.status(), e.to_string(), body_kind == BodyKind::Empty)
            })?;
            conn.io
                .write_all(&encoded)
                .await
                .map_err(|e| Failure::answer(502, format!("sending request to {} failed: {e}", target.authority()), false))?;
            conn
        }
    };

    // Request body, streamed.
    if expects_continue && body_kind != BodyKind::Empty {
        let _ = client.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    }
    let mut reader = BodyReader::new(body_kind);
    let mut writer = BodyWriter::new(body_out);
    while let Some(piece) = tokio::time::timeout(cfg.idle_timeout, reader.next(client))
        .await
        .map_err(|_| Failure::cut("client stopped sending the request body"))?
        .map_err(|e| Failure::answer(400, format!("reading request body: {e}"), false))?
    {
        record.bytes_up += piece.len() as u64;
        writer
            .write(&mut origin.io, &piece)
            .await
            .map_err(|e| Failure::answer(502, format!("sending request body to {} failed: {e}", target.authority()), false))?;
    }
    writer
        .finish(&mut origin.io)
        .await
        .map_err(|e| Failure::answer(502, format!("sending request body to {} failed: {e}", target.authority()), false))?;
    let _ = origin.io.flush().await;

    // Response head; interim 1xx answers (other than 101) are consumed.
    let response = loop {
        let r = tokio::time::timeout(cfg.response_timeout, origin.read_response_head(cfg.max_header_bytes))
            .await
            .map_err(|_| {
                Failure::answer(504, format!("no response from {} within {:?}", target.authority(), cfg.response_timeout), true)
            })?
            .map_err(|e| match e {
                HttpError::Closed => Failure::answer(502, format!("{} closed the connection without a response", target.authority()), true),
                e => Failure::answer(502, format!("bad response from {}: {e}", target.authority()), true),
            })?;
        if (100..200).contains(&r.status) && r.status != 101 {
            continue;
        }
        break r;
    };
    record.status = response.status;

    if response.status == 101 && is_upgrade {
        return upgrade(engine, client, origin, response, record).await;
    }

    let origin_kind = response_body_kind(&head.method, &response)
        .map_err(|m| Failure::answer(502, format!("bad response from {}: {m}", target.authority()), true))?;
    let origin_keep_alive = origin_kind != BodyKind::CloseDelimited
        && !response.headers.has_token("connection", "close")
        && (response.version == 1 || response.headers.has_token("connection", "keep-alive"));

    // The response as the client gets it: re-framed as chunked when the length is unknown.
    let mut back = ResponseHead { version: 1, ..response };
    strip_hop_by_hop(&mut back.headers, false);
    let mut keep_client = client_keep_alive && !engine.is_draining();
    let client_kind = match origin_kind {
        BodyKind::Chunked | BodyKind::CloseDelimited if head.version == 1 => {
            back.headers.push("Transfer-Encoding", "chunked");
            BodyKind::Chunked
        }
        BodyKind::Chunked | BodyKind::CloseDelimited => {
            keep_client = false;
            BodyKind::CloseDelimited
        }
        k => k,
    };
    if head.version == 0 && keep_client {
        back.headers.push("Connection", "keep-alive");
    } else if !keep_client {
        back.headers.push("Connection", "close");
    }
    client
        .io
        .write_all(&back.encode())
        .await
        .map_err(|e| Failure::cut(format!("writing response to client failed: {e}")))?;

    let mut reader = BodyReader::new(origin_kind);
    let mut writer = BodyWriter::new(client_kind);
    loop {
        let piece = tokio::time::timeout(cfg.idle_timeout, reader.next(&mut origin))
            .await
            .map_err(|_| Failure::cut(format!("{} stalled in the middle of the response body", target.authority())))?
            .map_err(|e| Failure::cut(format!("reading response body from {}: {e}", target.authority())))?;
        let Some(piece) = piece else { break };
        record.bytes_down += piece.len() as u64;
        writer
            .write(&mut client.io, &piece)
            .await
            .map_err(|e| Failure::cut(format!("writing response body to client failed: {e}")))?;
    }
    writer.finish(&mut client.io).await.map_err(|e| Failure::cut(format!("writing response to client failed: {e}")))?;
    client.io.flush().await.map_err(|e| Failure::cut(format!("writing response to client failed: {e}")))?;

    if origin_keep_alive {
        engine.pool.put(pool_key, origin);
    }
    Ok(if keep_client { Next::KeepAlive } else { Next::Close })
}

async fn connect_origin(engine: &Engine, route: &Route, target: &Target, record: &mut AccessRecord) -> Result<OriginConn, ConnectError> {
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
    Ok(BufStream::new(stream))
}

/// After `101 Switching Protocols` the connection carries another protocol: relay bytes.
async fn upgrade<C: Io>(
    engine: &Arc<Engine>,
    client: &mut BufStream<C>,
    origin: OriginConn,
    mut response: ResponseHead,
    record: &mut AccessRecord,
) -> Result<Next, Failure> {
    response.version = 1;
    strip_hop_by_hop(&mut response.headers, true);
    response.headers.push("Connection", "Upgrade");
    client.io.write_all(&response.encode()).await.map_err(|e| Failure::cut(e.to_string()))?;
    record.kind = "upgrade".into();
    let client_prefix = client.buf.split().freeze();
    let origin_prefix = origin.buf.clone().freeze();
    let client_side = Rewind::new(client_prefix, &mut client.io);
    let origin_side = Rewind::new(origin_prefix, origin.io);
    let (totals, _err) = relay(client_side, origin_side, engine).await;
    record.bytes_up += totals.a_to_b;
    record.bytes_down += totals.b_to_a;
    Ok(Next::Close)
}

async fn relay<A: AsyncRead + AsyncWrite + Unpin, B: AsyncRead + AsyncWrite + Unpin>(
    a: A,
    b: B,
    engine: &Engine,
) -> (super::tunnel::PumpTotals, Option<io::Error>) {
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    pump((ar, aw), (br, bw), engine.config.tunnel_buffer_bytes, engine.config.idle_timeout).await
}

/// CONNECT: open a way to the destination, answer 200, then relay bytes untouched.
async fn handle_connect(engine: &Arc<Engine>, mut client: BufStream<TcpStream>, head: RequestHead, info: &mut ConnInfo) {
    let started = Instant::now();
    let mut record = AccessRecord {
        id: info.next_id(),
        client: Some(info.peer),
        method: "CONNECT".into(),
        target: head.target.clone(),
        kind: "tunnel".into(),
        action: "direct".into(),
        policy: "none".into(),
        started: now_epoch(),
        ..Default::default()
    };
    let (host, port) = match split_authority(&head.target, None) {
        Ok(x) => x,
        Err(m) => {
            let m = format!("bad CONNECT target {:?}: {m}", head.target);
            let _ = send_error(&mut client.io, 400, &m, false).await;
            record.status = 400;
            record.error = Some(m);
            record.duration = started.elapsed();
            engine.access.record(record);
            return;
        }
    };
    let route = Route::Direct;
    let (mut origin, dns) = match engine.connector.open_tunnel(&route, &host, port).await {
        Ok(x) => x,
        Err(e) => {
            let _ = send_error(&mut client.io, e.status(), &e.to_string(), false).await;
            record.status = e.status();
            record.error = Some(e.to_string());
            record.duration = started.elapsed();
            engine.access.record(record);
            return;
        }
    };
    record.dns = dns;
    if client.io.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err() {
        return;
    }
    record.status = 200;
    let client_prefix: Bytes = client.buf.split().freeze();
    let origin_prefix: Bytes = origin.buf.split().freeze();
    let (cr, cw) = client.io.into_split();
    let (or, ow) = origin.io.into_split();
    let (totals, err) = pump(
        (Rewind::new(client_prefix, cr), cw),
        (Rewind::new(origin_prefix, or), ow),
        engine.config.tunnel_buffer_bytes,
        engine.config.idle_timeout,
    )
    .await;
    record.bytes_up = totals.a_to_b;
    record.bytes_down = totals.b_to_a;
    record.error = err.map(|e| e.to_string());
    record.duration = started.elapsed();
    engine.access.record(record);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed() {
        let t = parse_absolute("http://Example.test:8080/a/b?c=1").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("example.test", 8080, "/a/b?c=1"));
        let t = parse_absolute("http://[::1]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert_eq!(t.host_header(), "[::1]");
        let t = parse_absolute("http://a.test?x").unwrap();
        assert_eq!(t.path, "/?x");
        assert!(parse_absolute("ftp://a/").is_err());
        assert!(parse_absolute("http://u:p@a/").is_err());
        assert_eq!(split_authority("a.test:443", None).unwrap(), ("a.test".into(), 443));
        assert!(split_authority("a.test", None).is_err());
        assert!(split_authority("a.test:0", None).is_err());
        assert_eq!(split_authority("[::1]:8443", None).unwrap(), ("::1".into(), 8443));
    }
}
