"""Handler base classes: subclass one, override the async hooks you need, pass a builder.

    class AddHeader(HTTPSForwardProxyHandler):
        async def on_request_received(self):
            self.request.headers.set("X-Seen", "1")
            await self.forward_http_request()

    server = await start_proxy_server(lambda: AddHeader(), "127.0.0.1", 8080)

The same names as asyncio-https-proxy, so its scripts run by changing the import line.

How hooks run:

- The Rust engine calls a hook only if your class overrides it (it checks once, at start).
  A handler that overrides nothing runs at engine speed; body bytes stay in Rust unless you
  override `on_response_chunk`, call `read_request_body()`, or read response bodies
  (`read_response_body()` / `upstream_reader`, see `reads_response_body`).
- Hooks run on the asyncio loop that awaited `start_proxy_server` (a notebook's loop too),
  each as a task in one `contextvars.Context` per client connection, so a ContextVar set in
  `on_request_received` is visible in `on_response_received` of the same connection.
- Keep-alive: `handler_builder()` is called once per client connection (the first call happens
  at start, to learn the handler class; that instance serves the first connection). The same
  instance then handles every request of that connection in turn: `request` and `response` are
  replaced for each request, while attributes you set yourself persist across the connection's
  requests. `on_client_connected` runs once, before the first request's `on_request_received`.
- An exception in a hook is passed to `on_error`; the client gets a 502 (or its connection is
  closed if the response already started). A hook that takes longer than the server's
  `hook_timeout` is abandoned: the client gets a 504 and the hook's task is cancelled (so are
  hooks still running when their client connection ends).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import CodeType
from typing import Any, Literal, Self

from . import _engine
from .http import HTTPHeader, HTTPRequest, HTTPResponse
from .rules import Strategy
from .websocket import WebSocketMessage

__all__ = [
    "MAX_CHUNK_SIZE",
    "ClientReader",
    "ClientWriter",
    "ConnectAction",
    "HTTPSForwardProxyHandler",
    "HTTPSProxyHandler",
    "ProxyError",
    "UpstreamReader",
    "UpstreamWriter",
]

log = logging.getLogger("segproxy.handlers")

#: The most bytes one step of `read_response_body()` yields, and of `read_request_body()` when
#: it reads a `client_reader` the script set itself (asyncio-https-proxy's constant and value).
MAX_CHUNK_SIZE = 4096

ConnectAction = Literal["tunnel", "intercept", "block"]


class ProxyError(Exception):
    """A failure the engine reported (destination unreachable, bad response, timeout...)."""


class _FlowState:
    """What a handler needs about the request in hand; replaced for every request."""

    __slots__ = ("body_read", "client", "flow", "policy", "reader", "writer")

    def __init__(self, flow: _engine.FlowHandle, client: tuple[str, int]) -> None:
        self.flow = flow
        self.body_read: list[bytes] | None = None
        self.policy: tuple[str, int, int, int, float] | None = None
        self.reader: ClientReader | None = None
        self.writer: ClientWriter | None = None
        self.client = client


class HTTPSProxyHandler:
    """One client connection's handler: it answers requests itself.

    Set by the proxy: `request` (the request in hand). Hooks: `on_client_connected`,
    `on_request_received`, `on_error`, and segproxy's `on_connect`, `on_tunnel_open`,
    `on_tunnel_close`, `on_websocket_message`. Helpers: `read_request_body()`,
    `write_response()`, `flush_response()`, `client_reader` / `client_writer`,
    `set_segmentation()`, `inject_websocket_message()`.

    If `on_request_received` returns without writing a response, the client gets a 502.
    """

    request: HTTPRequest
    _sp: _FlowState

    # --- hooks ---------------------------------------------------------------------------
    async def on_client_connected(self) -> None:
        """Called once per client connection, before its first `on_request_received`."""

    async def on_request_received(self) -> None:
        """Called for each request; `self.request` holds it. Answer with `write_response`."""

    async def on_error(self, error: Exception) -> None:
        """Called with the exception a hook raised, or a `ProxyError` the engine reported."""

    async def on_connect(self, host: str, port: int) -> ConnectAction | tuple[str, str] | None:
        """A CONNECT to host:port arrived: return "tunnel" (pass the bytes through), "intercept"
        (decrypt with a minted certificate), "block" or ("block", reason), or None for what the
        rules say."""
        return None

    async def on_tunnel_open(self, host: str, port: int) -> None:
        """A CONNECT tunnel to host:port was opened (the client got its 200)."""

    async def on_authenticate(self, scheme: str, credentials: str) -> bool:
        """A request or CONNECT came with `Proxy-Authorization: <scheme> <credentials>` that
        the server's `proxy_auth` credentials do not settle (another scheme, or Basic when no
        `proxy_auth` is set): return True to let it through, False for a 407. Overriding it
        turns authentication on; the header is never forwarded."""
        return False

    async def on_tunnel_close(self, host: str, port: int, bytes_up: int, bytes_down: int) -> None:
        """A tunnel closed; bytes moved client -> destination (`bytes_up`) and back."""

    async def on_websocket_message(self, message: WebSocketMessage) -> None:
        """A whole WebSocket message on an upgraded connection (plain or intercepted), before
        it goes on: assign `message.content` to change it, `message.drop()` to send nothing.
        Overriding it makes the engine relay WebSocket upgrades message by message; without
        it they stay a byte relay."""

    def inject_websocket_message(
        self, content: bytes | str, to_client: bool = True, is_text: bool | None = None
    ) -> None:
        """Sends a message of your own on this connection's WebSocket (a class with
        `on_websocket_message`, from the 101 until the WebSocket closes): to the client, or
        to the server with `to_client=False`. `is_text` None means text for a str, binary for
        bytes. It goes out after the message in hand; once that direction has closed it is
        dropped."""
        conn: _Connection | None = getattr(self, "_conn", None)
        injector = conn.websocket if conn is not None else None
        if injector is None:
            raise RuntimeError(
                "inject_websocket_message: no WebSocket is open on this connection (it works "
                "from the 101 of an upgrade until the WebSocket closes, in a class that "
                "overrides on_websocket_message)"
            )
        if is_text is None:
            is_text = isinstance(content, str)
        data = content.encode() if isinstance(content, str) else bytes(content)
        if is_text:
            try:
                data.decode()
            except UnicodeDecodeError as e:
                raise ValueError(f"a text message must be UTF-8: {e}") from None
        injector.inject(data, to_client, is_text)

    # --- helpers -------------------------------------------------------------------------
    def _flow(self) -> _FlowState:
        try:
            return self._sp
        except AttributeError:
            raise RuntimeError(
                f"this {type(self).__name__} is not serving a request: a proxy server started "
                "with start_proxy_server() gives handlers their requests"
            ) from None

    async def read_request_body(self) -> AsyncIterator[bytes]:
        """The client's request body, piece by piece (nothing for a body-less request).

        Read bodies are kept: a later `forward_http_request()` sends them on. If the script set
        `client_reader` itself, the body is read from that instead, as asyncio-https-proxy does:
        `Content-Length` bytes (nothing without one) in reads of at most `MAX_CHUNK_SIZE`."""
        own = self.__dict__.get("_own_client_reader")
        if own is not None:
            length = self.request.headers.first("Content-Length")
            if length is not None:
                async for piece in _read_counted(own, int(length)):
                    yield piece
            return
        sp = self._flow()
        if sp.body_read is None:
            sp.body_read = []
        while True:
            chunk = await _next_body_chunk(sp)
            if chunk is None:
                return
            sp.body_read.append(chunk)
            yield chunk

    def write_response(self, content: bytes) -> None:
        """Sends raw bytes to the client: a whole HTTP response, status line included (it may
        come in several calls). Not buffered: `flush_response()` is there for compatibility.
        (To a `client_writer` the script set itself, if it did.)"""
        own = self.__dict__.get("_own_client_writer")
        if own is not None:
            own.write(content)
        else:
            self._flow().flow.write(content)

    async def flush_response(self) -> None:
        """Kept for asyncio-https-proxy compatibility; `write_response` does not buffer. (Drains
        a `client_writer` the script set itself, if it did.)"""
        own = self.__dict__.get("_own_client_writer")
        if own is not None:
            await own.drain()

    def set_segmentation(
        self,
        strategy: Strategy = "fixed",
        chunk: int = 0,
        min: int = 0,
        max: int = 0,
        delay_ms: float = 0.0,
    ) -> None:
        """Segmentation for the request in hand (overrides the rules): `fixed` cuts the bytes
        sent into `chunk`-byte writes, `random` into sizes in [min, max], with `delay_ms`
        between them. Call it before `forward_http_request()`. A bad policy raises the
        engine's ValueError (the same as from a rule)."""
        _engine.segment_policy(strategy, chunk, min, max, delay_ms)
        self._flow().policy = (strategy, chunk, min, max, float(delay_ms))

    @property
    def client_reader(self) -> ClientReader:
        """The request body as an asyncio.StreamReader-like object.

        A script may set it (asyncio-https-proxy's server does, and its unit tests set a mock):
        `read_request_body()` then reads that object instead of the engine's body."""
        own = self.__dict__.get("_own_client_reader")
        if own is not None:
            return own  # type: ignore[no-any-return]
        sp = self._flow()
        if sp.reader is None:
            sp.reader = ClientReader(sp)
        return sp.reader

    @client_reader.setter
    def client_reader(self, reader: Any) -> None:
        self.__dict__["_own_client_reader"] = reader

    @property
    def client_writer(self) -> ClientWriter:
        """Writes raw response bytes to the client, like an asyncio.StreamWriter.

        A script may set it: `write_response()` and `flush_response()` then use that object."""
        own = self.__dict__.get("_own_client_writer")
        if own is not None:
            return own  # type: ignore[no-any-return]
        sp = self._flow()
        if sp.writer is None:
            sp.writer = ClientWriter(sp)
        return sp.writer

    @client_writer.setter
    def client_writer(self, writer: Any) -> None:
        self.__dict__["_own_client_writer"] = writer


class HTTPSForwardProxyHandler(HTTPSProxyHandler):
    """A handler that forwards requests (the engine does the forwarding, in Rust).

    Its `on_request_received` forwards; override it to change `self.request` first (method,
    path, headers, or `request.body` to replace the body), to answer without forwarding
    (`write_response`), or both. Response hooks: `on_response_received` (change
    `self.response`: status, reason, headers), `on_response_chunk(chunk)` (return new bytes, or
    None to drop the chunk; the engine re-frames the body when its length changes),
    `on_response_complete`.

    `read_response_body()` (and `upstream_reader`) give the response body inside
    `on_response_received`, as in asyncio-https-proxy; see there for what segproxy needs.
    """

    upstream_reader: Any = None
    """asyncio-https-proxy's stream from the origin. Here the engine holds the connection to
    the origin and has read the response head; while `on_response_received` runs, this is an
    `UpstreamReader` over the response body (de-chunked), for handler classes that read the
    body (see `read_response_body`); None otherwise. A script that forwards by itself may set
    its own stream here: `read_response_body()` then reads that, as asyncio-https-proxy does."""

    upstream_writer: Any = None
    """asyncio-https-proxy's stream to the origin. Here the engine has sent the request and owns
    the connection, so this is an `UpstreamWriter` stand-in, set when a response head arrives
    (for classes with a response hook; None before): it closes with the response and its
    `write()` raises. A script that forwards by itself may set its own stream here."""

    reads_response_body: bool | None = None
    """Whether the engine hands response bodies to Python for `read_response_body()` /
    `upstream_reader`; None (the default) decides from the class's code: True if a method of
    the class names `read_response_body` or `upstream_reader`. Set True when the call is made
    elsewhere (a helper function), False to keep bodies in the engine."""

    # None until a response head arrived for the request in hand, as in asyncio-https-proxy;
    # typed as set because the response hooks, where it is read, always see it set.
    response: HTTPResponse = None  # type: ignore[assignment]
    """The response in hand: set before `on_response_received` runs, for each request, and
    still there when `forward_http_request()` returns if the class overrides a response hook."""

    async def on_request_received(self) -> None:
        await self.forward_http_request()

    async def on_response_received(self) -> None:
        """The response head arrived; `self.response` holds it and may be changed."""

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        """A piece of the response body: return what to send instead, or None to drop it."""
        return chunk

    async def on_response_complete(self) -> None:
        """The response was sent in full, or forwarding failed (then `on_error` follows), as
        in asyncio-https-proxy."""

    async def read_response_body(self) -> AsyncIterator[bytes]:
        """The response body, as asyncio-https-proxy's async generator: `Content-Length` bytes
        (to the end without one) in pieces of at most `MAX_CHUNK_SIZE`, read from
        `upstream_reader`.

        With the engine forwarding, it works in `on_response_received` (and tasks it awaits):
        the first read sends the response head on as `self.response` is at that moment (later
        changes to it are not seen by the client), then each piece read is also sent on to the
        client, through `on_response_chunk`; the rest of the body follows when the hook returns.
        The body arrives de-chunked, and the client gets it re-framed as chunked. Reading it
        twice gives nothing the second time. The engine passes bodies to Python only for
        classes that read them (see `reads_response_body`).

        Elsewhere (in `on_response_chunk`, `on_response_complete`, after
        `forward_http_request()` returned, or before a response arrived) it raises
        RuntimeError: the engine has sent the body on, or has none yet. On a handler no server
        serves, with no `upstream_reader` set, it yields nothing, as there."""
        reader = self.upstream_reader
        if isinstance(reader, UpstreamReader):
            if not reader._body.attached:
                raise RuntimeError(_BODY_GONE)
        elif reader is None:
            conn: _Connection | None = getattr(self, "_conn", None)
            if conn is None:
                return
            if conn.in_head_hook:
                raise RuntimeError(_BODY_NOT_PASSED.format(cls=type(self).__name__))
            raise RuntimeError(_BODY_GONE)
        response = self.response
        if response is None:
            return
        length = response.headers.first("Content-Length") if response.headers else None
        pieces = _read_counted(reader, int(length)) if length is not None else _read_all(reader)
        async for piece in pieces:
            yield piece

    async def forward_http_request(self) -> None:
        """Forwards `self.request` as it is now. If this class overrides a response hook, returns
        once the response has gone through them (after `on_response_complete`, or an error);
        otherwise returns at once while the engine streams the response."""
        sp = self._flow()
        r = self.request
        body = r.body
        if body is None and sp.body_read is not None:
            # The hook consumed the body: send on what it read (plus anything left).
            async for _ in self.read_request_body():
                pass
            body = b"".join(sp.body_read)
        if body is not None:
            body = bytes(body)
            r.headers.remove("Transfer-Encoding")
            r.headers.set("Content-Length", str(len(body)))
        conn: _Connection | None = getattr(self, "_conn", None)
        waiter = conn.expect_response() if conn is not None and conn.waits_response else None
        sp.flow.forward(
            (r.method, r.scheme, r.host, r.port, r.path, r.version, r.headers._fields),
            body,
            sp.policy,
        )
        if waiter is not None:
            await waiter


_BODY_GONE = (
    "read_response_body() reads the body of the response in hand from on_response_received: "
    "the engine forwards it once that hook has read it or returned. Here the body is not "
    "there (not arrived yet, or already sent on to the client); on_response_chunk sees every "
    "piece as it goes to the client"
)
_BODY_NOT_PASSED = (
    "read_response_body() in on_response_received needs the engine to pass the response body "
    "to Python, which segproxy turns on, at start, for handler classes whose methods name "
    "read_response_body or upstream_reader: set `reads_response_body = True` on {cls}"
)


async def _read_counted(reader: Any, length: int) -> AsyncIterator[bytes]:
    """`length` bytes from a StreamReader-like `reader`, in reads of at most MAX_CHUNK_SIZE
    (one read of 0 for an empty body, as asyncio-https-proxy); stops early at EOF."""
    while True:
        chunk = await reader.read(min(length, MAX_CHUNK_SIZE))
        if not chunk:
            return
        yield chunk
        length -= len(chunk)
        if length <= 0:
            return


async def _read_all(reader: Any) -> AsyncIterator[bytes]:
    """Everything up to EOF from a StreamReader-like `reader`, MAX_CHUNK_SIZE at a time."""
    while chunk := await reader.read(MAX_CHUNK_SIZE):
        yield chunk


async def _next_body_chunk(sp: _FlowState) -> bytes | None:
    fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
    sp.flow.read_body(fut)
    return await fut


class _PieceReader:
    """asyncio.StreamReader's reading methods over a body that arrives in pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False

    async def _next_piece(self) -> bytes | None:
        raise NotImplementedError

    async def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = await self._next_piece()
        if chunk is None:
            self._eof = True
            return False
        self._buf += chunk
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            while await self._fill():
                pass
            return self._take(len(self._buf))
        if n == 0:
            return b""
        if not self._buf:
            await self._fill()
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                partial = self._take(len(self._buf))
                raise asyncio.IncompleteReadError(partial, n)
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        while True:
            i = self._buf.find(separator)
            if i >= 0:
                return self._take(i + len(separator))
            if not await self._fill():
                partial = self._take(len(self._buf))
                raise asyncio.IncompleteReadError(partial, None)

    async def readline(self) -> bytes:
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            return e.partial

    def at_eof(self) -> bool:
        return self._eof and not self._buf

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class ClientReader(_PieceReader):
    """The client's request body with asyncio.StreamReader's reading methods."""

    def __init__(self, sp: _FlowState) -> None:
        super().__init__()
        self._sp = sp

    async def _next_piece(self) -> bytes | None:
        return await _next_body_chunk(self._sp)


class UpstreamReader(_PieceReader):
    """The response body with asyncio.StreamReader's reading methods, in place of
    asyncio-https-proxy's stream from the origin (whose head the engine has read).

    Readable while `on_response_received` runs: reading sends the head on, then each piece
    read goes on to the client (through `on_response_chunk`) when the next one is asked for.
    At EOF once the body is over or the hook has returned. The body comes de-chunked."""

    def __init__(self, body: _ResponseBody) -> None:
        super().__init__()
        self._body = body

    async def _next_piece(self) -> bytes | None:
        return await self._body.next_piece()


class UpstreamWriter:
    """Stands for asyncio-https-proxy's stream to the origin: the engine has sent the request
    and owns that connection, so nothing can be written to it from Python.

    `write()` / `writelines()` raise RuntimeError (change `self.request` before
    `forward_http_request()` instead); `close()`, `drain()` and `wait_closed()` do nothing;
    `is_closing()` is True once the response is over; `get_extra_info()` gives its default
    (the engine does not tell Python which address it connected to)."""

    def __init__(self) -> None:
        self._over = False

    def write(self, data: bytes) -> None:
        raise RuntimeError(
            "upstream_writer: the engine sent the request and owns the connection to the "
            "origin; change self.request before forward_http_request() to change what is sent"
        )

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    async def drain(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self._over

    async def wait_closed(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class ClientWriter:
    """Writes raw bytes to the client with asyncio.StreamWriter's methods."""

    def __init__(self, sp: _FlowState) -> None:
        self._sp = sp
        self._closed = False

    def write(self, data: bytes) -> None:
        self._sp.flow.write(data)

    def writelines(self, data: list[bytes]) -> None:
        self._sp.flow.write(b"".join(data))

    async def drain(self) -> None:
        """Writes are not buffered here; nothing to wait for."""

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self._closed = True

    def is_closing(self) -> bool:
        return self._closed or not self._sp.flow.is_open()

    async def wait_closed(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._sp.client
        return default


# ----------------------------------------------------------------------------------------------
# which hooks a class overrides (decided once, at start)


def _overrides(cls: type, name: str, base: type) -> bool:
    mine = getattr(cls, name, None)
    return mine is not None and mine is not getattr(base, name, None)


_BODY_NAMES = frozenset({"read_response_body", "upstream_reader"})


def _code_names(code: CodeType) -> set[str]:
    """Attribute and global names a function's code uses, nested functions included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _code_names(const)
    return names


def _functions(value: Any) -> Iterator[Any]:
    """The functions behind a class attribute: a method, a static or class method, a
    property's accessors, and what decorators wrapped (`__wrapped__`, a few levels)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        yield from (f for f in (value.fget, value.fset, value.fdel) if f is not None)
        return
    for _ in range(8):
        if not callable(value):
            return
        yield value
        value = getattr(value, "__wrapped__", None)


def reads_response_body(cls: type) -> bool:
    """Whether the engine must hand response bodies of `cls` to Python: its
    `reads_response_body` if set, else whether a method the class defines (not segproxy's
    base classes) names `read_response_body` or `upstream_reader`."""
    flag = getattr(cls, "reads_response_body", None)
    if flag is not None:
        return bool(flag)
    for klass in cls.__mro__:
        if klass.__module__ == __name__ or klass is object:
            continue
        for value in vars(klass).values():
            for fn in _functions(value):
                code = getattr(fn, "__code__", None)
                if isinstance(code, CodeType) and not _BODY_NAMES.isdisjoint(_code_names(code)):
                    return True
    return False


def overridden_hooks(cls: type) -> list[str]:
    """The engine hook names `cls` needs. Anything not listed never crosses into Python."""
    forward = issubclass(cls, HTTPSForwardProxyHandler)
    hooks: list[str] = []
    connected = _overrides(cls, "on_client_connected", HTTPSProxyHandler)
    if connected:
        hooks.append("client_connected")
    # on_response_complete also runs when forwarding fails (see _Connection._error), which
    # Python sees only for requests it forwarded itself. The inherited on_request_received
    # calls forward_http_request, so overriding that one alone needs the request hook too.
    if (
        not forward
        or connected
        or _overrides(cls, "on_request_received", HTTPSForwardProxyHandler)
        or _overrides(cls, "forward_http_request", HTTPSForwardProxyHandler)
        or _overrides(cls, "on_response_complete", HTTPSForwardProxyHandler)
    ):
        hooks.append("request")
    if forward:
        # Reading the body in on_response_received takes the pieces the chunk hook brings.
        chunk = _overrides(cls, "on_response_chunk", HTTPSForwardProxyHandler) or (
            reads_response_body(cls)
        )
        any_response = (
            chunk
            or _overrides(cls, "on_response_received", HTTPSForwardProxyHandler)
            or _overrides(cls, "on_response_complete", HTTPSForwardProxyHandler)
        )
        if any_response:
            # The head is always given (so `self.response` is set in every response hook), and
            # completion and errors are always reported (so `forward_http_request` can wait).
            hooks += ["response", "response_complete", "error"]
            if chunk:
                hooks.append("response_chunk")
    if "error" not in hooks and _overrides(cls, "on_error", HTTPSProxyHandler):
        hooks.append("error")
    if _overrides(cls, "on_connect", HTTPSProxyHandler):
        hooks.append("connect")
    if _overrides(cls, "on_tunnel_open", HTTPSProxyHandler) or _overrides(
        cls, "on_tunnel_close", HTTPSProxyHandler
    ):
        hooks.append("tunnel")
    if _overrides(cls, "on_authenticate", HTTPSProxyHandler):
        hooks.append("authenticate")
    if _overrides(cls, "on_websocket_message", HTTPSProxyHandler):
        hooks.append("websocket_message")
    return hooks


# ----------------------------------------------------------------------------------------------
# the per-connection driver the Rust bridge calls (on the loop thread)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Connection:
    """Runs one client connection's hooks; the bridge calls its methods on the loop thread.
    Every method returns at once, starting the hook as a task in the connection's context."""

    __slots__ = (
        "body",
        "client",
        "connected",
        "ctx",
        "handler",
        "in_head_hook",
        "loop",
        "reads_body",
        "response_done",
        "tasks",
        "waits_response",
        "websocket",
    )

    def __init__(
        self,
        handler: Any,
        loop: asyncio.AbstractEventLoop,
        ctx: contextvars.Context,
        client: tuple[str, int],
        waits_response: bool,
        reads_body: bool = False,
    ) -> None:
        self.handler = handler
        self.loop = loop
        self.ctx = ctx
        self.client = client
        self.waits_response = waits_response
        self.reads_body = reads_body
        self.connected = False
        # The body of the response in hand, for classes that read it in on_response_received.
        self.body: _ResponseBody | None = None
        self.in_head_hook = False
        # Hooks in progress (strong references), each with whether the engine waits for it:
        # those are cancelled when the engine stops waiting (connection gone, timeout).
        self.tasks: dict[asyncio.Task[None], bool] = {}
        self.response_done: asyncio.Future[None] | None = None
        # The open WebSocket's injector (from its 101 until it closes).
        self.websocket: _engine.WebSocketInjector | None = None
        handler._conn = self

    def _spawn(self, coro: Coroutine[Any, Any, object], flow: bool = True) -> None:
        own: list[asyncio.Task[None]] = []
        task = self.loop.create_task(self._tracked(coro, own), context=self.ctx)
        if not task.done():  # an eager task factory may have run it to its end already
            own.append(task)
            self.tasks[task] = flow

    async def _tracked(
        self, coro: Coroutine[Any, Any, object], own: list[asyncio.Task[None]]
    ) -> None:
        # Forgets its own task when done: cheaper than a done callback, which costs the loop
        # one more scheduled call per hook. `own` holds the task rather than
        # asyncio.current_task() asking for it: on Python 3.11 that makes a getpid() system
        # call every time (py-spy: a fifth of the loop thread under the handler load).
        try:
            await coro
        finally:
            if own:
                self.tasks.pop(own[0], None)

    async def _report(self, exc: BaseException) -> None:
        try:
            await self.handler.on_error(exc)
        except Exception:
            log.exception("on_error raised while handling %s", _describe(exc))

    def expect_response(self) -> asyncio.Future[None]:
        self._settle_response()
        self.response_done = self.loop.create_future()
        return self.response_done

    def _settle_response(self) -> None:
        done, self.response_done = self.response_done, None
        if done is not None and not done.done():
            done.set_result(None)

    # --- called by the bridge ------------------------------------------------------------
    def request(self, flow: _engine.FlowHandle, parts: tuple[Any, ...]) -> None:
        self._spawn(self._request(flow, parts))

    async def _request(self, flow: _engine.FlowHandle, parts: tuple[Any, ...]) -> None:
        h = self.handler
        method, scheme, host, port, path, version, headers = parts
        h.request = HTTPRequest(
            method, scheme, host, port, path, version, HTTPHeader._wrap(headers)
        )
        h._sp = _FlowState(flow, self.client)
        if isinstance(h, HTTPSForwardProxyHandler):
            # The previous request's response must not leak into this one.
            for name in ("response", "upstream_reader", "upstream_writer"):
                if name in h.__dict__:
                    delattr(h, name)
        try:
            if not self.connected:
                self.connected = True
                await h.on_client_connected()
            await h.on_request_received()
        except Exception as exc:
            await self._report(exc)
            flow.fail(_describe(exc))
        else:
            flow.finish()

    def response(self, completer: _engine.Completer, parts: tuple[Any, ...]) -> None:
        self._spawn(self._response(completer, parts))

    async def _response(self, completer: _engine.Completer, parts: tuple[Any, ...]) -> None:
        h = self.handler
        version, status, reason, headers = parts
        h.response = HTTPResponse(version, status, reason, HTTPHeader._wrap(headers))
        h.upstream_writer = UpstreamWriter()
        body = self.body = _ResponseBody(self, completer) if self.reads_body else None
        if body is not None:
            h.upstream_reader = UpstreamReader(body)
        failure: str | None = "the hook was cancelled"
        self.in_head_hook = True
        try:
            await h.on_response_received()
            if body is None or body.take_head() is not None:  # not sent by a read
                completer.resolve(_head_parts(h.response))
            failure = None
        except Exception as exc:
            failure = _describe(exc)
            await self._report(exc)
            completer.fail(failure)
            if body is None or body.head is not None:
                self._settle_response()
            # else a read sent the head on: the engine reports how the response ends.
        finally:
            self.in_head_hook = False
            if body is not None:
                await body.detach(failure)

    def response_chunk(self, completer: _engine.Completer, chunk: bytes) -> None:
        body = self.body
        if body is not None and body.takes_pieces():
            body.deliver(completer, chunk)
        else:
            self._spawn(self._pass_piece(completer, chunk))

    async def _pass_piece(self, completer: _engine.Completer, chunk: bytes) -> bool:
        """Sends a piece of the response body on, through `on_response_chunk`."""
        try:
            completer.resolve(await self.handler.on_response_chunk(chunk))
            return True
        except Exception as exc:
            await self._report(exc)
            completer.fail(_describe(exc))
            self._settle_response()
            return False

    def response_complete(self, completer: _engine.Completer) -> None:
        self._spawn(self._response_complete(completer))

    async def _response_complete(self, completer: _engine.Completer) -> None:
        try:
            body, self.body = self.body, None
            if body is not None:  # on_response_received finishes reading the body first
                body.end()
                await body.hook_done
            await self.handler.on_response_complete()
            completer.resolve(None)
        except Exception as exc:
            await self._report(exc)
            completer.fail(_describe(exc))
        finally:
            self._response_over()
            self._settle_response()

    def _response_over(self) -> None:
        writer = getattr(self.handler, "upstream_writer", None)
        if isinstance(writer, UpstreamWriter):
            writer._over = True

    def error(self, message: str) -> None:
        self._spawn(self._error(message), flow=False)

    async def _error(self, message: str) -> None:
        if self.body is not None:
            self.body.end()
        self._response_over()
        try:
            # A forwarded request that failed before its response completed still gets
            # on_response_complete, then on_error, as in asyncio-https-proxy.
            pending = self.response_done is not None and not self.response_done.done()
            if pending and isinstance(self.handler, HTTPSForwardProxyHandler):
                try:
                    await self.handler.on_response_complete()
                except Exception as exc:
                    await self._report(exc)
            await self._report(ProxyError(message))
        finally:
            self._settle_response()

    def connect(self, completer: _engine.Completer, host: str, port: int) -> None:
        self._spawn(self._connect(completer, host, port))

    async def _connect(self, completer: _engine.Completer, host: str, port: int) -> None:
        try:
            completer.resolve(await self.handler.on_connect(host, port))
        except Exception as exc:
            await self._report(exc)
            completer.fail(_describe(exc))

    def authenticate(self, completer: _engine.Completer, scheme: str, credentials: str) -> None:
        self._spawn(self._authenticate(completer, scheme, credentials))

    async def _authenticate(
        self, completer: _engine.Completer, scheme: str, credentials: str
    ) -> None:
        try:
            completer.resolve(await self.handler.on_authenticate(scheme, credentials))
        except Exception as exc:
            await self._report(exc)
            completer.fail(_describe(exc))

    def tunnel_opened(self, host: str, port: int) -> None:
        self._spawn(self._observe(self.handler.on_tunnel_open(host, port)), flow=False)

    def tunnel_closed(self, host: str, port: int, bytes_up: int, bytes_down: int) -> None:
        self._spawn(
            self._observe(self.handler.on_tunnel_close(host, port, bytes_up, bytes_down)),
            flow=False,
        )

    async def _observe(self, hook: Coroutine[Any, Any, None]) -> None:
        try:
            await hook
        except Exception as exc:
            await self._report(exc)

    def websocket_opened(self, injector: _engine.WebSocketInjector) -> None:
        self.websocket = injector

    def websocket_closed(self) -> None:
        self.websocket = None

    def websocket_message(
        self, completer: _engine.Completer, from_client: bool, is_text: bool, content: bytes
    ) -> None:
        message = WebSocketMessage(from_client, is_text, content)
        self._spawn(self._websocket_message(completer, message))

    async def _websocket_message(
        self, completer: _engine.Completer, message: WebSocketMessage
    ) -> None:
        try:
            await self.handler.on_websocket_message(message)
            completer.resolve(message._verdict())
        except Exception as exc:
            await self._report(exc)
            completer.fail(_describe(exc))

    def closed(self) -> None:
        """The client connection ended (or the engine gave up on a hook after its timeout): a
        request waiting for its response stops waiting, and hooks still running are cancelled.
        The cancellation is scheduled after the wake-ups the settled futures caused, so a
        request hook that was only waiting for its response returns normally."""
        if self.body is not None:
            self.body.end()
        self._settle_response()
        if any(self.tasks.values()):
            self.loop.call_soon(self._cancel_flow_hooks)

    def _cancel_flow_hooks(self) -> None:
        for task, flow in list(self.tasks.items()):
            if flow:
                task.cancel()


def _head_parts(r: HTTPResponse) -> tuple[str, int, str, list[tuple[str, str]]]:
    return (r.version, r.status_code, r.reason_phrase, r.headers._fields)


class _ResponseBody:
    """The body of the response in hand while `on_response_received` may read it.

    The engine passes each piece (the chunk hook) and waits for its answer before reading the
    next. A piece given to a reader is held until the reader asks for the next one (or the hook
    returns), then sent on through `on_response_chunk`; pieces no reader took are sent on when
    the hook returns, and later ones go the usual way."""

    __slots__ = (
        "attached",
        "conn",
        "ended",
        "failed",
        "head",
        "held",
        "hook_done",
        "queue",
        "sending",
        "waiting",
    )

    def __init__(self, conn: _Connection, head: _engine.Completer) -> None:
        self.conn = conn
        self.head: _engine.Completer | None = head  # until the head is sent
        self.attached = True  # on_response_received is running
        self.ended = False  # no more pieces: the body is over, or the exchange ended
        self.failed: str | None = None  # the head went out, then the hook failed
        self.held: tuple[_engine.Completer, bytes] | None = None
        self.queue: list[tuple[_engine.Completer, bytes]] = []
        self.waiting: asyncio.Future[None] | None = None
        self.sending = False
        self.hook_done: asyncio.Future[None] = conn.loop.create_future()

    def take_head(self) -> _engine.Completer | None:
        head, self.head = self.head, None
        return head

    # --- the engine's side (the bridge, on the loop thread) -----------------------------------
    def takes_pieces(self) -> bool:
        return self.attached or self.failed is not None

    def deliver(self, completer: _engine.Completer, piece: bytes) -> None:
        if self.failed is not None:
            completer.fail(self.failed)
            return
        self.queue.append((completer, piece))
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(None)

    # --- the reader's side ---------------------------------------------------------------------
    async def next_piece(self) -> bytes | None:
        if self.sending:
            raise RuntimeError(_BODY_GONE)  # from on_response_chunk, while a piece goes on
        if self.waiting is not None:
            raise RuntimeError("another task is already reading the response body")
        if not self.attached:
            return None
        if not await self._send_held():
            return None
        head = self.take_head()
        if head is not None:
            head.resolve(_head_parts(self.conn.handler.response))
        while not self.queue:
            if self.ended or not self.attached:
                return None
            self.waiting = self.conn.loop.create_future()
            try:
                await self.waiting
            finally:
                self.waiting = None
        self.held = self.queue.pop(0)
        return self.held[1]

    async def _send_held(self) -> bool:
        held, self.held = self.held, None
        if held is None:
            return True
        self.sending = True
        try:
            sent = await self.conn._pass_piece(*held)
        finally:
            self.sending = False
        if not sent:  # on_response_chunk raised: the engine cuts the response
            self.failed = "on_response_chunk failed"
            self.ended = True
        return sent

    async def detach(self, failure: str | None) -> None:
        """on_response_received returned (`failure` None) or failed: what it held or left
        goes on, or fails if the head went out and the hook failed."""
        self.attached = False
        self._wake()
        try:
            if failure is not None and self.head is None:
                self.failed = failure
            pending = ([self.held] if self.held else []) + self.queue
            self.held, self.queue = None, []
            for completer, piece in pending:
                if self.failed is not None:
                    completer.fail(self.failed)
                elif not await self.conn._pass_piece(completer, piece):
                    self.failed = "on_response_chunk failed"
        finally:
            if not self.hook_done.done():
                self.hook_done.set_result(None)


# ----------------------------------------------------------------------------------------------
# building the bridge (called by start_proxy_server on the running loop)


def _checked(handler: Any, builder: Callable[[], Any]) -> Any:
    """`handler` if it is a handler; a TypeError naming what the builder returned otherwise
    (raised by `start_proxy_server`, which calls the builder once before it listens)."""
    if not isinstance(handler, HTTPSProxyHandler):
        raise TypeError(
            f"handler_builder returned {type(handler).__name__}, not an HTTPSProxyHandler "
            f"(pass the handler class, or a function returning an instance): {builder!r}"
        )
    return handler


class HookRunner:
    """The bridge between the engine and a handler class on one asyncio loop."""

    def __init__(self, handler_builder: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        first = _checked(handler_builder(), handler_builder)
        cls = type(first)
        self.handler_class = cls
        self.hooks = overridden_hooks(cls)
        waits_response = "response_complete" in self.hooks and "request" in self.hooks
        reads_body = "response_chunk" in self.hooks and reads_response_body(cls)
        base_ctx = contextvars.copy_context()
        spare: list[Any] = [first]

        def open_connection(conn_id: int, client_host: str, client_port: int) -> _Connection:
            handler = spare.pop() if spare else _checked(handler_builder(), handler_builder)
            return _Connection(
                handler,
                loop,
                base_ctx.copy(),
                (client_host, client_port),
                waits_response,
                reads_body,
            )

        self.bridge = _engine.HookBridge(open_connection, self.hooks)
        self.loop = loop
        self._fd: int | None = None
        try:
            fd = self.bridge.fileno()
            loop.add_reader(fd, self.bridge.drain)
            self._fd = fd
        except NotImplementedError:
            self.bridge.start_ringer(loop)

    def close(self) -> None:
        """Unregisters from the loop and stops the bridge (after the server stopped)."""
        if self._fd is not None:
            try:
                self.loop.remove_reader(self._fd)
            except Exception:  # the loop may already be closed
                pass
            self._fd = None
        self.bridge.close()
