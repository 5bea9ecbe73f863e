//! Responses the proxy writes itself: status lines with their standard reason phrases and
//! short plain-text error bodies.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// The standard reason phrases (RFC 9110 and the registered extensions a proxy may send).
const STATUS_TEXT: &[(u16, &str)] = &[
    (100, "Continue"),
    (101, "Switching Protocols"),
    (200, "OK"),
    (201, "Created"),
    (202, "Accepted"),
    (204, "No Content"),
    (206, "Partial Content"),
    (301, "Moved Permanently"),
    (302, "Found"),
    (303, "See Other"),
    (304, "Not Modified"),
    (307, "Temporary Redirect"),
    (308, "Permanent Redirect"),
    (400, "Bad Request"),
    (401, "Unauthorized"),
    (403, "Forbidden"),
    (404, "Not Found"),
    (405, "Method Not Allowed"),
    (407, "Proxy Authentication Required"),
    (408, "Request Timeout"),
    (409, "Conflict"),
    (411, "Length Required"),
    (413, "Content Too Large"),
    (414, "URI Too Long"),
    (417, "Expectation Failed"),
    (421, "Misdirected Request"),
    (426, "Upgrade Required"),
    (429, "Too Many Requests"),
    (431, "Request Header Fields Too Large"),
    (500, "Internal Server Error"),
    (501, "Not Implemented"),
    (502, "Bad Gateway"),
    (503, "Service Unavailable"),
    (504, "Gateway Timeout"),
    (505, "HTTP Version Not Supported"),
];

/// The reason phrase of a status code; for a code without a standard phrase, its class's
/// name (RFC 9110 section 15).
pub fn reason_phrase(status: u16) -> &'static str {
    if let Some((_, r)) = STATUS_TEXT.iter().find(|(s, _)| *s == status) {
        return r;
    }
    match status / 100 {
        1 => "Informational",
        2 => "Success",
        3 => "Redirection",
        4 => "Client Error",
        _ => "Server Error",
    }
}

/// Writes a short plain-text response made by the proxy itself.
pub async fn send_error<W: AsyncWrite + Unpin>(
    client: &mut W,
    status: u16,
    message: &str,
    keep_alive: bool,
) -> io::Result<()> {
    send_error_with(client, status, message, keep_alive, "").await
}

/// `send_error` with extra header lines (each ending in CRLF).
pub async fn send_error_with<W: AsyncWrite + Unpin>(
    client: &mut W,
    status: u16,
    message: &str,
    keep_alive: bool,
    extra_headers: &str,
) -> io::Result<()> {
    let body = format!("segproxy: {message}\n");
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n{extra_headers}Content-Length: {}\r\nConnection: {}\r\n\r\n",
        reason_phrase(status),
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    client.write_all(&out).await?;
    client.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_a_reason_phrase() {
        assert_eq!(reason_phrase(408), "Request Timeout");
        assert_eq!(reason_phrase(502), "Bad Gateway");
        assert_eq!(reason_phrase(505), "HTTP Version Not Supported");
        assert_eq!(reason_phrase(499), "Client Error");
        assert_eq!(reason_phrase(599), "Server Error");
        assert!((100..600).all(|s| reason_phrase(s) != "Error"));
    }
}
