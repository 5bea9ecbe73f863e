"""Test helpers, all on loopback (127.0.0.1, free ports, real sockets). By module:

- ``procs``: ``LOOPBACK``, ``free_port``, ``port_accepts``, ``find_binary``,
  ``ManagedProcess`` (a program run in the foreground, stopped by pid).
- ``services``: real peers as processes: ``NginxOrigin``, ``NghttpdOrigin``, ``Squid``, ``Tinyproxy``,
  ``Dnsmasq``, ``Segproxy`` (the CLI); ``wait_for`` (poll a condition, bounded).
- ``certs``: ``make_origin_certs`` (test CA + leaf), ``make_self_signed``.
- ``dnsclient``: ``query_a`` (one DNS A query over UDP).
- ``inprocess``: ``ProxyThread`` (``start_proxy_server`` on its own loop thread).
- ``origins``: origins on an asyncio loop thread (``ThreadedOrigin``):
  ``RecordingOrigin``, ``ScriptedOrigin``, ``SinkThenReplyOrigin``, ``TlsEchoOrigin``
  (lines back uppercased), ``WebSocketOrigin``; ``HttpsEchoOrigin`` (http.server over
  TLS: chunked bodies, body SHA-256, connection ids); the ``pattern_*`` bodies;
  ``blackhole_port``, ``full_backlog_port``, ``refused_port``.
- ``loopback``: servers with a thread per connection (``ThreadedServer``):
  ``FramedOrigin``, ``SinkOrigin``, ``SourceOrigin``, ``TcpEchoOrigin`` (raw TCP echo),
  ``HttpRecordingOrigin``, ``OneRequestOrigin``, ``FakeUpstream``, ``TcpRelay``,
  ``HttpOrigin``; wire helpers on blocking sockets (``read_head``, ``parse_headers``,
  ``header``, ``read_chunked_file``, ``recv_exact``, ``blob``, ``sha``); proxy clients
  ``proxy_connect``, ``proxy_request``, ``read_response``.
- ``clients``: ``Conn`` (a buffered raw connection to the proxy), ``request``,
  ``get_via``, ``curl``.
- ``tls_clients``: HTTPS through the proxy: ``connect_tunnel``, ``trusting_context``,
  ``get``, ``read_response_from_file``.

Import from tests as ``from support import NginxOrigin, Squid, ...`` or from a module
(``from support.origins import RecordingOrigin``); tests/ is on sys.path through
tests/conftest.py. The benchmark scripts (bench/) import the same package; what this
file imports (and re-exports) must not need ``segproxy`` itself (``inprocess`` does).
"""

from .certs import make_origin_certs, make_self_signed
from .dnsclient import query_a
from .procs import (
    LOOPBACK,
    ManagedProcess,
    MissingBinary,
    find_binary,
    free_port,
    port_accepts,
)
from .services import Dnsmasq, NghttpdOrigin, NginxOrigin, Segproxy, Squid, Tinyproxy, wait_for

__all__ = [
    "LOOPBACK",
    "Dnsmasq",
    "ManagedProcess",
    "MissingBinary",
    "NghttpdOrigin",
    "NginxOrigin",
    "Segproxy",
    "Squid",
    "Tinyproxy",
    "find_binary",
    "free_port",
    "make_origin_certs",
    "make_self_signed",
    "port_accepts",
    "query_a",
    "wait_for",
]
