//! HTTP/2 to origins that choose it in the TLS handshake (ALPN `h2`), framed by the `h2`
//! crate. One HTTP/2 connection per destination (and route and segmentation) carries the
//! streams of all exchanges going there at once.
//!
//! An exchange still speaks HTTP/1.1 to its origin connection: here that connection is an
//! in-memory pipe to a task that sends each request as a stream and writes the stream's
//! response back in HTTP/1.1 framing, so the exchange's phases, hooks and pool are the ones
//! every origin gets. Bodies go under HTTP/2 flow control; GOAWAY is the crate's: streams
//! the origin did not take fail, and the connection is no longer offered to new exchanges.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream};

use super::connector::Route;
use super::http1::{
    request_body_kind, strip_hop_by_hop, BodyKind, BodyReader, BufStream, Headers, RequestHead,
    ResponseHead,
};
use super::pool::OriginConn;
use super::respond::reason_phrase;

/// Room in the pipe between an exchange and its stream; beyond it, flow control holds.
const PIPE_BYTES: usize = 64 * 1024;

/// The HTTP/2 connections to origins, one per key, while they last.
#[derive(Default)]
pub struct H2Origins {
    conns: Mutex<HashMap<String, (u64, SendRequest<Bytes>)>>,
    next_id: AtomicU64,
}

/// Which exchanges may share an HTTP/2 connection: same destination, route and segmentation
/// of the encrypted bytes (as for pooled HTTP/1.1 connections).
pub fn key(authority: &str, route: &Route, segmentation: &str) -> String {
    let via = match route {
        Route::Direct => String::new(),
        Route::Upstream(hop) => hop.to_string(),
    };
    format!("{authority}|{via}|{segmentation}")
}

impl H2Origins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, SendRequest<Bytes>)>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An origin connection on the live HTTP/2 connection for `key`, once it takes another
    /// stream (within `wait`); None when there is none or it is closing.
    pub async fn reuse(
        self: &Arc<Self>,
        key: &str,
        wait: Duration,
        max_head: usize,
        scheme: &'static str,
    ) -> Option<OriginConn> {
        let (id, send) = self.lock().get(key).cloned()?;
        match tokio::time::timeout(wait, send.ready()).await {
            Ok(Ok(send)) => {
                Some(self.origin_conn(send, Retire(key.to_string(), id), max_head, scheme))
            }
            _ => {
                self.forget(key, id);
                None
            }
        }
    }

    /// Starts HTTP/2 on a new connection (TLS whose ALPN said `h2`, or cleartext with prior
    /// knowledge for `scheme` "http"), keeps it for `key`, and returns an origin connection
    /// on it.
    pub async fn start<IO>(
        self: &Arc<Self>,
        key: String,
        io: IO,
        max_head: usize,
        scheme: &'static str,
    ) -> Result<OriginConn, h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let header_list = u32::try_from(max_head).unwrap_or(u32::MAX);
        let (send, connection) = h2::client::Builder::new()
            .max_header_list_size(header_list)
            .handshake::<_, Bytes>(io)
            .await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key.clone(), (id, send.clone()));
        let origins = self.clone();
        let retire = Retire(key.clone(), id);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("HTTP/2 connection to {key} ended: {e}");
            }
            origins.forget(&key, id);
        });
        Ok(self.origin_conn(send, retire, max_head, scheme))
    }

    /// An origin connection whose requests go out as streams on `send`'s connection.
    fn origin_conn(
        self: &Arc<Self>,
        send: SendRequest<Bytes>,
        retire: Retire,
        max_head: usize,
        scheme: &'static str,
    ) -> OriginConn {
        let (exchange_side, bridge_side) = tokio::io::duplex(PIPE_BYTES);
        let bridge = serve_requests(bridge_side, send, max_head, scheme);
        let origins = self.clone();
        tokio::spawn(async move {
            // A stream that failed (GOAWAY, closed): the connection is not offered again,
            // before the exchange sees its origin close (and may send once more).
            let (served, pipe) = bridge.await;
            if !served {
                origins.forget(&retire.0, retire.1);
            }
            drop(pipe);
        });
        let mut conn = OriginConn::new(Box::new(exchange_side));
        conn.retry_safe = true;
        conn
    }

    fn forget(&self, key: &str, id: u64) {
        let mut conns = self.lock();
        if conns.get(key).is_some_and(|(current, _)| *current == id) {
            conns.remove(key);
        }
    }
}

/// Which connection of the registry an origin connection rides on.
struct Retire(String, u64);

/// Serves the HTTP/1.1 requests an exchange writes into the pipe, each as one stream, until
/// the pipe or the HTTP/2 connection closes (closing the pipe: the exchange sees the origin
/// close, and retries a request without a body on a fresh connection). Returns false when a
/// stream failed, with the pipe, for the caller to close.
async fn serve_requests(
    pipe: DuplexStream,
    send: SendRequest<Bytes>,
    max_head: usize,
    scheme: &'static str,
) -> (bool, BufStream<DuplexStream>) {
    let mut pipe = BufStream::new(pipe);
    loop {
        let Ok(head) = pipe.read_request_head(max_head).await else {
            return (true, pipe);
        };
        if let Err(e) = one_request(&mut pipe, &send, head, scheme).await {
            log::debug!("HTTP/2 stream to the origin failed: {e}");
            return (false, pipe);
        }
    }
}

async fn one_request(
    pipe: &mut BufStream<DuplexStream>,
    send: &SendRequest<Bytes>,
    head: RequestHead,
    scheme: &str,
) -> Result<(), String> {
    let kind = request_body_kind(&head)?;
    let is_head = head.method.eq_ignore_ascii_case("HEAD");
    let request = stream_request(head, scheme)?;
    let mut send = send.clone().ready().await.map_err(|e| e.to_string())?;
    let (response, mut upload) = send
        .send_request(request, kind == BodyKind::Empty)
        .map_err(|e| e.to_string())?;
    if kind != BodyKind::Empty {
        let mut reader = BodyReader::new(kind);
        while let Some(piece) = reader.next(pipe).await.map_err(|e| e.to_string())? {
            send_data(&mut upload, piece)
                .await
                .map_err(|e| e.to_string())?;
        }
        let trailers = reader.take_trailers();
        if trailers.is_empty() {
            upload.send_data(Bytes::new(), true)
        } else {
            upload.send_trailers(trailer_map(&trailers))
        }
        .map_err(|e| e.to_string())?;
    }
    let response = response.await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let mut headers = Headers::default();
    for (name, value) in &parts.headers {
        headers.push(name.as_str(), Bytes::copy_from_slice(value.as_bytes()));
    }
    let status = parts.status.as_u16();
    let has_length = headers.contains("content-length");
    let bodiless = is_head || status == 204 || status == 304;
    // Chunked when the length is unknown, or when trailers are announced (only the chunked
    // framing carries them on).
    let chunked =
        !body.is_end_stream() && !bodiless && (!has_length || headers.contains("trailer"));
    if chunked {
        headers.remove("content-length");
        headers.push("Transfer-Encoding", "chunked");
    } else if body.is_end_stream() && !has_length && !bodiless {
        headers.push("Content-Length", "0");
    }
    let head = ResponseHead {
        version: 1,
        status,
        reason: reason_phrase(status).to_string(),
        headers,
    };
    pipe.io
        .write_all(&head.encode())
        .await
        .map_err(|e| e.to_string())?;
    download(pipe, body, chunked).await
}

/// The request as a stream's: an absolute URI (`:authority` from `Host`), no hop-by-hop
/// fields (HTTP/2 forbids them).
fn stream_request(head: RequestHead, scheme: &str) -> Result<http::Request<()>, String> {
    let mut fields = head.headers;
    strip_hop_by_hop(&mut fields, false);
    let authority = fields
        .get("host")
        .ok_or("a request to an HTTP/2 origin needs a Host")?
        .to_string();
    let uri = format!("{scheme}://{authority}{}", head.target);
    let mut request = http::Request::builder()
        .method(head.method.as_str())
        .uri(uri);
    for field in &fields.0 {
        if field.name.eq_ignore_ascii_case("host") {
            continue;
        }
        request = request.header(field.name.as_str(), field.value.as_ref());
    }
    request
        .body(())
        .map_err(|e| format!("the request cannot be sent as HTTP/2: {e}"))
}

/// The stream's response body into the pipe (chunked, with its trailers, when its length is
/// not given), releasing flow-control capacity as the exchange takes it.
async fn download(
    pipe: &mut BufStream<DuplexStream>,
    mut body: RecvStream,
    chunked: bool,
) -> Result<(), String> {
    while let Some(frame) = body.data().await {
        let data = frame.map_err(|e| e.to_string())?;
        let n = data.len();
        if chunked && n > 0 {
            let mut framed = format!("{n:x}\r\n").into_bytes();
            framed.extend_from_slice(&data);
            framed.extend_from_slice(b"\r\n");
            pipe.io.write_all(&framed).await
        } else {
            pipe.io.write_all(&data).await
        }
        .map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(n);
    }
    if chunked {
        let mut end = b"0\r\n".to_vec();
        if let Ok(Some(trailers)) = body.trailers().await {
            end.extend_from_slice(&trailer_lines(&trailers));
        }
        end.extend_from_slice(b"\r\n");
        pipe.io.write_all(&end).await.map_err(|e| e.to_string())?;
    }
    pipe.io.flush().await.map_err(|e| e.to_string())
}

/// HTTP/1.1 trailer lines (`name: value\r\n`, as `BodyReader::take_trailers` gives them) as
/// HTTP/2 trailers; a line that is not a valid field is left out.
pub(crate) fn trailer_map(lines: &[u8]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for line in lines.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = http::HeaderName::from_bytes(line[..colon].trim_ascii());
        let value = http::HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (name, value) {
            map.append(name, value);
        }
    }
    map
}

/// HTTP/2 trailers as HTTP/1.1 trailer lines.
pub(crate) fn trailer_lines(map: &http::HeaderMap) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in map {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Sends a piece of body as the stream's send window allows.
pub(crate) async fn send_data(
    out: &mut SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        out.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| out.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(h2::Error::from(h2::Reason::STREAM_CLOSED)),
        };
        if granted == 0 {
            continue;
        }
        let piece = data.split_to(granted.min(data.len()));
        out.send_data(piece, false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http1_request_becomes_a_stream_request() {
        let mut headers = Headers::default();
        headers.push("Host", "example.com:8443");
        headers.push("Connection", "keep-alive");
        headers.push("Transfer-Encoding", "chunked");
        headers.push("X-One", "1");
        let head = RequestHead {
            method: "POST".into(),
            target: "/a?b=c".into(),
            version: 1,
            headers,
        };
        let request = stream_request(head, "https").unwrap();
        assert_eq!(request.uri(), "https://example.com:8443/a?b=c");
        assert_eq!(request.headers().len(), 1);
        assert_eq!(request.headers()["x-one"], "1");
    }

    #[test]
    fn trailers_cross_between_the_framings() {
        let map = trailer_map(b"x-sum: abc\r\nx-two: 2\r\nbad line\r\n");
        assert_eq!(map.len(), 2);
        assert_eq!(map["x-sum"], "abc");
        assert_eq!(trailer_lines(&map), b"x-sum: abc\r\nx-two: 2\r\n");
    }
}
