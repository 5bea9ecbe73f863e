"""segproxy: a programmable HTTP/HTTPS forward proxy for traffic experiments.

A Rust engine does the forwarding; Python starts it, configures it and (optionally)
hooks into flows. Start one on a running asyncio loop::

    server = await segproxy.start_proxy_server(port=0)
    print(server.url)
"""

from ._engine import __version__
from ._server import (
    AccessRecord,
    BoundSocket,
    ErrorCounts,
    FlowRecord,
    ProxyOptions,
    ProxyServer,
    ProxyStats,
    run,
    servers,
    start_proxy_server,
)
from .handlers import HTTPSForwardProxyHandler, HTTPSProxyHandler, ProxyError
from .http import HTTPHeader, HTTPRequest, HTTPResponse
from .rules import Decision, Rule, Rules
from .tls import CERTIFICATE_VALIDITY_DAYS, TLSStore, load_or_create_ca

__all__ = [
    "CERTIFICATE_VALIDITY_DAYS",
    "AccessRecord",
    "BoundSocket",
    "Decision",
    "ErrorCounts",
    "FlowRecord",
    "HTTPHeader",
    "HTTPRequest",
    "HTTPResponse",
    "HTTPSForwardProxyHandler",
    "HTTPSProxyHandler",
    "ProxyError",
    "ProxyOptions",
    "ProxyServer",
    "ProxyStats",
    "Rule",
    "Rules",
    "TLSStore",
    "__version__",
    "load_or_create_ca",
    "run",
    "servers",
    "start_proxy_server",
]
