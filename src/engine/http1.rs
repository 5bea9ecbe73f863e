//! HTTP/1.1 framing: reading message heads with httparse, deciding body framing, and
//! streaming bodies (Content-Length, chunked, close-delimited) without buffering them whole.

use std::fmt;
use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most header fields accepted in one message head.
pub const MAX_HEADERS: usize = 128;
/// Size of one read from a socket while streaming a body.
const READ_CHUNK: usize = 64 * 1024;
/// Room for one read while waiting for a message head.
const HEAD_CHUNK: usize = 8 * 1024;

/// A header field name, original case kept. A received name shares the head's buffer
/// instead of being copied out: one allocation fewer per field of every message.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HeaderName(Bytes);

impl HeaderName {
    /// A name that is a slice of a received head (httparse checked it is a token).
    fn within(head: &Bytes, name: &str) -> HeaderName {
        HeaderName(head.slice_ref(name.as_bytes()))
    }
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor takes a `str` (or a slice of one), so the bytes are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl std::ops::Deref for HeaderName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for HeaderName {
    fn from(name: &str) -> Self {
        HeaderName(Bytes::copy_from_slice(name.as_bytes()))
    }
}

impl From<String> for HeaderName {
    fn from(name: String) -> Self {
        HeaderName(Bytes::from(name.into_bytes()))
    }
}

impl fmt::Debug for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for HeaderName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A header field as received: original name case kept, value as raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: HeaderName,
    pub value: Bytes,
}

impl Header {
    pub fn new(name: impl Into<HeaderName>, value: impl Into<Bytes>) -> Self {
        Header {
            name: name.into(),
            value: value.into(),
        }
    }
    pub fn value_str(&self) -> &str {
        std::str::from_utf8(&self.value).unwrap_or("")
    }
}

/// Ordered header fields; duplicates kept, lookups case-insensitive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<Header>);

impl Headers {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value_str())
    }
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value_str())
    }
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|h| h.name.eq_ignore_ascii_case(name))
    }
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|h| !h.name.eq_ignore_ascii_case(name));
    }
    pub fn set(&mut self, name: &str, value: impl Into<Bytes>) {
        let value = value.into();
        match self
            .0
            .iter()
            .position(|h| h.name.eq_ignore_ascii_case(name))
        {
            Some(i) => {
                self.0[i].value = value;
                let mut seen = 0;
                self.0.retain(|h| {
                    if h.name.eq_ignore_ascii_case(name) {
                        seen += 1;
                        seen == 1
                    } else {
                        true
                    }
                });
            }
            None => self.0.push(Header::new(name, value)),
        }
    }
    pub fn push(&mut self, name: &str, value: impl Into<Bytes>) {
        self.0.push(Header::new(name, value));
    }
    /// Whether a comma-separated header (e.g. Connection) lists `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.get_all(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
    /// Bytes `write_to` appends, with the blank line that ends a head.
    fn encoded_len(&self) -> usize {
        2 + self
            .0
            .iter()
            .map(|h| h.name.len() + h.value.len() + 4)
            .sum::<usize>()
    }
    fn write_to(&self, out: &mut Vec<u8>) {
        for h in &self.0 {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(&h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Headers,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub version: u8,
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
}

impl RequestHead {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.method.len() + self.target.len() + 13 + self.headers.encoded_len(),
        );
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.extend_from_slice(if self.version == 0 {
            b" HTTP/1.0\r\n"
        } else {
            b" HTTP/1.1\r\n"
        });
        self.headers.write_to(&mut out);
        out.extend_from_slice(b"\r\n");
        out
    }
    /// Whether the client wants the connection kept open after this exchange.
    pub fn wants_keep_alive(&self) -> bool {
        if self.version == 0 {
            self.headers.has_token("connection", "keep-alive")
                || self.headers.has_token("proxy-connection", "keep-alive")
        } else {
            !self.headers.has_token("connection", "close")
                && !self.headers.has_token("proxy-connection", "close")
        }
    }
}

impl ResponseHead {
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_room(0)
    }
    /// The head, in a buffer with `room` bytes to spare for a body that goes out with it.
    pub fn encode_with_room(&self, room: usize) -> Vec<u8> {
        use std::io::Write as _;
        let mut out =
            Vec::with_capacity(self.reason.len() + 18 + self.headers.encoded_len() + room);
        let _ = write!(
            out,
            "HTTP/1.{} {} {}\r\n",
            self.version, self.status, self.reason
        );
        self.headers.write_to(&mut out);
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Why a message could not be read; each maps to the status a client is answered with.
#[derive(Debug)]
pub enum HttpError {
    /// Peer closed the connection cleanly before sending any byte of a new message.
    Closed,
    Io(io::Error),
    /// The head is not valid HTTP/1.x (answer 400).
    Malformed(String),
    /// The head is larger than allowed (answer 431).
    TooLarge(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Closed => write!(f, "connection closed"),
            HttpError::Io(e) => write!(f, "{e}"),
            HttpError::Malformed(m) => write!(f, "malformed message: {m}"),
            HttpError::TooLarge(m) => write!(f, "{m}"),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

/// A stream with a read buffer, so a head can be parsed and what follows it (body, pipelined
/// requests, a TLS ClientHello after CONNECT) is kept rather than lost.
pub struct BufStream<S> {
    pub io: S,
    pub buf: BytesMut,
}

impl<S: AsyncRead + Unpin> BufStream<S> {
    pub fn new(io: S) -> Self {
        BufStream {
            io,
            buf: BytesMut::with_capacity(HEAD_CHUNK),
        }
    }

    /// Reads more bytes into the buffer; returns how many (0 at end of stream).
    pub async fn fill(&mut self) -> io::Result<usize> {
        self.fill_up_to(HEAD_CHUNK).await
    }

    /// Reads with room for about `room` bytes: small for heads (memory per idle connection
    /// stays low), large while streaming a body (fewer syscalls).
    async fn fill_up_to(&mut self, room: usize) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < room.min(4096) {
            self.buf.reserve(room);
        }
        self.io.read_buf(&mut self.buf).await
    }

    /// Waits until the buffer holds a complete head (ending in an empty line) and returns
    /// its length, failing with TooLarge past `limit` bytes.
    async fn head_len(&mut self, limit: usize) -> Result<usize, HttpError> {
        let mut scanned = 0;
        loop {
            // Tolerate empty lines before a request line (RFC 9112 section 2.2).
            while self.buf.starts_with(b"\r\n") {
                self.buf.advance(2);
            }
            // The limit holds however the head arrived: in one read or in many.
            let end = find_head_end(&self.buf, scanned);
            if end.unwrap_or(self.buf.len()) > limit {
                return Err(HttpError::TooLarge(format!(
                    "header section larger than {limit} bytes"
                )));
            }
            if let Some(pos) = end {
                return Ok(pos);
            }
            scanned = self.buf.len().saturating_sub(3);
            let empty = self.buf.is_empty();
            if self.fill().await? == 0 {
                return Err(if empty {
                    HttpError::Closed
                } else {
                    HttpError::Malformed("connection closed in the middle of a message head".into())
                });
            }
        }
    }

    pub async fn read_request_head(&mut self, limit: usize) -> Result<RequestHead, HttpError> {
        let head = self.take_head(limit).await?;
        parse_request(&head)
    }

    pub async fn read_response_head(&mut self, limit: usize) -> Result<ResponseHead, HttpError> {
        let head = self.take_head(limit).await?;
        parse_response(&head)
    }

    /// The next head's bytes, copied out: the read buffer then stays the only owner of its
    /// memory and is reused for the next read, rather than a new buffer per message.
    async fn take_head(&mut self, limit: usize) -> Result<Bytes, HttpError> {
        let len = self.head_len(limit).await?;
        let head = Bytes::copy_from_slice(&self.buf[..len]);
        self.buf.advance(len);
        Ok(head)
    }

    /// Reads up to `max` bytes, from the buffer first.
    pub async fn read_some(&mut self, max: usize) -> io::Result<Bytes> {
        if self.buf.is_empty() && self.fill_up_to(max.clamp(HEAD_CHUNK, READ_CHUNK)).await? == 0 {
            return Ok(Bytes::new());
        }
        let n = self.buf.len().min(max);
        Ok(self.buf.split_to(n).freeze())
    }

    async fn read_line(&mut self, limit: usize) -> io::Result<Bytes> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1).freeze();
                return Ok(line);
            }
            if self.buf.len() > limit {
                return Err(invalid("chunked body: line too long"));
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
        }
    }
}

fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.min(buf.len());
    buf[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| start + p + 4)
        .or_else(|| {
            // Bare LF line endings, which httparse accepts too.
            buf[start..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| start + p + 2)
        })
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn convert_headers(raw: &[httparse::Header<'_>], head: &Bytes) -> Headers {
    Headers(
        raw.iter()
            .map(|h| Header {
                name: HeaderName::within(head, h.name),
                value: head.slice_ref(h.value),
            })
            .collect(),
    )
}

/// A token character (RFC 9110 section 5.6.2): methods and field names are tokens.
fn is_tchar(b: u8) -> bool {
    TCHAR[b as usize]
}

/// `is_tchar` as a table: it runs for every byte of every method and field name.
static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

/// Checks a message head for what RFC 9112 says a recipient must reject, before httparse
/// reads it, so the answer names the rule: bare CR and NUL (section 2.2, RFC 9110 section
/// 5.5), obs-fold (section 5.2), whitespace between a field name and its colon (section
/// 5.1), and, in requests, a method or field name that is not a token. Every head goes
/// through it, so the scans use `memchr`.
fn check_head_bytes(head: &[u8], request: bool) -> Result<(), String> {
    if let Some(i) = memchr::memchr(0, head) {
        return Err(format!(
            "NUL byte at offset {i} of the message head (RFC 9110 section 5.5)"
        ));
    }
    if let Some(i) = memchr::memchr_iter(b'\r', head).find(|&i| head.get(i + 1) != Some(&b'\n')) {
        return Err(format!(
            "bare CR at offset {i} of the message head (RFC 9112 section 2.2)"
        ));
    }
    let mut start = 0;
    let mut lines = memchr::memchr_iter(b'\n', head)
        .chain(std::iter::once(head.len()))
        .map(|end| {
            let line = &head[start.min(end)..end];
            start = end + 1;
            line.strip_suffix(b"\r").unwrap_or(line)
        });
    let first = lines.next().unwrap_or_default();
    if request {
        let method = first.split(|&b| b == b' ').next().unwrap_or_default();
        if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
            return Err(format!(
                "the method {:?} is not a token (RFC 9110 section 9.1)",
                String::from_utf8_lossy(method)
            ));
        }
    }
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(
                "obs-fold: a header line starts with whitespace (RFC 9112 section 5.2)".into(),
            );
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Err(format!(
                "header line without a colon: {:?} (RFC 9112 section 5)",
                String::from_utf8_lossy(line)
            ));
        };
        let name = &line[..colon];
        if name.last().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err(format!(
                "whitespace between the field name {:?} and the colon (RFC 9112 section 5.1)",
                String::from_utf8_lossy(name.trim_ascii_end())
            ));
        }
        if request && (name.is_empty() || !name.iter().all(|&b| is_tchar(b))) {
            return Err(format!(
                "the field name {:?} is not a token (RFC 9110 section 5.1)",
                String::from_utf8_lossy(name)
            ));
        }
    }
    Ok(())
}

/// What RFC 9112 section 3.2 asks of Host: exactly one in an HTTP/1.1 request, at most one in
/// any. CONNECT without Host is tolerated: its target is the authority, and load tools (oha)
/// omit Host there.
fn check_host(head: &RequestHead) -> Result<(), String> {
    match head.headers.get_all("host").count() {
        0 if head.version == 1 && !head.method.eq_ignore_ascii_case("CONNECT") => {
            Err("HTTP/1.1 request without a Host header (RFC 9112 section 3.2)".into())
        }
        n if n > 1 => Err(format!(
            "{n} Host headers in one request (RFC 9112 section 3.2)"
        )),
        _ => {
            // uri-host [ ":" port ] (RFC 9110 section 7.2): no whitespace, userinfo, path...
            let value = head.headers.get("host").unwrap_or("");
            let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%:[]".contains(&b);
            if value.bytes().all(ok) {
                Ok(())
            } else {
                Err(format!(
                    "invalid Host header {value:?} (RFC 9112 section 3.2)"
                ))
            }
        }
    }
}

fn parse_request(head: &Bytes) -> Result<RequestHead, HttpError> {
    check_head_bytes(head, true).map_err(HttpError::Malformed)?;
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut storage);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(HttpError::Malformed("incomplete request head".into()))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooLarge(format!(
                "more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => return Err(HttpError::Malformed(format!("invalid request head ({e})"))),
    }
    let parsed = RequestHead {
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        version: req.version.unwrap_or(1),
        headers: convert_headers(req.headers, head),
    };
    check_host(&parsed).map_err(HttpError::Malformed)?;
    Ok(parsed)
}

fn parse_response(head: &Bytes) -> Result<ResponseHead, HttpError> {
    check_head_bytes(head, false).map_err(HttpError::Malformed)?;
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut storage);
    match res.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(HttpError::Malformed("incomplete response head".into()))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooLarge(format!(
                "more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => return Err(HttpError::Malformed(format!("invalid response head ({e})"))),
    }
    Ok(ResponseHead {
        version: res.version.unwrap_or(1),
        status: res.code.unwrap_or(0),
        reason: res.reason.unwrap_or("").to_string(),
        headers: convert_headers(res.headers, head),
    })
}

/// How a message body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// Ends when the sender closes the connection (responses only).
    CloseDelimited,
}

/// The framing of a request body; rejects the ambiguous framings used for request smuggling.
pub fn request_body_kind(head: &RequestHead) -> Result<BodyKind, String> {
    let te: Vec<&str> = head.headers.get_all("transfer-encoding").collect();
    let has_cl = head.headers.contains("content-length");
    if !te.is_empty() {
        if has_cl {
            return Err(
                "both Transfer-Encoding and Content-Length are present (RFC 9112 section 6.1)"
                    .into(),
            );
        }
        if head.version == 0 {
            return Err(
                "Transfer-Encoding is not allowed in an HTTP/1.0 request (RFC 9112 section 6.1)"
                    .into(),
            );
        }
        let last = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Ok(BodyKind::Chunked),
            _ => Err(
                "Transfer-Encoding of a request must end in chunked (RFC 9112 section 6.1)".into(),
            ),
        };
    }
    match content_length(&head.headers)? {
        Some(0) | None => Ok(BodyKind::Empty),
        Some(n) => Ok(BodyKind::Length(n)),
    }
}

/// The value of Transfer-Encoding for a body re-framed as chunked: the sender's other codings
/// (gzip, ...) kept in order, then `chunked`. The codings belong to the message; only the
/// chunked framing is this hop's.
pub fn chunked_transfer_encoding(original: &Headers) -> String {
    let mut codings: Vec<&str> = original
        .get_all("transfer-encoding")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("chunked"))
        .collect();
    codings.push("chunked");
    codings.join(", ")
}

/// The framing of a response body, given the request method it answers (RFC 9112 section 6.3).
pub fn response_body_kind(request_method: &str, head: &ResponseHead) -> Result<BodyKind, String> {
    if request_method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304
    {
        return Ok(BodyKind::Empty);
    }
    if head.headers.contains("transfer-encoding") {
        if head.headers.contains("content-length") {
            return Err(
                "both Transfer-Encoding and Content-Length are present (RFC 9112 section 6.1)"
                    .into(),
            );
        }
        if head.version == 0 {
            return Err("Transfer-Encoding in an HTTP/1.0 response (RFC 9112 section 6.1)".into());
        }
        return Ok(if head.headers.has_token("transfer-encoding", "chunked") {
            BodyKind::Chunked
        } else {
            BodyKind::CloseDelimited
        });
    }
    match content_length(&head.headers)? {
        Some(0) => Ok(BodyKind::Empty),
        Some(n) => Ok(BodyKind::Length(n)),
        None => Ok(BodyKind::CloseDelimited),
    }
}

/// Content-Length, which must be one number (repeated identical values are tolerated).
fn content_length(headers: &Headers) -> Result<Option<u64>, String> {
    let mut found: Option<u64> = None;
    for value in headers.get_all("content-length") {
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "invalid Content-Length {value:?} (RFC 9110 section 8.6)"
                ));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| format!("invalid Content-Length {value:?} (RFC 9110 section 8.6)"))?;
            if found.is_some_and(|f| f != n) {
                return Err("conflicting Content-Length values (RFC 9112 section 6.3)".into());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Reads a body in its wire framing and yields its content in pieces.
pub struct BodyReader {
    kind: BodyKind,
    /// Bytes left in the whole body (Length) or in the current chunk (Chunked).
    remaining: u64,
    done: bool,
    /// A chunked body's trailer section, its field lines as received (CRLF-terminated).
    trailers: Vec<u8>,
}

/// The most of a trailer section kept to pass on.
const MAX_TRAILER_BYTES: usize = 64 * 1024;

impl BodyReader {
    pub fn new(kind: BodyKind) -> Self {
        let remaining = match kind {
            BodyKind::Length(n) => n,
            _ => 0,
        };
        BodyReader {
            kind,
            remaining,
            done: kind == BodyKind::Empty,
            trailers: Vec::new(),
        }
    }

    /// The trailer fields read at the end of a chunked body (`name: value\r\n` lines).
    pub fn take_trailers(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.trailers)
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The body's framing, as the head gave it.
    pub fn kind(&self) -> BodyKind {
        self.kind
    }

    /// The next piece of content, or None at the end of the body.
    pub async fn next<S: AsyncRead + Unpin>(
        &mut self,
        src: &mut BufStream<S>,
    ) -> io::Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        match self.kind {
            BodyKind::Empty => {
                self.done = true;
                Ok(None)
            }
            BodyKind::Length(_) => {
                let want = self.remaining.min(READ_CHUNK as u64) as usize;
                let data = src.read_some(want).await?;
                if data.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed with {} body bytes still expected",
                            self.remaining
                        ),
                    ));
                }
                self.remaining -= data.len() as u64;
                if self.remaining == 0 {
                    self.done = true;
                }
                Ok(Some(data))
            }
            BodyKind::CloseDelimited => {
                let data = src.read_some(READ_CHUNK).await?;
                if data.is_empty() {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Some(data))
            }
            BodyKind::Chunked => loop {
                if self.remaining > 0 {
                    let want = self.remaining.min(READ_CHUNK as u64) as usize;
                    let data = src.read_some(want).await?;
                    if data.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside a chunk",
                        ));
                    }
                    self.remaining -= data.len() as u64;
                    if self.remaining == 0 {
                        let crlf = src.read_line(2).await?;
                        if crlf.as_ref() != b"\r\n" {
                            return Err(invalid("chunked body: chunk data not followed by CRLF (RFC 9112 section 7.1)"));
                        }
                    }
                    return Ok(Some(data));
                }
                let line = src.read_line(4096).await?;
                let size = parse_chunk_size(&line)?;
                if size == 0 {
                    // Trailer section: kept for the writer to pass on (`take_trailers`).
                    loop {
                        let t = src.read_line(16 * 1024).await?;
                        if t.as_ref() == b"\r\n" {
                            break;
                        }
                        check_chunk_line(&t, "trailer field")?;
                        if self.trailers.len() + t.len() > MAX_TRAILER_BYTES {
                            return Err(invalid("chunked body: trailer section too large"));
                        }
                        self.trailers.extend_from_slice(&t);
                    }
                    self.done = true;
                    return Ok(None);
                }
                self.remaining = size;
            },
        }
    }
}

/// A line of a chunked body ends in CRLF and holds no other CR, LF or NUL (RFC 9112 sections
/// 7.1 and 2.2): a bare CR or LF there is how smuggled requests hide.
fn check_chunk_line(line: &[u8], what: &str) -> io::Result<()> {
    let body = line.strip_suffix(b"\r\n").ok_or_else(|| {
        invalid(&format!(
            "chunked body: {what} line does not end in CRLF (RFC 9112 section 7.1)"
        ))
    })?;
    if body.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(invalid(&format!(
            "chunked body: bare CR, LF or NUL in a {what} line (RFC 9112 section 7.1)"
        )));
    }
    Ok(())
}

/// The size of a chunk: hex digits, then optional extensions (RFC 9112 section 7.1.1).
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    check_chunk_line(line, "chunk size")?;
    let line = &line[..line.len() - 2];
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (size, rest) = line.split_at(digits);
    if size.is_empty() {
        return Err(invalid(
            "chunked body: chunk size is not a hex number (RFC 9112 section 7.1)",
        ));
    }
    let ext = rest.trim_ascii_start();
    if !ext.is_empty() && ext[0] != b';' {
        return Err(invalid(
            "chunked body: chunk size is not a hex number (RFC 9112 section 7.1)",
        ));
    }
    if ext.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(invalid(
            "chunked body: control character in a chunk extension (RFC 9112 section 7.1.1)",
        ));
    }
    let text = std::str::from_utf8(size).expect("hex digits are ASCII");
    u64::from_str_radix(text, 16)
        .ok()
        .filter(|n| *n <= 1 << 62)
        .ok_or_else(|| invalid("chunked body: chunk size too large (RFC 9112 section 7.1)"))
}

/// Writes body content in a given framing. Chunked output is re-framed from whatever pieces
/// arrive, so a body whose length changed (a hook rewrote it) stays correctly framed.
pub struct BodyWriter {
    kind: BodyKind,
}

impl BodyWriter {
    pub fn new(kind: BodyKind) -> Self {
        BodyWriter { kind }
    }

    pub async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        dst: &mut W,
        data: &[u8],
    ) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        match self.kind {
            BodyKind::Chunked => {
                let head = format!("{:x}\r\n", data.len());
                // One write per chunk keeps small chunks in one segment.
                if data.len() <= 16 * 1024 {
                    let mut frame = Vec::with_capacity(head.len() + data.len() + 2);
                    frame.extend_from_slice(head.as_bytes());
                    frame.extend_from_slice(data);
                    frame.extend_from_slice(b"\r\n");
                    dst.write_all(&frame).await
                } else {
                    dst.write_all(head.as_bytes()).await?;
                    dst.write_all(data).await?;
                    dst.write_all(b"\r\n").await
                }
            }
            _ => dst.write_all(data).await,
        }
    }

    pub async fn finish<W: AsyncWrite + Unpin>(&mut self, dst: &mut W) -> io::Result<()> {
        self.finish_with_trailers(dst, &[]).await
    }

    /// Ends the body; a chunked one with `trailers` (`name: value\r\n` lines, as
    /// `BodyReader::take_trailers` gives them). Other framings cannot carry trailers.
    pub async fn finish_with_trailers<W: AsyncWrite + Unpin>(
        &mut self,
        dst: &mut W,
        trailers: &[u8],
    ) -> io::Result<()> {
        if self.kind == BodyKind::Chunked {
            let mut end = Vec::with_capacity(5 + trailers.len());
            end.extend_from_slice(b"0\r\n");
            end.extend_from_slice(trailers);
            end.extend_from_slice(b"\r\n");
            dst.write_all(&end).await?;
        }
        Ok(())
    }
}

/// Follows a response that a handler writes as raw bytes, to learn its status and whether it
/// ended cleanly (a complete head and exactly its Content-Length of body), in which case the
/// client connection can carry on; anything else closes it after the response.
#[derive(Default)]
pub struct RawResponse {
    head: Vec<u8>,
    parsed: Option<ResponseHead>,
    body: u64,
    broken: bool,
}

impl RawResponse {
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.broken {
            return;
        }
        if self.parsed.is_some() {
            self.body += bytes.len() as u64;
            return;
        }
        self.head.extend_from_slice(bytes);
        if let Some(end) = find_head_end(&self.head, 0) {
            let head = Bytes::copy_from_slice(&self.head[..end]);
            match parse_response(&head) {
                Ok(parsed) => {
                    self.body = (self.head.len() - end) as u64;
                    self.parsed = Some(parsed);
                    self.head = Vec::new();
                }
                Err(_) => self.broken = true,
            }
        } else if self.head.len() > 64 * 1024 {
            self.broken = true;
        }
    }

    pub fn status(&self) -> u16 {
        self.parsed.as_ref().map(|h| h.status).unwrap_or(0)
    }

    pub fn reusable(&self, request_method: &str) -> bool {
        let Some(head) = self.parsed.as_ref().filter(|_| !self.broken) else {
            return false;
        };
        if head.version != 1 || head.headers.has_token("connection", "close") {
            return false;
        }
        match response_body_kind(request_method, head) {
            Ok(BodyKind::Empty) => self.body == 0,
            Ok(BodyKind::Length(n)) => self.body == n,
            _ => false,
        }
    }
}

/// Header fields that describe one hop and are never forwarded (RFC 9110 section 7.6.1),
/// plus those the Connection header names.
pub fn strip_hop_by_hop(headers: &mut Headers, keep_upgrade: bool) {
    // Runs on every message: compares in place rather than lowercasing copies.
    const HOP_BY_HOP: [&str; 7] = [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ];
    let is_hop = |name: &str| HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h));
    if !headers
        .0
        .iter()
        .any(|h| is_hop(&h.name) || h.name.eq_ignore_ascii_case("upgrade"))
    {
        return;
    }
    let named: Vec<Bytes> = headers
        .0
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| {
            h.value_str()
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| h.value.slice_ref(t.as_bytes()))
        })
        .collect();
    headers.0.retain(|h| {
        let n: &str = &h.name;
        let upgrade = n.eq_ignore_ascii_case("upgrade");
        let hop =
            is_hop(n) || upgrade || named.iter().any(|t| n.as_bytes().eq_ignore_ascii_case(t));
        !(hop && !(keep_upgrade && upgrade))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse_req(raw: &[u8]) -> Result<RequestHead, HttpError> {
        let mut s = BufStream::new(raw);
        s.read_request_head(8192).await
    }

    #[test]
    fn rechunking_keeps_other_transfer_codings() {
        let mut h = Headers::default();
        assert_eq!(chunked_transfer_encoding(&h), "chunked");
        h.push("Transfer-Encoding", "gzip, chunked");
        assert_eq!(chunked_transfer_encoding(&h), "gzip, chunked");
        let mut h = Headers::default();
        h.push("Transfer-Encoding", "gzip");
        h.push("transfer-encoding", "Chunked");
        assert_eq!(chunked_transfer_encoding(&h), "gzip, chunked");
    }

    #[tokio::test]
    async fn parses_absolute_form_request() {
        let h = parse_req(
            b"GET http://a.test:81/x?y=1 HTTP/1.1\r\nHost: a.test:81\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "http://a.test:81/x?y=1");
        assert_eq!(h.headers.get_all("X-A").collect::<Vec<_>>(), vec!["1", "2"]);
    }

    #[tokio::test]
    async fn rejects_garbage_and_oversized_heads() {
        assert!(matches!(
            parse_req(b"NOT HTTP\r\n\r\n").await,
            Err(HttpError::Malformed(_))
        ));
        let big = format!("GET http://a/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10000));
        assert!(matches!(
            parse_req(big.as_bytes()).await,
            Err(HttpError::TooLarge(_))
        ));
        // A complete head over the limit is refused even when it arrived in a single read.
        let mut s = BufStream::new(big.as_bytes());
        while s.buf.len() < big.len() {
            assert!(s.fill().await.unwrap() > 0);
        }
        assert!(matches!(
            s.read_request_head(8192).await,
            Err(HttpError::TooLarge(_))
        ));
        assert!(matches!(parse_req(b"").await, Err(HttpError::Closed)));
    }

    #[tokio::test]
    async fn smuggling_framings_are_rejected() {
        let h = parse_req(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n").await.unwrap();
        assert!(request_body_kind(&h).is_err());
        let h = parse_req(
            b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(request_body_kind(&h).is_err());
        let h = parse_req(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(request_body_kind(&h).unwrap(), BodyKind::Length(3));
    }

    /// Every head RFC 9112 says a server must reject is Malformed, naming the rule.
    #[tokio::test]
    async fn strict_request_heads() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"GET http://a/ HTTP/1.1\r\nAccept: */*\r\n\r\n",
                "without a Host header",
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "2 Host headers",
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: 1\r\n  folded\r\n\r\n",
                "obs-fold",
            ),
            (b"GET http://a/ HTTP/1.1\r\nHost : a\r\n\r\n", "section 5.1"),
            (
                b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: 1\rY: 2\r\n\r\n",
                "bare CR",
            ),
            (b"GET http://a/ HTTP/1.1\rHost: a\r\n\r\n", "bare CR"),
            (
                b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
                "NUL",
            ),
            (b"G(T http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "not a token"),
            (
                b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX@Y: 1\r\n\r\n",
                "not a token",
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nHost: a\r\n: 1\r\n\r\n",
                "not a token",
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nHost: a b\r\n\r\n",
                "invalid Host header",
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nHost: user@a\r\n\r\n",
                "invalid Host header",
            ),
        ];
        for (raw, why) in cases {
            match parse_req(raw).await {
                Err(HttpError::Malformed(m)) => {
                    assert!(m.contains(why), "{m:?} should name {why:?}")
                }
                other => panic!(
                    "{:?} accepted or misread: {other:?}",
                    String::from_utf8_lossy(raw)
                ),
            }
        }
        // HTTP/1.0 may omit Host; CONNECT is tolerated without one.
        assert!(parse_req(b"GET http://a/ HTTP/1.0\r\n\r\n").await.is_ok());
        assert!(parse_req(b"CONNECT a:443 HTTP/1.1\r\n\r\n").await.is_ok());
        assert!(
            parse_req(b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX-Y_z~: 1\r\n\r\n")
                .await
                .is_ok()
        );
        assert!(
            parse_req(b"GET http://a/ HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
                .await
                .is_ok()
        );
        assert!(parse_req(b"GET http://a/ HTTP/1.1\r\nHost:\r\n\r\n")
            .await
            .is_ok());
    }

    #[test]
    fn strict_response_framing() {
        let mut r = ResponseHead {
            version: 1,
            status: 200,
            reason: "OK".into(),
            headers: Headers::default(),
        };
        r.headers.push("Content-Length", "3");
        r.headers.push("Transfer-Encoding", "chunked");
        assert!(response_body_kind("GET", &r)
            .unwrap_err()
            .contains("section 6.1"));
        let mut r = ResponseHead {
            version: 1,
            status: 200,
            reason: "OK".into(),
            headers: Headers::default(),
        };
        r.headers.push("Content-Length", "3");
        r.headers.push("Content-Length", "4");
        assert!(response_body_kind("GET", &r).is_err());
    }

    #[tokio::test]
    async fn bad_chunked_bodies_are_refused() {
        let cases: &[&[u8]] = &[
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            b"5;a=b\rc\r\nhello\r\n0\r\n\r\n",
            b"5;a=b\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX: 1\rY\r\n\r\n",
        ];
        for raw in cases {
            let mut s = BufStream::new(*raw);
            let mut r = BodyReader::new(BodyKind::Chunked);
            let mut result = Ok(());
            loop {
                match r.next(&mut s).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            let e = result.expect_err(&format!("{:?} accepted", String::from_utf8_lossy(raw)));
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains("RFC 9112"), "{e}");
        }
        // Extensions with whitespace before the semicolon are fine.
        let mut s = BufStream::new(&b"5 ;x=\"y z\"\r\nhello\r\n0\r\n\r\n"[..]);
        let mut r = BodyReader::new(BodyKind::Chunked);
        assert_eq!(&r.next(&mut s).await.unwrap().unwrap()[..], b"hello");
        assert!(r.next(&mut s).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn chunked_body_is_decoded_and_reframed() {
        let raw: &[u8] = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let mut s = BufStream::new(raw);
        let mut r = BodyReader::new(BodyKind::Chunked);
        let mut out = Vec::new();
        while let Some(piece) = r.next(&mut s).await.unwrap() {
            out.extend_from_slice(&piece);
        }
        assert_eq!(out, b"hello world");
        assert_eq!(&s.buf[..], b"NEXT");
        let mut w = BodyWriter::new(BodyKind::Chunked);
        let mut wire = Vec::new();
        w.write(&mut wire, b"abc").await.unwrap();
        w.finish(&mut wire).await.unwrap();
        assert_eq!(wire, b"3\r\nabc\r\n0\r\n\r\n");
    }

    #[test]
    fn raw_responses_keep_the_connection_only_when_complete() {
        let mut r = RawResponse::default();
        r.feed(b"HTTP/1.1 403 Forbidden\r\nContent-Le");
        r.feed(b"ngth: 7\r\n\r\nBlock");
        assert_eq!(r.status(), 403);
        assert!(!r.reusable("GET"));
        r.feed(b"ed");
        assert!(r.reusable("GET"));
        let mut close = RawResponse::default();
        close.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!close.reusable("GET"));
        let mut unframed = RawResponse::default();
        unframed.feed(b"HTTP/1.1 200 OK\r\n\r\nbody");
        assert!(!unframed.reusable("GET"));
        let mut garbage = RawResponse::default();
        garbage.feed(b"hello\r\n\r\n");
        assert_eq!(garbage.status(), 0);
        assert!(!garbage.reusable("GET"));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = Headers::default();
        for (n, v) in [
            ("Connection", "close, X-Secret"),
            ("X-Secret", "1"),
            ("Keep-Alive", "5"),
            ("Proxy-Authorization", "x"),
            ("Accept", "*/*"),
        ] {
            h.push(n, v.as_bytes().to_vec());
        }
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.0.len(), 1);
        assert_eq!(h.0[0].name, "Accept");
    }

    #[test]
    fn response_framing_follows_rfc() {
        let mut r = ResponseHead {
            version: 1,
            status: 200,
            reason: "OK".into(),
            headers: Headers::default(),
        };
        assert_eq!(
            response_body_kind("GET", &r).unwrap(),
            BodyKind::CloseDelimited
        );
        assert_eq!(response_body_kind("HEAD", &r).unwrap(), BodyKind::Empty);
        r.headers.push("Content-Length", "10");
        assert_eq!(response_body_kind("GET", &r).unwrap(), BodyKind::Length(10));
        r.status = 304;
        assert_eq!(response_body_kind("GET", &r).unwrap(), BodyKind::Empty);
    }
}
