//! SOCKS5, server side (RFC 1928; username/password by RFC 1929): the handshake up to the
//! request, and the replies. A CONNECT is then served by `connect` exactly as an HTTP CONNECT
//! is; only the answer to the client is written in SOCKS form.
//!
//! The parsers take the bytes received so far and say `Incomplete` until a whole message is
//! there, so malformed or short input gives an error or a wait, never a panic.

use std::net::{Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use bytes::Buf;
use tokio::io::AsyncWriteExt;

use super::connector::{authority, socks_reply, Io};
use super::flow_error::await_hook;
use super::http1::BufStream;
use super::session::ConnState;
use super::state::Engine;

/// The protocol version byte every SOCKS5 message starts with.
pub const VERSION: u8 = 0x05;
/// Authentication methods (RFC 1928 section 3).
const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
/// The version of the username/password sub-negotiation (RFC 1929).
const USER_PASS_VERSION: u8 = 0x01;
/// Commands (RFC 1928 section 4).
const CONNECT: u8 = 0x01;
const BIND: u8 = 0x02;
const UDP_ASSOCIATE: u8 = 0x03;
/// Address types.
const ATYP_IPV4: u8 = 0x01;
const ATYP_DOMAIN: u8 = 0x03;
const ATYP_IPV6: u8 = 0x04;

/// A parser's answer: more bytes needed, or the message and how many bytes it took.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse<T> {
    Incomplete,
    Done(T, usize),
}

/// Why a handshake failed: what the records say, and the reply the client gets (a method
/// choice of 0xff before the request, a reply code after it; None: the client is gone).
#[derive(Debug, PartialEq, Eq)]
pub struct SocksError {
    pub message: String,
    pub answer: Option<Answer>,
}

/// How a failed handshake is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// "No acceptable methods" to the greeting.
    NoMethod,
    /// Failure status of the username/password sub-negotiation.
    AuthFailed,
    /// A reply to the request with this code.
    Reply(u8),
}

impl SocksError {
    fn new(message: impl Into<String>, answer: Option<Answer>) -> Self {
        SocksError {
            message: message.into(),
            answer,
        }
    }
}

/// A SOCKS request: the command and the destination as `host:port` (IPv6 in brackets).
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub command: u8,
    pub target: String,
}

/// The greeting: the authentication methods the client offers.
pub fn parse_greeting(buf: &[u8]) -> Result<Parse<Vec<u8>>, SocksError> {
    let [version, count, ..] = *buf else {
        return Ok(Parse::Incomplete);
    };
    if version != VERSION {
        return Err(SocksError::new(
            format!("not a SOCKS5 greeting (version {version:#04x})"),
            None,
        ));
    }
    let end = 2 + usize::from(count);
    match buf.get(2..end) {
        None => Ok(Parse::Incomplete),
        Some(_) if count == 0 => Err(SocksError::new(
            "the greeting offers no authentication method",
            Some(Answer::NoMethod),
        )),
        Some(methods) => Ok(Parse::Done(methods.to_vec(), end)),
    }
}

/// A user name and password as sent (RFC 1929 allows any bytes).
#[derive(Debug, PartialEq, Eq)]
pub struct UserPass {
    pub user: Vec<u8>,
    pub pass: Vec<u8>,
}

/// The username/password sub-negotiation (RFC 1929): the user name and the password.
pub fn parse_user_pass(buf: &[u8]) -> Result<Parse<UserPass>, SocksError> {
    let [version, user_len, ..] = *buf else {
        return Ok(Parse::Incomplete);
    };
    if version != USER_PASS_VERSION {
        return Err(SocksError::new(
            format!("username/password version {version:#04x}, expected 0x01 (RFC 1929)"),
            Some(Answer::AuthFailed),
        ));
    }
    let user_end = 2 + usize::from(user_len);
    let Some(&pass_len) = buf.get(user_end) else {
        return Ok(Parse::Incomplete);
    };
    let pass_end = user_end + 1 + usize::from(pass_len);
    let Some(pass) = buf.get(user_end + 1..pass_end) else {
        return Ok(Parse::Incomplete);
    };
    if user_len == 0 {
        return Err(SocksError::new("empty user name", Some(Answer::AuthFailed)));
    }
    let user = buf[2..user_end].to_vec();
    let pass = pass.to_vec();
    Ok(Parse::Done(UserPass { user, pass }, pass_end))
}

/// The request: command, address (IPv4, domain name or IPv6) and port.
pub fn parse_request(buf: &[u8]) -> Result<Parse<Request>, SocksError> {
    let [version, command, _reserved, atyp, ..] = *buf else {
        return Ok(Parse::Incomplete);
    };
    if version != VERSION {
        return Err(SocksError::new(
            format!("request version {version:#04x}, expected 0x05"),
            Some(Answer::Reply(socks_reply::GENERAL_FAILURE)),
        ));
    }
    let (host, end) = match atyp {
        ATYP_IPV4 => match buf.get(4..8) {
            None => return Ok(Parse::Incomplete),
            Some(a) => (Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(), 8),
        },
        ATYP_IPV6 => match buf.get(4..20) {
            None => return Ok(Parse::Incomplete),
            Some(a) => {
                let octets: [u8; 16] = a.try_into().expect("16 bytes");
                (Ipv6Addr::from(octets).to_string(), 20)
            }
        },
        ATYP_DOMAIN => {
            let Some(&len) = buf.get(4) else {
                return Ok(Parse::Incomplete);
            };
            let end = 5 + usize::from(len);
            let Some(name) = buf.get(5..end) else {
                return Ok(Parse::Incomplete);
            };
            (domain_name(name)?, end)
        }
        other => {
            return Err(SocksError::new(
                format!("address type {other:#04x} is not supported (1 IPv4, 3 name, 4 IPv6)"),
                Some(Answer::Reply(socks_reply::ADDRESS_TYPE_NOT_SUPPORTED)),
            ))
        }
    };
    let Some(port) = buf.get(end..end + 2) else {
        return Ok(Parse::Incomplete);
    };
    let port = u16::from_be_bytes([port[0], port[1]]);
    if port == 0 {
        return Err(SocksError::new(
            format!("destination {host} has port 0"),
            Some(Answer::Reply(socks_reply::GENERAL_FAILURE)),
        ));
    }
    Ok(Parse::Done(
        Request {
            command,
            target: authority(&host, port),
        },
        end + 2,
    ))
}

/// A destination name as sent: printable ASCII without the characters that would change
/// what an authority means.
fn domain_name(name: &[u8]) -> Result<String, SocksError> {
    let bad = |why: &str| {
        SocksError::new(
            format!("destination name {:?} {why}", String::from_utf8_lossy(name)),
            Some(Answer::Reply(socks_reply::GENERAL_FAILURE)),
        )
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if !name
        .iter()
        .all(|b| b.is_ascii_graphic() && !b"/?#@[]\\:".contains(b))
    {
        return Err(bad("is not a host name"));
    }
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// A reply to the request (RFC 1928 section 6); the bound address is given as 0.0.0.0:0,
/// which clients of a CONNECT do not use.
pub fn reply(code: u8) -> [u8; 10] {
    [VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
}

/// Writes a failure answer and closes the client's side.
pub async fn answer<C: Io>(client: &mut C, answer: Answer) {
    let bytes: &[u8] = match answer {
        Answer::NoMethod => &[VERSION, NO_ACCEPTABLE_METHOD],
        Answer::AuthFailed => &[USER_PASS_VERSION, 0x01],
        Answer::Reply(code) => &reply(code),
    };
    let _ = client.write_all(bytes).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

/// Reads one message with `parse`, waiting for more bytes as needed, and consumes it.
async fn read<C: Io, T>(
    client: &mut BufStream<C>,
    parse: impl Fn(&[u8]) -> Result<Parse<T>, SocksError>,
    what: &str,
) -> Result<T, SocksError> {
    loop {
        if let Parse::Done(value, used) = parse(&client.buf)? {
            client.buf.advance(used);
            return Ok(value);
        }
        match client.fill().await {
            Ok(n) if n > 0 => {}
            Ok(_) => {
                return Err(SocksError::new(
                    format!("the client closed the connection during the {what}"),
                    None,
                ))
            }
            Err(e) => {
                return Err(SocksError::new(
                    format!("reading the {what} failed: {e}"),
                    None,
                ))
            }
        }
    }
}

/// The handshake up to a CONNECT request: the method choice (username/password when the
/// server requires credentials, else none), the credentials, the request. Returns the
/// destination as `host:port`; on error the client has not been answered yet.
pub async fn handshake<C: Io>(
    engine: &Engine,
    client: &mut BufStream<C>,
    conn: &mut ConnState,
) -> Result<String, SocksError> {
    let methods = read(client, parse_greeting, "greeting").await?;
    let needs_auth = engine.config.proxy_auth.is_enabled() || engine.hooks.authenticate;
    let method = if needs_auth { USER_PASS } else { NO_AUTH };
    if !methods.contains(&method) {
        let why = if needs_auth {
            "the server requires a user name and password (method 0x02), which the client did not offer"
        } else {
            "the client did not offer \"no authentication\" (method 0x00)"
        };
        return Err(SocksError::new(why, Some(Answer::NoMethod)));
    }
    write(client, &[VERSION, method]).await?;
    if needs_auth {
        let UserPass { user, pass } = read(client, parse_user_pass, "username/password").await?;
        if !credentials_accepted(engine, conn, &user, &pass).await {
            return Err(SocksError::new(
                format!(
                    "proxy credentials not accepted (user {:?})",
                    String::from_utf8_lossy(&user)
                ),
                Some(Answer::AuthFailed),
            ));
        }
        write(client, &[USER_PASS_VERSION, 0x00]).await?;
    }
    let request = read(client, parse_request, "request").await?;
    match request.command {
        CONNECT => Ok(request.target),
        BIND | UDP_ASSOCIATE => Err(SocksError::new(
            format!(
                "{} {} is not supported (CONNECT only)",
                if request.command == BIND {
                    "BIND"
                } else {
                    "UDP ASSOCIATE"
                },
                request.target
            ),
            Some(Answer::Reply(socks_reply::COMMAND_NOT_SUPPORTED)),
        )),
        other => Err(SocksError::new(
            format!("unknown command {other:#04x}"),
            Some(Answer::Reply(socks_reply::COMMAND_NOT_SUPPORTED)),
        )),
    }
}

async fn write<C: Io>(client: &mut BufStream<C>, bytes: &[u8]) -> Result<(), SocksError> {
    client
        .io
        .write_all(bytes)
        .await
        .map_err(|e| SocksError::new(format!("answering the client failed: {e}"), None))
}

/// The same judgment as for Proxy-Authorization: the server's credentials when it has
/// some, else the handler's `on_authenticate` (given them as Basic credentials).
async fn credentials_accepted(
    engine: &Engine,
    conn: &mut ConnState,
    user: &[u8],
    pass: &[u8],
) -> bool {
    let pair = [user, b":", pass].concat();
    if engine.config.proxy_auth.is_enabled() {
        return engine.config.proxy_auth.accepts(&pair);
    }
    let Some(handler) = conn.handler(engine) else {
        return false;
    };
    let token = base64::engine::general_purpose::STANDARD.encode(&pair);
    let reply = handler.authenticate("Basic".into(), token);
    let timeout = engine.config.hook_timeout;
    matches!(
        await_hook(&engine.hook_waits, timeout, reply, "on_authenticate").await,
        Ok(true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<Parse<T>, SocksError>) -> SocksError {
        r.expect_err("an error")
    }

    #[test]
    fn greetings() {
        assert_eq!(parse_greeting(b""), Ok(Parse::Incomplete));
        assert_eq!(parse_greeting(b"\x05"), Ok(Parse::Incomplete));
        assert_eq!(parse_greeting(b"\x05\x02\x00"), Ok(Parse::Incomplete));
        assert_eq!(
            parse_greeting(b"\x05\x02\x00\x02rest"),
            Ok(Parse::Done(vec![0, 2], 4))
        );
        let e = err(parse_greeting(b"\x04\x01\x00"));
        assert!(e.message.contains("not a SOCKS5 greeting"), "{e:?}");
        assert_eq!(e.answer, None);
        let e = err(parse_greeting(b"\x05\x00"));
        assert_eq!(e.answer, Some(Answer::NoMethod));
    }

    #[test]
    fn user_pass() {
        assert_eq!(parse_user_pass(b"\x01\x03us"), Ok(Parse::Incomplete));
        assert_eq!(parse_user_pass(b"\x01\x03usr"), Ok(Parse::Incomplete));
        assert_eq!(parse_user_pass(b"\x01\x03usr\x02p"), Ok(Parse::Incomplete));
        assert_eq!(
            parse_user_pass(b"\x01\x03usr\x02pw"),
            Ok(Parse::Done(
                UserPass {
                    user: b"usr".to_vec(),
                    pass: b"pw".to_vec()
                },
                8
            ))
        );
        // An empty password is allowed; an empty user is not.
        assert_eq!(
            parse_user_pass(b"\x01\x01u\x00"),
            Ok(Parse::Done(
                UserPass {
                    user: b"u".to_vec(),
                    pass: vec![]
                },
                4
            ))
        );
        assert_eq!(
            err(parse_user_pass(b"\x01\x00\x00")).answer,
            Some(Answer::AuthFailed)
        );
        let e = err(parse_user_pass(b"\x05\x01u\x01p"));
        assert!(e.message.contains("RFC 1929"), "{e:?}");
    }

    #[test]
    fn requests() {
        let done = |buf: &[u8]| match parse_request(buf) {
            Ok(Parse::Done(r, n)) => (r.command, r.target, n),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            done(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"),
            (1, "127.0.0.1:80".into(), 10)
        );
        assert_eq!(
            done(b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"),
            (1, "example.com:443".into(), 18)
        );
        let mut v6 = b"\x05\x02\x00\x04".to_vec();
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0x1f, 0x90]);
        assert_eq!(done(&v6), (2, "[::1]:8080".into(), 22));
        // Every prefix of a whole request is incomplete, never an error.
        for whole in [&b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"[..], &v6] {
            for n in 0..whole.len() {
                assert_eq!(parse_request(&whole[..n]), Ok(Parse::Incomplete), "{n}");
            }
        }
    }

    #[test]
    fn malformed_requests_get_their_reply_codes() {
        let code = |buf: &[u8]| err(parse_request(buf)).answer;
        let reply = |c| Some(Answer::Reply(c));
        assert_eq!(
            code(b"\x05\x01\x00\x05\x00"),
            reply(socks_reply::ADDRESS_TYPE_NOT_SUPPORTED)
        );
        assert_eq!(
            code(b"\x04\x01\x00\x01"),
            reply(socks_reply::GENERAL_FAILURE)
        );
        assert_eq!(
            code(b"\x05\x01\x00\x03\x00\x00\x50"),
            reply(socks_reply::GENERAL_FAILURE)
        );
        assert_eq!(
            code(b"\x05\x01\x00\x03\x03a/b\x00\x50"),
            reply(socks_reply::GENERAL_FAILURE)
        );
        assert_eq!(
            code(b"\x05\x01\x00\x03\x03a:b\x00\x50"),
            reply(socks_reply::GENERAL_FAILURE)
        );
        assert_eq!(
            code(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00"),
            reply(socks_reply::GENERAL_FAILURE)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator: every parser over many short random inputs.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = buf.first_mut() {
                // Mostly well-versioned, so the parsers get past the first check.
                if next() % 4 != 0 {
                    *first = VERSION;
                }
            }
            let _ = parse_greeting(&buf);
            let _ = parse_request(&buf);
            if let Some(first) = buf.first_mut() {
                *first = USER_PASS_VERSION;
            }
            let _ = parse_user_pass(&buf);
        }
    }

    #[test]
    fn replies() {
        assert_eq!(reply(0), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(reply(socks_reply::NOT_ALLOWED)[1], 2);
    }
}
