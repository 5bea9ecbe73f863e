"""`segproxy.http_header`: asyncio-https-proxy's module path for `HTTPHeader` (defined in
`segproxy.http`), so ``from asyncio_https_proxy.http_header import HTTPHeader`` becomes
``from segproxy.http_header import HTTPHeader``."""

from .http import HTTPHeader

__all__ = ["HTTPHeader"]
