//! One HTTP exchange on a client connection, plain or intercepted: request hooks, the rule
//! decision, the origin (pooled, direct or through an upstream proxy), the response head and
//! hooks, then both bodies streamed (segmented where a policy says) and upgrades relayed.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::access::{now_epoch, AccessRecord, Kind, Outcome, PendingRecord};
use super::connector::{ConnectError, Io, Rewind, Route};
use super::decision::{decide, route_for};
use super::flow_error::{await_hook, FlowError};
use super::flows::{FlowHandle, FlowRecord};
use super::hooks::{ForwardOrder, HandlerCommand, Reply, RequestParts, ResponseParts};
use super::http1::{
    chunked_transfer_encoding, request_body_kind, response_body_kind, strip_hop_by_hop, BodyKind,
    BodyReader, BodyWriter, BufStream, HttpError, RawResponse, RequestHead, ResponseHead,
};
use super::pool::OriginConn;
use super::respond::{reason_phrase, send_error};
use super::rules::{Action, Scheme};
use super::segment::{read_flushing, Carry, ChunkObserver, SegmentPolicy, Segmented};
use super::session::{ConnState, Mode};
use super::state::Engine;
use super::target::{request_target, Target};
use super::tls;
use super::tunnel::pump;
use super::tunnel::SEGMENTING_BUFFER;

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
    let mut record = PendingRecord::new(
        &engine.access,
        &engine.closing,
        AccessRecord {
            id: conn.info.next_id(),
            client: Some(conn.info.peer),
            method: head.method.clone(),
            target: head.target.clone(),
            kind: if matches!(mode, Mode::Proxy) {
                Kind::Forward
            } else {
                Kind::Intercept
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
            kind: record.kind,
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
            if !failure.handler_knows {
                conn.report_error(engine, &failure.message);
            }
            match failure.status {
                Some(status) => {
                    record.status = status;
                    let keep = failure.client_usable && !engine.is_draining();
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
) -> Result<Next, FlowError> {
    let cfg = &engine.config;
    let hooks = engine.hooks;
    let body_kind = request_body_kind(&head).map_err(|m| FlowError::answer(400, m, false))?;
    let body_empty = body_kind == BodyKind::Empty;
    let mut target =
        request_target(&head, mode).map_err(|m| FlowError::answer(400, m, body_empty))?;
    record.target = target.url();
    if target.scheme == "https" && matches!(mode, Mode::Proxy) {
        return Err(FlowError::answer(
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
                        FlowError::cut_error(msg)
                    } else {
                        FlowError::answer(504, msg, false)
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
                        FlowError::client_gone(format!("writing to client failed: {e}"))
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
                        record.kind = Kind::Handler;
                        let keep = raw.reusable(&head.method)
                            && request_body.is_done()
                            && client_keep_alive;
                        return Ok(if keep { Next::KeepAlive } else { Next::Close });
                    }
                    return Err(FlowError::answer(
                        502,
                        "the handler returned without forwarding or answering the request",
                        request_body.is_done(),
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
        )
        .into();
    }
    if let Action::Block { reason } = &decision.action {
        record.kind = Kind::Block;
        return Err(FlowError::answer(
            403,
            format!("blocked by rule {}: {reason}", record.rule),
            body_empty,
        ));
    }
    engine.filter.check_host(&target.host).map_err(|reason| {
        FlowError::answer(
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
                    FlowError::answer(status, e.to_string(), body_empty)
                })?;
            let mut w = Segmented::new(&mut new.io, up_policy.clone(), up_observer.clone());
            write_head(&mut w, &encoded, head_is_message)
                .await
                .map_err(|e| {
                    FlowError::answer(502, format!("sending request to {peer} failed: {e}"), false)
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
                        let stalled = FlowError::cut("client stopped sending the request body");
                        return Err(FlowError {
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
        Some(send) => FlowError::answer(
            502,
            format!("sending request body to {peer} failed: {send}"),
            false,
        ),
        None => FlowError::answer(502, e, client_reusable),
    };

    // Response head; interim 1xx answers (other than 101) are consumed.
    let response = loop {
        let r = tokio::time::timeout(
            cfg.response_timeout,
            origin.read_response_head(cfg.max_header_bytes),
        )
        .await
        .map_err(|_| {
            FlowError::answer(
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
                    .map_err(|e| FlowError::answer(e.status(), e.to_string(), client_reusable))?;
                let mut w = Segmented::new(&mut new.io, up_policy.clone(), up_observer.clone());
                w.write_all(&encoded)
                    .await
                    .and(w.flush().await)
                    .map_err(|e| {
                        FlowError::answer(
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
        return Err(FlowError::answer(
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
        FlowError::answer(
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
    // A body already read with the head goes out with it, in one write (and one segment):
    // only when nothing segments, rewrites or re-frames it, so no wait delays the head.
    let mut head_out = Some(back.encode());
    let with_body = !segmenting
        && to_client.is_passthrough()
        && !rewrites_body
        && matches!(client_kind, BodyKind::Length(n) if n > 0)
        && !origin.buf.is_empty();
    if !with_body {
        let head = head_out.take().unwrap_or_default();
        to_client.write_all(&head).await.map_err(|e| {
            FlowError::client_gone(format!("writing response to client failed: {e}"))
        })?;
    }

    let mut reader = BodyReader::new(origin_kind);
    let mut writer = BodyWriter::new(client_kind);
    loop {
        let read = read_flushing(reader.next(&mut origin), to_client.idle_flush(), segmenting);
        let piece = tokio::time::timeout(cfg.idle_timeout, read)
            .await
            .map_err(|_| {
                FlowError::cut(format!("{peer} stalled in the middle of the response body"))
            })?
            .map_err(|e| FlowError::client_gone(format!("writing response to client failed: {e}")))?
            .map_err(|e| FlowError::cut(format!("reading response body from {peer}: {e}")))?;
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
    writer
        .finish(&mut to_client)
        .await
        .map_err(|e| FlowError::client_gone(format!("writing response to client failed: {e}")))?;
    to_client
        .flush()
        .await
        .map_err(|e| FlowError::client_gone(format!("writing response to client failed: {e}")))?;
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
                record.dns = c.dns.into();
                Box::new(c.stream)
            }
            Route::Upstream(hop) => {
                let c = engine.connector.tcp_to_hop(hop).await?;
                record.dns = format!("via {hop}").into();
                Box::new(c.stream)
            }
        };
        return Ok(BufStream::new(stream));
    }
    let (tcp, dns) = engine
        .connector
        .open_tunnel(route, &target.host, target.port)
        .await?;
    record.dns = dns.into();
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
) -> Result<Next, FlowError> {
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
            .map_err(|e| FlowError::client_gone(e.to_string()))?;
        head.take_carry()
    };
    record.kind = Kind::Upgrade;
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
