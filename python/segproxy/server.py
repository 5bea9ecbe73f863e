"""`segproxy.server`: asyncio-https-proxy's module path for `start_proxy_server` (defined in
`segproxy._server`, with `ProxyServer`, the object it returns)."""

from ._server import ProxyServer, start_proxy_server

__all__ = ["ProxyServer", "start_proxy_server"]
