"""`TLSStore`: segproxy's certificate authority for HTTPS interception.

Same API as asyncio-https-proxy's TLSStore; the CA lives in the Rust engine, which mints a
certificate per host (cached) when a CONNECT is intercepted.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _engine

if TYPE_CHECKING:  # ssl costs the command line 4 MiB: imported where a context is made
    import ssl

__all__ = ["CERTIFICATE_VALIDITY_DAYS", "TLSStore", "load_or_create_ca"]

StrPath = str | os.PathLike[str]

#: Days between a minted certificate's not-before and not-after (asyncio-https-proxy's name).
#: Shorter than there (100 years): browsers refuse leaf certificates valid over 398 days.
CERTIFICATE_VALIDITY_DAYS: int = _engine.CertificateAuthority.leaf_validity_days()


class TLSStore:
    """A CA that signs certificates for intercepted hosts on the fly.

    ``TLSStore()`` makes a fresh CA with default names; ``TLSStore.generate_ca(...)`` names it;
    ``TLSStore.load_ca_from_disk(key_file, cert_file)`` reuses one saved before;
    ``TLSStore(ca_key, ca_cert)`` (asyncio-https-proxy's constructor) takes a CA key and
    certificate as `cryptography` objects or as PEM text.
    """

    def __init__(
        self,
        ca_key: Any = None,
        ca_cert: Any = None,
        *,
        ca: _engine.CertificateAuthority | None = None,
    ) -> None:
        if isinstance(ca_key, _engine.CertificateAuthority):
            ca, ca_key = ca_key, None
        if ca is not None:
            if ca_key is not None or ca_cert is not None:
                raise TypeError(
                    "TLSStore: give either a CA (ca=) or its key and certificate, not both"
                )
            self._ca = ca
        elif ca_key is None and ca_cert is None:
            self._ca = _engine.CertificateAuthority.generate()
        elif ca_key is None or ca_cert is None:
            raise TypeError(
                "TLSStore(ca_key, ca_cert) needs both the CA key and the CA certificate"
            )
        else:
            self._ca = _engine.CertificateAuthority.from_pem(_key_pem(ca_key), _cert_pem(ca_cert))

    @classmethod
    def generate_ca(
        cls,
        country: str = "US",
        state: str = "CA",
        locality: str = "San Francisco",
        organization: str = "segproxy",
        common_name: str = "segproxy CA",
    ) -> TLSStore:
        """A new CA (P-256 key, 10 years) with these subject fields."""
        return cls(
            _engine.CertificateAuthority.generate(
                country, state, locality, organization, common_name
            )
        )

    @classmethod
    def from_pem(cls, key_pem: str | bytes, cert_pem: str | bytes) -> TLSStore:
        """A CA from PEM text (PKCS#8 key); a key that does not match the certificate is refused."""
        return cls(_engine.CertificateAuthority.from_pem(_text(key_pem), _text(cert_pem)))

    @classmethod
    def load_ca_from_disk(
        cls,
        key_file: StrPath | None = None,
        cert_file: StrPath | None = None,
        *,
        key_path: StrPath | None = None,
        cert_path: StrPath | None = None,
        stacklevel: int = 1,
    ) -> TLSStore:
        """Load a CA saved with `save_ca_to_disk` (or made with openssl, PKCS#8 key).

        The paths go positionally or by keyword: ``key_file``/``cert_file`` (asyncio-https-proxy's
        names) or ``key_path``/``cert_path``. Raises ValueError for a missing, unreadable or
        mismatched pair; warns when the key file can be read by other users.
        """
        key, cert = _paths("load_ca_from_disk", key_file, cert_file, key_path, cert_path)
        ca, warning = _engine.CertificateAuthority.load(key, cert)
        if warning:
            warnings.warn(warning, stacklevel=stacklevel + 1)
        return cls(ca)

    def save_ca_to_disk(
        self,
        key_file: StrPath | None = None,
        cert_file: StrPath | None = None,
        *,
        key_path: StrPath | None = None,
        cert_path: StrPath | None = None,
    ) -> None:
        """Write the CA key (mode 0600) and certificate as PEM files (paths named as in
        `load_ca_from_disk`)."""
        key, cert = _paths("save_ca_to_disk", key_file, cert_file, key_path, cert_path)
        self._ca.save(key, cert)

    def get_ca_pem(self) -> bytes:
        """The CA certificate in PEM, for clients to trust."""
        return self._ca.cert_pem().encode()

    def get_ca_key_pem(self) -> bytes:
        return self._ca.key_pem().encode()

    def get_cert_pem(self, host: str) -> bytes:
        """The certificate chain served for `host` (minted now if not cached)."""
        return self._ca.leaf_pem(host).encode()

    def get_ssl_context(self, domain: str) -> ssl.SSLContext:
        """A server-side `ssl.SSLContext` serving the certificate minted for `domain` (cached),
        for handlers that terminate TLS themselves, as in asyncio-https-proxy."""
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # ssl loads a certificate and key from files only; these are private to this user
        # (mode 0600) and gone when the block ends.
        with tempfile.NamedTemporaryFile() as cert_file, tempfile.NamedTemporaryFile() as key_file:
            cert_file.write(self.get_cert_pem(domain))
            cert_file.flush()
            key_file.write(self._ca.leaf_key_pem().encode())
            key_file.flush()
            context.load_cert_chain(certfile=cert_file.name, keyfile=key_file.name)
        return context

    @property
    def minted(self) -> int:
        """How many leaf certificates were minted so far."""
        return self._ca.mint_count()

    @property
    def engine_ca(self) -> _engine.CertificateAuthority:
        return self._ca


def load_or_create_ca(directory: StrPath, *, stacklevel: int = 1) -> TLSStore:
    """The CA in `directory` (ca-key.pem, ca-cert.pem), created and saved there if absent."""
    folder = Path(directory)
    key, cert = folder / "ca-key.pem", folder / "ca-cert.pem"
    if key.exists() and cert.exists():
        # A warning about the key names the caller's line, not this one.
        return TLSStore.load_ca_from_disk(key, cert, stacklevel=stacklevel + 1)
    if key.exists() or cert.exists():
        raise ValueError(
            f"{folder} holds only one of ca-key.pem and ca-cert.pem; remove it or add the other"
        )
    folder.mkdir(parents=True, exist_ok=True)
    store = TLSStore.generate_ca()
    store.save_ca_to_disk(key, cert)
    return store


def _paths(
    method: str,
    key_file: StrPath | None,
    cert_file: StrPath | None,
    key_path: StrPath | None,
    cert_path: StrPath | None,
) -> tuple[str, str]:
    """The (key, cert) paths given under either pair of names, exactly once each."""
    if (key_file is not None and key_path is not None) or (
        cert_file is not None and cert_path is not None
    ):
        raise TypeError(
            f"{method}: give the key and the certificate once each (key_file or key_path, cert_file or cert_path)"
        )
    key = key_file if key_file is not None else key_path
    cert = cert_file if cert_file is not None else cert_path
    if key is None or cert is None:
        raise TypeError(f"{method}() needs the key and the certificate paths")
    return os.fspath(key), os.fspath(cert)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _key_pem(key: Any) -> str:
    """PKCS#8 PEM of a CA key given as PEM text or a `cryptography` private key."""
    if isinstance(key, (str, bytes)):
        return _text(key)
    if hasattr(key, "private_bytes"):
        from cryptography.hazmat.primitives import serialization

        pem: bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return pem.decode()
    raise TypeError(
        f"ca_key must be PEM text or a cryptography private key, not {type(key).__name__}"
    )


def _cert_pem(cert: Any) -> str:
    """PEM of a CA certificate given as PEM text or a `cryptography` x509.Certificate."""
    if isinstance(cert, (str, bytes)):
        return _text(cert)
    if hasattr(cert, "public_bytes"):
        from cryptography.hazmat.primitives import serialization

        cert_bytes: bytes = cert.public_bytes(serialization.Encoding.PEM)
        return cert_bytes.decode()
    raise TypeError(
        f"ca_cert must be PEM text or a cryptography x509.Certificate, not {type(cert).__name__}"
    )
