"""`segproxy.http_response`: asyncio-https-proxy's module path for `HTTPResponse` (defined
in `segproxy.http`)."""

from .http import HTTPResponse

__all__ = ["HTTPResponse"]
