"""segproxy: a programmable HTTP/HTTPS forward proxy for traffic experiments.

A Rust engine does the forwarding; Python starts it, configures it and (optionally)
hooks into flows. Start one on a running asyncio loop::

    server = await segproxy.start_proxy_server(port=0)
    print(server.url)
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._engine import __version__
from .rules import Decision, Rule, Rules
from .tls import CERTIFICATE_VALIDITY_DAYS, TLSStore, load_or_create_ca

if TYPE_CHECKING:
    from ._server import (
        AccessRecord,
        BoundSocket,
        CapturedRequest,
        CapturedResponse,
        ErrorCounts,
        FlowRecord,
        PhaseTimes,
        ProxyOptions,
        ProxyServer,
        ProxyStats,
        run,
        servers,
        start_proxy_server,
    )
    from .handlers import HTTPSForwardProxyHandler, HTTPSProxyHandler, ProxyError
    from .http import HTTPHeader, HTTPRequest, HTTPResponse
    from .replay import ReplayResult, replay
    from .websocket import WebSocketMessage

#: Names imported on first use: the asyncio side (server, handlers) costs the command line,
#: which needs no event loop, about 8 MiB.
_LAZY = {
    **dict.fromkeys(
        (
            "AccessRecord",
            "BoundSocket",
            "CapturedRequest",
            "CapturedResponse",
            "ErrorCounts",
            "FlowRecord",
            "PhaseTimes",
            "ProxyOptions",
            "ProxyServer",
            "ProxyStats",
            "run",
            "servers",
            "start_proxy_server",
        ),
        "._server",
    ),
    **dict.fromkeys(("HTTPSForwardProxyHandler", "HTTPSProxyHandler", "ProxyError"), ".handlers"),
    **dict.fromkeys(("HTTPHeader", "HTTPRequest", "HTTPResponse"), ".http"),
    "WebSocketMessage": ".websocket",
    **dict.fromkeys(("ReplayResult", "replay"), ".replay"),
}


#: Submodules reached as attributes (``segproxy.experiment.sweep``) and imported on first use.
_SUBMODULES = ("experiment", "frames", "har")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        submodule = import_module(f".{name}", __name__)
        globals()[name] = submodule
        return submodule
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = [
    "CERTIFICATE_VALIDITY_DAYS",
    "AccessRecord",
    "BoundSocket",
    "CapturedRequest",
    "CapturedResponse",
    "Decision",
    "ErrorCounts",
    "FlowRecord",
    "HTTPHeader",
    "HTTPRequest",
    "HTTPResponse",
    "HTTPSForwardProxyHandler",
    "HTTPSProxyHandler",
    "PhaseTimes",
    "ProxyError",
    "ProxyOptions",
    "ProxyServer",
    "ProxyStats",
    "ReplayResult",
    "Rule",
    "Rules",
    "TLSStore",
    "WebSocketMessage",
    "__version__",
    "load_or_create_ca",
    "replay",
    "run",
    "servers",
    "start_proxy_server",
]
