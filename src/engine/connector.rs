//! Reaching a destination: name resolution, TCP connect with a timeout, and the handshake
//! through an upstream proxy (an HTTP CONNECT, or a SOCKS5 CONNECT by RFC 1928 with RFC 1929
//! credentials). Every error names the hop that failed.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::dns::{CacheOutcome, DnsResolver, DnsSettings};
use super::http1::{BufStream, Headers, RequestHead};

/// Any byte stream the engine can relay.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An upstream proxy to go through, as the connector sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamHop {
    pub host: String,
    pub port: u16,
    pub protocol: HopProtocol,
}

/// What an upstream proxy speaks, with the credentials it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HopProtocol {
    /// An HTTP proxy; a ready `Proxy-Authorization` value (e.g. "Basic dXNlcjpwYXNz"), sent
    /// to this hop only.
    Http { authorization: Option<String> },
    /// A SOCKS5 proxy; `(user, password)` for RFC 1929.
    Socks5 {
        credentials: Option<(String, String)>,
    },
}

impl UpstreamHop {
    /// The `Proxy-Authorization` for an HTTP proxy; None for SOCKS5 or without credentials.
    pub fn http_authorization(&self) -> Option<&str> {
        match &self.protocol {
            HopProtocol::Http { authorization } => authorization.as_deref(),
            HopProtocol::Socks5 { .. } => None,
        }
    }

    /// An HTTP proxy, which takes plain HTTP requests in absolute form.
    pub fn is_http(&self) -> bool {
        matches!(self.protocol, HopProtocol::Http { .. })
    }

    /// The hop as errors name it: "proxy HOST:PORT" or "SOCKS5 proxy HOST:PORT".
    pub fn describe(&self) -> String {
        match self.protocol {
            HopProtocol::Http { .. } => format!("proxy {self}"),
            HopProtocol::Socks5 { .. } => format!("SOCKS5 proxy {self}"),
        }
    }
}

impl fmt::Display for UpstreamHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", authority(&self.host, self.port))
    }
}

/// The way out for one flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Direct,
    Upstream(UpstreamHop),
}

/// `host:port`, with brackets around an IPv6 literal.
pub fn authority(host: &str, port: u16) -> String {
    let mut out = String::with_capacity(host.len() + 8);
    push_authority(&mut out, host, port);
    out
}

/// Appends `host:port` to `out`, an IPv6 host in brackets (one allocation fewer than
/// formatting a new string: this runs for every forwarded request).
pub fn push_authority(out: &mut String, host: &str, port: u16) {
    use std::fmt::Write;
    push_host(out, host);
    let _ = write!(out, ":{port}");
}

/// Appends `host` as an authority writes it: an IPv6 address in brackets.
pub fn push_host(out: &mut String, host: &str) {
    if host.contains(':') && !host.starts_with('[') {
        out.push('[');
        out.push_str(host);
        out.push(']');
    } else {
        out.push_str(host);
    }
}

/// Why a destination could not be reached.
#[derive(Debug)]
pub enum ConnectError {
    Resolve {
        host: String,
        reason: String,
    },
    Denied {
        host: String,
        reason: String,
    },
    /// `refused`: the destination answered the connect with a reset (nothing listens).
    Connect {
        target: String,
        reason: String,
        refused: bool,
    },
    Timeout {
        target: String,
    },
    /// `hop` as [`UpstreamHop::describe`] names it.
    Upstream {
        hop: String,
        reason: String,
    },
}

impl ConnectError {
    /// Status the client is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ConnectError::Denied { .. } => 403,
            // A connect that times out is a connect failure (504 is for a destination that
            // accepted the request and then sent no response in time).
            _ => 502,
        }
    }

    /// The SOCKS5 reply code a SOCKS client is answered with.
    pub fn socks_reply(&self) -> u8 {
        match self {
            ConnectError::Denied { .. } => socks_reply::NOT_ALLOWED,
            ConnectError::Connect { refused: true, .. } => socks_reply::REFUSED,
            ConnectError::Resolve { .. }
            | ConnectError::Connect { .. }
            | ConnectError::Timeout { .. } => socks_reply::HOST_UNREACHABLE,
            ConnectError::Upstream { .. } => socks_reply::GENERAL_FAILURE,
        }
    }
}

/// SOCKS5 reply codes (RFC 1928 section 6).
pub mod socks_reply {
    pub const SUCCEEDED: u8 = 0x00;
    pub const GENERAL_FAILURE: u8 = 0x01;
    pub const NOT_ALLOWED: u8 = 0x02;
    pub const NETWORK_UNREACHABLE: u8 = 0x03;
    pub const HOST_UNREACHABLE: u8 = 0x04;
    pub const REFUSED: u8 = 0x05;
    pub const TTL_EXPIRED: u8 = 0x06;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x07;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

    /// The RFC's words for a reply code.
    pub fn describe(code: u8) -> &'static str {
        match code {
            SUCCEEDED => "succeeded",
            GENERAL_FAILURE => "general SOCKS server failure",
            NOT_ALLOWED => "connection not allowed by ruleset",
            NETWORK_UNREACHABLE => "network unreachable",
            HOST_UNREACHABLE => "host unreachable",
            REFUSED => "connection refused",
            TTL_EXPIRED => "TTL expired",
            COMMAND_NOT_SUPPORTED => "command not supported",
            ADDRESS_TYPE_NOT_SUPPORTED => "address type not supported",
            _ => "unassigned reply code",
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Resolve { host, reason } => write!(f, "cannot resolve {host}: {reason}"),
            ConnectError::Denied { host, reason } => {
                write!(f, "destination {host} denied: {reason}")
            }
            ConnectError::Connect { target, reason, .. } => {
                write!(f, "cannot connect to {target}: {reason}")
            }
            ConnectError::Timeout { target } => write!(f, "timed out connecting to {target}"),
            ConnectError::Upstream { hop, reason } => write!(f, "upstream {hop}: {reason}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Decides whether a resolved address may be contacted (the deny-private switch).
pub type AddrCheck = Box<dyn Fn(std::net::IpAddr) -> Result<(), String> + Send + Sync>;

pub struct Connector {
    pub connect_timeout: Duration,
    pub resolver: DnsResolver,
    pub addr_check: Option<AddrCheck>,
}

/// A connected TCP stream plus what the access log says about how it was reached.
pub struct Connected {
    pub stream: TcpStream,
    pub dns: String,
}

/// When a connection's name was resolved and which address it reached, for flows that
/// capture their phases (others pass none and no clock is read).
#[derive(Debug, Default)]
pub struct ConnectTimes {
    pub resolved: Option<Instant>,
    pub addr: Option<SocketAddr>,
}

impl Connector {
    pub fn new(connect_timeout: Duration) -> Self {
        let resolver =
            DnsResolver::new(DnsSettings::default()).expect("default DNS settings are valid");
        Connector {
            connect_timeout,
            resolver,
            addr_check: None,
        }
    }

    /// TCP to `host:port`, trying each resolved address in turn within the connect timeout.
    pub async fn tcp(
        &self,
        host: &str,
        port: u16,
        times: Option<&mut ConnectTimes>,
    ) -> Result<Connected, ConnectError> {
        self.connect(host, port, true, times).await
    }

    /// `check_addr`: apply the address check (the deny-private switch) to what `host`
    /// resolves to. Upstream proxies are the operator's own choice and are not checked.
    async fn connect(
        &self,
        host: &str,
        port: u16,
        check_addr: bool,
        mut times: Option<&mut ConnectTimes>,
    ) -> Result<Connected, ConnectError> {
        let target = authority(host, port);
        let resolved =
            self.resolver
                .resolve(host, port)
                .await
                .map_err(|e| ConnectError::Resolve {
                    host: host.to_string(),
                    reason: e.reason().to_string(),
                })?;
        if let Some(t) = times.as_deref_mut() {
            t.resolved = Some(Instant::now());
        }
        let dns = match resolved.cache {
            CacheOutcome::Literal => "literal".to_string(),
            cache => format!("{}/{}", resolved.source, cache.as_str()),
        };
        let addrs = resolved.addrs;
        if let Some(check) = self.addr_check.as_ref().filter(|_| check_addr) {
            for a in &addrs {
                check(a.ip()).map_err(|reason| ConnectError::Denied {
                    host: host.to_string(),
                    reason,
                })?;
            }
        }
        let attempt = async {
            let mut last = None;
            for addr in &addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok((s, *addr)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other("no addresses")))
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok((stream, addr))) => {
                let _ = stream.set_nodelay(true);
                if let Some(t) = times {
                    t.addr = Some(addr);
                }
                Ok(Connected { stream, dns })
            }
            Ok(Err(e)) => Err(ConnectError::Connect {
                target,
                refused: e.kind() == io::ErrorKind::ConnectionRefused,
                reason: e.to_string(),
            }),
            Err(_) => Err(ConnectError::Timeout { target }),
        }
    }

    /// TCP to an upstream proxy; failures name the hop.
    pub async fn tcp_to_hop(
        &self,
        hop: &UpstreamHop,
        times: Option<&mut ConnectTimes>,
    ) -> Result<Connected, ConnectError> {
        self.connect(&hop.host, hop.port, false, times)
            .await
            .map_err(|e| ConnectError::Upstream {
                hop: hop.describe(),
                reason: e.to_string(),
            })
    }

    /// A byte stream to `host:port` by `route`: direct TCP, or a tunnel through the hop (an
    /// HTTP CONNECT or a SOCKS5 CONNECT).
    pub async fn open_tunnel(
        &self,
        route: &Route,
        host: &str,
        port: u16,
        times: Option<&mut ConnectTimes>,
    ) -> Result<(BufStream<TcpStream>, String), ConnectError> {
        match route {
            Route::Direct => {
                let c = self.tcp(host, port, times).await?;
                Ok((BufStream::new(c.stream), c.dns))
            }
            Route::Upstream(hop) => {
                let c = self.tcp_to_hop(hop, times).await?;
                let mut s = BufStream::new(c.stream);
                let timeout = self.connect_timeout;
                match &hop.protocol {
                    HopProtocol::Http { authorization } => {
                        let auth = authorization.as_deref();
                        upstream_connect(&mut s, hop, auth, host, port, timeout).await?;
                    }
                    HopProtocol::Socks5 { credentials } => {
                        let handshake = socks5_connect(&mut s.io, credentials.as_ref(), host, port);
                        tokio::time::timeout(timeout, handshake)
                            .await
                            .map_err(|_| format!("no SOCKS5 answer within {timeout:?}"))
                            .and_then(|r| r)
                            .map_err(|reason| ConnectError::Upstream {
                                hop: hop.describe(),
                                reason,
                            })?;
                    }
                }
                Ok((s, format!("via {hop}")))
            }
        }
    }
}

/// Sends `CONNECT host:port` to an upstream proxy and checks for a 2xx answer.
async fn upstream_connect(
    s: &mut BufStream<TcpStream>,
    hop: &UpstreamHop,
    authorization: Option<&str>,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let target = authority(host, port);
    let mut headers = Headers::default();
    headers.push("Host", target.clone());
    if let Some(auth) = authorization {
        headers.push("Proxy-Authorization", auth.to_string());
    }
    let head = RequestHead {
        method: "CONNECT".into(),
        target: target.clone(),
        version: 1,
        headers,
    };
    let fail = |reason: String| ConnectError::Upstream {
        hop: hop.describe(),
        reason,
    };
    s.io.write_all(&head.encode())
        .await
        .map_err(|e| fail(format!("sending CONNECT failed: {e}")))?;
    let response = tokio::time::timeout(timeout, s.read_response_head(64 * 1024))
        .await
        .map_err(|_| fail(format!("no answer to CONNECT {target} within {timeout:?}")))?
        .map_err(|e| fail(format!("bad answer to CONNECT {target}: {e}")))?;
    if !(200..300).contains(&response.status) {
        return Err(fail(format!(
            "answered {} {} to CONNECT {target}",
            response.status, response.reason
        )));
    }
    Ok(())
}

/// The client side of a SOCKS5 CONNECT (RFC 1928) to `host:port` on a stream to a SOCKS5
/// proxy, with username/password (RFC 1929) when given. The destination goes as a name
/// (address type 3) so the proxy resolves it; IP literals go as addresses. The error says
/// which step failed.
pub async fn socks5_connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    credentials: Option<&(String, String)>,
    host: &str,
    port: u16,
) -> Result<(), String> {
    const USER_PASS: u8 = 0x02;
    const NO_AUTH: u8 = 0x00;
    let greeting: &[u8] = match credentials {
        Some(_) => &[0x05, 0x02, NO_AUTH, USER_PASS],
        None => &[0x05, 0x01, NO_AUTH],
    };
    s.write_all(greeting)
        .await
        .map_err(io_err("sending the greeting"))?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice)
        .await
        .map_err(io_err("reading the method choice"))?;
    if choice[0] != 0x05 {
        return Err(format!(
            "not a SOCKS5 proxy (answered version {:#04x})",
            choice[0]
        ));
    }
    match (choice[1], credentials) {
        (NO_AUTH, _) => {}
        (USER_PASS, Some((user, pass))) => {
            if user.len() > 255 || pass.len() > 255 {
                return Err("SOCKS5 user name and password are at most 255 bytes".into());
            }
            let mut auth = vec![0x01, user.len() as u8];
            auth.extend_from_slice(user.as_bytes());
            auth.push(pass.len() as u8);
            auth.extend_from_slice(pass.as_bytes());
            s.write_all(&auth)
                .await
                .map_err(io_err("sending the credentials"))?;
            let mut status = [0u8; 2];
            s.read_exact(&mut status)
                .await
                .map_err(io_err("reading the authentication status"))?;
            if status[1] != 0x00 {
                return Err(format!("user {user:?} not accepted"));
            }
        }
        (USER_PASS, None) => {
            return Err("the proxy asks for a user name and password; give them as socks5://USER:PASS@HOST:PORT".into())
        }
        (0xff, _) => return Err("no offered authentication method accepted".into()),
        (other, _) => return Err(format!("chose authentication method {other:#04x}, which was not offered")),
    }
    let mut request = vec![0x05, 0x01, 0x00];
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            request.push(0x01);
            request.extend_from_slice(&ip.octets());
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            request.push(0x04);
            request.extend_from_slice(&ip.octets());
        }
        Err(_) => {
            let name = u8::try_from(host.len())
                .map_err(|_| format!("destination name {host:?} is longer than 255 bytes"))?;
            request.push(0x03);
            request.push(name);
            request.extend_from_slice(host.as_bytes());
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request)
        .await
        .map_err(io_err("sending the CONNECT request"))?;
    let target = authority(host, port);
    let mut reply = [0u8; 4];
    s.read_exact(&mut reply)
        .await
        .map_err(io_err("reading the CONNECT reply"))?;
    if reply[1] != socks_reply::SUCCEEDED {
        return Err(format!(
            "answered {:#04x} ({}) to CONNECT {target}",
            reply[1],
            socks_reply::describe(reply[1])
        ));
    }
    // The bound address, which nothing here needs, is read past.
    let rest = match reply[3] {
        0x01 => 4 + 2,
        0x04 => 16 + 2,
        0x03 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len)
                .await
                .map_err(io_err("reading the CONNECT reply"))?;
            usize::from(len[0]) + 2
        }
        other => {
            return Err(format!(
                "CONNECT reply has unknown address type {other:#04x}"
            ))
        }
    };
    let mut bound = vec![0u8; rest];
    s.read_exact(&mut bound)
        .await
        .map_err(io_err("reading the CONNECT reply"))?;
    Ok(())
}

/// Names the SOCKS5 step an I/O error happened in.
fn io_err(step: &'static str) -> impl Fn(io::Error) -> String {
    move |e| format!("{step}: {e}")
}

/// A stream that first yields bytes already read from it (kept after a parsed head).
pub struct Rewind<S> {
    prefix: bytes::Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: bytes::Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let part = self.prefix.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// Runs the SOCKS5 client against a peer that reads what it is sent and answers `script`
    /// all at once; returns the client's result and the bytes the peer received.
    async fn against(
        script: &'static [u8],
        credentials: Option<(String, String)>,
        host: &str,
    ) -> (Result<(), String>, Vec<u8>) {
        let (mut client, mut peer) = duplex(4096);
        let peer_task = tokio::spawn(async move {
            peer.write_all(script).await.unwrap();
            peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            let _ = peer.read_to_end(&mut got).await;
            got
        });
        let result = socks5_connect(&mut client, credentials.as_ref(), host, 443).await;
        drop(client);
        (result, peer_task.await.unwrap())
    }

    #[tokio::test]
    async fn socks5_client_sends_names_and_credentials() {
        let creds = Some(("u".to_string(), "pw".to_string()));
        let ok = b"\x05\x02\x01\x00\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00";
        let (result, sent) = against(ok, creds, "example.test").await;
        assert_eq!(result, Ok(()));
        let mut expected =
            b"\x05\x02\x00\x02\x01\x01u\x02pw\x05\x01\x00\x03\x0cexample.test".to_vec();
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(sent, expected);
        // An IPv6 literal goes as an address.
        let ok = b"\x05\x00\x05\x00\x00\x03\x01a\x00\x00";
        let (result, sent) = against(ok, None, "[::1]").await;
        assert_eq!(result, Ok(()));
        assert_eq!(sent[3..7], [0x05, 0x01, 0x00, 0x04]);
    }

    /// A peer's answers, the credentials offered, what the error must say.
    type Case = (&'static [u8], Option<(String, String)>, &'static str);

    #[tokio::test]
    async fn socks5_client_errors_say_what_failed() {
        let cases: [Case; 6] = [
            (b"HTTP/1.1 400 Bad\r\n\r\n", None, "not a SOCKS5 proxy"),
            (
                b"\x05\xff",
                None,
                "no offered authentication method accepted",
            ),
            (b"\x05\x02", None, "asks for a user name and password"),
            (
                b"\x05\x02\x01\x01",
                Some(("u".into(), "p".into())),
                "user \"u\" not accepted",
            ),
            (
                b"\x05\x00\x05\x05\x00\x01\0\0\0\0\0\0",
                None,
                "answered 0x05 (connection refused) to CONNECT example.test:443",
            ),
            (b"\x05\x00\x05\x00", None, "reading the CONNECT reply"),
        ];
        for (script, creds, expected) in cases {
            let (result, _) = against(script, creds, "example.test").await;
            let e = result.expect_err(expected);
            assert!(e.contains(expected), "{e:?} should say {expected:?}");
        }
    }
}
