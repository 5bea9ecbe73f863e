//! End-to-end tests of the engine alone: a real `ProxyServer` on 127.0.0.1:0, a tiny origin
//! written here with tokio, and raw `TcpStream` clients. Every wait is bounded.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::config::EngineConfig;
use super::server::ProxyServer;
use super::state::EngineParts;

/// The longest any single step of a test may take.
const STEP: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(STEP, what, fut).await
}

async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

async fn start_proxy(tweak: impl FnOnce(&mut EngineConfig)) -> ProxyServer {
    let mut config = EngineConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Default::default()
    };
    tweak(&mut config);
    within(
        "proxy bind",
        ProxyServer::bind(config, EngineParts::default()),
    )
    .await
    .expect("proxy binds")
}

/// Deterministic, non-repeating-looking bytes.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9 ^ seed as u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

const BIG: usize = 1024 * 1024 + 17;

// ------------------------------------------------------------------------------------------
// Wire helpers shared by the origin and the clients.

struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn new(s: TcpStream) -> Self {
        Wire { s, buf: Vec::new() }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = vec![0u8; 64 * 1024];
        let n = self.s.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// A head (up to and without the blank line); None at a clean end of stream.
    async fn head(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 4);
                return Ok(Some(head));
            }
            if self.fill().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside a head",
                ));
            }
        }
    }

    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside a line",
                ));
            }
        }
    }

    async fn exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed with {} of {n} bytes", self.buf.len()),
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let size_line = self.line().await?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("chunk size {size_line:?}: {e}"),
                    )
                })?;
            if size == 0 {
                while !self.line().await?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.exact(size).await?);
            let crlf = self.exact(2).await?;
            assert_eq!(crlf, b"\r\n", "chunk not followed by CRLF");
        }
    }

    /// The body a head announces (requests: no framing means empty; responses to GET: see
    /// `response`).
    async fn body(&mut self, head: &Head, close_delimited: bool) -> io::Result<Vec<u8>> {
        if head
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            self.chunked().await
        } else if let Some(n) = head.header("content-length") {
            self.exact(n.trim().parse().expect("numeric Content-Length"))
                .await
        } else if close_delimited {
            while self.fill().await? > 0 {}
            Ok(std::mem::take(&mut self.buf))
        } else {
            Ok(Vec::new())
        }
    }

    /// Reads one response (head and body).
    async fn response(&mut self) -> io::Result<(Head, Vec<u8>)> {
        let raw = self
            .head()
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no response"))?;
        let head = Head::parse(&raw);
        let body = self.body(&head, true).await?;
        Ok((head, body))
    }

    /// True if the peer closed (end of stream or reset) with nothing more sent.
    async fn at_eof(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut one = [0u8; 1];
        matches!(self.s.read(&mut one).await, Ok(0) | Err(_))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Clone, Debug)]
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(raw: &str) -> Head {
        let mut lines = raw.split("\r\n");
        let first = lines.next().unwrap_or_default().to_string();
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap_or((l, ""));
                (k.trim().to_string(), v.trim().to_string())
            })
            .collect();
        Head { first, headers }
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn has(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
    fn status(&self) -> u16 {
        self.first
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

// ------------------------------------------------------------------------------------------
// The origin: HTTP/1.1 with keep-alive, reporting what it saw as events.

#[derive(Debug)]
enum Event {
    Accepted,
    Request {
        conn: usize,
        head: Head,
        body: Vec<u8>,
    },
    Closed(usize),
}

struct Origin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Connections seen closed so far (events read while looking for something else).
    closed: Vec<usize>,
    /// Requests read while looking for something else.
    pending: std::collections::VecDeque<(usize, Head, Vec<u8>)>,
}

impl Origin {
    /// Answers `/big` with `BIG` pattern bytes (Content-Length), anything else with
    /// `ok <target>` (Content-Length); keeps connections open unless asked to close.
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("origin binds");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, events) = mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = tx.send(Event::Accepted);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = serve_origin_conn(Wire::new(s), n, &tx).await;
                    let _ = tx.send(Event::Closed(n));
                });
            }
        });
        Origin {
            addr,
            accepted,
            events,
            closed: Vec::new(),
            pending: Default::default(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The next event that is a request (others are skipped).
    async fn next_request(&mut self) -> (usize, Head, Vec<u8>) {
        if let Some(r) = self.pending.pop_front() {
            return r;
        }
        loop {
            match within("origin request", self.events.recv())
                .await
                .expect("origin alive")
            {
                Event::Request { conn, head, body } => return (conn, head, body),
                Event::Closed(c) => self.closed.push(c),
                Event::Accepted => {}
            }
        }
    }

    /// Waits (bounded by `limit`) until origin connection `n` is seen closed.
    async fn wait_closed(&mut self, n: usize, limit: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.closed.contains(&n) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Err(format!("origin connection {n} still open after {limit:?}")),
                Ok(None) => return Err("origin gone".into()),
                Ok(Some(Event::Closed(c))) => self.closed.push(c),
                Ok(Some(Event::Request { conn, head, body })) => {
                    self.pending.push_back((conn, head, body))
                }
                Ok(Some(Event::Accepted)) => {}
            }
        }
    }
}

async fn serve_origin_conn(
    mut w: Wire,
    n: usize,
    tx: &mpsc::UnboundedSender<Event>,
) -> io::Result<()> {
    loop {
        let Some(raw) = w.head().await? else {
            return Ok(());
        };
        let head = Head::parse(&raw);
        let body = w.body(&head, false).await?;
        let target = head.first.split(' ').nth(1).unwrap_or("").to_string();
        let close = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let _ = tx.send(Event::Request {
            conn: n,
            head,
            body,
        });
        let payload = if target == "/big" {
            pattern(BIG, 7)
        } else {
            format!("ok {target}").into_bytes()
        };
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nServer: e2e-origin\r\nContent-Length: {}\r\n",
            payload.len()
        )
        .into_bytes();
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&payload);
        w.s.write_all(&out).await?;
        if close {
            return Ok(());
        }
    }
}

async fn client(proxy: &ProxyServer) -> Wire {
    let s = within("connect to proxy", TcpStream::connect(proxy.local_addr()))
        .await
        .expect("proxy accepts");
    s.set_nodelay(true).unwrap();
    Wire::new(s)
}

// ------------------------------------------------------------------------------------------
// (a) absolute form -> origin form, Host, hop-by-hop headers removed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_absolute_form_is_forwarded_in_origin_form_without_hop_by_hop_headers() {
    let mut origin = Origin::start().await;
    let proxy = start_proxy(|_| {}).await;
    let mut c = client(&proxy).await;
    let req = format!(
        "GET {} HTTP/1.1\r\n\
         Host: wrong.example\r\n\
         Connection: keep-alive, X-Secret-Hop\r\n\
         X-Secret-Hop: must not pass\r\n\
         Proxy-Connection: keep-alive\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
         X-Normal: kept\r\n\
         \r\n",
        origin.url("/a/b?c=1&d=%20")
    );
    within("send", c.s.write_all(req.as_bytes())).await.unwrap();
    let (resp, body) = within("response", c.response()).await.unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(body, b"ok /a/b?c=1&d=%20");

    let (_, head, _) = origin.next_request().await;
    assert_eq!(
        head.first, "GET /a/b?c=1&d=%20 HTTP/1.1",
        "origin got {head:?}"
    );
    let hosts: Vec<_> = head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
        .collect();
    assert_eq!(hosts.len(), 1, "exactly one Host: {head:?}");
    assert_eq!(
        hosts[0].1,
        origin.addr.to_string(),
        "Host names the URL's authority: {head:?}"
    );
    for hop in [
        "x-secret-hop",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
    ] {
        assert!(!head.has(hop), "{hop} leaked to the origin: {head:?}");
    }
    if let Some(conn) = head.header("connection") {
        assert!(
            !conn.to_ascii_lowercase().contains("x-secret-hop"),
            "{head:?}"
        );
    }
    assert_eq!(head.header("x-normal"), Some("kept"), "{head:?}");
}

// ------------------------------------------------------------------------------------------
// (b) keep-alive on both sides: two requests, one origin connection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_two_requests_on_one_client_connection_reuse_one_origin_connection() {
    let mut origin = Origin::start().await;
    let proxy = start_proxy(|_| {}).await;
    let mut c = client(&proxy).await;
    for path in ["/one", "/two"] {
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
            origin.url(path),
            origin.addr
        );
        within("send", c.s.write_all(req.as_bytes())).await.unwrap();
        let (resp, body) = within("response", c.response()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body, format!("ok {path}").as_bytes());
    }
    let (c1, h1, _) = origin.next_request().await;
    let (c2, h2, _) = origin.next_request().await;
    assert!(
        h1.first.starts_with("GET /one ") && h2.first.starts_with("GET /two "),
        "{h1:?} {h2:?}"
    );
    assert_eq!((c1, c2), (1, 1), "both requests on origin connection 1");
    assert_eq!(origin.accepted(), 1, "the origin accepted one connection");
}

// ------------------------------------------------------------------------------------------
// (c) a chunked request body arrives intact; a ~1 MiB Content-Length response too

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_chunked_request_body_and_large_response_are_byte_identical() {
    let mut origin = Origin::start().await;
    let proxy = start_proxy(|_| {}).await;
    let mut c = client(&proxy).await;

    let body = pattern(300_001, 3);
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n",
        origin.url("/upload"),
        origin.addr
    )
    .into_bytes();
    // Uneven chunks, one with an extension, then trailers.
    let mut off = 0;
    for (i, size) in [1usize, 4095, 65536, 7, 100_000].iter().cycle().enumerate() {
        if off >= body.len() {
            break;
        }
        let end = (off + size).min(body.len());
        let ext = if i == 2 { ";name=value" } else { "" };
        req.extend_from_slice(format!("{:x}{ext}\r\n", end - off).as_bytes());
        req.extend_from_slice(&body[off..end]);
        req.extend_from_slice(b"\r\n");
        off = end;
    }
    req.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    within("send chunked request", c.s.write_all(&req))
        .await
        .unwrap();
    let (resp, answer) = within("upload response", c.response()).await.unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(answer, b"ok /upload");
    let (_, head, got) = origin.next_request().await;
    assert!(head.first.starts_with("POST /upload "), "{head:?}");
    assert_eq!(got.len(), body.len(), "request body length at the origin");
    assert!(got == body, "request body bytes differ at the origin");

    // Same client connection: a large Content-Length response.
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.url("/big"),
        origin.addr
    );
    within("send", c.s.write_all(req.as_bytes())).await.unwrap();
    let (resp, big) = within("large response", c.response()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.header("content-length"),
        Some(BIG.to_string().as_str()),
        "{resp:?}"
    );
    assert!(!resp.has("transfer-encoding"), "{resp:?}");
    assert_eq!(big.len(), BIG);
    assert!(big == pattern(BIG, 7), "large response bytes differ");
}

// ------------------------------------------------------------------------------------------
// (d) CONNECT: 200, bytes both ways, half-close passed on

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_connect_tunnel_pumps_both_ways_and_passes_half_close() {
    // An origin that echoes what it reads, and once the client's side ended writes a
    // trailer and closes. It reports everything it read.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = listener.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut all = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = s.write_all(b"ORIGIN-BYE").await;
        let _ = s.shutdown().await;
        let _ = got_tx.send(all);
    });

    let proxy = start_proxy(|_| {}).await;
    let mut c = client(&proxy).await;
    let req = format!("CONNECT {origin_addr} HTTP/1.1\r\nHost: {origin_addr}\r\n\r\n");
    within("send CONNECT", c.s.write_all(req.as_bytes()))
        .await
        .unwrap();
    let raw = within("CONNECT answer", c.head())
        .await
        .unwrap()
        .expect("an answer");
    assert_eq!(Head::parse(&raw).status(), 200, "{raw}");
    assert!(
        c.buf.is_empty(),
        "nothing after the 200 head before the origin speaks"
    );

    // A first exchange proves the tunnel is open both ways.
    within("ping", c.s.write_all(b"ping")).await.unwrap();
    let echoed = within("pong", c.exact(4)).await.unwrap();
    assert_eq!(echoed, b"ping");

    // Then a larger payload written by one task while this one reads, and the client's
    // half-close; the origin's echo and its trailer must still come back.
    let payload = pattern(512 * 1024, 9);
    let Wire { s, buf } = c;
    assert!(buf.is_empty());
    let (mut r, mut w) = s.into_split();
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await?;
        w.shutdown().await?;
        Ok::<_, io::Error>(w)
    });
    let mut back = Vec::new();
    within("read until the tunnel closes", r.read_to_end(&mut back))
        .await
        .expect("clean end of stream");
    let _w = within("writer", writer)
        .await
        .unwrap()
        .expect("client wrote and half-closed");
    let mut expected = payload.clone();
    expected.extend_from_slice(b"ORIGIN-BYE");
    assert_eq!(back.len(), expected.len(), "bytes back through the tunnel");
    assert!(back == expected, "tunnel bytes differ");
    let got = within("origin report", got_rx).await.unwrap();
    let mut sent = b"ping".to_vec();
    sent.extend_from_slice(&payload);
    assert!(
        got == sent,
        "origin got {} bytes, expected {}",
        got.len(),
        sent.len()
    );
}

// ------------------------------------------------------------------------------------------
// (e) a malformed request: 400, and the server carries on

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_malformed_request_gets_400_and_the_server_still_serves() {
    let mut origin = Origin::start().await;
    let proxy = start_proxy(|_| {}).await;

    let mut bad = client(&proxy).await;
    within("send garbage", bad.s.write_all(b"NOT HTTP AT ALL\r\n\r\n"))
        .await
        .unwrap();
    let (resp, body) = within("400 answer", bad.response()).await.unwrap();
    assert_eq!(
        resp.status(),
        400,
        "{resp:?} {}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        within("close after 400", bad.at_eof()).await,
        "connection closed after the 400"
    );

    let mut good = client(&proxy).await;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.url("/after"),
        origin.addr
    );
    within("send", good.s.write_all(req.as_bytes()))
        .await
        .unwrap();
    let (resp, body) = within("response", good.response()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body, b"ok /after");
    let (_, head, _) = origin.next_request().await;
    assert!(head.first.starts_with("GET /after "), "{head:?}");
    assert_eq!(
        origin.accepted(),
        1,
        "the malformed request never reached the origin"
    );
}

// ------------------------------------------------------------------------------------------
// (f) pooled idle upstream connections expire

const POOL_IDLE: Duration = Duration::from_millis(300);

async fn one_get(proxy: &ProxyServer, origin: &Origin, path: &str) {
    let mut c = client(proxy).await;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        origin.url(path),
        origin.addr
    );
    within("send", c.s.write_all(req.as_bytes())).await.unwrap();
    let (resp, body) = within("response", c.response()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body, format!("ok {path}").as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_pooled_idle_upstream_connection_is_dropped_after_pool_idle_timeout() {
    let mut origin = Origin::start().await;
    let proxy = start_proxy(|c| c.pool_idle_timeout = POOL_IDLE).await;

    // Within the idle timeout a second client connection reuses the pooled one.
    one_get(&proxy, &origin, "/first").await;
    // The client can have the whole response a moment before the proxy pools the origin
    // connection: wait for the pool to hold it.
    within("the origin connection pooled", async {
        while proxy.engine().pool.idle_count() == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    one_get(&proxy, &origin, "/reused").await;
    assert_eq!(origin.accepted(), 1, "reused within the pool idle timeout");

    // Left idle, the pooled connection is closed by the proxy (the pool is swept now and
    // then, so allow well past the timeout: no speed is asserted).
    let idle_from = Instant::now();
    origin
        .wait_closed(1, Duration::from_secs(15))
        .await
        .expect("the proxy closes the idle pooled connection");
    assert!(
        idle_from.elapsed() + Duration::from_millis(50) >= POOL_IDLE,
        "not closed before the timeout"
    );
    eprintln!(
        "idle pooled connection closed by the proxy {:?} after it went idle",
        idle_from.elapsed()
    );

    // And the next request opens a new origin connection.
    one_get(&proxy, &origin, "/fresh").await;
    let (conn, head, _) = loop {
        let r = origin.next_request().await;
        if r.1.first.starts_with("GET /fresh ") {
            break r;
        }
    };
    assert_eq!(conn, 2, "{head:?}");
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_expired_pooled_connection_is_not_used_for_the_next_request() {
    let mut origin = Origin::start().await;
    let proxy = start_proxy(|c| c.pool_idle_timeout = POOL_IDLE).await;
    one_get(&proxy, &origin, "/first").await;
    // Past the timeout but (most likely) before any sweep: the request must not ride the
    // stale connection, and the stale one is closed.
    tokio::time::sleep(POOL_IDLE * 2).await;
    one_get(&proxy, &origin, "/second").await;
    let mut conns = Vec::new();
    for _ in 0..2 {
        let (conn, head, _) = origin.next_request().await;
        conns.push((conn, head.first));
    }
    assert_eq!(conns[0].0, 1, "{conns:?}");
    assert_eq!(
        conns[1].0, 2,
        "a new connection after the pool idle timeout: {conns:?}"
    );
    origin
        .wait_closed(1, Duration::from_secs(5))
        .await
        .expect("the expired connection is closed");
}

/// Stricter than the test above: the proxy closes an idle pooled connection about when
/// `pool_idle_timeout` passes (the sweep runs at half the timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_pooled_idle_upstream_connection_is_closed_promptly() {
    let mut origin = Origin::start().await;
    let proxy = start_proxy(|c| c.pool_idle_timeout = POOL_IDLE).await;
    one_get(&proxy, &origin, "/first").await;
    origin
        .wait_closed(1, POOL_IDLE + Duration::from_millis(1500))
        .await
        .expect("closed within pool_idle_timeout + 1.5 s");
}
