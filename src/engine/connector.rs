//! Reaching a destination: name resolution, TCP connect with a timeout, and the CONNECT
//! handshake through an upstream proxy. Every error names the hop that failed.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    /// A ready `Proxy-Authorization` value (e.g. "Basic dXNlcjpwYXNz"), sent to this hop only.
    pub authorization: Option<String>,
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
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Why a destination could not be reached.
#[derive(Debug)]
pub enum ConnectError {
    Resolve { host: String, reason: String },
    Denied { host: String, reason: String },
    Connect { target: String, reason: String },
    Timeout { target: String },
    Upstream { hop: String, reason: String },
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
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Resolve { host, reason } => write!(f, "cannot resolve {host}: {reason}"),
            ConnectError::Denied { host, reason } => {
                write!(f, "destination {host} denied: {reason}")
            }
            ConnectError::Connect { target, reason } => {
                write!(f, "cannot connect to {target}: {reason}")
            }
            ConnectError::Timeout { target } => write!(f, "timed out connecting to {target}"),
            ConnectError::Upstream { hop, reason } => write!(f, "upstream proxy {hop}: {reason}"),
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
                hop: hop.to_string(),
                reason: e.to_string(),
            })
    }

    /// A byte stream to `host:port` by `route`: direct TCP, or a CONNECT tunnel through the hop.
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
                upstream_connect(&mut s, hop, host, port, self.connect_timeout).await?;
                Ok((s, format!("via {hop}")))
            }
        }
    }
}

/// Sends `CONNECT host:port` to an upstream proxy and checks for a 2xx answer.
async fn upstream_connect(
    s: &mut BufStream<TcpStream>,
    hop: &UpstreamHop,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let target = authority(host, port);
    let mut headers = Headers::default();
    headers.push("Host", target.clone());
    if let Some(auth) = &hop.authorization {
        headers.push("Proxy-Authorization", auth.clone());
    }
    let head = RequestHead {
        method: "CONNECT".into(),
        target: target.clone(),
        version: 1,
        headers,
    };
    let fail = |reason: String| ConnectError::Upstream {
        hop: hop.to_string(),
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
