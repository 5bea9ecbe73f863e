"""`segproxy.http_request`: asyncio-https-proxy's module path for `HTTPRequest` (defined in
`segproxy.http`)."""

from .http import HTTPRequest

__all__ = ["HTTPRequest"]
