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
        raise ValueError(f"{folder} holds only one of ca-key.pem and ca-cert.pem; remove it or add the other")
    folder.mkdir(parents=True, exist_ok=True)
    store = TLSStore.generate_ca()
    store.save_ca_to_disk(key, cert)
    return store


def _paths(
    method: str, key_file: StrPath | None, cert_file: StrPath | None, key_path: StrPath | None, cert_path: StrPath | None
) -> tuple[str, str]:
    """The (key, cert) paths given under either pair of names, exactly once each."""
    if key_file is not None and key_path is not None or cert_file is not None and cert_path is not None:
        raise TypeError(f"{method}: give the key and the certificate once each (key_file or key_path, cert_file or cert_path)")
    key = key_file if key_file is not None else key_path
    cert = cert_file if cert_file is not None else cert_path
    if key is None or cert is None:
        raise TypeError(f"{method}() needs the key and the certificate paths")
    return os.fspath(key), os.fspath(cert)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
