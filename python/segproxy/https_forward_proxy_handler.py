"""`segproxy.https_forward_proxy_handler`: asyncio-https-proxy's module path for
`HTTPSForwardProxyHandler` and `MAX_CHUNK_SIZE` (defined in `segproxy.handlers`)."""

from .handlers import MAX_CHUNK_SIZE, HTTPSForwardProxyHandler

__all__ = ["MAX_CHUNK_SIZE", "HTTPSForwardProxyHandler"]
