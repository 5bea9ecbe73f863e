//! `CertificateAuthority`: the engine's CA (generation, PEM load/save, per-host minting).

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::engine::ca::{key_file_warning, CaError, CaSubject, CertificateAuthority};

pub(crate) fn ca_error(e: CaError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

#[pyclass(frozen, module = "segproxy._engine", name = "CertificateAuthority")]
pub struct PyCertificateAuthority {
    pub inner: Arc<CertificateAuthority>,
}

#[pymethods]
impl PyCertificateAuthority {
    #[staticmethod]
    #[pyo3(signature = (country = "US", state = "CA", locality = "San Francisco", organization = "segproxy", common_name = "segproxy CA"))]
    fn generate(
        country: &str,
        state: &str,
        locality: &str,
        organization: &str,
        common_name: &str,
    ) -> PyResult<Self> {
        let subject = CaSubject {
            country: country.into(),
            state: state.into(),
            locality: locality.into(),
            organization: organization.into(),
            common_name: common_name.into(),
        };
        Ok(PyCertificateAuthority {
            inner: Arc::new(CertificateAuthority::generate(&subject).map_err(ca_error)?),
        })
    }

    #[staticmethod]
    fn from_pem(key_pem: &str, cert_pem: &str) -> PyResult<Self> {
        Ok(PyCertificateAuthority {
            inner: Arc::new(CertificateAuthority::from_pem(key_pem, cert_pem).map_err(ca_error)?),
        })
    }

    /// Loads a CA; the second value is a warning when the key file is readable by others.
    #[staticmethod]
    fn load(key_path: PathBuf, cert_path: PathBuf) -> PyResult<(Self, Option<String>)> {
        let ca = CertificateAuthority::load(&key_path, &cert_path).map_err(ca_error)?;
        Ok((
            PyCertificateAuthority {
                inner: Arc::new(ca),
            },
            key_file_warning(&key_path),
        ))
    }

    fn save(&self, key_path: PathBuf, cert_path: PathBuf) -> PyResult<()> {
        self.inner.save(&key_path, &cert_path).map_err(ca_error)
    }

    fn key_pem(&self) -> String {
        self.inner.key_pem()
    }

    fn cert_pem(&self) -> String {
        self.inner.cert_pem()
    }

    /// The private key of the leaf certificates (one per CA load), PKCS#8 PEM.
    fn leaf_key_pem(&self) -> String {
        self.inner.leaf_key_pem()
    }

    /// Days between a leaf certificate's not-before and not-after.
    #[staticmethod]
    fn leaf_validity_days() -> i64 {
        CertificateAuthority::LEAF_VALIDITY_PERIOD_DAYS
    }

    /// How many leaf certificates were minted (cache misses).
    fn mint_count(&self) -> u64 {
        self.inner.mint_count()
    }

    /// The PEM chain served for `host` (minted now if not cached).
    fn leaf_pem(&self, host: &str) -> PyResult<String> {
        let key = self.inner.certified_key(host).map_err(ca_error)?;
        let mut out = String::new();
        for der in key.cert.iter() {
            out.push_str(&pem_encode(der.as_ref()));
        }
        Ok(out)
    }
}

fn pem_encode(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
