//! Safety options: which destinations the proxy may reach at all.
//!
//! [`DomainFilter`] has allow and deny lists of host names and an option to
//! refuse non-public addresses. List entries:
//! - `example.com` matches exactly that host;
//! - `.example.com` (or `*.example.com`, read the same way) matches
//!   `example.com` and every subdomain;
//! - `*` matches every host.
//!
//! Entries and hosts are compared case-insensitively, ignoring a trailing dot
//! and IPv6 brackets. Deny wins over allow; with a non-empty allow list, hosts
//! not in it are denied.
//!
//! `check_host` runs before DNS; the private-address guard must also run on
//! every *resolved* address with `check_addr`, since a public-looking name can
//! resolve to a private address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainFilter {
    allow: Vec<String>,
    deny: Vec<String>,
    /// Refuse private, loopback, link-local and other non-public addresses.
    pub deny_private: bool,
}

impl DomainFilter {
    /// Builds a filter; empty entries are ignored.
    pub fn new<A, D>(allow: A, deny: D, deny_private: bool) -> Self
    where
        A: IntoIterator,
        A::Item: AsRef<str>,
        D: IntoIterator,
        D::Item: AsRef<str>,
    {
        Self {
            allow: normalize_entries(allow),
            deny: normalize_entries(deny),
            deny_private,
        }
    }

    /// The normalized allow entries (`.suffix` or exact host).
    pub fn allow(&self) -> &[String] {
        &self.allow
    }

    /// The normalized deny entries (`.suffix` or exact host).
    pub fn deny(&self) -> &[String] {
        &self.deny
    }

    /// True when the filter lets everything through (skip calling it).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && !self.deny_private
    }

    /// Checks a destination host name (or IP literal) before connecting.
    /// `Err` carries a reason fit for a 403 body or a log line.
    pub fn check_host(&self, host: &str) -> Result<(), String> {
        // Nothing to check against (the default): no normalised copy of the host.
        if self.deny.is_empty() && self.allow.is_empty() && !self.deny_private {
            return Ok(());
        }
        let host = normalize_host(host);
        if let Some(entry) = self.deny.iter().find(|e| entry_matches(e, &host)) {
            return Err(format!("host {host} is denied ({entry})"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|e| entry_matches(e, &host)) {
            return Err(format!("host {host} is not in the allow list"));
        }
        if self.deny_private {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return self.check_addr(ip);
            }
            // These never reach a public host whatever DNS says.
            if host == "localhost" || host.ends_with(".localhost") {
                return Err(format!("host {host} is a loopback name"));
            }
        }
        Ok(())
    }

    /// Checks a resolved address (always call it after DNS when
    /// `deny_private` is set).
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), String> {
        if !self.deny_private {
            return Ok(());
        }
        match non_public(ip) {
            None => Ok(()),
            Some(NonPublic::Direct(kind)) => Err(format!("{ip} is a non-public address ({kind})")),
            Some(NonPublic::Embedded(v4, kind)) => {
                Err(format!("{ip} embeds {v4}, a non-public address ({kind})"))
            }
        }
    }
}

impl fmt::Display for DomainFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "allow=[{}] deny=[{}] deny_private={}",
            self.allow.join(","),
            self.deny.join(","),
            self.deny_private
        )
    }
}

fn normalize_entries<I>(entries: I) -> Vec<String>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    entries
        .into_iter()
        .filter_map(|e| {
            let e = normalize_host(e.as_ref().trim());
            let e = match e.strip_prefix("*.") {
                Some(rest) => format!(".{rest}"),
                None => e,
            };
            (!e.is_empty() && e != ".").then_some(e)
        })
        .collect()
}

fn normalize_host(host: &str) -> String {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

fn entry_matches(entry: &str, host: &str) -> bool {
    if entry == "*" {
        return true;
    }
    match entry.strip_prefix('.') {
        Some(apex) => host == apex || host.ends_with(entry),
        None => host == entry,
    }
}

enum NonPublic {
    Direct(&'static str),
    /// An IPv6 address carrying a non-public IPv4 one (mapped, NAT64, 6to4).
    Embedded(Ipv4Addr, &'static str),
}

fn non_public(ip: IpAddr) -> Option<NonPublic> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4).map(NonPublic::Direct),
        IpAddr::V6(v6) => v6_kind(v6),
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "unspecified / this network",
        (10, _, _) => "private",
        (172, 16..=31, _) => "private",
        (192, 168, _) => "private",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared address space 100.64.0.0/10",
        (192, 0, 0) => "IETF protocol assignments",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, _, _) => "multicast",
        _ if ip.is_broadcast() => "broadcast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

fn v6_kind(ip: Ipv6Addr) -> Option<NonPublic> {
    let s = ip.segments();
    let embedded = |v4: Ipv4Addr| v4_kind(v4).map(|kind| NonPublic::Embedded(v4, kind));
    let direct = |kind| Some(NonPublic::Direct(kind));
    if ip.is_unspecified() {
        return direct("unspecified");
    }
    if ip.is_loopback() {
        return direct("loopback");
    }
    // ::ffff:a.b.c.d is the IPv4 host itself.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return embedded(v4);
    }
    let low_v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // Deprecated IPv4-compatible ::a.b.c.d.
        [0, 0, 0, 0, 0, 0, _, _] => direct("reserved (IPv4-compatible)"),
        // NAT64 well-known prefix: reaches the embedded IPv4 host.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => embedded(low_v4),
        [0x64, 0xff9b, 1, ..] => direct("private (local-use NAT64)"),
        [0x2002, hi, lo, ..] => embedded(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        [0x2001, 0xdb8, ..] => direct("documentation"),
        [0x3fff, b, ..] if b < 0x1000 => direct("documentation"),
        [0x100, 0, 0, 0, ..] => direct("discard-only"),
        [a, ..] if a & 0xfe00 == 0xfc00 => direct("unique local fc00::/7"),
        [a, ..] if a & 0xffc0 == 0xfe80 => direct("link-local"),
        [a, ..] if a & 0xffc0 == 0xfec0 => direct("site-local"),
        [a, ..] if a & 0xff00 == 0xff00 => direct("multicast"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(allow: &[&str], deny: &[&str], private: bool) -> DomainFilter {
        DomainFilter::new(allow, deny, private)
    }

    #[test]
    fn lists_match_exact_and_suffix() {
        let filter = f(&[], &[".example.com", "exact.test"], false);
        assert!(filter.check_host("example.com").is_err());
        assert!(filter.check_host("a.b.Example.COM.").is_err());
        assert!(filter.check_host("notexample.com").is_ok());
        assert!(filter.check_host("exact.test").is_err());
        assert!(filter.check_host("sub.exact.test").is_ok());
        assert_eq!(
            filter.check_host("www.example.com").unwrap_err(),
            "host www.example.com is denied (.example.com)"
        );
        // `*.x` reads as `.x`.
        let filter = f(&[], &["*.x.test"], false);
        assert!(filter.check_host("x.test").is_err());
        assert_eq!(filter.deny(), &[".x.test".to_string()]);
        assert!(f(&[], &["*"], false).check_host("anything").is_err());
    }

    #[test]
    fn allow_list_and_deny_wins() {
        let filter = f(&[".example.com", "api.test"], &["bad.example.com"], false);
        assert!(filter.check_host("example.com").is_ok());
        assert!(filter.check_host("www.example.com").is_ok());
        assert!(filter.check_host("api.test").is_ok());
        assert_eq!(
            filter.check_host("other.test").unwrap_err(),
            "host other.test is not in the allow list"
        );
        assert!(filter.check_host("bad.example.com").is_err());
        assert!(filter.check_host("x.bad.example.com").is_ok()); // exact entry only
        let open = f(&[" ", ""], &[], false);
        assert!(open.is_open());
        assert!(open.check_host("anything").is_ok());
        assert!(open.check_addr("127.0.0.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn private_addresses() {
        let filter = f(&[], &[], true);
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "127.255.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fec0::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "2001:db8::1",
            "3fff::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:c0a8:0101::1",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert!(filter.check_addr(addr).is_err(), "{ip} should be denied");
            assert!(
                filter.check_host(ip).is_err(),
                "{ip} literal should be denied"
            );
        }
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.0.3.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert!(filter.check_addr(addr).is_ok(), "{ip} should be allowed");
        }
        assert_eq!(
            filter.check_addr("127.0.0.1".parse().unwrap()).unwrap_err(),
            "127.0.0.1 is a non-public address (loopback)"
        );
        assert_eq!(
            filter
                .check_addr("::ffff:192.168.0.1".parse().unwrap())
                .unwrap_err(),
            "::ffff:192.168.0.1 embeds 192.168.0.1, a non-public address (private)"
        );
        assert!(filter.check_host("[::1]").is_err());
        assert!(filter.check_host("localhost").is_err());
        assert!(filter.check_host("app.localhost.").is_err());
        assert!(filter.check_host("example.com").is_ok());
        // Off: nothing is checked.
        assert!(f(&[], &[], false).check_host("127.0.0.1").is_ok());
    }
}
