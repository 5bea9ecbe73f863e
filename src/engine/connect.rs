//! CONNECT, asked for by an HTTP CONNECT or a SOCKS5 CONNECT: decide (rules, handler), then
//! either relay bytes untouched (tunnel) or terminate TLS with a minted certificate and hand
//! the decrypted stream back to the connection, which serves its requests (intercept). The
//! two ways of asking differ only in how the client is answered ([`Via`]). Nothing here calls
//! back up into the connection.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::connector::{socks_reply, Rewind};
use super::decision::{decide, route_for};
use super::flow::{Flow, FlowAction, Kind, Outcome};
use super::flow_error::{await_hook, FlowError};
use super::hooks::ConnectDecision;
use super::http1::BufStream;
use super::respond::send_error;
use super::rules::{Action, Intercept, Scheme};
use super::segment::{raw_socket, SegmentPolicy, Segmented};
use super::session::{ConnState, Mode};
use super::sink::FlowGuard;
use super::socks;
use super::state::Engine;
use super::stats::Open;
use super::target::split_authority;
use super::tls;
use super::tunnel::{plain_pump, pump, SEGMENTING_BUFFER};

/// The decrypted side of an intercepted CONNECT, for the connection to serve; its `record`
/// is finished when those requests are done.
pub struct Interception<'a> {
    pub stream: BufStream<InterceptedStream>,
    pub mode: Mode,
    pub record: ConnectRecord<'a>,
}

/// The client's TLS stream inside an intercepted CONNECT (segmented below TLS).
pub type InterceptedStream = tokio_rustls::server::TlsStream<Rewind<Segmented<TcpStream>>>;

/// The CONNECT's access record and flow, open while its inner requests are served.
pub struct ConnectRecord<'a> {
    /// Counts the interception as open until it is finished.
    _open: Open<'a>,
    record: FlowGuard<'a>,
    started: Instant,
}

impl ConnectRecord<'_> {
    pub fn finish(mut self) {
        if self.record.outcome == Outcome::Unfinished {
            self.record.outcome = Outcome::Ok;
        }
        self.record.duration = self.started.elapsed();
        self.record.commit();
    }
}

/// How the client asked for the tunnel, and so how it is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// An HTTP `CONNECT`: `200 Connection Established`, or an HTTP error.
    Http,
    /// A SOCKS5 CONNECT: a SOCKS reply. With interception planned, the client's first bytes
    /// decide: a TLS ClientHello is intercepted, anything else tunnelled.
    Socks5,
}

impl Via {
    /// The record's method.
    fn method(self) -> &'static str {
        match self {
            Via::Http => "CONNECT",
            Via::Socks5 => "SOCKS5",
        }
    }
}

/// A request for a tunnel to `target` (`host:port`).
pub struct ConnectRequest {
    pub target: String,
    pub via: Via,
}

/// A CONNECT refused before its tunnel: the error, and the SOCKS reply code for it.
struct Refused {
    error: FlowError,
    socks_reply: u8,
}

impl From<FlowError> for Refused {
    fn from(error: FlowError) -> Self {
        let socks_reply = match error.status {
            Some(403) => socks_reply::NOT_ALLOWED,
            _ => socks_reply::GENERAL_FAILURE,
        };
        Refused { error, socks_reply }
    }
}

/// Answers a CONNECT: refused, tunnelled to its end, or intercepted (then the decrypted
/// stream is returned for the connection to serve).
pub async fn handle_connect<'e>(
    engine: &'e Arc<Engine>,
    mut client: BufStream<TcpStream>,
    request: ConnectRequest,
    conn: &mut ConnState,
) -> Option<Interception<'e>> {
    let started = Instant::now();
    let via = request.via;
    let mut record = FlowGuard::begin(
        &engine.sinks,
        &engine.closing,
        Flow {
            id: conn.info.next_id(),
            client: Some(conn.info.peer),
            method: via.method().into(),
            target: request.target.clone(),
            kind: Kind::Tunnel,
            action: FlowAction::Direct,
            policy: "none".into(),
            ..Default::default()
        },
    );
    // Each stage is boxed: the connection's future then weighs what the current stage needs
    // (an idle tunnel holds only the tunnel's state), not the largest stage's.
    let plan = Box::pin(plan_connect(engine, &request.target, conn, &mut record)).await;
    // A SOCKS client's destination is reached before the answer even when interception is
    // planned: its reply can then say why it could not be, and a client that does not speak
    // TLS first is tunnelled over it.
    let ready = match plan {
        Ok(plan) if !plan.intercept || via == Via::Socks5 => {
            open_tunnel(engine, plan, &mut record).await
        }
        Ok(plan) => Ok(Ready { plan, origin: None }),
        Err(e) => Err(Refused::from(e)),
    };
    let ready = match ready {
        Err(Refused {
            error:
                FlowError {
                    status,
                    message,
                    handler_knows,
                    ..
                },
            socks_reply,
        }) => {
            // A CONNECT is refused before its 200, so there is always a status to answer.
            let status = status.unwrap_or(502);
            // Recorded first, so whoever reads the answer also finds the record.
            record.status = status;
            record.error = Some(message.clone());
            record.outcome = Outcome::of_status(status);
            record.duration = started.elapsed();
            if !handler_knows {
                conn.report_error(engine, &message);
            }
            record.commit();
            match via {
                Via::Http => {
                    let _ = send_error(&mut client.io, status, &message, false).await;
                }
                Via::Socks5 => {
                    socks::answer(&mut client.io, socks::Answer::Reply(socks_reply)).await;
                }
            }
            return None;
        }
        Ok(ready) => ready,
    };
    let established: &[u8] = match via {
        Via::Http => b"HTTP/1.1 200 Connection Established\r\n\r\n",
        Via::Socks5 => &socks::reply(socks_reply::SUCCEEDED),
    };
    let result = match client.io.write_all(established).await {
        Err(e) => Err(e.to_string()),
        Ok(()) => {
            record.status = 200;
            let ready = match ready {
                Ready {
                    plan,
                    origin: Some(origin),
                } if plan.intercept => {
                    let tls = tls_comes_first(engine, &mut client, &origin).await;
                    Ready {
                        origin: (!tls).then_some(origin),
                        plan,
                    }
                }
                ready => ready,
            };
            match ready {
                Ready { plan, origin: None } => {
                    match Box::pin(intercept(engine, client, plan, &mut record)).await {
                        Ok((stream, mode)) => {
                            return Some(Interception {
                                stream,
                                mode,
                                record: ConnectRecord {
                                    _open: engine.stats().intercept_opened(),
                                    record,
                                    started,
                                },
                            })
                        }
                        Err(e) => Err(e),
                    }
                }
                Ready {
                    plan,
                    origin: Some(origin),
                } => Box::pin(tunnel(engine, client, origin, plan, conn, &mut record)).await,
            }
        }
    };
    if let Err(message) = result {
        conn.report_error(engine, &message);
        record.error = Some(message);
        if record.outcome == Outcome::Unfinished {
            record.outcome = Outcome::Error;
        }
    } else if record.outcome == Outcome::Unfinished {
        record.outcome = Outcome::Ok;
    }
    record.duration = started.elapsed();
    record.commit();
    None
}

/// Whether the client's first bytes after the answer are a TLS record, waiting at most the
/// header timeout for them; the destination speaking first (or nothing arriving) means not.
async fn tls_comes_first(
    engine: &Engine,
    client: &mut BufStream<TcpStream>,
    origin: &BufStream<TcpStream>,
) -> bool {
    if client.buf.is_empty() && origin.buf.is_empty() {
        let first = async {
            tokio::select! {
                filled = client.fill() => matches!(filled, Ok(n) if n > 0),
                _ = origin.io.readable() => false,
            }
        };
        if !tokio::time::timeout(engine.config.header_timeout, first)
            .await
            .unwrap_or(false)
        {
            return false;
        }
    }
    client.buf.first() == Some(&TLS_HANDSHAKE_RECORD)
}

/// The content type of a TLS handshake record, which a ClientHello starts with.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A plan with its connection to the destination (None for interception, which connects
/// per inner request).
struct Ready {
    plan: Plan,
    origin: Option<BufStream<TcpStream>>,
}

async fn open_tunnel(engine: &Engine, plan: Plan, record: &mut Flow) -> Result<Ready, Refused> {
    let (origin, dns) = match engine
        .connector
        .open_tunnel(&plan.route, &plan.host, plan.port, None)
        .await
    {
        Ok(opened) => opened,
        Err(e) => {
            return Err(Refused {
                error: (e.status(), e.to_string()).into(),
                socks_reply: e.socks_reply(),
            })
        }
    };
    record.dns = dns.into();
    Ok(Ready {
        plan,
        origin: Some(origin),
    })
}

/// What to do with a CONNECT once rules and the handler have spoken.
struct Plan {
    host: String,
    port: u16,
    intercept: bool,
    route: super::connector::Route,
    up_policy: SegmentPolicy,
    down_policy: SegmentPolicy,
    /// `ttfb=`: how long a tunnel's first byte toward the client is held.
    ttfb: Option<std::time::Duration>,
}

async fn plan_connect(
    engine: &Arc<Engine>,
    target: &str,
    conn: &mut ConnState,
    record: &mut Flow,
) -> Result<Plan, FlowError> {
    let (host, port) = split_authority(target, None)
        .map_err(|m| (400, format!("bad CONNECT target {target:?}: {m}")))?;
    let decision = decide(engine, "CONNECT", Scheme::Https, &host, port, "", record);
    let mut choice = match decision.intercept {
        Intercept::Yes => ConnectDecision::Intercept,
        Intercept::No => ConnectDecision::Tunnel,
        Intercept::Default if engine.ca.is_some() => ConnectDecision::Intercept,
        Intercept::Default => ConnectDecision::Tunnel,
    };
    if let Action::Block { reason } = &decision.action {
        choice = ConnectDecision::Block(format!("blocked by rule {}: {reason}", record.rule));
    }
    if engine.hooks.connect {
        if let Some(handler) = conn.handler(engine) {
            let reply = handler.connect(host.clone(), port);
            let hook_timeout = engine.config.hook_timeout;
            match await_hook(&engine.hook_waits, hook_timeout, reply, "on_connect").await {
                Err(e) => return Err(e),
                Ok(ConnectDecision::Default) => {}
                Ok(ConnectDecision::Intercept) if engine.ca.is_none() => {
                    // Not a silent tunnel: the handler author asked for something this server
                    // cannot do (on_error tells them, the client gets a 502).
                    return Err((
                        502,
                        format!(
                            "on_connect answered \"intercept\" for {host}:{port}, but the server has no tls_store \
                             (start_proxy_server(..., tls_store=TLSStore()) to intercept)"
                        ),
                    )
                        .into());
                }
                Ok(c) => choice = c,
            }
        }
    }
    if let ConnectDecision::Block(reason) = choice {
        record.kind = Kind::Block;
        return Err((403, reason).into());
    }
    engine
        .filter
        .load()
        .check_host(&host)
        .map_err(|reason| (403, format!("destination {host} denied: {reason}")))?;
    let intercept = match (&choice, &engine.ca) {
        (ConnectDecision::Intercept, Some(_)) => true,
        (ConnectDecision::Intercept, None) => {
            log::warn!(
                "CONNECT {host}:{port}: interception asked for but no CA is configured; tunnelling"
            );
            false
        }
        _ => false,
    };
    let up_policy = if decision.direction.segments_up() {
        decision.policy.clone()
    } else {
        SegmentPolicy::none()
    };
    let down_policy = if decision.direction.segments_down() {
        decision.policy.clone()
    } else {
        SegmentPolicy::none()
    };
    Ok(Plan {
        host,
        port,
        intercept,
        route: route_for(&decision.action),
        ttfb: decision.policy.ttfb,
        up_policy,
        down_policy,
    })
}

/// Terminates the client's TLS (the CONNECT answered) with a minted certificate.
async fn intercept(
    engine: &Arc<Engine>,
    client: BufStream<TcpStream>,
    plan: Plan,
    record: &mut Flow,
) -> Result<(BufStream<InterceptedStream>, Mode), String> {
    let Plan {
        host,
        port,
        up_policy,
        down_policy,
        ..
    } = plan;
    record.kind = Kind::Intercept;
    let ca = engine.ca.clone().expect("interception needs a CA");
    let BufStream {
        io: client_io,
        buf: client_buf,
    } = client;
    let prefix = leftover(client_buf);
    let down_segmenting = !down_policy.is_passthrough();
    let on_fault = record.fault_observer("down", &down_policy);
    let fd = raw_socket(&client_io);
    let down = Segmented::new(client_io, down_policy, record.observer("down"))
        .reset_via(fd)
        .on_fault(on_fault);
    let accepted = tokio::time::timeout(
        engine.config.header_timeout,
        tls::accept_intercepted(Rewind::new(prefix, down), &ca, &host),
    )
    .await;
    let tls_stream = match accepted {
        Err(_) => {
            return Err(format!(
                "TLS handshake with the client for {host} timed out"
            ))
        }
        Ok(Err(e)) => {
            log::info!("intercepting {host}:{port}: {e}");
            return Err(e.to_string());
        }
        Ok(Ok((s, _sni))) => s,
    };
    let mode = Mode::Intercepted {
        host,
        port,
        up_policy,
        down_segmenting,
    };
    Ok((BufStream::new(tls_stream), mode))
}

/// Relays bytes both ways (the CONNECT answered) until either side closes.
async fn tunnel(
    engine: &Arc<Engine>,
    client: BufStream<TcpStream>,
    origin: BufStream<TcpStream>,
    plan: Plan,
    conn: &mut ConnState,
    record: &mut Flow,
) -> Result<(), String> {
    let Plan {
        host,
        port,
        up_policy,
        down_policy,
        ttfb,
        ..
    } = plan;
    let _open = engine.stats().tunnel_opened();
    if engine.hooks.tunnel {
        if let Some(h) = conn.handler(engine) {
            h.tunnel_opened(host.clone(), port);
        }
    }
    // Bytes read past the heads go first; the head buffers are let go before the tunnel
    // settles in, so an idle tunnel holds no buffer.
    let BufStream {
        io: client_io,
        buf: client_buf,
    } = client;
    let BufStream {
        io: origin_io,
        buf: origin_buf,
    } = origin;
    let client_prefix = leftover(client_buf);
    let origin_prefix = leftover(origin_buf);
    if up_policy.is_passthrough()
        && down_policy.is_passthrough()
        && ttfb.is_none()
        && !record.records_chunks()
    {
        // Nothing to segment or record: the plain relay, with pooled buffers.
        let (mut client_io, mut origin_io) = (client_io, origin_io);
        let prefixes = async {
            origin_io.write_all(&client_prefix).await?;
            client_io.write_all(&origin_prefix).await
        };
        let (totals, err) = match prefixes.await {
            Ok(()) => plain_pump(&client_io, &origin_io, engine.config.idle_timeout).await,
            Err(e) => (Default::default(), Some(e)),
        };
        record.bytes_up = totals.a_to_b + client_prefix.len() as u64;
        record.bytes_down = totals.b_to_a + origin_prefix.len() as u64;
        return finish_tunnel(engine, conn, host, port, record, err);
    }
    let (client_fd, origin_fd) = (raw_socket(&client_io), raw_socket(&origin_io));
    let (up_fault, down_fault) = (
        record.fault_observer("up", &up_policy),
        record.fault_observer("down", &down_policy),
    );
    let (cr, cw) = client_io.into_split();
    let (or, ow) = origin_io.into_split();
    let to_origin = Segmented::new(ow, up_policy, record.observer("up"))
        .reset_via(origin_fd)
        .on_fault(up_fault);
    let to_client = Segmented::new(cw, down_policy, record.observer("down"))
        .reset_via(client_fd)
        .on_fault(down_fault)
        .hold_first(ttfb);
    let buffer = if to_origin.is_passthrough() && to_client.is_passthrough() {
        engine.config.tunnel_buffer_bytes
    } else {
        SEGMENTING_BUFFER
    };
    // Boxed: a plain tunnel's future does not carry this relay's larger state.
    let (totals, err) = Box::pin(pump(
        (Rewind::new(client_prefix, cr), to_client),
        (Rewind::new(origin_prefix, or), to_origin),
        buffer,
        engine.config.idle_timeout,
    ))
    .await;
    record.bytes_up = totals.a_to_b;
    record.bytes_down = totals.b_to_a;
    finish_tunnel(engine, conn, host, port, record, err)
}

fn finish_tunnel(
    engine: &Engine,
    conn: &mut ConnState,
    host: String,
    port: u16,
    record: &mut Flow,
    err: Option<std::io::Error>,
) -> Result<(), String> {
    record.outcome = match &err {
        None => Outcome::Ok,
        Some(e) if e.kind() == std::io::ErrorKind::TimedOut => Outcome::IdleTimeout,
        Some(_) => Outcome::Error,
    };
    if engine.hooks.tunnel {
        if let Some(h) = conn.handler(engine) {
            h.tunnel_closed(host, port, record.bytes_up, record.bytes_down);
        }
    }
    match err {
        Some(e) if e.kind() != std::io::ErrorKind::TimedOut => Err(format!("tunnel ended: {e}")),
        _ => Ok(()),
    }
}

/// The bytes a head buffer holds past the head, in an allocation of their own (the buffer's
/// spare capacity is freed with it).
fn leftover(buf: bytes::BytesMut) -> Bytes {
    if buf.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&buf)
    }
}
