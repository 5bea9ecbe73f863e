//! Proxy client authentication (RFC 9110 sections 11.7.1 and 11.7.2, Basic scheme of RFC
//! 7617), and the refusal to run as an open relay on a reachable address.

use std::fmt;
use std::net::SocketAddr;

use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::http1::Headers;

/// The challenge sent with every 407.
pub const CHALLENGE: &str = "Basic realm=\"segproxy\"";

/// The accepted `user:password` pairs, kept only as SHA-256 digests: a candidate is hashed
/// and compared with every entry in constant time, so neither the content nor the length of
/// a secret shows in the time an answer takes.
#[derive(Clone, Default)]
pub struct ProxyAuth {
    digests: Vec<[u8; 32]>,
}

impl fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyAuth({} credentials)", self.digests.len())
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What a request's Proxy-Authorization said.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Basic credentials that match an accepted pair.
    Accepted,
    /// No Proxy-Authorization at all.
    Missing,
    /// Basic credentials that match no pair (or do not decode).
    Rejected,
    /// Another scheme (or Basic without a match) for a handler's `on_authenticate` to judge:
    /// the scheme name and the credentials after it, as sent.
    Other { scheme: String, credentials: String },
}

impl ProxyAuth {
    /// Accepts each `user:password` (the user may not contain a colon, RFC 7617 section 2).
    pub fn new<I, S>(pairs: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut digests = Vec::new();
        for pair in pairs {
            let pair = pair.as_ref();
            match pair.split_once(':') {
                Some((user, _)) if !user.is_empty() => digests.push(digest(pair.as_bytes())),
                _ => {
                    return Err(format!(
                        "proxy credentials must be USER:PASS with a non-empty USER, got {:?}",
                        redact(pair)
                    ))
                }
            }
        }
        Ok(ProxyAuth { digests })
    }

    pub fn is_enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `user:password` is one of the accepted pairs, in time independent of which
    /// entry matched or how close a wrong one came.
    pub fn accepts(&self, user_pass: &[u8]) -> bool {
        let candidate = digest(user_pass);
        let mut ok = subtle::Choice::from(0);
        for d in &self.digests {
            ok |= candidate.ct_eq(d);
        }
        ok.into()
    }

    /// Judges the Proxy-Authorization of a request.
    pub fn check(&self, headers: &Headers) -> Verdict {
        let Some(value) = headers.get("proxy-authorization") else {
            return Verdict::Missing;
        };
        let value = value.trim();
        let (scheme, credentials) = value.split_once([' ', '\t']).unwrap_or((value, ""));
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) {
                if self.accepts(&decoded) {
                    return Verdict::Accepted;
                }
            }
            if !self.is_enabled() {
                return Verdict::Other {
                    scheme: scheme.to_string(),
                    credentials: credentials.to_string(),
                };
            }
            return Verdict::Rejected;
        }
        Verdict::Other {
            scheme: scheme.to_string(),
            credentials: credentials.to_string(),
        }
    }
}

/// A credential pair as it may be shown: the user, never the password.
fn redact(pair: &str) -> String {
    match pair.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".into(),
    }
}

/// Refuses to serve without authentication on an address other than loopback: anyone who can
/// reach it could relay traffic through it (and reach what only this machine can).
pub fn open_relay_refusal(
    listen: SocketAddr,
    authenticated: bool,
    allow_open_proxy: bool,
) -> Result<(), String> {
    if authenticated || allow_open_proxy || listen.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {listen} without client authentication: anyone who can reach that address \
         could use this proxy as an open relay; require credentials with --proxy-auth USER:PASS \
         (proxy_auth= in Python), or pass --allow-open-proxy (allow_open_proxy=True) if the network is trusted"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> Headers {
        let mut h = Headers::default();
        h.push("Proxy-Authorization", value.to_string());
        h
    }

    #[test]
    fn basic_credentials_are_checked() {
        let auth = ProxyAuth::new(["alice:s3cret", "bob:pa:ss"]).unwrap();
        assert!(auth.is_enabled());
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(auth.check(&Headers::default()), Verdict::Missing);
        assert_eq!(
            auth.check(&with(&format!("Basic {}", b64("alice:s3cret")))),
            Verdict::Accepted
        );
        assert_eq!(
            auth.check(&with(&format!("basic  {}", b64("bob:pa:ss")))),
            Verdict::Accepted
        );
        assert_eq!(
            auth.check(&with(&format!("Basic {}", b64("alice:wrong")))),
            Verdict::Rejected
        );
        assert_eq!(
            auth.check(&with(&format!("Basic {}", b64("alice:s3cret2")))),
            Verdict::Rejected
        );
        assert_eq!(auth.check(&with("Basic !!notbase64")), Verdict::Rejected);
        assert_eq!(
            auth.check(&with("Bearer tok123")),
            Verdict::Other {
                scheme: "Bearer".into(),
                credentials: "tok123".into()
            }
        );
        assert!(ProxyAuth::new(["nocolon"]).is_err());
        assert!(ProxyAuth::new([":pass"]).is_err());
        let e = ProxyAuth::new(["secret-password"]).unwrap_err();
        assert!(!e.contains("secret-password"), "{e}");
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn open_relay_is_refused_off_loopback() {
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let e = open_relay_refusal(public, false, false).unwrap_err();
        assert!(
            e.contains("--proxy-auth") && e.contains("--allow-open-proxy"),
            "{e}"
        );
        assert!(open_relay_refusal(public, true, false).is_ok());
        assert!(open_relay_refusal(public, false, true).is_ok());
        assert!(open_relay_refusal("127.0.0.1:1".parse().unwrap(), false, false).is_ok());
        assert!(open_relay_refusal("[::1]:1".parse().unwrap(), false, false).is_ok());
        assert!(open_relay_refusal("[::]:1".parse().unwrap(), false, false).is_err());
    }
}
