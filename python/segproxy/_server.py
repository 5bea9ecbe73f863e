"""The asyncio-facing server: `start_proxy_server` and `ProxyServer`, shaped like asyncio.Server."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import weakref
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Literal, TypedDict, Unpack

from . import _engine
from .handlers import HookRunner
from .rules import Rules
from .tls import TLSStore

__all__ = [
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
]

#: Every ProxyServer of this process, by creation order; weak, so it keeps none alive.
_SERVERS: weakref.WeakValueDictionary[int, ProxyServer] = weakref.WeakValueDictionary()
_ORDER = itertools.count()


def servers() -> list[ProxyServer]:
    """The servers of this process still serving, oldest first: a notebook that lost its
    handle on one (a re-run cell) closes it with ``await segproxy.servers()[0].aclose()``."""
    return [server for _, server in sorted(_SERVERS.items()) if server.is_serving()]


def _collected(engine: _engine.EngineServer, hooks: HookRunner | None) -> None:
    """A ProxyServer was garbage-collected without being closed: its listener closes now
    (exchanges in flight get a second), and its hooks leave the loop."""
    if not engine.is_stopped():
        engine.begin_shutdown(1.0)
    if hooks is not None:
        try:
            hooks.close()
        except Exception:  # the loop may be gone already
            pass


class AccessRecord(TypedDict):
    """One forwarded request or tunnel, as the access log saw it."""

    id: str
    client: str | None
    method: str
    target: str
    status: int
    bytes_up: int
    bytes_down: int
    duration: float
    kind: str
    rule: str
    action: str
    policy: str
    dns: str
    error: str | None
    started: float
    outcome: str
    """What happened: "ok", "blocked", "rejected", "refused_limit", "error",
    "client_aborted", "origin_aborted", "idle_timeout", "cut_at_shutdown" or "fault"."""
    host: str
    """The destination as the rules saw it ("" before it was known)."""
    port: int
    scheme: str
    mode: str
    """The mode word of the rule that decided (SegmentedProxy's ``mode=``)."""
    line: str
    """SegmentedProxy's ``ACCESS rid=...`` line (our fields after its fields)."""


class CapturedRequest(TypedDict):
    """A captured request (``capture=`` / ``capture_bodies``): its head as it went to the
    origin (hop-by-hop fields left out, as forwarded) and its body's first bytes."""

    method: str
    url: str
    """The absolute URL (``https://`` for a request inside an intercepted CONNECT)."""
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes
    """The body's first bytes, at most the capture's limit (base64 text in a
    ``flows_file`` line)."""
    body_size: int
    """The body's size in all (transfer coding removed)."""
    body_truncated: bool
    """Whether `body` holds less than `body_size` bytes."""


class CapturedResponse(TypedDict):
    """A captured response: its head as the client got it and its body's first bytes."""

    status: int
    reason: str
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes
    body_size: int
    body_truncated: bool


class PhaseTimes(TypedDict):
    """When each phase of a captured exchange happened, in seconds on the clock of
    `FlowRecord.start` (None when it did not happen: a pooled connection has no
    connect phases, plain HTTP no ``tls_end``)."""

    connect_start: float | None
    """A new origin connection is started (name resolution begins)."""
    dns_end: float | None
    connect_end: float | None
    """TCP connected (through an upstream proxy: its CONNECT answered too)."""
    tls_end: float | None
    """TLS toward the origin established (intercepted flows)."""
    send_start: float | None
    """The origin connection ready, the request head starting out."""
    sent: float | None
    """The request (head and body) sent."""
    first_byte: float | None
    """The response's first byte arrived."""
    done: float | None
    """The response's last byte went to the client."""


class FlowRecord(TypedDict):
    """One flow's decision and the chunks written for it (``record_flows=True``)."""

    id: str
    kind: str
    method: str
    target: str
    rule: str
    action: str
    policy: str
    direction: str
    status: int
    """The status the client got (0 if the connection ended first); 200 for a tunnel."""
    bytes_up: int
    """Bytes client -> destination, as in `AccessRecord.bytes_up`."""
    bytes_down: int
    error: str | None
    outcome: str
    """What happened, as in `AccessRecord.outcome`."""
    start: float
    end: float | None
    dropped_chunks: int
    chunks: list[tuple[str, int, float]]
    """(direction, size, seconds) of every chunk, at its start."""
    short_chunks: list[tuple[int, str]]
    """(index into ``chunks``, why) of each chunk shorter than the policy asked: "flush" (the
    message ended), "idle" (the source was quiet for 1 ms) or "end" (the stream ended)."""
    faults: list[tuple[str, str, float]]
    """(direction, fault, seconds) of each injected fault that struck (``fault=``), on the
    chunks' clock: e.g. ``("down", "reset@5000", 12.3)``."""
    websocket_messages: list[tuple[str, int, float, bool]]
    """An upgraded WebSocket relayed message by message (a handler with
    `on_websocket_message`): (direction, size, seconds, is_text) of each message sent on,
    changed or not, and each injected one (dropped ones are not there); `size` is the
    content's length as the hook saw it (decompressed)."""
    websocket_up: int
    """How many of those messages went client -> server."""
    websocket_down: int
    started: float
    """Seconds since the Unix epoch when the flow started (`start` is the same moment on
    the proxy's monotonic clock)."""
    request: CapturedRequest | None
    """The captured request; None when the flow captured nothing (see ``capture=``)."""
    response: CapturedResponse | None
    """The captured response; None without a capture or when no response head came."""
    timings: PhaseTimes | None
    """The captured exchange's phase times; None without a capture."""
    server_address: str | None
    """``IP:PORT`` the origin connection went to (an upstream proxy's when through one),
    when captured (a pooled connection's when a capturing flow opened it)."""


class ErrorCounts(TypedDict):
    """Finished requests by outcome, for every outcome but "ok" (as in
    `AccessRecord.outcome`)."""

    blocked: int
    """Refused by a rule, the handler or the destination filter (403)."""
    rejected: int
    """Not acceptable as sent (400, 408, 431: malformed, slow or too large heads)."""
    refused_limit: int
    """Connections refused at the connection limit (503)."""
    error: int
    """The proxy answered an error (502, 504...) or a tunnel failed."""
    client_aborted: int
    origin_aborted: int
    idle_timeout: int
    cut_at_shutdown: int
    fault: int
    """Ended on purpose by an injected fault (``fault=reset@N`` or ``close@N``)."""


class ProxyStats(TypedDict):
    """`ProxyServer.stats()`: what the server has done since it started (the numbers
    ``/metrics`` serves with ``stats_port``)."""

    connections_open: int
    """Client connections open now."""
    connections_total: int
    """Client connections accepted, including those refused at the connection limit."""
    requests_total: int
    """Requests finished, one per access record: forwarded or answered requests (also
    inside intercepted connections), CONNECTs, rejected requests and refused connections."""
    tunnels_open: int
    tunnels_total: int
    """CONNECT tunnels established (bytes relayed untouched)."""
    intercepts_open: int
    intercepts_total: int
    """CONNECTs intercepted (TLS terminated by the proxy)."""
    bytes_up: int
    """Bytes client -> destination as access records count them (request bodies; all
    bytes of a tunnel), added when each request or tunnel finishes."""
    bytes_down: int
    """Bytes destination -> client, likewise (response bodies; all bytes of a tunnel)."""
    errors: ErrorCounts


class BoundSocket:
    """What `ProxyServer.sockets` lists: enough of a socket to ask where it listens."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.type = socket.SOCK_STREAM

    def getsockname(self) -> tuple[str, int]:
        return (self._host, self._port)

    def __repr__(self) -> str:
        return f"<BoundSocket {self._host}:{self._port}>"


StrPath = str | os.PathLike[str]


class ProxyOptions(TypedDict, total=False):
    """The keyword options of `start_proxy_server`: the engine's table of options
    (`segproxy.options.OPTIONS`, defaults in `ENGINE_OPTIONS`), typed; a test keeps the two
    the same."""

    connect_timeout: float
    idle_timeout: float
    header_timeout: float
    response_timeout: float
    max_connections: int | None
    """Most concurrent client connections (more get 503); None derives it from the
    open-file limit, which the server raises to its hard limit: two descriptors a
    connection, plus headroom (`ProxyServer.max_connections` says what is in force)."""
    shutdown_timeout: float
    """Seconds that exchanges in flight get to finish when the server closes (`close()` /
    `aclose()` without a `grace`, SIGTERM / Ctrl-C in `run` and the CLI); then they are cut."""
    max_header_bytes: int
    access_log: StrPath | None
    access_log_format: Literal["text", "json"]
    access_records: int
    hook_timeout: float
    pool_idle_timeout: float
    rules: Rules | str | None
    dns_server: str | None
    dns_port: int
    dns_transport: Literal["udp", "tcp"]
    dns_cache_size: int
    allow_domains: str | Iterable[str]
    deny_domains: str | Iterable[str]
    deny_private: bool
    upstream_ca: StrPath | Iterable[StrPath]
    upstream_insecure: bool
    record_flows: bool
    flows_file: StrPath | None
    flows_capacity: int
    capture_bodies: int
    """Capture every HTTP flow: heads, phase times and bodies up to this many bytes each
    (for `ProxyServer.export_har`); turns `record_flows` on unless a `flows_file` is given.
    0 (the default) captures only flows whose rule says ``capture=yes``, 64 KiB bodies."""
    proxy_auth: Iterable[str | tuple[str, str]]
    allow_open_proxy: bool
    stats_port: int | None
    """Serve `stats()` at ``GET /metrics`` in Prometheus text format on this port of the
    proxy's host (0 picks a free one; `ProxyServer.metrics_url` says where)."""
    socks_port: int | None
    """Also serve SOCKS5 on this port of the proxy's host (0 picks a free one;
    `ProxyServer.socks_port` says which). The proxy port answers SOCKS5 too."""


class ProxyServer:
    """A running segproxy server. Create it with `await start_proxy_server(...)`."""

    def __init__(
        self,
        engine: _engine.EngineServer,
        handler_builder: Callable[[], Any] | None = None,
        hooks: HookRunner | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self._engine = engine
        self._rules = Rules()
        self._handler_builder = handler_builder
        self._hooks = hooks
        self._closing: asyncio.Future[None] | None = None
        self.shutdown_timeout = shutdown_timeout
        """Seconds that exchanges in flight get when the server closes."""
        self._stopped_future: asyncio.Future[None] | None = None
        self._stop_poller: asyncio.Task[None] | None = None
        _SERVERS[next(_ORDER)] = self
        # Dropped without aclose(): the listener closes, so the port can be used again.
        self._finalizer = weakref.finalize(self, _collected, engine, hooks)
        # Not at interpreter exit: the process ends anyway, and engine threads must not be
        # woken while Python finalizes.
        self._finalizer.atexit = False

    # --- where it listens -------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        return self._engine.local_addr()

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def socks_address(self) -> tuple[str, int] | None:
        """Where the SOCKS5 port listens as (host, port); None without ``socks_port``."""
        return self._engine.socks_addr()

    @property
    def socks_port(self) -> int | None:
        """The bound SOCKS5 port; None without ``socks_port`` (the proxy port serves
        SOCKS5 as well)."""
        address = self.socks_address
        return None if address is None else address[1]

    @property
    def max_connections(self) -> int:
        """The connection limit in force: as given, or derived from the open-file limit."""
        return self._engine.max_connections

    @property
    def url(self) -> str:
        """The proxy URL clients are given, e.g. ``http://127.0.0.1:8080``."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def stats_address(self) -> tuple[str, int] | None:
        """Where ``/metrics`` is served as (host, port); None without ``stats_port`` or
        once the server has stopped."""
        return self._engine.stats_addr()

    @property
    def metrics_url(self) -> str | None:
        """The URL of the Prometheus endpoint, e.g. ``http://127.0.0.1:9090/metrics``."""
        address = self.stats_address
        if address is None:
            return None
        host, port = address
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    @property
    def sockets(self) -> tuple[BoundSocket, ...]:
        if self._closing is not None:
            return ()
        return (BoundSocket(*self.address),)

    # --- lifecycle, as asyncio.Server ----------------------------------------------------
    def is_serving(self) -> bool:
        return self._closing is None and not self._engine.is_stopped()

    def close(self, grace: float | None = None) -> None:
        """Stop accepting now; exchanges in flight get up to `grace` seconds to finish
        (default: the server's `shutdown_timeout` option)."""
        if self._closing is None:
            self._engine.begin_shutdown(self.shutdown_timeout if grace is None else grace)
            self._closing = asyncio.ensure_future(self._shutdown())

    async def _shutdown(self) -> None:
        try:
            await self._stopped()
        finally:
            self._finalizer.detach()
            if self._hooks is not None:  # hooks serve exchanges in flight until the end
                self._hooks.close()

    def _stopped(self) -> asyncio.Future[None]:
        """One future for everyone waiting: resolved when the engine's stop pipe is readable."""
        if self._stopped_future is None:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            fd = self._engine.stopped_fd()

            def settle() -> None:
                loop.remove_reader(fd)
                if not future.done():
                    future.set_result(None)

            try:
                loop.add_reader(fd, settle)
            except NotImplementedError:  # loops without add_reader: poll

                async def poll() -> None:
                    # No descriptor to wait on here, so the engine's state is polled.
                    while not self._engine.is_stopped():  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                    if not future.done():
                        future.set_result(None)

                self._stop_poller = loop.create_task(poll())
            self._stopped_future = future
        return self._stopped_future

    async def wait_closed(self) -> None:
        """Wait until the server has closed (after `close()`)."""
        if self._closing is not None:
            await self._closing
        else:
            await asyncio.shield(self._stopped())

    async def aclose(self, grace: float | None = None) -> None:
        """`close(grace)`, then wait until the server has stopped."""
        self.close(grace)
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until the server is closed; cancelling this closes it."""
        try:
            await asyncio.shield(self._stopped())
        except asyncio.CancelledError:
            await self.aclose()
            raise

    async def start_serving(self) -> None:
        """The server serves from creation; kept for asyncio.Server compatibility."""

    async def __aenter__(self) -> ProxyServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- what happened ----------------------------------------------------------------------
    def access_records(self, clear: bool = False) -> list[AccessRecord]:
        """Recent access records, oldest first (bounded; see the `access_records` option).

        A record is written when its flow ends: that can be a moment after the client has
        the whole response (the proxy writes the last bytes, then the record; with a
        handler, the flow ends when its hook returns). Read them once the server is closed,
        or wait until the count you expect is there.
        """
        return self._engine.access_records(clear)  # type: ignore[return-value]

    def flows(self, clear: bool = False) -> list[FlowRecord]:
        """Finished flow records, oldest first (needs ``record_flows=True``).

        Each has the flow's decision and ``chunks``: (direction, size, seconds) per
        segment written, ready to plot. Like `access_records`, a flow is here once it has
        ended, which can be a moment after its client got the last byte.
        """
        return self._engine.flows(clear)  # type: ignore[return-value]

    def flows_frame(self, clear: bool = False) -> Any:
        """`flows()` as a pandas DataFrame, one row a flow (`segproxy.frames.flows_frame`).
        Needs pandas: ``pip install segproxy[notebook]``."""
        from .frames import flows_frame

        return flows_frame(self.flows(clear))

    def chunks_frame(self, clear: bool = False) -> Any:
        """Every chunk of `flows()` as a pandas DataFrame, one row a chunk, times in seconds
        from its flow's start (`segproxy.frames.chunks_frame`). Needs pandas."""
        from .frames import chunks_frame

        return chunks_frame(self.flows(clear))

    def export_har(self, path: StrPath, clear: bool = False) -> int:
        """Writes `flows()` to `path` as HAR 1.2 (`segproxy.har.dump`) and returns how many
        entries it has. Heads, bodies and timings come from captured flows (``capture=`` on
        a rule, or the ``capture_bodies`` option); other requests get what their record
        knows. Needs flow records in memory (``record_flows=True``, or ``capture_bodies``
        without a ``flows_file``; `segproxy.har.dump` takes a flows file's lines)."""
        from .har import dump

        if not self._engine.recording_flows():
            raise ValueError(
                "export_har needs flow records in memory: start the server with "
                "capture_bodies=N or record_flows=True (a flows_file's lines go to "
                "segproxy.har.dump)"
            )
        return dump(self.flows(clear), path)

    def active_connections(self) -> int:
        return self._engine.active_connections()

    def stats(self) -> ProxyStats:
        """Counters since the server started: open connections, tunnels and interceptions,
        requests, bytes each way, and ``errors`` by outcome. Requests, bytes and errors are
        counted as each access record is written (a tunnel's bytes when it closes)."""
        return self._engine.stats()  # type: ignore[return-value]

    # --- changing the policy while it runs ---------------------------------------------
    @property
    def rules(self) -> Rules:
        """The rules in force (those given at start, or the last `set_rules`). The server
        holds a snapshot: changing this object afterwards changes nothing until it is given
        to `set_rules` again."""
        return self._rules

    def set_rules(self, rules: Rules | str) -> None:
        """Puts `rules` (a `Rules` object or rule text, default policy included) in force now,
        in one atomic swap: new connections and new requests on kept-alive connections are
        decided by them; flows already decided (a tunnel segmenting, a request in flight)
        keep the policy they started with; nothing is dropped. A rule saying
        ``intercept=yes`` on a server without a CA raises ValueError and changes nothing."""
        if isinstance(rules, str):
            rules = Rules.parse(rules)
        if not isinstance(rules, Rules):
            raise TypeError(
                f"rules must be a segproxy.Rules or rule text, not {type(rules).__name__}"
            )
        self._engine.set_rules(rules.engine_rules)
        self._rules = rules

    def set_domain_filter(
        self,
        allow_domains: str | Iterable[str] = (),
        deny_domains: str | Iterable[str] = (),
        deny_private: bool = False,
    ) -> None:
        """Puts a new destination filter in force now, as `allow_domains`, `deny_domains` and
        `deny_private` at start would: checked for every destination from now on."""
        self._engine.set_domain_filter(
            _domains(allow_domains), _domains(deny_domains), bool(deny_private)
        )

    def __repr__(self) -> str:
        state = "serving" if self.is_serving() else "closed"
        return f"<segproxy.ProxyServer {self.url} {state}>"


async def start_proxy_server(
    handler_builder: Callable[[], Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    tls_store: TLSStore | None = None,
    **options: Unpack[ProxyOptions],
) -> ProxyServer:
    """Start a proxy on `host:port` (port 0 picks a free one) and return its `ProxyServer`.

    Must be awaited on a running asyncio loop (a script's `asyncio.run`, or a notebook's
    loop). `handler_builder` is called once per client connection; options are the engine's
    (timeouts in seconds, `max_connections`, `access_log` path, ...).
    """
    # The engine reads (and checks) every option; a Rules object or rule text is ours.
    engine_options: dict[str, Any] = dict(options)
    rules = engine_options.pop("rules", None)
    if isinstance(rules, str):
        rules = Rules.parse(rules)
    if rules is not None and not isinstance(rules, Rules):
        raise TypeError(f"rules must be a segproxy.Rules or rule text, not {type(rules).__name__}")
    if tls_store is not None and not isinstance(tls_store, TLSStore):
        raise TypeError(f"tls_store must be a segproxy.TLSStore, not {type(tls_store).__name__}")
    hooks = (
        None if handler_builder is None else HookRunner(handler_builder, asyncio.get_running_loop())
    )
    try:
        engine = await _engine.start_server(
            host,
            port,
            rules=None if rules is None else rules.engine_rules,
            ca=None if tls_store is None else tls_store.engine_ca,
            handler=None if hooks is None else hooks.bridge,
            **engine_options,
        )
    except OSError as exc:
        if hooks is not None:
            hooks.close()
        running = servers()
        index = next((i for i, s in enumerate(running) if s.port == port and port != 0), None)
        if index is not None:
            # Typically a notebook cell run again: the first server still listens. (No
            # reference to it stays in this frame: the traceback must not keep it alive.)
            message = (
                f"{exc}; {running[index]!r} of this process listens there: close it "
                f"(await segproxy.servers()[{index}].aclose()) or use port=0"
            )
            del running
            raise OSError(message) from exc
        raise
    except BaseException:
        if hooks is not None:
            hooks.close()
        raise
    server = ProxyServer(engine, handler_builder, hooks, engine.shutdown_timeout)
    server._rules = rules if rules is not None else Rules()
    return server


def _domains(value: str | Iterable[str]) -> list[str]:
    """Domain entries given as one string or as many, as at start."""
    if isinstance(value, str):
        return [value]
    return [str(d) for d in value]


def run(
    handler_builder: Callable[[], Any] | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    tls_store: TLSStore | None = None,
    *,
    on_ready: Callable[[ProxyServer], None] | None = None,
    **options: Unpack[ProxyOptions],
) -> None:
    """Run a proxy from a plain script until Ctrl-C or SIGTERM (blocking).

    Not for notebooks, whose loop is already running: there, `await start_proxy_server(...)`.
    """

    async def main() -> None:
        server = await start_proxy_server(handler_builder, host, port, tls_store, **options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, server.close)
            except (NotImplementedError, RuntimeError):
                pass
        if on_ready is not None:
            on_ready(server)
        await server.serve_forever()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
