//! One client connection, one way down: the HTTP/1.1 request loop (keep-alive, client
//! authentication, non-HTTP bytes answered at once) or, from its first byte, a SOCKS5
//! handshake (`socks`); each request goes to the exchange, each CONNECT (HTTP or SOCKS5) to
//! `connect`, whose interception hands back a TLS stream this loop then serves.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::auth::{self, Verdict};
use super::connect::{self, ConnectRequest, Via};
use super::connector::Io;
use super::exchange::{forward, Next};
use super::flow::{Flow, Kind, Outcome};
use super::flow_error::await_hook;
use super::http1::{request_body_kind, BodyKind, BufStream, HttpError, RequestHead};
use super::respond::{send_error, send_error_with};
use super::session::{ConnInfo, ConnState, Mode};
use super::sink::FlowGuard;
use super::socks;
use super::state::Engine;

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The proxy port: HTTP, or SOCKS5 told apart by its first byte.
    Proxy,
    /// The SOCKS5 port (`socks_port`): SOCKS5 only.
    Socks,
}

/// What the request loop hands back: a tunnel to set up, with the concrete stream.
pub enum Handoff<C> {
    /// An HTTP CONNECT (authenticated).
    Connect(RequestHead, BufStream<C>),
    /// A SOCKS5 greeting as the connection's first bytes.
    Socks(BufStream<C>),
}

/// Serves one accepted client connection until it closes.
pub async fn serve_client(
    engine: &Arc<Engine>,
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    entry: Entry,
) {
    let mut conn = ConnState::new(id, peer);
    conn.local = stream.local_addr().ok();
    conn.client_fd = super::segment::raw_socket(&stream);
    let client = BufStream::new(stream);
    // Boxed stages: a connection holds the state of the stage it is in, not of the largest.
    let handoff = match entry {
        Entry::Proxy => Box::pin(serve_http(engine, client, &mut conn, &Mode::Proxy)).await,
        Entry::Socks => Some(Handoff::Socks(client)),
    };
    let (request, client) = match handoff {
        None => return,
        Some(Handoff::Connect(head, client)) => (
            ConnectRequest {
                target: head.target,
                via: Via::Http,
            },
            client,
        ),
        Some(Handoff::Socks(mut client)) => {
            match Box::pin(socks_handshake(engine, &mut client, &mut conn)).await {
                Some(target) => (
                    ConnectRequest {
                        target,
                        via: Via::Socks5,
                    },
                    client,
                ),
                None => return,
            }
        }
    };
    let intercepted = Box::pin(connect::handle_connect(engine, client, request, &mut conn)).await;
    if let Some(connect::Interception {
        stream,
        mode,
        record,
    }) = intercepted
    {
        if super::h2_server::negotiated(&stream) {
            Box::pin(super::h2_server::serve(engine, stream, &conn, &mode)).await;
        } else {
            let _ = Box::pin(serve_http(engine, stream, &mut conn, &mode)).await;
        }
        record.finish();
    }
}

/// The SOCKS5 handshake within the header timeout: the destination, or None when it failed
/// (the client answered and the refusal recorded).
async fn socks_handshake(
    engine: &Engine,
    client: &mut BufStream<TcpStream>,
    conn: &mut ConnState,
) -> Option<String> {
    let timeout = engine.config.header_timeout;
    let error = match tokio::time::timeout(timeout, socks::handshake(engine, client, conn)).await {
        Ok(Ok(target)) => return Some(target),
        Ok(Err(e)) => e,
        // Closed without an answer: mid-handshake, no reply would be read as meant.
        Err(_) => socks::SocksError {
            message: format!("handshake not completed within {timeout:?}"),
            answer: None,
        },
    };
    let why = format!("SOCKS5: {}", error.message);
    match error.answer {
        Some(answer) => socks::answer(&mut client.io, answer).await,
        None => {
            let _ = client.io.shutdown().await;
        }
    }
    log::info!("client {}: {why}", conn.info.peer);
    log_refusal(engine, &mut conn.info, 0, &why);
    None
}

/// The request loop. Returns the connection when a CONNECT arrives in proxy mode, or a
/// SOCKS5 greeting opens it, since a tunnel needs the concrete stream.
pub async fn serve_http<C: Io>(
    engine: &Arc<Engine>,
    mut client: BufStream<C>,
    conn: &mut ConnState,
    mode: &Mode,
) -> Option<Handoff<C>> {
    let cfg = &engine.config;
    let mut draining = engine.draining.clone();
    let mut first = true;
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
        match sniff_foreign(&client.buf) {
            Some(Foreign::Socks5) if first && matches!(mode, Mode::Proxy) => {
                return Some(Handoff::Socks(client));
            }
            Some(foreign) => {
                answer_foreign(engine, &mut client, conn, foreign).await;
                return None;
            }
            None => first = false,
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
                return Some(Handoff::Connect(head, client));
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
            let reply = handler.authenticate(scheme, credentials);
            let timeout = engine.config.hook_timeout;
            match await_hook(&engine.hook_waits, timeout, reply, "on_authenticate").await {
                Ok(true) => {
                    head.headers.remove("proxy-authorization");
                    return Ok(head);
                }
                Ok(false) => "proxy credentials not accepted",
                // A hook that fails or hangs lets nobody in (its exception went to on_error).
                Err(e) if e.status == Some(504) => {
                    "proxy credentials not accepted (hook on_authenticate did not return in time)"
                }
                Err(_) => "proxy credentials not accepted (hook on_authenticate failed)",
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
            // Only a connection's first bytes may be a SOCKS5 greeting.
            let _ = client.io.write_all(&[socks::VERSION, 0xff]).await;
            (0, format!("SOCKS5 greeting after HTTP requests on the same connection: {hint}"))
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

pub(crate) fn log_refusal(engine: &Engine, info: &mut ConnInfo, status: u16, why: &str) {
    let flow = Flow {
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
        kind: Kind::Error,
        error: Some(why.to_string()),
        policy: "none".into(),
        ..Default::default()
    };
    FlowGuard::begin(&engine.sinks, &engine.closing, flow).commit();
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
