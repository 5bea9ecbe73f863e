//! Our own certificate authority, and per-host leaf certificates minted from it.
//!
//! A [`CertificateAuthority`] holds the CA key and certificate, one leaf key pair (generated when
//! the CA is created or loaded; never the CA's own key) and a bounded cache of
//! host -> `rustls::ServerConfig`. The first request for a host mints a leaf certificate (~40 µs,
//! done inline); concurrent first requests for one host mint once.
//!
//! Everything uses the ring `CryptoProvider` explicitly; nothing relies on a process-wide default.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration as StdDuration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use time::{Duration, OffsetDateTime};

/// Default number of hosts whose certificate/`ServerConfig` is kept.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// Validity of a generated CA certificate.
const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of a leaf certificate (browsers reject > 398 days). Counted from now; the
/// certificate starts [`BACKDATE`] earlier to tolerate client clock skew.
const LEAF_VALIDITY_DAYS: i64 = 90;
/// Certificates start this long before "now" (clock skew between proxy and clients).
const BACKDATE: Duration = Duration::days(1);
/// A cached leaf is re-minted after this long, well before it expires.
const LEAF_RENEW_AFTER: StdDuration = StdDuration::from_secs(30 * 24 * 3600);
/// Stateful TLS session-resumption entries shared by all hosts of one CA.
const SESSION_CACHE_SIZE: usize = 4096;
/// X.520 upper bound for commonName; longer host names get no CN (SAN is what counts).
const MAX_CN_LEN: usize = 64;

/// A certificate-authority error, with a message a user can act on.
#[derive(Clone, PartialEq, Eq)]
pub struct CaError(String);

impl CaError {
    fn new(msg: impl Into<String>) -> Self {
        CaError(msg.into())
    }
    /// The message (same as `Display`).
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaError({:?})", self.0)
    }
}

impl std::error::Error for CaError {}

/// Subject of a generated CA certificate (same fields as asyncio-https-proxy's
/// `TLSStore.generate_ca`). Empty fields are left out of the certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaSubject {
    pub country: String,
    pub state: String,
    pub locality: String,
    pub organization: String,
    pub common_name: String,
}

impl Default for CaSubject {
    fn default() -> Self {
        CaSubject {
            country: "US".into(),
            state: "CA".into(),
            locality: "San Francisco".into(),
            organization: "segproxy".into(),
            common_name: "segproxy CA".into(),
        }
    }
}

/// A host name as it goes into a certificate: a DNS name (lowercase, no trailing dot) or an IP.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostName {
    Dns(String),
    Ip(IpAddr),
}

impl HostName {
    /// Normalise a host: trim, strip `[...]` around IPv6, strip one trailing dot, lowercase.
    /// No port: the caller passes the bare host.
    fn parse(host: &str) -> Result<HostName, CaError> {
        let mut h = host.trim();
        if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            h = inner;
        }
        if let Ok(ip) = h.parse::<IpAddr>() {
            return Ok(HostName::Ip(ip));
        }
        let h = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
        if h.is_empty() {
            return Err(CaError::new(
                "cannot mint a certificate for an empty host name",
            ));
        }
        if rustls::pki_types::DnsName::try_from(h.as_str()).is_err() {
            return Err(CaError::new(format!(
                "cannot mint a certificate for {host:?}: not a valid DNS name or IP address"
            )));
        }
        Ok(HostName::Dns(h))
    }

    /// Cache key: the normalised name, or the canonical text of the IP.
    fn key(&self) -> String {
        match self {
            HostName::Dns(d) => d.clone(),
            HostName::Ip(ip) => ip.to_string(),
        }
    }
}

/// Resolver used only while building the template `ServerConfig`; always replaced.
#[derive(Debug)]
struct NoCert;
impl ResolvesServerCert for NoCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

struct Minted {
    config: Arc<ServerConfig>,
    certified: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

/// One per cached host: the lock makes concurrent first requests mint once.
#[derive(Default)]
struct Slot(Mutex<Option<Minted>>);

struct HostCache {
    map: HashMap<String, Arc<Slot>>,
    /// Insertion order, for first-in-first-out eviction when full.
    order: VecDeque<String>,
}

/// Our certificate authority. `Send + Sync`; share it behind an `Arc`.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_cert_der: CertificateDer<'static>,
    ca_not_after: OffsetDateTime,
    /// Shared by every leaf this CA instance mints (not the CA's key).
    leaf_key: KeyPair,
    leaf_signing_key: Arc<dyn rustls::sign::SigningKey>,
    provider: Arc<CryptoProvider>,
    /// Cloned per host with its own cert resolver; shares the session cache.
    template: ServerConfig,
    cache: Mutex<HostCache>,
    cache_capacity: usize,
    mints: AtomicU64,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("ca_not_after", &self.ca_not_after)
            .field("mints", &self.mint_count())
            .field("cached_hosts", &self.cached_hosts())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The ring provider, used explicitly everywhere (never the process default).
pub(crate) fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A positive, non-zero, 16-byte random serial number (RFC 5280: <= 20 octets).
fn random_serial(provider: &CryptoProvider) -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    provider
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::new("cannot get random bytes for a certificate serial number"))?;
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // non-zero and always 16 bytes long
    Ok(SerialNumber::from_slice(&bytes))
}

/// PEM-encode DER with 64-character lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn parse_key_pem(key_pem: &str) -> Result<KeyPair, CaError> {
    use rustls_pemfile::Item;
    let mut reader = key_pem.as_bytes();
    let mut saw_cert = false;
    loop {
        match rustls_pemfile::read_one(&mut reader) {
            Ok(Some(Item::Pkcs8Key(der))) => {
                return KeyPair::try_from(&der).map_err(|e| {
                    CaError::new(format!(
                        "CA key is not a usable private key (supported: ECDSA P-256/P-384, \
                         Ed25519, RSA in PKCS#8): {e}"
                    ))
                });
            }
            Ok(Some(Item::Sec1Key(_))) | Ok(Some(Item::Pkcs1Key(_))) => {
                return Err(CaError::new(
                    "CA key is in the traditional \"EC/RSA PRIVATE KEY\" format; convert it to \
                     PKCS#8 with: openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8",
                ));
            }
            Ok(Some(Item::X509Certificate(_))) => saw_cert = true,
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return Err(CaError::new(format!("CA key PEM cannot be parsed: {e:?}"))),
        }
    }
    if key_pem.contains("ENCRYPTED PRIVATE KEY") {
        return Err(CaError::new(
            "CA key is encrypted; segproxy needs an unencrypted PKCS#8 key \
             (openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.plain)",
        ));
    }
    if saw_cert {
        return Err(CaError::new(
            "no private key found in CA key PEM (it holds a certificate: are the key and \
             certificate swapped?)",
        ));
    }
    Err(CaError::new("no private key found in CA key PEM"))
}

fn parse_cert_pem(cert_pem: &str) -> Result<CertificateDer<'static>, CaError> {
    let mut reader = cert_pem.as_bytes();
    let first = match rustls_pemfile::certs(&mut reader).next() {
        Some(Ok(der)) => Some(der),
        Some(Err(e)) => {
            return Err(CaError::new(format!(
                "CA certificate PEM cannot be parsed: {e:?}"
            )))
        }
        None => None,
    };
    match first {
        Some(der) => Ok(der),
        None if cert_pem.contains("PRIVATE KEY") => Err(CaError::new(
            "no certificate found in CA certificate PEM (it holds a private key: are the key \
             and certificate swapped?)",
        )),
        None => Err(CaError::new("no certificate found in CA certificate PEM")),
    }
}

fn write_file_atomic(path: &Path, data: &[u8], private: bool, what: &str) -> Result<(), CaError> {
    let err =
        |e: std::io::Error| CaError::new(format!("cannot write {what} {}: {e}", path.display()));
    let file_name = path.file_name().ok_or_else(|| {
        CaError::new(format!(
            "cannot write {what} {}: not a file path",
            path.display()
        ))
    })?;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}-{nanos}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

/// Whether a key file is private to its owner (no group/other permission bits).
/// Always `Ok(true)` on non-Unix systems.
pub fn key_file_is_private(path: &Path) -> Result<bool, CaError> {
    let meta = fs::metadata(path)
        .map_err(|e| CaError::new(format!("cannot read CA key file {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(meta.permissions().mode() & 0o077 == 0)
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Ok(true)
    }
}

/// A warning to show the user if the key file is readable or writable by group/others, else `None`.
pub fn key_file_warning(path: &Path) -> Option<String> {
    match key_file_is_private(path) {
        Ok(true) | Err(_) => None,
        Ok(false) => {
            #[cfg(unix)]
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                fs::metadata(path)
                    .map(|m| m.permissions().mode() & 0o777)
                    .unwrap_or(0)
            };
            #[cfg(not(unix))]
            let mode = 0;
            Some(format!(
                "CA key file {} is accessible by group/others (mode {mode:04o}); \
                 anyone who reads it can impersonate any site to your clients: chmod 600 {}",
                path.display(),
                path.display()
            ))
        }
    }
}

impl CertificateAuthority {
    /// Generate a new CA: ECDSA P-256, `CA:TRUE, pathlen:0`, keyCertSign + cRLSign,
    /// valid from one day ago for ten years, random serial.
    pub fn generate(subject: &CaSubject) -> Result<Self, CaError> {
        let provider = ring_provider();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::new(format!("cannot generate CA key: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        for (ty, value) in [
            (DnType::CountryName, &subject.country),
            (DnType::StateOrProvinceName, &subject.state),
            (DnType::LocalityName, &subject.locality),
            (DnType::OrganizationName, &subject.organization),
            (DnType::CommonName, &subject.common_name),
        ] {
            if !value.is_empty() {
                dn.push(ty, value.as_str());
            }
        }
        if subject.common_name.is_empty() {
            return Err(CaError::new("CA common name must not be empty"));
        }
        if !subject.country.is_empty() && subject.country.len() != 2 {
            return Err(CaError::new(format!(
                "CA country must be a two-letter code (got {:?})",
                subject.country
            )));
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial(&provider)?);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::new(format!("cannot create CA certificate: {e}")))?;
        let ca_cert_der = cert.der().clone();
        let issuer = Issuer::new(params, key);
        Self::from_parts(
            issuer,
            ca_cert_der,
            now + Duration::days(CA_VALIDITY_DAYS),
            provider,
        )
    }

    /// Load a CA from PEM text: an unencrypted PKCS#8 private key and a CA certificate (the first
    /// certificate in `cert_pem`). Checks that the certificate is a CA, may sign certificates,
    /// has not expired, and that the key matches its public key.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Self, CaError> {
        let key = parse_key_pem(key_pem)?;
        let der = parse_cert_pem(cert_pem)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::new(format!("CA certificate cannot be parsed: {e}")))?;
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(CaError::new(
                    "CA certificate is not a CA (basicConstraints)",
                ))
            }
            Err(e) => {
                return Err(CaError::new(format!(
                    "CA certificate has an unreadable basicConstraints extension: {e}"
                )))
            }
        }
        if let Ok(Some(ku)) = x509.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(CaError::new(
                    "CA certificate may not sign certificates (keyUsage lacks keyCertSign)",
                ));
            }
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::new("CA key does not match CA certificate"));
        }
        let not_after = OffsetDateTime::from_unix_timestamp(x509.validity().not_after.timestamp())
            .map_err(|e| CaError::new(format!("CA certificate has a bad expiry date: {e}")))?;
        if not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::new(format!(
                "CA certificate expired on {}; generate a new CA",
                x509.validity().not_after
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| CaError::new(format!("CA certificate cannot be used as issuer: {e}")))?;
        Self::from_parts(issuer, der.into_owned(), not_after, ring_provider())
    }

    /// Load a CA from a key file and a certificate file (PEM). See [`Self::from_pem`].
    /// Does not complain about key file permissions: see [`key_file_warning`].
    pub fn load(key_path: &Path, cert_path: &Path) -> Result<Self, CaError> {
        let key_pem = fs::read_to_string(key_path).map_err(|e| {
            CaError::new(format!(
                "cannot read CA key file {}: {e}",
                key_path.display()
            ))
        })?;
        let cert_pem = fs::read_to_string(cert_path).map_err(|e| {
            CaError::new(format!(
                "cannot read CA certificate file {}: {e}",
                cert_path.display()
            ))
        })?;
        Self::from_pem(&key_pem, &cert_pem).map_err(|e| {
            CaError::new(format!(
                "{e} (key file {}, certificate file {})",
                key_path.display(),
                cert_path.display()
            ))
        })
    }

    /// Write the key (PKCS#8 PEM, file created with mode 0600) and the certificate (PEM, 0644).
    /// Each file is written to a temporary file in the same directory and renamed into place.
    pub fn save(&self, key_path: &Path, cert_path: &Path) -> Result<(), CaError> {
        write_file_atomic(key_path, self.key_pem().as_bytes(), true, "CA key file")?;
        write_file_atomic(
            cert_path,
            self.cert_pem().as_bytes(),
            false,
            "CA certificate file",
        )
    }

    fn from_parts(
        issuer: Issuer<'static, KeyPair>,
        ca_cert_der: CertificateDer<'static>,
        ca_not_after: OffsetDateTime,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, CaError> {
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::new(format!("cannot generate leaf key: {e}")))?;
        let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signing_key = provider
            .key_provider
            .load_private_key(leaf_der)
            .map_err(|e| CaError::new(format!("cannot load leaf key into rustls: {e}")))?;
        let mut template = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CaError::new(format!("cannot build TLS server config: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCert));
        // HTTP/2 when the client offers it (served by `h2_server`), else HTTP/1.1.
        template.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // One session cache for all hosts of this CA (rustls only resumes a session for the
        // same SNI), instead of 256 entries allocated per host config.
        template.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
        Ok(CertificateAuthority {
            issuer,
            ca_cert_der,
            ca_not_after,
            leaf_key,
            leaf_signing_key,
            provider,
            template,
            cache: Mutex::new(HostCache {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            mints: AtomicU64::new(0),
        })
    }

    /// Set how many hosts are cached (at least 1; default [`DEFAULT_CACHE_CAPACITY`]). When
    /// full, the host cached first is evicted.
    pub fn with_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity.max(1);
        self
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The private key of every leaf certificate this CA mints, PKCS#8 PEM (for servers
    /// that terminate TLS themselves with a minted certificate).
    pub fn leaf_key_pem(&self) -> String {
        self.leaf_key.serialize_pem()
    }

    /// Days between a leaf certificate's not-before and not-after (when the CA outlives it).
    pub const LEAF_VALIDITY_PERIOD_DAYS: i64 = LEAF_VALIDITY_DAYS + BACKDATE.whole_days();

    /// The CA certificate, PEM (what clients must trust).
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.ca_cert_der)
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> Vec<u8> {
        self.ca_cert_der.to_vec()
    }

    /// How many leaf certificates this CA has minted so far.
    pub fn mint_count(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// How many hosts are currently in the cache.
    pub fn cached_hosts(&self) -> usize {
        lock(&self.cache).map.len()
    }

    /// The TLS server config presenting a certificate for `host` (a DNS name or an IP literal,
    /// IPv6 with or without brackets; no port). Case-insensitive; cached; concurrent first
    /// calls for one host mint once.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        self.minted(host, |m| m.config.clone())
    }

    /// The certificate chain `[leaf, CA]` and key for `host` (same cache as
    /// [`Self::server_config`]).
    pub fn certified_key(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        self.minted(host, |m| m.certified.clone())
    }

    fn minted<T>(&self, host: &str, pick: impl FnOnce(&Minted) -> T) -> Result<T, CaError> {
        let name = HostName::parse(host)?;
        let key = name.key();
        let slot = {
            let mut cache = lock(&self.cache);
            match cache.map.get(&key) {
                Some(slot) => slot.clone(),
                None => {
                    while cache.map.len() >= self.cache_capacity {
                        match cache.order.pop_front() {
                            Some(old) => {
                                cache.map.remove(&old);
                            }
                            None => break,
                        }
                    }
                    let slot = Arc::new(Slot::default());
                    cache.map.insert(key.clone(), slot.clone());
                    cache.order.push_back(key);
                    slot
                }
            }
        };
        let mut entry = lock(&slot.0);
        if let Some(m) = entry.as_ref() {
            if SystemTime::now() < m.renew_at {
                return Ok(pick(m));
            }
        }
        let minted = self.mint(&name)?;
        let out = pick(&minted);
        *entry = Some(minted);
        Ok(out)
    }

    fn mint(&self, name: &HostName) -> Result<Minted, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let (san, cn) = match name {
            HostName::Dns(d) => (
                SanType::DnsName(d.as_str().try_into().map_err(|e| {
                    CaError::new(format!("cannot mint a certificate for {d:?}: {e}"))
                })?),
                d.clone(),
            ),
            HostName::Ip(ip) => (SanType::IpAddress(*ip), ip.to_string()),
        };
        if cn.len() <= MAX_CN_LEN {
            dn.push(DnType::CommonName, cn.as_str());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial(&self.provider)?);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = (now + Duration::days(LEAF_VALIDITY_DAYS)).min(self.ca_not_after);
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(|e| CaError::new(format!("cannot mint a certificate for {cn}: {e}")))?;
        let certified = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.ca_cert_der.clone()],
            self.leaf_signing_key.clone(),
        ));
        let mut config = self.template.clone();
        config.cert_resolver = Arc::new(SingleCertAndKey::from(certified.clone()));
        self.mints.fetch_add(1, Ordering::Relaxed);
        let left = (params.not_after - now).max(Duration::ZERO);
        let left = StdDuration::from_secs(left.whole_seconds().max(0) as u64);
        Ok(Minted {
            config: Arc::new(config),
            certified,
            renew_at: SystemTime::now() + LEAF_RENEW_AFTER.min(left / 2),
        })
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<CertificateAuthority>();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::{parse_x509_certificate, X509Certificate};

    /// A fresh, unique, empty directory under the system temp dir (removed on drop).
    pub(crate) struct TempDir(pub PathBuf);
    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "segproxy-{tag}-{}-{nanos}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        pub(crate) fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn test_ca() -> CertificateAuthority {
        CertificateAuthority::generate(&CaSubject::default()).unwrap()
    }

    fn leaf_der(ca: &CertificateAuthority, host: &str) -> Vec<u8> {
        let ck = ca.certified_key(host).unwrap();
        assert_eq!(ck.cert.len(), 2, "chain is [leaf, CA]");
        assert_eq!(ck.cert[1].as_ref(), ca.cert_der().as_slice());
        ck.cert[0].to_vec()
    }

    fn now_ts() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn generated_ca_fields() {
        let subject = CaSubject {
            country: "DE".into(),
            state: "Berlin".into(),
            locality: "Berlin".into(),
            organization: "Lab".into(),
            common_name: "Lab CA".into(),
        };
        let ca = CertificateAuthority::generate(&subject).unwrap();
        let der = ca.cert_der();
        let (rest, cert) = parse_x509_certificate(&der).unwrap();
        assert!(rest.is_empty());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        let subj = cert.subject().to_string();
        for part in ["C=DE", "ST=Berlin", "L=Berlin", "O=Lab", "CN=Lab CA"] {
            assert!(subj.contains(part), "{subj} lacks {part}");
        }
        assert_eq!(cert.subject(), cert.issuer());
        // self-signed, P-256
        cert.verify_signature(None).unwrap();
        assert_eq!(
            cert.public_key()
                .algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        let v = cert.validity();
        let years =
            (v.not_after.timestamp() - v.not_before.timestamp()) as f64 / (365.25 * 86400.0);
        assert!((9.9..10.1).contains(&years), "CA validity {years} years");
        assert!(v.not_before.timestamp() <= now_ts() - 23 * 3600);
        assert!(cert.raw_serial().len() >= 16);
        // the PEM forms are parseable
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(ca.key_pem().contains("BEGIN PRIVATE KEY"));
        // two CAs differ (keys, serials)
        let other = test_ca();
        assert_ne!(other.key_pem(), ca.key_pem());
        let other_der = other.cert_der();
        let (_, c2) = parse_x509_certificate(&other_der).unwrap();
        assert_ne!(c2.raw_serial(), cert.raw_serial());
    }

    #[test]
    fn generate_rejects_bad_subject() {
        let mut s = CaSubject::default();
        s.common_name.clear();
        assert!(CertificateAuthority::generate(&s)
            .unwrap_err()
            .to_string()
            .contains("common name"));
        let s = CaSubject {
            country: "USA".into(),
            ..CaSubject::default()
        };
        assert!(CertificateAuthority::generate(&s)
            .unwrap_err()
            .to_string()
            .contains("two-letter"));
    }

    #[test]
    fn pem_round_trip() {
        let ca = test_ca();
        let again = CertificateAuthority::from_pem(&ca.key_pem(), &ca.cert_pem()).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
        assert_eq!(again.key_pem(), ca.key_pem());
        assert_eq!(again.cert_pem(), ca.cert_pem());
    }

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn save_load_round_trip_with_private_key_file() {
        let dir = TempDir::new("ca-save");
        let (k, c) = (dir.path("ca.key"), dir.path("ca.pem"));
        let ca = test_ca();
        ca.save(&k, &c).unwrap();
        #[cfg(unix)]
        {
            assert_eq!(mode(&k), 0o600);
            assert_eq!(mode(&c) & 0o600, 0o600);
        }
        assert!(key_file_is_private(&k).unwrap());
        assert_eq!(key_file_warning(&k), None);
        let loaded = CertificateAuthority::load(&k, &c).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.key_pem(), ca.key_pem());
        // no temp files left behind
        let names: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // a leaf minted by the loaded CA has the original CA as issuer
        let leaf = leaf_der(&loaded, "example.com");
        let (_, leaf) = parse_x509_certificate(&leaf).unwrap();
        let ca_der = ca.cert_der();
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
    }

    #[cfg(unix)]
    #[test]
    fn save_replaces_world_readable_key_with_private_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("ca-perm");
        let (k, c) = (dir.path("ca.key"), dir.path("ca.pem"));
        fs::write(&k, "old").unwrap();
        fs::set_permissions(&k, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!key_file_is_private(&k).unwrap());
        let w = key_file_warning(&k).unwrap();
        assert!(w.contains("0644") && w.contains("chmod 600"), "{w}");
        test_ca().save(&k, &c).unwrap();
        assert_eq!(mode(&k), 0o600);
        assert!(key_file_warning(&k).is_none());
    }

    #[test]
    fn save_into_missing_directory_fails_clearly() {
        let dir = TempDir::new("ca-missing");
        let k = dir.path("nope/ca.key");
        let e = test_ca()
            .save(&k, &dir.path("ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot write CA key file ") && e.contains("nope/ca.key"),
            "{e}"
        );
    }

    #[test]
    fn load_missing_file_names_it() {
        let dir = TempDir::new("ca-load");
        let e = CertificateAuthority::load(&dir.path("x.key"), &dir.path("x.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read CA key file ") && e.contains("x.key"),
            "{e}"
        );
        let ca = test_ca();
        ca.save(&dir.path("x.key"), &dir.path("y.pem")).unwrap();
        let e = CertificateAuthority::load(&dir.path("x.key"), &dir.path("x.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read CA certificate file ") && e.contains("x.pem"),
            "{e}"
        );
    }

    #[test]
    fn mismatched_key_and_cert_rejected() {
        let a = test_ca();
        let b = test_ca();
        let e = CertificateAuthority::from_pem(&a.key_pem(), &b.cert_pem()).unwrap_err();
        assert_eq!(e.to_string(), "CA key does not match CA certificate");
        // through files the message names them
        let dir = TempDir::new("ca-mismatch");
        fs::write(dir.path("a.key"), a.key_pem()).unwrap();
        fs::write(dir.path("b.pem"), b.cert_pem()).unwrap();
        let e = CertificateAuthority::load(&dir.path("a.key"), &dir.path("b.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("CA key does not match CA certificate (key file "),
            "{e}"
        );
    }

    #[test]
    fn garbage_pem_rejected() {
        let ca = test_ca();
        let e = CertificateAuthority::from_pem("hello", &ca.cert_pem()).unwrap_err();
        assert_eq!(e.to_string(), "no private key found in CA key PEM");
        let e = CertificateAuthority::from_pem(&ca.key_pem(), "hello").unwrap_err();
        assert_eq!(e.to_string(), "no certificate found in CA certificate PEM");
        // right labels, garbage inside
        let bad_key = "-----BEGIN PRIVATE KEY-----\nAAAAAAAA\n-----END PRIVATE KEY-----\n";
        let e = CertificateAuthority::from_pem(bad_key, &ca.cert_pem())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("CA key is not a usable private key"), "{e}");
        let bad_cert = "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n";
        let e = CertificateAuthority::from_pem(&ca.key_pem(), bad_cert)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("CA certificate cannot be parsed"), "{e}");
        // truncated PEM
        let pem = ca.cert_pem();
        let e = CertificateAuthority::from_pem(&ca.key_pem(), &pem[..pem.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CA certificate"), "{e}");
        // swapped key and certificate
        let e = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem())
            .unwrap_err()
            .to_string();
        assert!(e.contains("swapped"), "{e}");
        // traditional EC key format
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAAAAAA\n-----END EC PRIVATE KEY-----\n";
        let e = CertificateAuthority::from_pem(sec1, &ca.cert_pem())
            .unwrap_err()
            .to_string();
        assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
        let enc = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAAAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = CertificateAuthority::from_pem(enc, &ca.cert_pem())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("CA key is encrypted"), "{e}");
    }

    #[test]
    fn non_ca_certificate_rejected() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec!["example.com".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let e = CertificateAuthority::from_pem(&key.serialize_pem(), &cert.pem()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CA certificate is not a CA (basicConstraints)"
        );
        // CA:TRUE but keyUsage without keyCertSign
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        let e = CertificateAuthority::from_pem(&key.serialize_pem(), &cert.pem()).unwrap_err();
        assert!(e.to_string().contains("keyCertSign"), "{e}");
    }

    #[test]
    fn expired_ca_rejected() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = rcgen::date_time_ymd(2015, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let e = CertificateAuthority::from_pem(&key.serialize_pem(), &cert.pem()).unwrap_err();
        assert!(
            e.to_string().starts_with("CA certificate expired on"),
            "{e}"
        );
    }

    #[test]
    fn external_rsa_ca_loads() {
        // An RSA CA from another tool (PKCS#8) works: ring signs with it.
        let pkcs8 = include_str!("testdata/rsa2048.pk8.pem");
        let key = KeyPair::from_pem(pkcs8).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "rsa ca");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        let ca = CertificateAuthority::from_pem(pkcs8, &cert.pem()).unwrap();
        let leaf = leaf_der(&ca, "rsa.example");
        let (_, leaf) = parse_x509_certificate(&leaf).unwrap();
        let (_, ca_cert) = parse_x509_certificate(cert.der()).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn openssl_made_ca_loads() {
        // A CA made by `openssl req -x509` (PKCS#8 P-256 key), like the files other tools save.
        let key = include_str!("testdata/openssl-ca.key.pem");
        let cert = include_str!("testdata/openssl-ca.cert.pem");
        let ca = CertificateAuthority::from_pem(key, cert).unwrap();
        let leaf = leaf_der(&ca, "example.net");
        let (_, leaf) = parse_x509_certificate(&leaf).unwrap();
        let ca_der = ca.cert_der();
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(leaf.issuer().to_string(), "C=US, O=openssl, CN=openssl CA");
        // The same key in the traditional SEC1 form gets a conversion hint.
        let sec1 = include_str!("testdata/openssl-ca.sec1.pem");
        let e = CertificateAuthority::from_pem(sec1, cert)
            .unwrap_err()
            .to_string();
        assert!(e.contains("openssl pkcs8 -topk8 -nocrypt"), "{e}");
    }

    fn san_names(cert: &X509Certificate<'_>) -> Vec<String> {
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => format!("ip:{}", IpAddr::from(<[u8; 4]>::try_from(*b).unwrap())),
                    16 => format!("ip:{}", IpAddr::from(<[u8; 16]>::try_from(*b).unwrap())),
                    _ => "ip:?".into(),
                },
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn leaf_fields() {
        let ca = test_ca();
        let ca_der = ca.cert_der();
        let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
        let ca_ski = ca_cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .expect("CA has a subjectKeyIdentifier");
        let cases = [
            ("Example.COM.", "dns:example.com", Some("example.com")),
            (
                "sub.example.org",
                "dns:sub.example.org",
                Some("sub.example.org"),
            ),
            ("127.0.0.1", "ip:127.0.0.1", Some("127.0.0.1")),
            ("::1", "ip:::1", Some("::1")),
            ("[2001:db8::7]", "ip:2001:db8::7", Some("2001:db8::7")),
            ("localhost", "dns:localhost", Some("localhost")),
        ];
        let mut serials = std::collections::HashSet::new();
        let mut leaf_keys = std::collections::HashSet::new();
        for (host, san, cn) in cases {
            let der = leaf_der(&ca, host);
            let (_, cert) = parse_x509_certificate(&der).unwrap();
            assert_eq!(san_names(&cert), vec![san.to_string()], "{host}");
            let got_cn = cert
                .subject()
                .iter_common_name()
                .next()
                .map(|c| c.as_str().unwrap().to_string());
            assert_eq!(got_cn.as_deref(), cn, "{host}");
            assert_eq!(cert.issuer(), ca_cert.subject());
            cert.verify_signature(Some(ca_cert.public_key())).unwrap();
            let eku = cert.extended_key_usage().unwrap().unwrap();
            assert!(eku.value.server_auth && !eku.value.client_auth);
            let ku = cert.key_usage().unwrap().unwrap();
            assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
            let bc = cert.basic_constraints().unwrap().unwrap();
            assert!(!bc.value.ca);
            let v = cert.validity();
            let days = (v.not_after.timestamp() - v.not_before.timestamp()) / 86400;
            assert!((80..398).contains(&days), "leaf validity {days} days");
            assert!(
                v.not_before.timestamp() <= now_ts() - 23 * 3600,
                "backdated"
            );
            assert!(v.not_after.timestamp() >= now_ts() + 80 * 86400);
            let aki = cert
                .extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(a) => {
                        a.key_identifier.as_ref().map(|k| k.0.to_vec())
                    }
                    _ => None,
                })
                .expect("leaf has authorityKeyIdentifier");
            assert_eq!(aki, ca_ski);
            assert!(
                serials.insert(cert.raw_serial().to_vec()),
                "serial repeated"
            );
            assert_ne!(
                cert.public_key().raw,
                ca_cert.public_key().raw,
                "leaf key is not the CA key"
            );
            leaf_keys.insert(cert.public_key().raw.to_vec());
        }
        assert_eq!(leaf_keys.len(), 1, "one leaf key pair per CA instance");
        for i in 0..200 {
            let der = leaf_der(&ca, &format!("h{i}.example"));
            let (_, cert) = parse_x509_certificate(&der).unwrap();
            assert!(
                serials.insert(cert.raw_serial().to_vec()),
                "serial repeated"
            );
        }
        // a second CA instance has a different leaf key
        let der = leaf_der(&test_ca(), "example.com");
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        assert!(!leaf_keys.contains(cert.public_key().raw));
    }

    #[test]
    fn long_host_gets_san_but_no_cn() {
        let ca = test_ca();
        let host = format!("{}.example.com", "a".repeat(60));
        let der = leaf_der(&ca, &host);
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        assert_eq!(san_names(&cert), vec![format!("dns:{host}")]);
        assert!(cert.subject().iter_common_name().next().is_none());
    }

    #[test]
    fn host_normalisation_and_cache_keys() {
        let ca = test_ca();
        let a = ca.server_config("Example.COM").unwrap();
        let b = ca.server_config("example.com.").unwrap();
        let c = ca.server_config(" example.com ").unwrap();
        assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&a, &c));
        let d = ca.server_config("::1").unwrap();
        let e = ca.server_config("[::1]").unwrap();
        let f = ca.server_config("0:0::1").unwrap();
        assert!(Arc::ptr_eq(&d, &e) && Arc::ptr_eq(&d, &f));
        assert_eq!(ca.mint_count(), 2);
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        for bad in ["", "  ", ".", "bad host", "a..b", "exa mple.com", "x/y"] {
            let e = ca.server_config(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("cannot mint a certificate for"),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(ca.mint_count(), 2);
    }

    #[test]
    fn concurrent_first_contacts_mint_once_threads() {
        let ca = Arc::new(test_ca());
        let barrier = Arc::new(std::sync::Barrier::new(32));
        let handles: Vec<_> = (0..32)
            .map(|_| {
                let (ca, barrier) = (ca.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ca.server_config("race.example").unwrap()
                })
            })
            .collect();
        let configs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ca.mint_count(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_contacts_mint_once_tasks() {
        let ca = Arc::new(test_ca());
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let ca = ca.clone();
                tokio::spawn(async move { ca.server_config("new.example").unwrap() })
            })
            .collect();
        let mut configs = Vec::new();
        for t in tasks {
            configs.push(t.await.unwrap());
        }
        assert_eq!(ca.mint_count(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }

    #[test]
    fn thousand_distinct_hosts() {
        let ca = test_ca();
        for i in 0..1000 {
            ca.server_config(&format!("host{i}.test")).unwrap();
        }
        assert_eq!(ca.mint_count(), 1000);
        assert_eq!(ca.cached_hosts(), 1000);
        for i in 0..1000 {
            ca.server_config(&format!("HOST{i}.test")).unwrap();
        }
        assert_eq!(
            ca.mint_count(),
            1000,
            "second round is served from the cache"
        );
    }

    #[test]
    fn cache_is_bounded_fifo() {
        let ca = test_ca().with_cache_capacity(10);
        for i in 0..15 {
            ca.server_config(&format!("h{i}.test")).unwrap();
        }
        assert_eq!(ca.cached_hosts(), 10);
        assert_eq!(ca.mint_count(), 15);
        ca.server_config("h14.test").unwrap(); // still cached
        assert_eq!(ca.mint_count(), 15);
        ca.server_config("h0.test").unwrap(); // evicted: minted again
        assert_eq!(ca.mint_count(), 16);
        assert_eq!(ca.cached_hosts(), 10);
    }

    /// `cargo test --no-default-features --lib mint_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn mint_timing() {
        use std::time::Instant;
        let t = Instant::now();
        let ca = test_ca();
        println!("generate CA + leaf key: {:?}", t.elapsed());
        let (key, cert) = (ca.key_pem(), ca.cert_pem());
        let n = 20;
        let t = Instant::now();
        for _ in 0..n {
            CertificateAuthority::from_pem(&key, &cert).unwrap();
        }
        println!("load CA from PEM (+ leaf key): {:?} each", t.elapsed() / n);
        let n = 2000;
        let t = Instant::now();
        for i in 0..n {
            ca.server_config(&format!("mint{i}.example")).unwrap();
        }
        let mint = t.elapsed() / n;
        let t = Instant::now();
        for i in 0..n {
            ca.server_config(&format!("mint{i}.example")).unwrap();
        }
        let cached = t.elapsed() / n;
        println!(
            "mint new host (cert + ServerConfig): {mint:?} each; cached lookup: {cached:?} each"
        );
        assert!(mint < StdDuration::from_millis(1), "mint took {mint:?}");
    }
}
