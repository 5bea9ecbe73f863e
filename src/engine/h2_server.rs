//! HTTP/2 from clients of an intercepted CONNECT (ALPN `h2`), framed by the `h2` crate.
//!
//! Each stream is one exchange with its own state and handler: the stream is presented to
//! `exchange::forward` as a one-request HTTP/1.1 client over an in-memory pipe, so rules,
//! hooks, the origin path and flow records are the HTTP/1.1 ones; this module only turns
//! the stream's request into that request and the answer back into the stream's response,
//! both bodies streamed under HTTP/2 flow control.
//!
//! Limits against abuse: at most `MAX_CONCURRENT_STREAMS` streams at once, a header list of at
//! most `max_header_bytes` (h2 0.4.4 and later stop a CONTINUATION flood at that size and
//! cap the number of CONTINUATION frames), the crate's reset-stream limits, and our own guard
//! that ends a connection whose client resets more streams than it lets finish
//! (CVE-2023-44487, rapid reset) with GOAWAY `ENHANCE_YOUR_CALM`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::connect::InterceptedStream;
use super::connector::Rewind;
use super::exchange::forward;
use super::h2_client::{send_data, trailer_lines, trailer_map};
use super::http1::{
    response_body_kind, strip_hop_by_hop, BodyKind, BodyReader, BufStream, Headers, RequestHead,
};
use super::session::{ConnState, Mode};
use super::state::Engine;

/// Streams a client may have open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Streams the client reset before they were accepted, queued at most (the crate's guard).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams we reset for the client's protocol errors before the connection ends.
const MAX_LOCAL_ERROR_RESETS: usize = 256;
/// Client resets tolerated before the guard compares them with finished streams.
pub const RAPID_RESET_BUDGET: u32 = 200;
/// Room in the pipe between a stream and its exchange; beyond it, flow control holds the peer.
const PIPE_BYTES: usize = 64 * 1024;

/// Whether the client chose HTTP/2 in the intercepted TLS handshake.
pub fn negotiated(stream: &BufStream<InterceptedStream>) -> bool {
    stream.io.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// Serves an intercepted connection that speaks HTTP/2, until it closes: each stream in a task
/// of its own.
pub async fn serve(
    engine: &Arc<Engine>,
    client: BufStream<InterceptedStream>,
    conn: &ConnState,
    mode: &Mode,
) {
    let cfg = &engine.config;
    let BufStream { io, buf } = client;
    let io = Rewind::new(buf.freeze(), io);
    let header_list = u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX);
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(header_list)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(io);
    let peer = conn.info.peer;
    let mut h2 = match tokio::time::timeout(cfg.header_timeout, handshake).await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            log::info!("client {peer}: HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            log::info!("client {peer}: HTTP/2 preface not received in time");
            return;
        }
    };
    let guard = Arc::new(ResetGuard::default());
    let mut streams = JoinSet::new();
    let mut draining = engine.draining.clone();
    let mut closing = false;
    loop {
        let idle = streams.is_empty() && !closing;
        tokio::select! {
            accepted = h2.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let stream = Stream {
                        engine: engine.clone(),
                        mode: mode.clone(),
                        conn_id: conn.info.id,
                        peer,
                        guard: guard.clone(),
                    };
                    streams.spawn(stream.serve(request, respond));
                }
                Some(Err(e)) => {
                    log::info!("client {peer}: HTTP/2 connection ended: {e}");
                    break;
                }
                None => break,
            },
            Some(_) = streams.join_next() => {}
            _ = guard.tripped.notified(), if !closing => {
                log::warn!(
                    "client {peer}: {} streams reset by the client, {} finished: closing the \
                     HTTP/2 connection (rapid reset guard)",
                    guard.resets.load(Ordering::Relaxed),
                    guard.finished.load(Ordering::Relaxed),
                );
                h2.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                closing = true;
            }
            _ = draining.wait_for(|d| *d), if !closing => {
                h2.graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(cfg.idle_timeout), if idle => {
                h2.graceful_shutdown();
                closing = true;
            }
        }
    }
    // The connection is gone: the streams' exchanges end (and are recorded) on their own.
    while streams.join_next().await.is_some() {}
}

/// Counts the streams a client reset against those that finished: many resets and few
/// answers is the rapid reset attack, which costs us an exchange per stream and the client
/// nothing.
#[derive(Default)]
struct ResetGuard {
    resets: AtomicU32,
    finished: AtomicU32,
    tripped: Notify,
}

impl ResetGuard {
    fn reset(&self) {
        let resets = self.resets.fetch_add(1, Ordering::Relaxed) + 1;
        if resets > RAPID_RESET_BUDGET && resets > self.finished.load(Ordering::Relaxed) {
            self.tripped.notify_one();
        }
    }

    fn finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a stream's task needs of its connection.
struct Stream {
    engine: Arc<Engine>,
    mode: Mode,
    conn_id: u64,
    peer: SocketAddr,
    guard: Arc<ResetGuard>,
}

/// How a stream's bridge ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The response went out whole.
    Done,
    /// The client reset the stream.
    ClientReset,
    /// The exchange ended without a whole response (we reset the stream), or the
    /// connection failed.
    Failed,
}

impl Stream {
    async fn serve(self, request: http::Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        let stream_id = respond.stream_id().as_u32();
        let (parts, body) = request.into_parts();
        if parts.method == http::Method::CONNECT {
            let refusal = http::Response::builder()
                .status(501)
                .body(())
                .expect("a status is a valid response");
            let _ = respond.send_response(refusal, true);
            return;
        }
        let (head, chunked) = request_head(&parts, body.is_end_stream());
        let method = head.method.clone();
        // Each stream has its own state, hence its own handler instance and flow id.
        let mut conn = ConnState::new(self.conn_id, self.peer);
        conn.info.stream = Some(stream_id);
        let (exchange_side, bridge_side) = tokio::io::duplex(PIPE_BYTES);
        let engine = &self.engine;
        let exchange = async {
            let mut client = BufStream::new(exchange_side);
            forward(engine, &mut client, head, &mut conn, &self.mode).await;
            // The pipe closes: the bridge reads the end of the answer.
            let _ = client.io.shutdown().await;
        };
        let max_head = engine.config.max_header_bytes;
        let bridge = bridge(bridge_side, body, chunked, respond, &method, max_head);
        let ((), end) = tokio::join!(exchange, bridge);
        match end {
            End::Done => self.guard.finished(),
            End::ClientReset => self.guard.reset(),
            End::Failed => {}
        }
    }
}

/// The request head the exchange reads: origin-form target, `Host` from `:authority`, cookie
/// fields joined (HTTP/2 may split them), and chunked framing when the body's length is not
/// given. Version 2 tells hooks the client spoke HTTP/2.
fn request_head(parts: &http::request::Parts, body_ends: bool) -> (RequestHead, bool) {
    let mut headers = Headers::default();
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            headers.push("Host", authority.as_str().to_string());
        }
    }
    let mut cookies: Vec<&[u8]> = Vec::new();
    for (name, value) in &parts.headers {
        if name == http::header::COOKIE {
            cookies.push(value.as_bytes());
        } else {
            headers.push(name.as_str(), Bytes::copy_from_slice(value.as_bytes()));
        }
    }
    if !cookies.is_empty() {
        headers.push("Cookie", Bytes::from(cookies.join(&b"; "[..])));
    }
    let chunked = !body_ends && !headers.contains("content-length");
    if chunked {
        headers.push("Transfer-Encoding", "chunked");
    }
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
        .to_string();
    let head = RequestHead {
        method: parts.method.as_str().to_string(),
        target,
        version: 2,
        headers,
    };
    (head, chunked)
}

/// Carries one stream's request body into the pipe and the exchange's answer back out as the
/// stream's response. Returning drops the pipe, so an exchange still running sees its client
/// gone.
async fn bridge(
    pipe: DuplexStream,
    body: RecvStream,
    chunked: bool,
    mut respond: SendResponse<Bytes>,
    method: &str,
    max_head: usize,
) -> End {
    let (from_exchange, to_exchange) = tokio::io::split(pipe);
    let upload = upload(body, to_exchange, chunked);
    let download = download(from_exchange, &mut respond, method, max_head);
    tokio::pin!(upload, download);
    let mut uploading = true;
    loop {
        tokio::select! {
            sent = &mut upload, if uploading => {
                uploading = false;
                if sent == End::ClientReset {
                    return End::ClientReset;
                }
            }
            end = &mut download => return end,
        }
    }
}

/// The request body, frame by frame, into the pipe (chunked when its length was not given);
/// flow-control capacity is released as each frame is taken by the exchange; trailers end a
/// chunked body.
async fn upload(mut body: RecvStream, mut pipe: WriteHalf<DuplexStream>, chunked: bool) -> End {
    while let Some(frame) = body.data().await {
        let data = match frame {
            Ok(data) => data,
            Err(e) if e.is_reset() || e.is_io() || e.is_go_away() => return End::ClientReset,
            Err(_) => return End::Failed,
        };
        let n = data.len();
        let written = if chunked && n > 0 {
            let mut framed = format!("{n:x}\r\n").into_bytes();
            framed.extend_from_slice(&data);
            framed.extend_from_slice(b"\r\n");
            pipe.write_all(&framed).await
        } else {
            pipe.write_all(&data).await
        };
        if written.is_err() {
            // The exchange stopped reading (it answered early or failed): not the client's doing.
            return End::Failed;
        }
        let _ = body.flow_control().release_capacity(n);
    }
    if chunked {
        let mut end = b"0\r\n".to_vec();
        match body.trailers().await {
            Ok(Some(trailers)) => end.extend_from_slice(&trailer_lines(&trailers)),
            Ok(None) => {}
            Err(_) => return End::ClientReset,
        }
        end.extend_from_slice(b"\r\n");
        if pipe.write_all(&end).await.is_err() {
            return End::Failed;
        }
    }
    End::Done
}

/// The exchange's answer, read back from the pipe, as the stream's response: interim answers
/// skipped, hop-by-hop fields dropped (HTTP/2 forbids them), the body sent as the client's
/// window allows. An answer cut short resets the stream, so the client never takes it for
/// whole.
async fn download(
    pipe: ReadHalf<DuplexStream>,
    respond: &mut SendResponse<Bytes>,
    method: &str,
    max_head: usize,
) -> End {
    let mut answer = BufStream::new(pipe);
    let head = loop {
        let read = tokio::select! {
            read = answer.read_response_head(max_head) => read,
            _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return End::ClientReset,
        };
        match read {
            Ok(head) if (100..200).contains(&head.status) => continue,
            Ok(head) => break head,
            Err(e) => {
                log::debug!("HTTP/2 stream: no answer from the exchange: {e}");
                respond.send_reset(Reason::INTERNAL_ERROR);
                return End::Failed;
            }
        }
    };
    let Ok(kind) = response_body_kind(method, &head) else {
        respond.send_reset(Reason::INTERNAL_ERROR);
        return End::Failed;
    };
    let mut fields = head.headers;
    strip_hop_by_hop(&mut fields, false);
    let mut response = http::Response::builder().status(head.status);
    for field in &fields.0 {
        if field.name.eq_ignore_ascii_case("host") {
            continue;
        }
        response = response.header(field.name.as_str(), field.value.as_ref());
    }
    let response = match response.body(()) {
        Ok(r) => r,
        Err(e) => {
            log::info!("HTTP/2 stream: the response cannot be sent as HTTP/2: {e}");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return End::Failed;
        }
    };
    let empty = kind == BodyKind::Empty;
    let mut out = match respond.send_response(response, empty) {
        Ok(out) => out,
        Err(e) => return client_error(&e),
    };
    if empty {
        return End::Done;
    }
    let mut reader = BodyReader::new(kind);
    loop {
        match reader.next(&mut answer).await {
            Ok(Some(piece)) => {
                if let Err(e) = send_data(&mut out, piece).await {
                    return stream_error(&e, &mut out);
                }
            }
            Ok(None) => break,
            Err(e) => {
                log::debug!("HTTP/2 stream: response body cut: {e}");
                out.send_reset(Reason::INTERNAL_ERROR);
                return End::Failed;
            }
        }
    }
    let trailers = reader.take_trailers();
    let ended = if trailers.is_empty() {
        out.send_data(Bytes::new(), true)
    } else {
        out.send_trailers(trailer_map(&trailers))
    };
    match ended {
        Ok(()) => End::Done,
        Err(e) => stream_error(&e, &mut out),
    }
}

/// How an h2 error on a stream counts: the client's reset, or a failure.
fn client_error(e: &h2::Error) -> End {
    if e.is_reset() || e.is_remote() {
        End::ClientReset
    } else {
        End::Failed
    }
}

/// How a failure to send on a stream counts: a stream the client reset reports only that it
/// is closed, so ask the stream whether a reset arrived.
fn stream_error(e: &h2::Error, out: &mut h2::SendStream<Bytes>) -> End {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match out.poll_reset(&mut cx) {
        std::task::Poll::Ready(Ok(_)) => End::ClientReset,
        _ => client_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_request_becomes_an_origin_form_head() {
        let request = http::Request::builder()
            .method("POST")
            .uri("https://example.com:8443/a?b=c")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-one", "1")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let (head, chunked) = request_head(&parts, false);
        assert!(chunked);
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/a?b=c");
        assert_eq!(head.version, 2);
        assert_eq!(head.headers.get("host"), Some("example.com:8443"));
        assert_eq!(head.headers.get("cookie"), Some("a=1; b=2"));
        assert_eq!(head.headers.get("transfer-encoding"), Some("chunked"));
        let (head, chunked) = request_head(&parts, true);
        assert!(!chunked && !head.headers.contains("transfer-encoding"));
    }
}
