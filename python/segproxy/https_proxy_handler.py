"""`segproxy.https_proxy_handler`: asyncio-https-proxy's module path for `HTTPSProxyHandler`
and `MAX_CHUNK_SIZE` (defined in `segproxy.handlers`)."""

from .handlers import MAX_CHUNK_SIZE, HTTPSProxyHandler

__all__ = ["MAX_CHUNK_SIZE", "HTTPSProxyHandler"]
