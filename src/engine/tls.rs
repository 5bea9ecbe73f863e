//! TLS plumbing for interception: accept TLS from a client with a certificate minted by our CA,
//! and connect to origins with a client config that trusts the system roots (plus extra CA
//! files, or anything at all when insecure).
//!
//! All configs use the ring `CryptoProvider` explicitly. Handshakes here have no timeout of
//! their own: wrap the calls in `tokio::time::timeout`.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use super::ca::{ring_provider, CaError, CertificateAuthority};

/// What went wrong, for the proxy to decide how to log or answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsErrorKind {
    /// The client aborted our handshake with a certificate alert (bad_certificate, unknown_ca,
    /// certificate_unknown, ...): it does not trust our CA or the minted certificate.
    ClientRejectedCertificate,
    /// The client closed the connection during the handshake without saying why (some clients
    /// do this instead of sending an alert when they reject the certificate).
    ClientClosed,
    /// The client's first bytes after CONNECT were not a TLS ClientHello.
    NotTls,
    /// The origin's certificate did not verify (unknown issuer, wrong name, expired, ...).
    OriginCertificate,
    /// Any other handshake failure (alert from the peer, no common version/cipher/ALPN, ...).
    Handshake,
    /// A configuration problem: cannot mint for the host, bad host name, unreadable CA file.
    Config,
    /// Transport error (reset, broken pipe, ...).
    Io,
}

/// A TLS failure; `Display` is one line naming the reason.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsError {
    kind: TlsErrorKind,
    message: String,
}

impl TlsError {
    fn new(kind: TlsErrorKind, message: impl Into<String>) -> Self {
        TlsError {
            kind,
            message: message.into(),
        }
    }
    pub fn kind(&self) -> TlsErrorKind {
        self.kind
    }
    /// True when the client refused the certificate we presented (see
    /// [`TlsErrorKind::ClientRejectedCertificate`]).
    pub fn client_rejected_certificate(&self) -> bool {
        self.kind == TlsErrorKind::ClientRejectedCertificate
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsError({:?}: {})", self.kind, self.message)
    }
}

impl std::error::Error for TlsError {}

impl From<CaError> for TlsError {
    fn from(e: CaError) -> Self {
        TlsError::new(TlsErrorKind::Config, e.to_string())
    }
}

/// `UnknownCA` -> `unknown_ca`, `UnknownPSKIdentity` -> `unknown_psk_identity` (the RFC names).
fn alert_name(alert: AlertDescription) -> String {
    let camel = format!("{alert:?}");
    if camel.contains('(') {
        return camel; // unknown value, e.g. AlertDescription(0xfe)
    }
    let chars: Vec<char> = camel.chars().collect();
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            let prev = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if prev.is_ascii_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_ascii_uppercase() && next_lower)
            {
                out.push('_');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Alerts a TLS client sends when it rejects the server's certificate.
fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::BadCertificateStatusResponse
            | AlertDescription::BadCertificateHashValue
            // A client that trusts a *different* CA with the same subject name (e.g. an older
            // segproxy CA) finds the anchor by name, fails the signature check and says this.
            | AlertDescription::DecryptError
    )
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn io_kind_message(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::BrokenPipe => "broken pipe".into(),
        io::ErrorKind::ConnectionAborted => "connection aborted".into(),
        _ => e.to_string(),
    }
}

/// Classify an error from reading the ClientHello.
fn client_hello_error(e: io::Error) -> TlsError {
    if let Some(r) = rustls_error(&e) {
        return TlsError::new(
            TlsErrorKind::NotTls,
            format!("client did not start TLS (not a valid ClientHello: {r})"),
        );
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => TlsError::new(
            TlsErrorKind::ClientClosed,
            "client closed the connection before sending a TLS ClientHello",
        ),
        _ => TlsError::new(
            TlsErrorKind::Io,
            format!(
                "reading the client's TLS ClientHello failed: {}",
                io_kind_message(&e)
            ),
        ),
    }
}

/// Classify an error from the server side of a handshake with a client.
fn client_handshake_error(e: io::Error, host: &str) -> TlsError {
    if let Some(r) = rustls_error(&e) {
        return match r {
            rustls::Error::AlertReceived(a) if is_certificate_alert(*a) => TlsError::new(
                TlsErrorKind::ClientRejectedCertificate,
                format!(
                    "client rejected our certificate for {host} (alert: {})",
                    alert_name(*a)
                ),
            ),
            rustls::Error::AlertReceived(a) => TlsError::new(
                TlsErrorKind::Handshake,
                format!(
                    "client aborted the handshake for {host} (alert: {})",
                    alert_name(*a)
                ),
            ),
            other => TlsError::new(
                TlsErrorKind::Handshake,
                format!("handshake with client for {host} failed: {other}"),
            ),
        };
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => TlsError::new(
            TlsErrorKind::ClientClosed,
            format!(
                "client closed the connection during the TLS handshake for {host} \
                 (it may have rejected our certificate)"
            ),
        ),
        _ => TlsError::new(
            TlsErrorKind::Io,
            format!(
                "handshake with client for {host} failed: {}",
                io_kind_message(&e)
            ),
        ),
    }
}

/// Classify an error from the client side of a handshake with an origin.
fn origin_handshake_error(e: io::Error, host: &str) -> TlsError {
    if let Some(r) = rustls_error(&e) {
        return match r {
            rustls::Error::InvalidCertificate(ce) => TlsError::new(
                TlsErrorKind::OriginCertificate,
                format!("origin certificate not trusted: {ce} (origin {host})"),
            ),
            rustls::Error::AlertReceived(a) => TlsError::new(
                TlsErrorKind::Handshake,
                format!(
                    "origin {host} aborted the handshake (alert: {})",
                    alert_name(*a)
                ),
            ),
            other => TlsError::new(
                TlsErrorKind::Handshake,
                format!("handshake with origin {host} failed: {other}"),
            ),
        };
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => TlsError::new(
            TlsErrorKind::Handshake,
            format!("origin {host} closed the connection during the TLS handshake"),
        ),
        _ => TlsError::new(
            TlsErrorKind::Io,
            format!(
                "handshake with origin {host} failed: {}",
                io_kind_message(&e)
            ),
        ),
    }
}

/// Accept TLS from a client after CONNECT. Reads the ClientHello, takes the host from SNI when
/// present, else `fallback_host` (the CONNECT target, maybe an IP literal), gets the
/// `ServerConfig` for it from the CA and finishes the handshake. Returns the stream and the host
/// the certificate was minted for.
pub async fn accept_intercepted<IO>(
    io: IO,
    ca: &CertificateAuthority,
    fallback_host: &str,
) -> Result<(tokio_rustls::server::TlsStream<IO>, String), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
        .await
        .map_err(client_hello_error)?;
    let host = match start.client_hello().server_name() {
        Some(sni) if !sni.is_empty() => sni.to_ascii_lowercase(),
        _ => fallback_host.to_string(),
    };
    // On a mint failure the connection is dropped without an alert; the caller logs the error.
    let config = ca.server_config(&host)?;
    let stream = start
        .into_stream(config)
        .await
        .map_err(|e| client_handshake_error(e, &host))?;
    Ok((stream, host))
}

/// Which certificates to trust when talking to origins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginTrust {
    /// PEM files of additional CA certificates (each may hold several).
    pub extra_ca_files: Vec<PathBuf>,
    /// Accept any origin certificate (handshake signatures are still checked). For testing only.
    pub insecure: bool,
}

/// Accepts any certificate; still checks the handshake signatures made with its key.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn load_extra_cas(roots: &mut RootCertStore, trust: &OriginTrust) -> Result<(), TlsError> {
    for path in &trust.extra_ca_files {
        let shown = path.display();
        let pem = std::fs::read(path).map_err(|e| {
            TlsError::new(
                TlsErrorKind::Config,
                format!("cannot read CA file {shown}: {e}"),
            )
        })?;
        let mut n = 0;
        for item in rustls_pemfile::certs(&mut pem.as_slice()) {
            let der = item.map_err(|e| {
                TlsError::new(
                    TlsErrorKind::Config,
                    format!("CA file {shown} cannot be parsed: {e:?}"),
                )
            })?;
            roots.add(der).map_err(|e| {
                TlsError::new(
                    TlsErrorKind::Config,
                    format!("CA file {shown}: certificate rejected: {e}"),
                )
            })?;
            n += 1;
        }
        if n == 0 {
            return Err(TlsError::new(
                TlsErrorKind::Config,
                format!(
                    "no certificates found in CA file {shown} (expected PEM \"BEGIN CERTIFICATE\")"
                ),
            ));
        }
    }
    Ok(())
}

fn builder(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| {
            TlsError::new(
                TlsErrorKind::Config,
                format!("cannot build TLS client config: {e}"),
            )
        })
}

/// Client config for talking to origins: system roots via rustls-native-certs (which honours
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`) plus `extra_ca_files`; with `insecure`, a verifier that
/// accepts any certificate. ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3. Loading the system store takes
/// milliseconds: build this once and share it.
pub fn origin_client_config(trust: &OriginTrust) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = ring_provider();
    let mut config = if trust.insecure {
        // Still read the extra files, so a typo in a path is reported either way.
        load_extra_cas(&mut RootCertStore::empty(), trust)?;
        let verifier = AcceptAnyServerCert {
            algorithms: provider.signature_verification_algorithms,
        };
        builder(provider)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            log::warn!("loading system root certificates: {e}");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            log::debug!("ignored {ignored} unparsable system root certificates");
        }
        load_extra_cas(&mut roots, trust)?;
        if roots.is_empty() {
            log::warn!(
                "no trusted root certificates (system store empty, no extra CA files): \
                 every origin certificate will be rejected"
            );
        }
        log::debug!("origin trust: {added} system roots, {} total", roots.len());
        builder(provider)?
            .with_root_certificates(roots)
            .with_no_client_auth()
    };
    // HTTP/2 when the origin chooses it (`h2_client`), else HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether an origin chose HTTP/2 in the TLS handshake.
pub fn negotiated_h2<IO>(tls: &tokio_rustls::client::TlsStream<IO>) -> bool {
    tls.get_ref().1.alpn_protocol() == Some(b"h2")
}

/// TLS handshake with an origin over `io`. `host` is a DNS name (sent as SNI and verified) or an
/// IP literal (IPv6 with or without brackets; no SNI, verified against IP SANs).
pub async fn connect_origin<IO>(
    io: IO,
    config: Arc<ClientConfig>,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<IO>, TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let bare = bare
        .strip_suffix('.')
        .filter(|b| !b.is_empty())
        .unwrap_or(bare);
    let name = ServerName::try_from(bare.to_string()).map_err(|_| {
        TlsError::new(
            TlsErrorKind::Config,
            format!("invalid origin host name {host:?}"),
        )
    })?;
    TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(|e| origin_handshake_error(e, host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ca::tests::{test_ca, TempDir};
    use crate::engine::ca::CaSubject;
    use std::future::Future;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const LIMIT: Duration = Duration::from_secs(10);

    async fn bounded<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(LIMIT, f)
            .await
            .expect("test step timed out")
    }

    /// A client config trusting only `ca`, offering `http/1.1`, with the given TLS versions.
    fn client_trusting(
        ca: &CertificateAuthority,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(ca.cert_der())).unwrap();
        let mut c = ClientConfig::builder_with_provider(ring_provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(c)
    }

    const BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];

    /// Run a TLS client against `accept_intercepted` over loopback TCP. Returns
    /// (client result: reply bytes, server result: host used).
    async fn intercept_once(
        ca: Arc<CertificateAuthority>,
        client: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        fallback: &str,
    ) -> (Result<Vec<u8>, io::Error>, Result<String, TlsError>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fallback = fallback.to_string();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut tls, host) = accept_intercepted(tcp, &ca, &fallback).await?;
            // Both sides offer h2 first: it is chosen.
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            tls.write_all(format!("pong {host}").as_bytes())
                .await
                .unwrap();
            tls.shutdown().await.unwrap();
            Ok(host)
        });
        let client_result = async {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = TlsConnector::from(client).connect(server_name, tcp).await?;
            // Both sides offer h2 first: it is chosen.
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let chain = tls.get_ref().1.peer_certificates().unwrap();
            assert_eq!(chain.len(), 2, "server sends [leaf, CA]");
            tls.write_all(b"ping").await?;
            let mut reply = Vec::new();
            tls.read_to_end(&mut reply).await?;
            Ok(reply)
        };
        let client_result = bounded(client_result).await;
        let server_result = bounded(server).await.unwrap();
        (client_result, server_result)
    }

    #[tokio::test]
    async fn handshake_with_sni_tls13_and_tls12() {
        let ca = Arc::new(test_ca());
        for versions in [BOTH, &[&rustls::version::TLS12][..]] {
            let (client, server) = intercept_once(
                ca.clone(),
                client_trusting(&ca, versions),
                ServerName::try_from("www.example.com").unwrap(),
                "connect-target.invalid",
            )
            .await;
            assert_eq!(client.unwrap(), b"pong www.example.com");
            assert_eq!(
                server.unwrap(),
                "www.example.com",
                "SNI wins over the CONNECT host"
            );
        }
        assert_eq!(ca.mint_count(), 1);
    }

    #[tokio::test]
    async fn ip_literal_without_sni_uses_connect_host() {
        let ca = Arc::new(test_ca());
        let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let (client, server) = intercept_once(
            ca.clone(),
            client_trusting(&ca, BOTH),
            ServerName::IpAddress(ip.into()),
            "127.0.0.1",
        )
        .await;
        assert_eq!(client.unwrap(), b"pong 127.0.0.1");
        assert_eq!(server.unwrap(), "127.0.0.1");
    }

    #[tokio::test]
    async fn ipv6_literal_over_duplex() {
        let ca = test_ca();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = client_trusting(&ca, BOTH);
        let ip: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        let client = async move {
            let mut tls = TlsConnector::from(client)
                .connect(ServerName::IpAddress(ip.into()), a)
                .await
                .unwrap();
            tls.write_all(b"hi").await.unwrap();
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.unwrap();
            buf
        };
        let server = async {
            let (mut tls, host) = accept_intercepted(b, &ca, "[2001:db8::1]").await.unwrap();
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"yo").await.unwrap();
            tls.flush().await.unwrap();
            host
        };
        let (got, host) = bounded(async { tokio::join!(client, server) }).await;
        assert_eq!(&got, b"yo");
        assert_eq!(host, "[2001:db8::1]");
    }

    /// A CA whose subject differs from the default one.
    fn stranger_ca() -> CertificateAuthority {
        let subject = CaSubject {
            common_name: "Stranger CA".into(),
            ..CaSubject::default()
        };
        CertificateAuthority::generate(&subject).unwrap()
    }

    #[tokio::test]
    async fn client_not_trusting_ca_is_reported_as_rejection() {
        let ca = Arc::new(test_ca());
        let other = stranger_ca();
        for versions in [BOTH, &[&rustls::version::TLS12][..]] {
            let (client, server) = intercept_once(
                ca.clone(),
                client_trusting(&other, versions),
                ServerName::try_from("bank.example").unwrap(),
                "bank.example",
            )
            .await;
            let ce = client.unwrap_err();
            assert!(ce.to_string().contains("UnknownIssuer"), "client: {ce}");
            let se = server.unwrap_err();
            assert_eq!(se.kind(), TlsErrorKind::ClientRejectedCertificate, "{se}");
            assert!(se.client_rejected_certificate());
            assert_eq!(
                se.to_string(),
                "client rejected our certificate for bank.example (alert: unknown_ca)"
            );
        }
    }

    #[tokio::test]
    async fn client_trusting_other_ca_with_same_name_is_reported_as_rejection() {
        // Same subject DN as ours (e.g. a previous segproxy CA still installed in the client).
        let ca = Arc::new(test_ca());
        let old = test_ca();
        let (client, server) = intercept_once(
            ca.clone(),
            client_trusting(&old, BOTH),
            ServerName::try_from("bank.example").unwrap(),
            "bank.example",
        )
        .await;
        let ce = client.unwrap_err();
        assert!(ce.to_string().contains("BadSignature"), "client: {ce}");
        let se = server.unwrap_err();
        assert!(se.client_rejected_certificate(), "{se}");
        assert_eq!(
            se.to_string(),
            "client rejected our certificate for bank.example (alert: decrypt_error)"
        );
    }

    #[tokio::test]
    async fn plain_http_instead_of_tls() {
        let ca = test_ca();
        let (mut a, b) = tokio::io::duplex(4096);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let e = bounded(accept_intercepted(b, &ca, "x.example"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::NotTls, "{e}");
        assert!(e.to_string().starts_with("client did not start TLS"), "{e}");
    }

    #[tokio::test]
    async fn client_closes_before_hello() {
        let ca = test_ca();
        let (a, b) = tokio::io::duplex(4096);
        drop(a);
        let e = bounded(accept_intercepted(b, &ca, "x.example"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::ClientClosed, "{e}");
    }

    #[tokio::test]
    async fn client_closes_after_hello() {
        // The client sends its ClientHello, then hangs up without an alert.
        let ca = Arc::new(test_ca());
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = client_trusting(&ca, BOTH);
        let server = tokio::spawn({
            let ca = ca.clone();
            async move {
                accept_intercepted(b, &ca, "x.example")
                    .await
                    .map(|(_, h)| h)
            }
        });
        let mut conn =
            rustls::ClientConnection::new(client, ServerName::try_from("y.example").unwrap())
                .unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        let mut a = a;
        a.write_all(&hello).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = bounded(a.read(&mut buf)).await.unwrap();
        assert!(n > 0, "server answered the ClientHello");
        drop(a);
        let e = bounded(server).await.unwrap().unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::ClientClosed, "{e}");
        assert!(e.to_string().contains("y.example"), "{e}");
    }

    #[tokio::test]
    async fn unmintable_fallback_host_is_config_error() {
        let ca = test_ca();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let client = client_trusting(&ca, BOTH);
        let client = async move {
            TlsConnector::from(client)
                .connect(ServerName::IpAddress(ip.into()), a)
                .await
        };
        let server = accept_intercepted(b, &ca, "not a host");
        let (c, s) = bounded(async { tokio::join!(client, server) }).await;
        assert!(c.is_err());
        let e = s.unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::Config, "{e}");
        assert!(
            e.to_string().starts_with("cannot mint a certificate for"),
            "{e}"
        );
    }

    #[test]
    fn alert_names() {
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(
            alert_name(AlertDescription::BadCertificate),
            "bad_certificate"
        );
        assert_eq!(
            alert_name(AlertDescription::UnknownPSKIdentity),
            "unknown_psk_identity"
        );
        assert_eq!(
            alert_name(AlertDescription::HandshakeFailure),
            "handshake_failure"
        );
    }

    /// An origin on loopback presenting a certificate for `host` minted by `origin_ca`;
    /// answers "hello" and checks ALPN.
    async fn spawn_origin(
        origin_ca: Arc<CertificateAuthority>,
        host: &str,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = origin_ca.server_config(host).unwrap();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"hello").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    async fn fetch(
        config: Arc<ClientConfig>,
        addr: std::net::SocketAddr,
        host: &str,
    ) -> Result<Vec<u8>, TlsError> {
        bounded(async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = connect_origin(tcp, config, host).await?;
            // Both sides offer h2 first: it is chosen.
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let mut out = Vec::new();
            tls.read_to_end(&mut out).await.unwrap();
            Ok(out)
        })
        .await
    }

    #[tokio::test]
    async fn origin_trust_extra_ca_file() {
        let origin_ca = Arc::new(test_ca());
        let stranger_ca = Arc::new(stranger_ca());
        let dir = TempDir::new("origin-trust");
        let ca_file = dir.path("origin-ca.pem");
        std::fs::write(&ca_file, origin_ca.cert_pem()).unwrap();

        let good = spawn_origin(origin_ca.clone(), "localhost").await;
        let bad = spawn_origin(stranger_ca.clone(), "localhost").await;
        let ip_good = spawn_origin(origin_ca.clone(), "127.0.0.1").await;

        let trusted = origin_client_config(&OriginTrust {
            extra_ca_files: vec![ca_file.clone()],
            insecure: false,
        })
        .unwrap();
        assert_eq!(
            trusted.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(
            fetch(trusted.clone(), good, "localhost").await.unwrap(),
            b"hello"
        );
        assert_eq!(
            fetch(trusted.clone(), ip_good, "127.0.0.1").await.unwrap(),
            b"hello"
        );

        let e = fetch(trusted.clone(), bad, "localhost").await.unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::OriginCertificate, "{e}");
        assert_eq!(
            e.to_string(),
            "origin certificate not trusted: UnknownIssuer (origin localhost)"
        );

        // trusted issuer, wrong name. A fresh config: `trusted` holds a resumable session for
        // "127.0.0.1" (from ip_good), and both test origins share origin_ca's session cache.
        let fresh = origin_client_config(&OriginTrust {
            extra_ca_files: vec![ca_file.clone()],
            insecure: false,
        })
        .unwrap();
        let e = fetch(fresh, good, "127.0.0.1").await.unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::OriginCertificate, "{e}");
        assert!(
            e.to_string()
                .starts_with("origin certificate not trusted: certificate not valid for name"),
            "{e}"
        );

        // system roots only: our test CA is unknown
        let system = origin_client_config(&OriginTrust::default()).unwrap();
        let e = fetch(system, good, "localhost").await.unwrap_err();
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");

        let insecure = origin_client_config(&OriginTrust {
            extra_ca_files: vec![],
            insecure: true,
        })
        .unwrap();
        assert_eq!(
            fetch(insecure.clone(), bad, "localhost").await.unwrap(),
            b"hello"
        );
        assert_eq!(fetch(insecure, good, "127.0.0.1").await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn origin_aborting_handshake_is_named() {
        // A server that answers any ClientHello with a fatal handshake_failure alert.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
                .await;
        });
        let config = origin_client_config(&OriginTrust {
            extra_ca_files: vec![],
            insecure: true,
        })
        .unwrap();
        let e = fetch(config, addr, "example.com").await.unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::Handshake, "{e}");
        assert_eq!(
            e.to_string(),
            "origin example.com aborted the handshake (alert: handshake_failure)"
        );
    }

    #[test]
    fn extra_ca_file_errors() {
        let dir = TempDir::new("origin-bad");
        let missing = dir.path("missing.pem");
        let e = origin_client_config(&OriginTrust {
            extra_ca_files: vec![missing],
            insecure: false,
        })
        .unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::Config);
        assert!(
            e.to_string().starts_with("cannot read CA file ")
                && e.to_string().contains("missing.pem"),
            "{e}"
        );
        let garbage = dir.path("garbage.pem");
        std::fs::write(&garbage, "not a pem").unwrap();
        let e = origin_client_config(&OriginTrust {
            extra_ca_files: vec![garbage.clone()],
            insecure: true,
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("no certificates found in CA file "),
            "{e}"
        );
        let bad_body = dir.path("bad.pem");
        std::fs::write(
            &bad_body,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = origin_client_config(&OriginTrust {
            extra_ca_files: vec![bad_body],
            insecure: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("bad.pem"), "{e}");
    }

    #[tokio::test]
    async fn invalid_origin_host() {
        let config = origin_client_config(&OriginTrust {
            extra_ca_files: vec![],
            insecure: true,
        })
        .unwrap();
        let (a, _b) = tokio::io::duplex(1024);
        let e = connect_origin(a, config, "bad host").await.unwrap_err();
        assert_eq!(e.kind(), TlsErrorKind::Config);
        assert_eq!(e.to_string(), "invalid origin host name \"bad host\"");
    }

    /// Client -> accept_intercepted (our CA) -> connect_origin -> origin (another CA): the whole
    /// interception chain with real handshakes on both sides.
    #[tokio::test]
    async fn full_interception_chain() {
        let proxy_ca = Arc::new(test_ca());
        let origin_ca = Arc::new(test_ca());
        let dir = TempDir::new("chain");
        let ca_file = dir.path("origin-ca.pem");
        std::fs::write(&ca_file, origin_ca.cert_pem()).unwrap();
        let origin = spawn_origin(origin_ca, "localhost").await;
        let upstream = origin_client_config(&OriginTrust {
            extra_ca_files: vec![ca_file],
            insecure: false,
        })
        .unwrap();

        let (client_io, proxy_io) = tokio::io::duplex(64 * 1024);
        let proxy = tokio::spawn({
            let proxy_ca = proxy_ca.clone();
            async move {
                let (mut down, host) = accept_intercepted(proxy_io, &proxy_ca, "localhost")
                    .await
                    .unwrap();
                let tcp = TcpStream::connect(origin).await.unwrap();
                let mut up = connect_origin(tcp, upstream, &host).await.unwrap();
                tokio::io::copy_bidirectional(&mut down, &mut up).await.ok();
            }
        });
        let client = client_trusting(&proxy_ca, BOTH);
        let got = bounded(async move {
            let mut tls = TlsConnector::from(client)
                .connect(ServerName::try_from("localhost").unwrap(), client_io)
                .await
                .unwrap();
            let mut out = Vec::new();
            tls.read_to_end(&mut out).await.unwrap();
            out
        })
        .await;
        assert_eq!(got, b"hello");
        bounded(proxy).await.unwrap();
    }

    /// A real client: curl (OpenSSL) through `accept_intercepted`. Skipped if curl is missing.
    #[tokio::test]
    async fn curl_through_accept_intercepted() {
        if std::process::Command::new("curl")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("curl not found: skipped");
            return;
        }
        let ca = Arc::new(test_ca());
        let dir = TempDir::new("curl");
        let ca_file = dir.path("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn({
            let ca = ca.clone();
            async move {
                let mut results = Vec::new();
                for _ in 0..3 {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let r = match accept_intercepted(tcp, &ca, "127.0.0.1").await {
                        Ok((mut tls, host)) => {
                            let mut buf = vec![0u8; 4096];
                            let _ = tls.read(&mut buf).await;
                            let body = format!("hello {host}");
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            tls.write_all(resp.as_bytes()).await.unwrap();
                            let _ = tls.shutdown().await;
                            Ok(host)
                        }
                        Err(e) => Err(e),
                    };
                    results.push(r);
                }
                results
            }
        });
        let curl = |args: Vec<String>| async move {
            tokio::process::Command::new("curl")
                .args(["-sS", "--max-time", "5", "--noproxy", "*", "--http1.1"])
                .args(args)
                .env_remove("SSL_CERT_FILE")
                .env_remove("CURL_CA_BUNDLE")
                .output()
                .await
                .unwrap()
        };
        let ca_arg = ca_file.display().to_string();
        // 1. DNS name via SNI, trusting our CA
        let out = bounded(curl(vec![
            "--cacert".into(),
            ca_arg.clone(),
            "--resolve".into(),
            format!("site.example:{port}:127.0.0.1"),
            format!("https://site.example:{port}/"),
        ]))
        .await;
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello site.example");
        // 2. IP literal: no SNI, the CONNECT host is used
        let out = bounded(curl(vec![
            "--cacert".into(),
            ca_arg,
            format!("https://127.0.0.1:{port}/"),
        ]))
        .await;
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello 127.0.0.1");
        // 3. curl not trusting our CA (system roots only)
        let out = bounded(curl(vec![
            "--resolve".into(),
            format!("site.example:{port}:127.0.0.1"),
            format!("https://site.example:{port}/"),
        ]))
        .await;
        assert!(!out.status.success());
        let results = bounded(server).await.unwrap();
        assert_eq!(results[0].as_deref().unwrap(), "site.example");
        assert_eq!(results[1].as_deref().unwrap(), "127.0.0.1");
        let e = results[2].as_ref().unwrap_err();
        assert!(e.client_rejected_certificate(), "{e}");
        assert_eq!(
            e.to_string(),
            "client rejected our certificate for site.example (alert: unknown_ca)"
        );
    }
}
