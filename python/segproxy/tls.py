"""`TLSStore`: segproxy's certificate authority for HTTPS interception.

Same API as asyncio-https-proxy's TLSStore; the CA lives in the Rust engine, which mints a
certificate per host (cached) when a CONNECT is intercepted.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from . import _engine

__all__ = ["TLSStore", "load_or_create_ca"]

StrPath = str | os.PathLike[str]


class TLSStore:
    """A CA that signs certificates for intercepted hosts on the fly.

    ``TLSStore()`` makes a fresh CA with default names; ``TLSStore.generate_ca(...)`` names it;
    ``TLSStore.load_ca_from_disk(key_file, cert_file)`` reuses one saved before.
    """

    def __init__(self, ca: _engine.CertificateAuthority | None = None) -> None:
        self._ca = ca if ca is not None else _engine.CertificateAuthority.generate()

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
        return cls(_engine.CertificateAuthority.generate(country, state, locality, organization, common_name))

    @classmethod
    def from_pem(cls, key_pem: str | bytes, cert_pem: str | bytes) -> TLSStore:
        """A CA from PEM text (PKCS#8 key); a key that does not match the certificate is refused."""
        return cls(_engine.CertificateAuthority.from_pem(_text(key_pem), _text(cert_pem)))

    @classmethod
    def load_ca_from_disk(cls, key_file: StrPath, cert_file: StrPath) -> TLSStore:
        """Load a CA saved with `save_ca_to_disk` (or made with openssl, PKCS#8 key).

        Raises ValueError for a missing, unreadable or mismatched pair; warns when the key
        file can be read by other users.
        """
        ca, warning = _engine.CertificateAuthority.load(os.fspath(key_file), os.fspath(cert_file))
        if warning:
            warnings.warn(warning, stacklevel=2)
        return cls(ca)

    def save_ca_to_disk(self, key_file: StrPath, cert_file: StrPath) -> None:
        """Write the CA key (mode 0600) and certificate as PEM files."""
        self._ca.save(os.fspath(key_file), os.fspath(cert_file))

    def get_ca_pem(self) -> bytes:
        """The CA certificate in PEM, for clients to trust."""
        return self._ca.cert_pem().encode()

    def get_ca_key_pem(self) -> bytes:
        return self._ca.key_pem().encode()

    def get_cert_pem(self, host: str) -> bytes:
        """The certificate chain served for `host` (minted now if not cached)."""
        return self._ca.leaf_pem(host).encode()

    @property
    def minted(self) -> int:
        """How many leaf certificates were minted so far."""
        return self._ca.mint_count()

    @property
    def engine_ca(self) -> _engine.CertificateAuthority:
        return self._ca


def load_or_create_ca(directory: StrPath) -> TLSStore:
    """The CA in `directory` (ca-key.pem, ca-cert.pem), created and saved there if absent."""
    folder = Path(directory)
    key, cert = folder / "ca-key.pem", folder / "ca-cert.pem"
    if key.exists() and cert.exists():
        return TLSStore.load_ca_from_disk(key, cert)
    if key.exists() or cert.exists():
        raise ValueError(f"{folder} holds only one of ca-key.pem and ca-cert.pem; remove it or add the other")
    folder.mkdir(parents=True, exist_ok=True)
    store = TLSStore.generate_ca()
    store.save_ca_to_disk(key, cert)
    return store


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
