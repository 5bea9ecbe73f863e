"""segproxy: a programmable HTTP/HTTPS forward proxy for traffic experiments.

A Rust engine does the forwarding; Python starts it, configures it and (optionally)
hooks into flows. Start one on a running asyncio loop::

    server = await segproxy.start_proxy_server(port=0)
    print(server.url)
"""

from ._engine import __version__
from ._server import AccessRecord, BoundSocket, ProxyServer, run, start_proxy_server

__all__ = [
    "AccessRecord",
    "BoundSocket",
    "ProxyServer",
    "__version__",
    "run",
    "start_proxy_server",
]
