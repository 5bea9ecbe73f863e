"""`segproxy.tls_store`: asyncio-https-proxy's module path for `TLSStore` and
`CERTIFICATE_VALIDITY_DAYS` (defined in `segproxy.tls`)."""

from .tls import CERTIFICATE_VALIDITY_DAYS, TLSStore

__all__ = ["CERTIFICATE_VALIDITY_DAYS", "TLSStore"]
