//! Loading a CA from PEM text: key and certificate split at the first NUL byte.
#![no_main]
use libfuzzer_sys::fuzz_target;

use _engine::engine::ca::CertificateAuthority;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (key, cert) = text.split_once('\0').unwrap_or((text, ""));
    let _ = CertificateAuthority::from_pem(key, cert);
});
