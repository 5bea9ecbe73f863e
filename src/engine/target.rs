//! Request targets: absolute-form URLs from proxy clients, origin-form paths inside an
//! intercepted CONNECT, and `host:port` authorities.

use super::connector::{authority, push_authority, push_host};
use super::http1::RequestHead;
use super::session::Mode;

/// A parsed request target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
    /// Path and query, origin form ("/" when empty).
    pub path: String,
}

/// The port a URL of `scheme` (http or https) leaves out.
pub fn default_port(scheme: &str) -> u16 {
    if scheme == "https" {
        443
    } else {
        80
    }
}

impl Target {
    pub fn default_port(&self) -> u16 {
        default_port(self.scheme)
    }
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }
    /// Authority as a Host header writes it: the port only when not the scheme's default.
    pub fn host_header(&self) -> String {
        if self.port != self.default_port() {
            return self.authority();
        }
        let mut out = String::with_capacity(self.host.len() + 2);
        push_host(&mut out, &self.host);
        out
    }
    /// `scheme://host[:port]path`, built in one allocation (it names every flow's record).
    pub fn url(&self) -> String {
        let mut out =
            String::with_capacity(self.scheme.len() + 3 + self.host.len() + 8 + self.path.len());
        out.push_str(self.scheme);
        out.push_str("://");
        if self.port == self.default_port() {
            push_host(&mut out, &self.host);
        } else {
            push_authority(&mut out, &self.host, self.port);
        }
        out.push_str(&self.path);
        out
    }
}

/// Splits `host[:port]` (IPv6 in brackets) into a host and a port.
pub fn split_authority(auth: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    if auth.is_empty() {
        return Err("empty host".into());
    }
    if auth.contains('@') {
        return Err("user information in a proxy target is not allowed".into());
    }
    let (host, port) = if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '[' in host")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("bad authority {auth:?}")),
        };
        (h, port)
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err("IPv6 address must be in brackets".into()),
            None => (auth, None),
        }
    };
    if host.is_empty()
        || host
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b'/' || b == b'?' || b == b'#')
    {
        return Err(format!("bad host {host:?}"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("bad port {p:?}"))?,
        None => default_port.ok_or("a port is required")?,
    };
    let mut host = host.to_string();
    host.make_ascii_lowercase();
    Ok((host, port))
}

/// Reads an absolute-form (`http://host/path`) target.
pub fn parse_absolute(target: &str) -> Result<Target, String> {
    let (scheme, rest) = target.split_once("://").ok_or("not an absolute URL")?;
    let scheme = if scheme.eq_ignore_ascii_case("http") {
        "http"
    } else if scheme.eq_ignore_ascii_case("https") {
        "https"
    } else {
        return Err(format!("unsupported scheme {scheme:?}"));
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, path) = rest.split_at(split);
    let (host, port) = split_authority(auth, Some(default_port(scheme)))?;
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok(Target {
        scheme,
        host,
        port,
        path,
    })
}

/// Resolves the request's target for the connection's mode.
pub fn request_target(head: &RequestHead, mode: &Mode) -> Result<Target, String> {
    match mode {
        Mode::Proxy => {
            if head.target.starts_with('/') || head.target == "*" {
                return Err(format!(
                    "{} {} is not a proxy request: send the absolute URL (http://host/path) or CONNECT",
                    head.method, head.target
                ));
            }
            parse_absolute(&head.target)
        }
        Mode::Intercepted { host, port, .. } => {
            if head.target.contains("://") {
                let t = parse_absolute(&head.target)?;
                return Ok(Target {
                    scheme: "https",
                    ..t
                });
            }
            if !head.target.starts_with('/') {
                return Err(format!("bad request target {:?}", head.target));
            }
            Ok(Target {
                scheme: "https",
                host: host.clone(),
                port: *port,
                path: head.target.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed() {
        let t = parse_absolute("http://Example.test:8080/a/b?c=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("example.test", 8080, "/a/b?c=1")
        );
        let t = parse_absolute("http://[::1]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert_eq!(t.host_header(), "[::1]");
        let t = parse_absolute("http://a.test?x").unwrap();
        assert_eq!(t.path, "/?x");
        assert!(parse_absolute("ftp://a/").is_err());
        assert!(parse_absolute("http://u:p@a/").is_err());
        assert_eq!(
            split_authority("a.test:443", None).unwrap(),
            ("a.test".into(), 443)
        );
        assert!(split_authority("a.test", None).is_err());
        assert!(split_authority("a.test:0", None).is_err());
        assert_eq!(
            split_authority("[::1]:8443", None).unwrap(),
            ("::1".into(), 8443)
        );
    }

    #[test]
    fn urls_leave_out_the_default_port_and_bracket_ipv6() {
        let url = |s: &str| parse_absolute(s).unwrap().url();
        assert_eq!(url("http://a.test:80/x?y"), "http://a.test/x?y");
        assert_eq!(url("http://a.test:8080"), "http://a.test:8080/");
        assert_eq!(url("http://[::1]:443/"), "http://[::1]:443/");
        assert_eq!(url("https://[::1]:443/p"), "https://[::1]/p");
        assert_eq!(url("https://b.test:80/"), "https://b.test:80/");
    }
}
