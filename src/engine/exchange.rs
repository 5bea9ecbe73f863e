//! One HTTP exchange on a client connection, plain or intercepted: request hooks, the rule
//! decision, the origin (pooled, direct or through an upstream proxy), the response head and
//! hooks, then both bodies streamed (segmented where a policy says) and upgrades relayed.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::capture::{
    header_pairs, Capture, Phase, RequestHeadCapture, ResponseHeadCapture, DEFAULT_BODY_LIMIT,
};
use super::connector::{push_authority, ConnectError, ConnectTimes, Connected, Io, Rewind, Route};
use super::decision::{decide, route_for};
use super::flow::{Flow, FlowAction, Kind, Outcome};
use super::flow_error::{await_hook, FlowError};
use super::hooks::{
    ForwardOrder, HandlerCommand, Reply, RequestParts, ResponseParts, WebSocketInjector,
};
use super::http1::{
    chunked_transfer_encoding, request_body_kind, response_body_kind, strip_hop_by_hop, BodyKind,
    BodyReader, BodyWriter, BufStream, Header, HttpError, RawResponse, RequestHead, ResponseHead,
};
use super::pool::{OriginConn, WireTap};
use super::respond::{reason_phrase, send_error};
use super::rules::{Action, Scheme};
use super::segment::{
    raw_socket, read_flushing, Carry, ChunkObserver, FaultObserver, SegmentPolicy, Segmented,
};
use super::session::{ConnState, Mode};
use super::sink::FlowGuard;
use super::state::Engine;
use super::target::{request_target, Target};
use super::tls;
use super::tunnel::pump;
use super::tunnel::SEGMENTING_BUFFER;
use super::websocket::{self, negotiated_extensions, MessageHook};

/// What happened to a connection after one exchange.
pub enum Next {
    KeepAlive,
    Close,
}

/// One plain (or intercepted) HTTP exchange: request out, response back, bodies streamed.
pub async fn forward<C: Io>(
    engine: &Arc<Engine>,
    client: &mut BufStream<C>,
    head: RequestHead,
    conn: &mut ConnState,
    mode: &Mode,
) -> Next {
    let started = Instant::now();
    let mut record = FlowGuard::begin(
        &engine.sinks,
        &engine.closing,
        Flow {
            id: conn.info.next_id(),
            client: Some(conn.info.peer),
            method: head.method.clone(),
            // Set by `Exchange::begin`: the parsed URL, or the raw target if it is bad.
            target: String::new(),
            kind: if matches!(mode, Mode::Proxy) {
                Kind::Forward
            } else {
                Kind::Intercept
            },
            action: FlowAction::Direct,
            policy: "none".into(),
            ..Default::default()
        },
    );
    // An error answer keeps the connection only if the client asked to keep it too (a client
    // that sent `Connection: close` gets the close RFC 9112 promises it).
    let client_keeps_alive = head.wants_keep_alive();
    let outcome = exchange(engine, client, head, mode, conn, &mut record).await;
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
            if !failure.handler_knows {
                conn.report_error(engine, &failure.message);
            }
            match failure.status {
                Some(status) => {
                    record.status = status;
                    let keep = failure.client_usable && client_keeps_alive && !engine.is_draining();
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
fn body_read_failure(e: io::Error, what: &str) -> FlowError {
    if e.kind() == io::ErrorKind::InvalidData {
        FlowError::answer(400, format!("reading {what}: {e}"), false)
    } else {
        FlowError::client_gone(format!("client went away while sending the {what}: {e}"))
    }
}

/// A hook's reply. Any failure of the hook counts as the handler's own (it is not reported
/// to it again); once the response has started it can only cut the connection.
async fn hook_reply<T>(
    engine: &Engine,
    reply: Reply<T>,
    hook: &str,
    started_response: bool,
) -> Result<T, FlowError> {
    let waited = await_hook(&engine.hook_waits, engine.config.hook_timeout, reply, hook).await;
    waited.map_err(|e| {
        if started_response {
            FlowError::cut_error(e.message).from_hook()
        } else {
            e.from_hook()
        }
    })
}

/// What a request head says of its body and where it goes; a 400 if either is bad.
fn body_and_target(head: &RequestHead, mode: &Mode) -> Result<(BodyKind, Target), FlowError> {
    let kind = request_body_kind(head).map_err(|m| FlowError::answer(400, m, false))?;
    let empty = kind == BodyKind::Empty;
    let target = request_target(head, mode).map_err(|m| FlowError::answer(400, m, empty))?;
    Ok((kind, target))
}

fn parts_of(head: &RequestHead, target: &Target) -> RequestParts {
    RequestParts {
        method: head.method.clone(),
        scheme: target.scheme.to_string(),
        host: target.host.clone(),
        port: target.port,
        path: target.path.clone(),
        version: version_name(head.version),
        headers: head.headers.clone(),
    }
}

/// The protocol a client spoke, as hooks see it: HTTP/1.0, HTTP/1.1, or HTTP/2 (a
/// `RequestHead` from `h2_server` carries version 2).
fn version_name(version: u8) -> String {
    match version {
        2 => "HTTP/2".into(),
        minor => format!("HTTP/1.{minor}"),
    }
}

/// The phases of one exchange, in order. Each takes the state value (`Exchange`) and what the
/// phase before it produced; any of them may end the exchange with a `FlowError`.
async fn exchange<C: Io>(
    engine: &Arc<Engine>,
    client: &mut BufStream<C>,
    head: RequestHead,
    mode: &Mode,
    conn: &mut ConnState,
    record: &mut Flow,
) -> Result<Next, FlowError> {
    let mut x = Exchange::begin(engine, client, head, mode, conn, record)?;
    // Stages that only some exchanges reach are boxed, so the common path's future (allocated
    // per request) does not carry their state: hooks, new origin connections, upgrades.
    let order = if engine.hooks.request || engine.hooks.any_response() {
        Box::pin(x.request_hooks()).await?
    } else {
        Handled::Forward(None)
    };
    let order = match order {
        Handled::Forward(order) => order,
        Handled::Answered(next) => return Ok(next),
    };
    let plan = x.route(order)?;
    let mut sent = x.send(&plan).await?;
    let response = x.response_head(&plan, &mut sent).await?;
    if response.status == 101 && plan.is_upgrade {
        return Box::pin(x.upgrade(plan, sent, response)).await;
    }
    let send_failed = sent.failure.is_some();
    let reply = x.response_hooks(&plan, send_failed, response).await?;
    x.relay(plan, sent, reply).await
}

/// One exchange as it goes: the client side, the request as received, and the flow's record.
struct Exchange<'a, C> {
    engine: &'a Arc<Engine>,
    client: &'a mut BufStream<C>,
    conn: &'a mut ConnState,
    mode: &'a Mode,
    /// The flow's record, filled in as the exchange goes.
    record: &'a mut Flow,
    /// The request head as the client sent it (until `route` makes it the outgoing one).
    head: RequestHead,
    /// The client's HTTP/1.x minor version.
    client_version: u8,
    /// Where it goes (changed by a request hook, if one forwards elsewhere).
    target: Target,
    /// The client's request body, read as it is forwarded (or by a hook).
    request_body: BodyReader,
    body_empty: bool,
    client_keep_alive: bool,
}

/// What the request hooks decided.
enum Handled {
    /// Forward the request, with the handler's changes if it made any.
    Forward(Option<Box<ForwardOrder>>),
    /// The handler answered the client itself.
    Answered(Next),
}

/// The request as it will be sent, where, and how each direction is segmented.
struct Plan {
    method: String,
    /// The encoded request head.
    encoded: Vec<u8>,
    /// How the body is framed toward the origin.
    body_out: BodyKind,
    /// The handler's replacement for the client's body.
    replacement_body: Option<Bytes>,
    expects_continue: bool,
    is_upgrade: bool,
    /// The request is complete with its head (so the head is flushed, not carried).
    head_is_message: bool,
    route: Route,
    pool_key: String,
    up_policy: SegmentPolicy,
    down_policy: SegmentPolicy,
    up_observer: Option<ChunkObserver>,
    /// Where each direction's injected fault reports (None without one).
    up_fault: Option<FaultObserver>,
    down_fault: Option<FaultObserver>,
    /// `ttfb=`: how long the response's first byte is held (plain and intercepted alike).
    ttfb: Option<std::time::Duration>,
    /// Plain HTTP through an upstream proxy: its answers are the proxy's, not the origin's.
    via_upstream: bool,
    /// `h2c=yes` on plain HTTP sent directly: HTTP/2 over cleartext to the origin, with the
    /// up-policy segmenting the bytes below HTTP/2 (this is that policy).
    h2c: Option<SegmentPolicy>,
}

/// The request sent: on which origin connection, and whether its body got through.
struct Sent {
    origin: OriginConn,
    /// The connection came from the pool and the request had no body: if the origin had
    /// closed it meanwhile, the request is sent once more on a fresh connection.
    retry_fresh: bool,
    /// Why sending the body failed; reported only if no response follows (an origin may
    /// answer early and stop reading).
    failure: Option<String>,
}

/// The response as the client gets it, and what becomes of both connections.
struct ClientResponse {
    head: ResponseHead,
    origin_kind: BodyKind,
    client_kind: BodyKind,
    /// A chunk hook sees (and may change) every piece of the body.
    rewrites_body: bool,
    keep_client: bool,
    origin_keep_alive: bool,
}

impl<'a, C: Io> Exchange<'a, C> {
    /// Reads what the request head says of its body and target.
    fn begin(
        engine: &'a Arc<Engine>,
        client: &'a mut BufStream<C>,
        head: RequestHead,
        mode: &'a Mode,
        conn: &'a mut ConnState,
        record: &'a mut Flow,
    ) -> Result<Self, FlowError> {
        let (body_kind, target) = match body_and_target(&head, mode) {
            Ok(parsed) => parsed,
            Err(e) => {
                // A target that cannot be parsed is recorded as the client sent it.
                record.target = head.target.clone();
                return Err(e);
            }
        };
        let body_empty = body_kind == BodyKind::Empty;
        record.target = target.url();
        if target.scheme == "https" && matches!(mode, Mode::Proxy) {
            return Err(FlowError::answer(
                400,
                "https:// URLs must be requested through CONNECT",
                body_empty,
            ));
        }
        Ok(Exchange {
            engine,
            client,
            conn,
            mode,
            record,
            client_keep_alive: head.wants_keep_alive(),
            client_version: head.version,
            head,
            target,
            request_body: BodyReader::new(body_kind),
            body_empty,
        })
    }

    fn plain(&self) -> bool {
        matches!(self.mode, Mode::Proxy)
    }

    /// Phase 1: the user's request hook decides first: forward (maybe changed), or answer.
    async fn request_hooks(&mut self) -> Result<Handled, FlowError> {
        let engine = self.engine;
        let cfg = &engine.config;
        if !(engine.hooks.request || engine.hooks.any_response()) {
            return Ok(Handled::Forward(None));
        }
        let handler = self
            .conn
            .handler(engine)
            .expect("a handler exists when hooks are set");
        let mut commands = handler.request(parts_of(&self.head, &self.target));
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
                        FlowError::cut_error(msg)
                    } else {
                        FlowError::answer(504, msg, false)
                    });
                }
                Ok(None) => HandlerCommand::Fail("the handler went away".into()),
                Ok(Some(c)) => c,
            };
            match command {
                HandlerCommand::Forward(order) => return Ok(Handled::Forward(Some(order))),
                HandlerCommand::Write(bytes) => {
                    wrote_raw = true;
                    self.record.bytes_down += bytes.len() as u64;
                    raw.feed(&bytes);
                    self.record.status = raw.status();
                    self.client.io.write_all(&bytes).await.map_err(|e| {
                        FlowError::client_gone(format!("writing to client failed: {e}"))
                    })?;
                }
                HandlerCommand::ReadBody(reply) => {
                    let piece =
                        tokio::time::timeout(cfg.idle_timeout, self.request_body.next(self.client))
                            .await;
                    let piece = match piece {
                        Err(_) => Err("client stopped sending the request body".to_string()),
                        Ok(r) => r.map_err(|e| e.to_string()),
                    };
                    if let Ok(Some(p)) = &piece {
                        self.record.bytes_up += p.len() as u64;
                    }
                    let _ = reply.send(piece);
                }
                HandlerCommand::Finish => {
                    if wrote_raw {
                        // The handler wrote its own response: the connection carries on only
                        // if that response was complete and well framed.
                        let _ = self.client.io.flush().await;
                        self.record.kind = Kind::Handler;
                        let keep = raw.reusable(&self.head.method)
                            && self.request_body.is_done()
                            && self.client_keep_alive;
                        let next = if keep { Next::KeepAlive } else { Next::Close };
                        return Ok(Handled::Answered(next));
                    }
                    return Err(FlowError::answer(
                        502,
                        "the handler returned without forwarding or answering the request",
                        self.request_body.is_done(),
                    )
                    .from_hook());
                }
                HandlerCommand::Fail(message) => {
                    let msg = format!("hook on_request_received failed: {message}");
                    return Err(if wrote_raw {
                        FlowError::cut_error(msg).from_hook()
                    } else {
                        FlowError::answer(502, msg, false).from_hook()
                    });
                }
            }
        }
    }

    /// Phase 2: the handler's changes applied, the rules' decision, the destination filter,
    /// and the request head as it will be sent.
    fn route(&mut self, order: Option<Box<ForwardOrder>>) -> Result<Plan, FlowError> {
        let engine = self.engine;
        let body_empty = self.body_empty;
        // The head as the client sent it is needed no more: it becomes the one sent on.
        let client_te = (self.request_body.kind() == BodyKind::Chunked)
            .then(|| chunked_transfer_encoding(&self.head.headers));
        let mut out = std::mem::take(&mut self.head);
        let mut replacement_body = None;
        let mut policy_override = None;
        if let Some(order) = order {
            let order = *order;
            let r = order.request;
            out.method = r.method;
            out.headers = r.headers;
            self.target.host = r.host;
            self.target.port = r.port;
            self.target.path = if r.path.is_empty() {
                "/".into()
            } else {
                r.path
            };
            replacement_body = order.body;
            policy_override = order.policy;
            self.record.method = out.method.clone();
            self.record.target = self.target.url();
        }
        let target = &self.target;
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
            self.record,
        );
        begin_capture(engine, self.record, decision.capture, &out, target);
        if let Some(p) = policy_override {
            decision.policy = p;
            self.record.policy = format!(
                "{} dir={} (handler)",
                decision.policy.describe(),
                decision.direction.as_str()
            )
            .into();
        }
        if let Action::Block { reason } = &decision.action {
            self.record.kind = Kind::Block;
            return Err(FlowError::answer(
                403,
                format!("blocked by rule {}: {reason}", self.record.rule),
                body_empty,
            ));
        }
        engine
            .filter
            .load()
            .check_host(&target.host)
            .map_err(|reason| {
                FlowError::answer(
                    403,
                    format!("destination {} denied: {reason}", target.host),
                    body_empty,
                )
            })?;
        let route = route_for(&decision.action);
        // Plain HTTP is segmented here; intercepted flows were segmented below TLS at CONNECT.
        let plain = self.plain();
        let mut up_policy = if plain && decision.direction.segments_up() {
            decision.policy.clone()
        } else {
            SegmentPolicy::none()
        };
        // h2c: the up-policy moves below HTTP/2, to the origin connection's bytes.
        let h2c_direct =
            decision.h2c && plain && target.scheme == "http" && matches!(route, Route::Direct);
        let h2c = h2c_direct.then(|| std::mem::take(&mut up_policy));
        let down_policy = if plain && decision.direction.segments_down() {
            decision.policy.clone()
        } else {
            SegmentPolicy::none()
        };
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
        let body_out = match (&replacement_body, self.request_body.kind()) {
            (Some(b), _) => {
                out.headers.remove("content-length");
                if !b.is_empty() || !matches!(out.method.as_str(), "GET" | "HEAD") {
                    out.headers.set("Content-Length", b.len().to_string());
                }
                BodyKind::Length(b.len() as u64)
            }
            (None, BodyKind::Chunked) => {
                out.headers
                    .push("Transfer-Encoding", client_te.unwrap_or_default());
                BodyKind::Chunked
            }
            (None, k) => k,
        };
        // The request as the origin gets it (an upstream hop's credentials are not its).
        if let Some(capture) = &mut self.record.capture {
            capture.request = Some(request_capture(&out, &self.target));
        }
        let mode_key = match self.mode {
            Mode::Proxy => String::new(),
            Mode::Intercepted { up_policy, .. } => up_policy.describe(),
        };
        let pool_key = match &route {
            Route::Direct => {
                out.target = target.path.clone();
                // "scheme|host:port|mode[|h2c policy]", built in one buffer (every request).
                let mut key = String::with_capacity(target.host.len() + mode_key.len() + 16);
                key.push_str(target.scheme);
                key.push('|');
                push_authority(&mut key, &target.host, target.port);
                key.push('|');
                key.push_str(&mode_key);
                if let Some(p) = &h2c {
                    key.push_str("|h2c ");
                    key.push_str(&p.describe());
                }
                key
            }
            Route::Upstream(hop) => {
                if target.scheme == "https" || !hop.is_http() {
                    // A tunnel through the hop: the destination gets origin form.
                    out.target = target.path.clone();
                    format!(
                        "{}|{}|via {}|{mode_key}",
                        target.scheme,
                        target.authority(),
                        hop.describe()
                    )
                } else {
                    out.target = target.url();
                    if let Some(auth) = hop.http_authorization() {
                        out.headers.push("Proxy-Authorization", auth.to_string());
                    }
                    format!("via|{hop}")
                }
            }
        };
        let via_upstream =
            matches!(&route, Route::Upstream(hop) if hop.is_http()) && target.scheme != "https";
        // A request without a body is complete with its head, so that is flushed.
        let head_is_message = body_empty && replacement_body.as_ref().is_none_or(|b| b.is_empty());
        let up_fault = self.record.fault_observer("up", &up_policy);
        let down_fault = self.record.fault_observer("down", &down_policy);
        Ok(Plan {
            up_fault,
            down_fault,
            encoded: out.encode(),
            method: out.method,
            body_out,
            replacement_body,
            expects_continue,
            is_upgrade,
            head_is_message,
            route,
            pool_key,
            up_policy,
            down_policy,
            up_observer: if plain {
                self.record.observer("up")
            } else {
                None
            },
            via_upstream,
            ttfb: decision.policy.ttfb,
            h2c,
        })
    }

    /// Phase 3: an origin connection (a pooled one when there is one, else a new one), the
    /// request head and the body, streamed (or the handler's replacement).
    async fn send(&mut self, plan: &Plan) -> Result<Sent, FlowError> {
        let engine = self.engine;
        let mut origin_conn = None;
        // The head and the body are one segmented stream: what the head's writer holds of an
        // incomplete chunk, and its schedule, go on in the body's writer.
        let mut head_carry = Carry::default();
        if let Some(mut conn) = engine.pool.take(&plan.pool_key) {
            if let Some(capture) = &mut self.record.capture {
                capture.mark(Phase::SendStart);
                capture.server = conn.peer;
            }
            // A pooled connection the origin closed meanwhile fails here; retry on a fresh one.
            let fd = conn.fd;
            let mut w = Segmented::new(
                &mut conn.io,
                plan.up_policy.clone(),
                plan.up_observer.clone(),
            )
            .reset_via(fd)
            .on_fault(plan.up_fault.clone());
            if write_head(&mut w, &plan.encoded, plan.head_is_message)
                .await
                .is_ok()
            {
                head_carry = w.take_carry();
                drop(w);
                origin_conn = Some(conn);
            }
        }
        // A pooled connection the peer closed as we wrote reads as closed: a request without a
        // body is then sent again, once, on a fresh connection.
        let pooled = origin_conn.is_some();
        let mut origin = match origin_conn {
            Some(c) => {
                self.watch_wire(&c);
                c
            }
            None => {
                // The body is not read yet: a failure to send the head closes the client's
                // connection too.
                let (new, carry) = self.fresh_origin(plan, self.body_empty, false).await?;
                head_carry = carry;
                new
            }
        };
        // So is a stream of a shared HTTP/2 connection that its origin retired meanwhile.
        let retry_fresh =
            (pooled || origin.retry_safe) && self.body_empty && plan.replacement_body.is_none();

        let mut failure: Option<String> = None;
        let fd = origin.fd;
        let mut w = Segmented::new(
            &mut origin.io,
            plan.up_policy.clone(),
            plan.up_observer.clone(),
        )
        .reset_via(fd)
        .on_fault(plan.up_fault.clone())
        .with_carry(head_carry);
        // Below TLS, an intercepted flow's writer may hold bytes too: flush it when idle.
        let segmenting = !w.is_passthrough()
            || matches!(self.mode, Mode::Intercepted { up_policy, .. } if !up_policy.is_passthrough());
        let mut writer = BodyWriter::new(plan.body_out);
        if let Some(body) = &plan.replacement_body {
            // What was sent up is the replacement, whatever the hook read of the client's.
            self.record.bytes_up = body.len() as u64;
            if let Some(capture) = &mut self.record.capture {
                capture.request_body(body);
            }
            if let Err(e) = writer.write(&mut w, body).await {
                failure = Some(e.to_string());
            }
        } else {
            if plan.expects_continue && !self.request_body.is_done() {
                let _ = self
                    .client
                    .io
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await;
            }
            loop {
                let read = read_flushing(
                    self.request_body.next(self.client),
                    w.idle_work(),
                    segmenting,
                );
                let piece = match tokio::time::timeout(engine.config.idle_timeout, read).await {
                    Err(_) => {
                        let stalled = FlowError::cut("client stopped sending the request body");
                        return Err(FlowError {
                            outcome: Outcome::IdleTimeout,
                            ..stalled
                        });
                    }
                    Ok(Err(e)) => {
                        failure = Some(e.to_string());
                        break;
                    }
                    Ok(Ok(piece)) => piece.map_err(|e| body_read_failure(e, "request body"))?,
                };
                let Some(piece) = piece else { break };
                self.record.bytes_up += piece.len() as u64;
                if let Some(capture) = &mut self.record.capture {
                    capture.request_body(&piece);
                }
                if let Err(e) = writer.write(&mut w, &piece).await {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        if failure.is_none() {
            let trailers = self.request_body.take_trailers();
            if let Err(e) = writer.finish_with_trailers(&mut w, &trailers).await {
                failure = Some(e.to_string());
            }
        }
        if let Err(e) = w.flush().await {
            failure.get_or_insert(e.to_string());
        }
        drop(w);
        self.record.mark(Phase::Sent);
        Ok(Sent {
            origin,
            retry_fresh,
            failure,
        })
    }

    /// Who answers on this exchange's origin connection, as error messages name it.
    fn peer<'p>(&'p self, plan: &'p Plan) -> Peer<'p> {
        Peer {
            route: &plan.route,
            target: &self.target,
        }
    }

    /// A new origin connection with the request head written on it, and what the head's
    /// writer holds of a chunk not yet complete (for the body's writer). Whether the client's
    /// connection stays usable after a failure is `usable_if_unreached` for a destination
    /// that cannot be reached, `usable_if_unsent` for a head that cannot be sent.
    async fn fresh_origin(
        &mut self,
        plan: &Plan,
        usable_if_unreached: bool,
        usable_if_unsent: bool,
    ) -> Result<(OriginConn, Carry), FlowError> {
        let mut new = Box::pin(connect_origin(
            self.engine,
            &plan.route,
            &self.target,
            self.mode,
            plan.h2c.as_ref(),
            self.record,
        ))
        .await
        .map_err(|e| FlowError::answer(e.status(), e.to_string(), usable_if_unreached))?;
        let fd = new.fd;
        self.record.mark(Phase::SendStart);
        let mut w = Segmented::new(
            &mut new.io,
            plan.up_policy.clone(),
            plan.up_observer.clone(),
        )
        .reset_via(fd)
        .on_fault(plan.up_fault.clone());
        if let Err(e) = write_head(&mut w, &plan.encoded, plan.head_is_message).await {
            let peer = self.peer(plan);
            return Err(FlowError::answer(
                502,
                format!("sending request to {peer} failed: {e}"),
                usable_if_unsent,
            ));
        }
        let carry = w.take_carry();
        drop(w);
        if plan.head_is_message {
            self.record.mark(Phase::Sent);
        }
        self.watch_wire(&new);
        Ok((new, carry))
    }

    /// Intercepted flows record the encrypted chunks toward the origin: the origin
    /// connection's tap reports to this exchange's flow while it is in use.
    fn watch_wire(&self, origin: &OriginConn) {
        if let Some(tap) = &origin.wire_up {
            let observer = if self.plain() {
                None
            } else {
                self.record.observer("up")
            };
            tap.point_to(observer);
        }
    }

    /// The client connection can carry on after an error answer: its request body was read
    /// to the end (a body the handler replaced may still be unread) and nothing failed.
    fn client_reusable(&self, sent: &Sent) -> bool {
        self.request_body.is_done() && sent.failure.is_none()
    }

    /// Phase 4: the response head; interim 1xx answers (other than 101) are consumed.
    async fn response_head(
        &mut self,
        plan: &Plan,
        sent: &mut Sent,
    ) -> Result<ResponseHead, FlowError> {
        let engine = self.engine;
        let cfg = &engine.config;
        let client_reusable = self.client_reusable(sent);
        let timed = self.record.capture.is_some();
        let response = loop {
            let origin = &mut sent.origin;
            let record = &mut *self.record;
            let read = async move {
                // A capture marks the response's first byte, before its head is complete.
                if timed && origin.buf.is_empty() && origin.fill().await? > 0 {
                    record.mark(Phase::FirstByte);
                }
                origin.read_response_head(cfg.max_header_bytes).await
            };
            let r = tokio::time::timeout(cfg.response_timeout, read)
                .await
                .map_err(|_| {
                    let peer = self.peer(plan);
                    FlowError::answer(
                        504,
                        format!("no response from {peer} within {:?}", cfg.response_timeout),
                        client_reusable,
                    )
                })?;
            let r = match r {
                Err(HttpError::Closed) | Err(HttpError::Io(_)) if sent.retry_fresh => {
                    sent.retry_fresh = false;
                    // Only a request without a body is retried: its head is the whole
                    // message, so nothing is carried.
                    let (new, _) = self
                        .fresh_origin(plan, client_reusable, client_reusable)
                        .await?;
                    sent.origin = new;
                    continue;
                }
                r => r.map_err(|e| {
                    let peer = self.peer(plan);
                    let message = match e {
                        HttpError::Closed => {
                            format!("{peer} closed the connection without a response")
                        }
                        e => format!("bad response from {peer}: {e}"),
                    };
                    match &sent.failure {
                        Some(send) => FlowError::answer(
                            502,
                            format!("sending request body to {peer} failed: {send}"),
                            false,
                        ),
                        None => FlowError::answer(502, message, client_reusable),
                    }
                })?,
            };
            sent.retry_fresh = false;
            if (100..200).contains(&r.status) && r.status != 101 {
                continue;
            }
            break r;
        };
        if let Some(capture) = &mut self.record.capture {
            // Bytes already read with an earlier message: the head counts as the first byte.
            if capture.at(Phase::FirstByte).is_none() {
                capture.mark(Phase::FirstByte);
            }
        }
        if plan.via_upstream && response.status == 407 {
            let peer = self.peer(plan);
            // The credentials come from the rule, not the client: the client cannot fix this.
            return Err(FlowError::answer(
                502,
                format!(
                    "{peer} answered 407 {}: check the credentials in the rule's upstream=",
                    response.reason
                ),
                client_reusable,
            ));
        }
        self.record.status = response.status;
        Ok(response)
    }

    /// Phase 5: the response hooks, and the response head as the client gets it: re-framed
    /// as chunked when its length is unknown or a chunk hook may change it.
    async fn response_hooks(
        &mut self,
        plan: &Plan,
        send_failed: bool,
        response: ResponseHead,
    ) -> Result<ClientResponse, FlowError> {
        let engine = self.engine;
        let hooks = engine.hooks;
        let client_reusable = self.request_body.is_done() && !send_failed;
        let origin_kind = response_body_kind(&plan.method, &response).map_err(|m| {
            let peer = Peer {
                route: &plan.route,
                target: &self.target,
            };
            FlowError::answer(
                502,
                format!("bad response from {peer}: {m}"),
                client_reusable,
            )
        })?;
        let origin_keep_alive = !send_failed
            && origin_kind != BodyKind::CloseDelimited
            && !response.headers.has_token("connection", "close")
            && (response.version == 1 || response.headers.has_token("connection", "keep-alive"));

        // Transfer codings other than chunked are the message's; stripping the hop-by-hop
        // headers removes them, so the re-chunked response names them again.
        let rechunked_te = response
            .headers
            .contains("transfer-encoding")
            .then(|| chunked_transfer_encoding(&response.headers));
        // Hooks see Transfer-Encoding as the origin sent it (asyncio-https-proxy shows it);
        // the body is re-framed whatever they do with it.
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
            Box::pin(self.response_hook(&mut back, origin_te)).await?;
        }
        let mut keep_client = self.client_keep_alive && client_reusable && !engine.is_draining();
        let rewrites_body = hooks.response_chunk && origin_kind != BodyKind::Empty;
        let client_kind = match origin_kind {
            BodyKind::Length(n) if !rewrites_body => {
                back.headers.set("Content-Length", n.to_string());
                BodyKind::Length(n)
            }
            BodyKind::Empty => BodyKind::Empty,
            // HTTP/1.1, and HTTP/2 streams (`h2_server` reads the framing back).
            _ if self.client_version >= 1 => {
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
        if self.client_version == 0 && keep_client {
            back.headers.push("Connection", "keep-alive");
        } else if !keep_client {
            back.headers.push("Connection", "close");
        }
        if let Some(capture) = &mut self.record.capture {
            capture.response = Some(ResponseHeadCapture {
                status: back.status,
                reason: back.reason.clone(),
                version: back.version,
                headers: header_pairs(&back.headers),
            });
        }
        Ok(ClientResponse {
            head: back,
            origin_kind,
            client_kind,
            rewrites_body,
            keep_client,
            origin_keep_alive,
        })
    }

    /// The user's response hook: it may change the status, reason and headers.
    async fn response_hook(
        &mut self,
        back: &mut ResponseHead,
        origin_te: Vec<Header>,
    ) -> Result<(), FlowError> {
        let engine = self.engine;
        let handler = self.conn.handler(engine).expect("handler");
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
        self.record.status = back.status;
        Ok(())
    }

    /// Phase 6: the response head and body to the client (segmented where the policy says,
    /// through the chunk hook if there is one); then the origin connection back to the pool
    /// and the completion hook.
    async fn relay(
        &mut self,
        plan: Plan,
        sent: Sent,
        reply: ClientResponse,
    ) -> Result<Next, FlowError> {
        let engine = self.engine;
        let peer = Peer {
            route: &plan.route,
            target: &self.target,
        };
        let mut origin = sent.origin;
        let down_observer = self.record.observer("down");
        let mut to_client = Segmented::new(&mut self.client.io, plan.down_policy, down_observer)
            .reset_via(self.conn.client_fd)
            .on_fault(plan.down_fault.clone())
            .hold_first(plan.ttfb);
        let segmenting = !to_client.is_passthrough()
            || matches!(
                self.mode,
                Mode::Intercepted {
                    down_segmenting: true,
                    ..
                }
            );
        // A body already read with the head goes out with it, in one write (and one
        // segment): only when nothing segments, rewrites or re-frames it, so no wait delays
        // the head.
        let with_body = !segmenting
            && to_client.is_passthrough()
            && !reply.rewrites_body
            && matches!(reply.client_kind, BodyKind::Length(n) if n > 0)
            && !origin.buf.is_empty();
        let mut head_out = if with_body {
            // Room for the body read with the head, so joining them does not reallocate.
            let room = match reply.client_kind {
                BodyKind::Length(n) => origin
                    .buf
                    .len()
                    .min(usize::try_from(n).unwrap_or(usize::MAX)),
                _ => 0,
            };
            Some(reply.head.encode_with_room(room))
        } else {
            let head = reply.head.encode();
            to_client.write_all(&head).await.map_err(|e| {
                FlowError::client_gone(format!("writing response to client failed: {e}"))
            })?;
            None
        };

        let mut reader = BodyReader::new(reply.origin_kind);
        let mut writer = BodyWriter::new(reply.client_kind);
        loop {
            let read = read_flushing(reader.next(&mut origin), to_client.idle_work(), segmenting);
            let piece = tokio::time::timeout(engine.config.idle_timeout, read)
                .await
                .map_err(|_| {
                    FlowError::cut(format!("{peer} stalled in the middle of the response body"))
                })?
                .map_err(|e| {
                    FlowError::client_gone(format!("writing response to client failed: {e}"))
                })?
                .map_err(|e| FlowError::cut(format!("reading response body from {peer}: {e}")))?;
            let Some(piece) = piece else { break };
            let piece = if reply.rewrites_body {
                let handler = self.conn.handler(engine).expect("handler");
                match Box::pin(hook_reply(
                    engine,
                    handler.response_chunk(piece),
                    "on_response_chunk",
                    true,
                ))
                .await?
                {
                    Some(p) => p,
                    None => continue,
                }
            } else {
                piece
            };
            self.record.bytes_down += piece.len() as u64;
            if let Some(capture) = &mut self.record.capture {
                capture.response_body(&piece);
            }
            let written = match head_out.take() {
                Some(mut head) => {
                    head.extend_from_slice(&piece);
                    to_client.write_all(&head).await
                }
                None => writer.write(&mut to_client, &piece).await,
            };
            written.map_err(|e| {
                FlowError::client_gone(format!("writing response body to client failed: {e}"))
            })?;
        }
        if let Some(head) = head_out.take() {
            to_client.write_all(&head).await.map_err(|e| {
                FlowError::client_gone(format!("writing response to client failed: {e}"))
            })?;
        }
        // Trailers pass on when both sides are chunked (HTTP/2 streams read them back).
        let trailers = reader.take_trailers();
        writer
            .finish_with_trailers(&mut to_client, &trailers)
            .await
            .map_err(|e| {
                FlowError::client_gone(format!("writing response to client failed: {e}"))
            })?;
        to_client.flush().await.map_err(|e| {
            FlowError::client_gone(format!("writing response to client failed: {e}"))
        })?;
        drop(to_client);
        self.record.mark(Phase::Done);

        if reply.origin_keep_alive {
            if let Some(tap) = &origin.wire_up {
                tap.point_to(None);
            }
            engine.pool.put(plan.pool_key, origin);
        }
        if engine.hooks.any_response() {
            let handler = self.conn.handler(engine).expect("handler");
            Box::pin(hook_reply(
                engine,
                handler.response_complete(),
                "on_response_complete",
                true,
            ))
            .await?;
        }
        Ok(if reply.keep_client {
            Next::KeepAlive
        } else {
            Next::Close
        })
    }

    /// After `101 Switching Protocols` the connection carries another protocol: relay bytes,
    /// segmented like a tunnel's toward the origin (up) and the client (down).
    async fn upgrade(
        self,
        plan: Plan,
        sent: Sent,
        mut response: ResponseHead,
    ) -> Result<Next, FlowError> {
        let plain = self.plain();
        let down_observer = if plain {
            self.record.observer("down")
        } else {
            None
        };
        // A WebSocket goes message by message only for a handler with the message hook, and
        // only with extensions it can read; anything else stays a byte relay.
        let websocket = (self.engine.hooks.websocket_message
            && response.headers.has_token("upgrade", "websocket"))
        .then(|| negotiated_extensions(response.headers.get_all("sec-websocket-extensions")).ok())
        .flatten();
        let client = self.client;
        let origin = sent.origin;
        response.version = 1;
        strip_hop_by_hop(&mut response.headers, true);
        response.headers.push("Connection", "Upgrade");
        // The 101 head and the bytes after it are one segmented stream toward the client.
        let head_carry = {
            let mut head = Segmented::new(
                &mut client.io,
                plan.down_policy.clone(),
                down_observer.clone(),
            )
            .reset_via(self.conn.client_fd)
            .on_fault(plan.down_fault.clone());
            head.write_all(&response.encode())
                .await
                .and(head.progress().await)
                .map_err(|e| FlowError::client_gone(e.to_string()))?;
            head.take_carry()
        };
        self.record.kind = Kind::Upgrade;
        let client_prefix = client.buf.split().freeze();
        let origin_prefix = origin.buf.clone().freeze();
        let origin_fd = origin.fd;
        let client_side = Rewind::new(client_prefix, &mut client.io);
        let origin_side = Rewind::new(origin_prefix, origin.into_io());
        let (ar, aw) = tokio::io::split(client_side);
        let (br, bw) = tokio::io::split(origin_side);
        let bw = Segmented::new(bw, plan.up_policy, plan.up_observer)
            .reset_via(origin_fd)
            .on_fault(plan.up_fault);
        let aw = Segmented::new(aw, plan.down_policy, down_observer).with_carry(head_carry);
        if let Some(deflate) = websocket {
            let engine = self.engine;
            let handler = self
                .conn
                .handler(engine)
                .expect("a handler with the message hook");
            let (to_client, to_client_queue) = mpsc::unbounded_channel();
            let (to_server, to_server_queue) = mpsc::unbounded_channel();
            handler.websocket_opened(WebSocketInjector {
                to_client,
                to_server,
            });
            let hook = MessageHook {
                handler,
                waits: &engine.hook_waits,
                timeout: engine.config.hook_timeout,
                epoch: engine.sinks.epoch(),
                list_messages: self.record.records_chunks(),
            };
            let relayed = websocket::relay(
                (ar, aw),
                (br, bw),
                deflate,
                &hook,
                (to_client_queue, to_server_queue),
                engine.config.idle_timeout,
            )
            .await;
            handler.websocket_closed();
            let record = &mut *self.record;
            record.bytes_up += relayed.bytes_up;
            record.bytes_down += relayed.bytes_down;
            record.websocket_up = relayed.messages_up;
            record.websocket_down = relayed.messages_down;
            record.websocket_messages = relayed.messages;
            return match relayed.error {
                None => Ok(Next::Close),
                Some(f) if f.from_hook => Err(FlowError::cut_error(f.message).from_hook()),
                Some(f) => Err(FlowError::cut(f.message)),
            };
        }
        let buffer = if aw.is_passthrough() && bw.is_passthrough() {
            self.engine.config.tunnel_buffer_bytes
        } else {
            SEGMENTING_BUFFER
        };
        let (totals, _err) =
            pump((ar, aw), (br, bw), buffer, self.engine.config.idle_timeout).await;
        self.record.bytes_up += totals.a_to_b;
        self.record.bytes_down += totals.b_to_a;
        Ok(Next::Close)
    }
}

/// A new connection to the destination: TCP (direct or through an upstream proxy), and TLS
/// for intercepted flows, with the intercepted flow's up-policy segmenting the encrypted bytes.
async fn connect_origin(
    engine: &Engine,
    route: &Route,
    target: &Target,
    mode: &Mode,
    h2c: Option<&SegmentPolicy>,
    record: &mut Flow,
) -> Result<OriginConn, ConnectError> {
    if let Some(policy) = h2c {
        return connect_h2c(engine, target, policy, record).await;
    }
    // A capture marks each step; other flows read no clock here.
    let mut times = record.capture.is_some().then(|| {
        record.mark(Phase::ConnectStart);
        ConnectTimes::default()
    });
    if target.scheme != "https" {
        let c = match route {
            Route::Direct => {
                let c = engine
                    .connector
                    .tcp(&target.host, target.port, times.as_mut())
                    .await?;
                record.dns = c.dns.clone().into();
                c
            }
            Route::Upstream(hop) if hop.is_http() => {
                let c = engine.connector.tcp_to_hop(hop, times.as_mut()).await?;
                record.dns = format!("via {hop}").into();
                c
            }
            Route::Upstream(_) => {
                // A SOCKS5 hop: its handshake reads exactly its replies, so nothing is left
                // in the head buffer and the plain stream carries on.
                let (tunnel, dns) = engine
                    .connector
                    .open_tunnel(route, &target.host, target.port, times.as_mut())
                    .await?;
                debug_assert!(tunnel.buf.is_empty());
                record.dns = dns.clone().into();
                Connected {
                    stream: tunnel.io,
                    dns,
                }
            }
        };
        let peer = connected(record, times);
        let fd = raw_socket(&c.stream);
        let mut conn = OriginConn::new(Box::new(c.stream));
        conn.fd = fd;
        conn.peer = peer;
        return Ok(conn);
    }
    // An HTTP/2 connection already open to this destination takes another stream.
    let up_policy = match mode {
        Mode::Intercepted { up_policy, .. } => up_policy.clone(),
        Mode::Proxy => SegmentPolicy::none(),
    };
    let h2_key = super::h2_client::key(&target.authority(), route, &up_policy.describe());
    let max_head = engine.config.max_header_bytes;
    let wait = engine.config.connect_timeout;
    if let Some(conn) = engine
        .h2_origins
        .reuse(&h2_key, wait, max_head, "https")
        .await
    {
        return Ok(conn);
    }
    let (tcp, dns) = engine
        .connector
        .open_tunnel(route, &target.host, target.port, times.as_mut())
        .await?;
    record.dns = dns.into();
    let peer = connected(record, times);
    // A pooled connection serves later requests too: its chunks are reported to whichever
    // request's flow is using it (`Exchange::watch_wire` points the tap).
    let tap = engine.sinks.records_chunks().then(WireTap::default);
    let on_fault = record.fault_observer("up", &up_policy);
    let fd = raw_socket(&tcp.io);
    let io = Segmented::new(tcp.io, up_policy, tap.as_ref().map(WireTap::observer))
        .reset_via(fd)
        .on_fault(on_fault);
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
        refused: false,
        reason: e.to_string(),
    })?;
    record.mark(Phase::TlsEnd);
    let mut conn = if tls::negotiated_h2(&tls) {
        engine
            .h2_origins
            .start(h2_key, tls, max_head, "https")
            .await
            .map_err(|e| ConnectError::Connect {
                target: target.authority(),
                refused: false,
                reason: format!("HTTP/2 handshake failed: {e}"),
            })?
    } else {
        OriginConn::new(Box::new(tls))
    };
    conn.wire_up = tap;
    conn.peer = peer;
    Ok(conn)
}

/// `h2c=yes`: plain HTTP in HTTP/2 over cleartext with prior knowledge, on one connection
/// per destination and policy shared by its exchanges; the policy segments its bytes.
async fn connect_h2c(
    engine: &Engine,
    target: &Target,
    policy: &SegmentPolicy,
    record: &mut Flow,
) -> Result<OriginConn, ConnectError> {
    let key = super::h2_client::key(&target.authority(), &Route::Direct, &policy.describe());
    let key = format!("h2c|{key}");
    let max_head = engine.config.max_header_bytes;
    let wait = engine.config.connect_timeout;
    if let Some(conn) = engine.h2_origins.reuse(&key, wait, max_head, "http").await {
        return Ok(conn);
    }
    let c = engine
        .connector
        .tcp(&target.host, target.port, None)
        .await?;
    record.dns = c.dns.clone().into();
    let tap = engine.sinks.records_chunks().then(WireTap::default);
    let on_fault = record.fault_observer("up", policy);
    let fd = raw_socket(&c.stream);
    let io = Segmented::new(
        c.stream,
        policy.clone(),
        tap.as_ref().map(WireTap::observer),
    )
    .reset_via(fd)
    .on_fault(on_fault);
    let mut conn = engine
        .h2_origins
        .start(key, io, max_head, "http")
        .await
        .map_err(|e| ConnectError::Connect {
            target: target.authority(),
            refused: false,
            reason: format!("HTTP/2 over cleartext (h2c=yes) failed: {e}"),
        })?;
    conn.wire_up = tap;
    Ok(conn)
}

/// A capture's connection steps: the name resolved, TCP connected (now); the address
/// reached, for the connection to keep.
fn connected(record: &mut Flow, times: Option<ConnectTimes>) -> Option<std::net::SocketAddr> {
    let (Some(capture), Some(times)) = (record.capture.as_deref_mut(), times) else {
        return None;
    };
    if let Some(at) = times.resolved {
        capture.mark_at(Phase::DnsEnd, at);
    }
    capture.mark(Phase::ConnectEnd);
    capture.server = times.addr;
    times.addr
}

/// Starts the flow's capture when its rule's `capture=` (or, unset, the server's
/// `capture_bodies`) asks for one and flow records are kept: captures live in them.
fn begin_capture(
    engine: &Engine,
    record: &mut Flow,
    rule_says: Option<bool>,
    head: &RequestHead,
    target: &Target,
) {
    let server_limit = engine.config.capture_bodies;
    if !rule_says.unwrap_or(server_limit > 0) || !engine.sinks.records_chunks() {
        return;
    }
    let limit = if server_limit > 0 {
        server_limit
    } else {
        DEFAULT_BODY_LIMIT
    };
    let mut capture = Capture::new(engine.sinks.epoch(), limit);
    capture.request = Some(request_capture(head, target));
    record.capture = Some(Box::new(capture));
}

/// A request head as a capture keeps it, with the request's absolute URL.
fn request_capture(head: &RequestHead, target: &Target) -> RequestHeadCapture {
    RequestHeadCapture {
        method: head.method.clone(),
        url: target.url(),
        version: head.version,
        headers: header_pairs(&head.headers),
    }
}

/// Who answers on an origin connection, as error messages name it: the destination, or the
/// upstream proxy when plain HTTP goes through one.
struct Peer<'a> {
    route: &'a Route,
    target: &'a Target,
}

impl std::fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.route {
            Route::Upstream(hop) if self.target.scheme != "https" && hop.is_http() => {
                write!(f, "upstream proxy {hop} (for {})", self.target.authority())
            }
            Route::Upstream(hop) => write!(
                f,
                "{} (through upstream {})",
                self.target.authority(),
                hop.describe()
            ),
            Route::Direct => f.write_str(&self.target.authority()),
        }
    }
}
