"""Python handlers through the real engine: an asyncio origin on loopback, httpx and raw
sockets as clients, segproxy in between with handler classes overriding hooks."""

from __future__ import annotations

import asyncio
import contextvars
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from segproxy import (
    HTTPHeader,
    HTTPSForwardProxyHandler,
    HTTPSProxyHandler,
    ProxyServer,
    TLSStore,
    start_proxy_server,
)

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------
# an origin server we control: HTTP/1.1 keep-alive, records what it receives


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Origin:
    port: int = 0
    seen: list[Received] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readline()).split(b";")[0], 16)
                        if size == 0:
                            await reader.readline()
                            break
                        body += await reader.readexactly(size)
                        await reader.readline()
                self.seen.append(Received(method, path, headers, body))
                writer.write(self.respond(method, path, body))
                await writer.drain()
        finally:
            writer.close()

    def respond(self, method: str, path: str, body: bytes) -> bytes:
        if path.startswith("/chunked"):
            parts = [b"alpha-", b"beta-", b"gamma"]
            out = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for p in parts:
                out += b"%x\r\n%s\r\n" % (len(p), p)
            return out + b"0\r\n\r\n"
        if path.startswith("/big"):
            data = b"x" * (256 * 1024)
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
        payload = body if path.startswith("/echo") else f"{method} {path}".encode()
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Origin: yes\r\nContent-Length: %d\r\n\r\n%s"
            % (len(payload), payload)
        )


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    o = Origin()
    o.server = await asyncio.start_server(o.handle, "127.0.0.1", 0)
    o.port = o.server.sockets[0].getsockname()[1]
    yield o
    o.server.close()


async def eventually(check: object, timeout: float = 5.0) -> None:
    """Waits until `check()` is true: hooks that run after the client got its answer."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


async def proxy(builder: object, **options: object) -> ProxyServer:
    return await start_proxy_server(builder, "127.0.0.1", 0, **options)  # type: ignore[arg-type]


def client(server: ProxyServer, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(proxy=server.url, timeout=20, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# hooks, in order, over keep-alive


class Recorder(HTTPSForwardProxyHandler):
    built: list[Recorder] = []

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []
        Recorder.built.append(self)

    async def on_client_connected(self) -> None:
        self.events.append(("connected",))

    async def on_request_received(self) -> None:
        self.events.append(
            ("request", self.request.method, self.request.url(), self.request.headers.first("x-n"))
        )
        await self.forward_http_request()
        self.events.append(("forwarded", self.response.status_code if self.response else None))

    async def on_response_received(self) -> None:
        assert self.response is not None
        self.events.append(
            ("response", self.response.status_code, self.response.headers.first("x-origin"))
        )

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        self.events.append(("chunk", chunk))
        return chunk

    async def on_response_complete(self) -> None:
        self.events.append(("complete",))


async def test_hooks_in_order_over_keep_alive(origin: Origin) -> None:
    Recorder.built.clear()
    server = await proxy(Recorder)
    async with server, client(server, limits=httpx.Limits(max_connections=1)) as c:
        for n in range(3):
            r = await c.get(f"{origin.base}/item/{n}?q={n}", headers={"X-N": str(n)})
            assert r.status_code == 200 and r.text == f"GET /item/{n}?q={n}"
    await eventually(lambda: len(Recorder.built[0].events) == 16)
    # one client connection -> one handler (the probe instance made at start serves it)
    assert len(Recorder.built) == 1
    events = Recorder.built[0].events
    expected: list[tuple] = [("connected",)]
    for n in range(3):
        expected += [
            ("request", "GET", f"{origin.base}/item/{n}?q={n}", str(n)),
            ("response", 200, "yes"),
            ("chunk", f"GET /item/{n}?q={n}".encode()),
            ("complete",),
            ("forwarded", 200),
        ]
    assert events == expected


class CountsHookTasks(HTTPSForwardProxyHandler):
    seen: list[int] = []

    async def on_request_received(self) -> None:
        CountsHookTasks.seen.append(len(self._conn.tasks))  # type: ignore[attr-defined]
        await self.forward_http_request()


async def test_finished_hook_tasks_are_let_go(origin: Origin) -> None:
    # Each hook's task drops itself from its connection when it ends: a kept-alive connection
    # serving many requests holds only the hooks still running.
    CountsHookTasks.seen.clear()
    server = await proxy(CountsHookTasks)
    async with server, client(server, limits=httpx.Limits(max_connections=1)) as c:
        for n in range(8):
            r = await c.get(f"{origin.base}/n/{n}")
            assert r.status_code == 200
    assert len(CountsHookTasks.seen) == 8
    assert max(CountsHookTasks.seen) <= 2, CountsHookTasks.seen


class Modifier(HTTPSForwardProxyHandler):
    async def on_request_received(self) -> None:
        r = self.request
        r.headers.add("X-Added", "yes")
        r.headers.remove("X-Secret")
        if r.path.startswith("/old"):
            r.path = "/new" + r.path[4:]
        if r.path.startswith("/echo-replace"):
            r.method = "PUT"
            r.body = b"replaced body"
        if r.path.startswith("/echo-upper"):
            body = b"".join([chunk async for chunk in self.read_request_body()])
            r.body = body.upper()
        await self.forward_http_request()


async def test_request_modification_reaches_origin(origin: Origin) -> None:
    server = await proxy(Modifier)
    async with server, client(server) as c:
        r = await c.get(f"{origin.base}/old/x?y=1", headers={"X-Secret": "s", "X-Keep": "k"})
        assert r.text == "GET /new/x?y=1"
        r = await c.post(f"{origin.base}/echo-replace", content=b"original")
        assert r.text == "replaced body"
        r = await c.post(f"{origin.base}/echo-upper", content=b"make me loud")
        assert r.text == "MAKE ME LOUD"
    first, second, third = origin.seen
    assert first.path == "/new/x?y=1"
    assert first.headers["x-added"] == "yes" and first.headers["x-keep"] == "k"
    assert "x-secret" not in first.headers
    assert (second.method, second.body, second.headers["content-length"]) == (
        "PUT",
        b"replaced body",
        "13",
    )
    assert third.body == b"MAKE ME LOUD"


class Mock(HTTPSForwardProxyHandler):
    async def on_request_received(self) -> None:
        if "blocked" in self.request.path:
            self.write_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\nBlocked")
            await self.flush_response()
            return
        await self.forward_http_request()


async def test_answer_without_forwarding(origin: Origin) -> None:
    server = await proxy(Mock)
    async with server, client(server) as c:
        r = await c.get(f"{origin.base}/blocked")
        assert (r.status_code, r.text) == (403, "Blocked")
        r = await c.get(f"{origin.base}/fine")
        assert (r.status_code, r.text) == (200, "GET /fine")
    assert [s.path for s in origin.seen] == ["/fine"]


class OwnResponder(HTTPSProxyHandler):
    """An asyncio-https-proxy style handler speaking HTTP itself through client_writer."""

    async def on_request_received(self) -> None:
        body = await self.client_reader.read()
        payload = b"saw %d bytes for %s" % (len(body), self.request.path.encode())
        self.client_writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        self.client_writer.write(payload)
        await self.client_writer.drain()


async def test_proxy_handler_answers_itself(origin: Origin) -> None:
    server = await proxy(OwnResponder)
    async with server, client(server) as c:
        r = await c.post(f"{origin.base}/p", content=b"12345")
        assert r.text == "saw 5 bytes for /p"
    assert origin.seen == []


class Silent(HTTPSProxyHandler):
    async def on_request_received(self) -> None:
        return None


async def test_returning_without_answer_is_502(origin: Origin) -> None:
    server = await proxy(Silent)
    async with server, client(server) as c:
        r = await c.get(f"{origin.base}/x")
        assert r.status_code == 502


class ResponseRewriter(HTTPSForwardProxyHandler):
    async def on_response_received(self) -> None:
        assert self.response is not None
        self.response.status_code = 299
        self.response.reason_phrase = "Rewritten"
        self.response.headers.set("X-Rewritten", "1")
        self.response.headers.remove("X-Origin")

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        if chunk.startswith(b"beta"):
            return None  # drop
        return chunk.replace(b"GET", b"FETCHED").replace(b"alpha", b"ALPHA!!")


async def test_response_rewrite_keeps_framing(origin: Origin) -> None:
    server = await proxy(ResponseRewriter)
    async with server, client(server, limits=httpx.Limits(max_connections=1)) as c:
        for _ in range(2):  # the connection stays usable: framing was right
            r = await c.get(f"{origin.base}/plain")
            assert (r.status_code, r.reason_phrase) == (299, "Rewritten")
            assert r.headers["x-rewritten"] == "1" and "x-origin" not in r.headers
            assert r.text == "FETCHED /plain"  # longer than the origin's Content-Length
            r = await c.get(f"{origin.base}/chunked")
            assert r.text in ("ALPHA!!-gamma", "ALPHA!!-beta-gamma")


class RawClient:
    """A keep-alive HTTP/1.1 client on one socket, to see the exact framing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, server: ProxyServer) -> RawClient:
        return cls(*await asyncio.open_connection(server.host, server.port))

    async def get(self, url: str) -> tuple[int, dict[str, str], bytes]:
        host = url.split("/")[2]
        self.writer.write(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)
        }
        if "content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        assert headers.get("transfer-encoding") == "chunked", headers
        body = b""
        while True:
            size = int(await self.reader.readline(), 16)
            if size == 0:
                await self.reader.readline()
                return status, headers, body
            body += await self.reader.readexactly(size)
            await self.reader.readline()

    def close(self) -> None:
        self.writer.close()


async def test_body_rewrite_reframes_as_chunked(origin: Origin) -> None:
    server = await proxy(ResponseRewriter)
    async with server:
        raw = await RawClient.connect(server)
        status, headers, body = await raw.get(f"{origin.base}/plain")
        assert status == 299 and body == b"FETCHED /plain"
        assert "content-length" not in headers or headers["content-length"] == str(len(body))
        status, headers, body = await raw.get(f"{origin.base}/chunked")
        assert body == b"ALPHA!!-gamma"
        raw.close()


# ------------------------------------------------------------------------------------------
# failures


class Failing(HTTPSForwardProxyHandler):
    errors: list[str] = []
    where = ""

    async def on_error(self, error: Exception) -> None:
        Failing.errors.append(f"{type(error).__name__}: {error}")

    async def on_request_received(self) -> None:
        if Failing.where == "request":
            raise RuntimeError("in request")
        await self.forward_http_request()

    async def on_response_received(self) -> None:
        if Failing.where == "response":
            raise RuntimeError("in response")

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        if Failing.where == "chunk":
            raise RuntimeError("in chunk")
        return chunk

    async def on_response_complete(self) -> None:
        if Failing.where == "complete":
            raise RuntimeError("in complete")


@pytest.mark.parametrize("where", ["request", "response", "chunk", "complete"])
async def test_exception_in_hook(origin: Origin, where: str) -> None:
    Failing.errors.clear()
    Failing.where = where
    server = await proxy(Failing)
    async with server:
        async with client(server) as c:
            try:
                r = await c.get(f"{origin.base}/x")
                status = r.status_code
            except httpx.HTTPError:
                status = None  # the response had started: the connection was cut
        if where in ("request", "response"):
            assert status == 502
        else:
            assert status in (None, 200)  # body already started (complete: all sent)
        # on_response_complete runs after the client has the whole response: wait for it.
        for _ in range(500):
            if f"RuntimeError: in {where}" in Failing.errors:
                break
            await asyncio.sleep(0.01)
        assert f"RuntimeError: in {where}" in Failing.errors
        # the server carries on
        Failing.where = ""
        async with client(server) as c:
            r = await c.get(f"{origin.base}/after")
            assert (r.status_code, r.text) == (200, "GET /after")


class SleepsInRequest(HTTPSForwardProxyHandler):
    async def on_request_received(self) -> None:
        if "slow" in self.request.path:
            await asyncio.sleep(5)
        await self.forward_http_request()


async def test_hook_timeout_is_504(origin: Origin) -> None:
    server = await proxy(SleepsInRequest, hook_timeout=0.5)
    async with server, client(server) as c:
        t = time.monotonic()
        r = await c.get(f"{origin.base}/slow")
        assert r.status_code == 504
        assert time.monotonic() - t < 4
        r = await c.get(f"{origin.base}/fast")
        assert r.status_code == 200


class SleepsInResponse(HTTPSForwardProxyHandler):
    async def on_response_received(self) -> None:
        if self.request.path == "/slow":
            await asyncio.sleep(30)


class SleepsInConnect(HTTPSForwardProxyHandler):
    async def on_connect(self, host: str, port: int) -> str | None:
        await asyncio.sleep(30)
        return None


async def test_response_and_connect_hook_timeouts_are_504(origin: Origin) -> None:
    async with await proxy(SleepsInResponse, hook_timeout=0.5) as server, client(server) as c:
        t = time.monotonic()
        r = await c.get(f"{origin.base}/slow")
        assert r.status_code == 504 and "on_response_received" in r.text
        assert time.monotonic() - t < 4
        assert (await c.get(f"{origin.base}/fast")).status_code == 200
    async with await proxy(SleepsInConnect, hook_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b" 504 " in head and b"on_connect" in await reader.read()
        writer.close()


class SleepsAndNotes(HTTPSForwardProxyHandler):
    outcome: list[str] = []

    async def on_request_received(self) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            SleepsAndNotes.outcome.append("cancelled")
            raise
        SleepsAndNotes.outcome.append("finished")


async def test_abandoned_hook_is_cancelled(origin: Origin) -> None:
    SleepsAndNotes.outcome.clear()
    server = await proxy(SleepsAndNotes, hook_timeout=0.5)
    async with server, client(server) as c:
        r = await c.get(f"{origin.base}/abandoned")
        assert r.status_code == 504
        for _ in range(300):
            if SleepsAndNotes.outcome:
                break
            await asyncio.sleep(0.01)
    assert SleepsAndNotes.outcome == ["cancelled"]
    assert origin.seen == []


class AllHooks(HTTPSForwardProxyHandler):
    async def on_client_connected(self) -> None:
        pass

    async def on_request_received(self) -> None:
        self.request.headers.set("X-Through", "segproxy")
        await self.forward_http_request()

    async def on_response_received(self) -> None:
        pass

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        return chunk

    async def on_response_complete(self) -> None:
        pass


async def test_hundred_concurrent_connections(origin: Origin) -> None:
    server = await proxy(AllHooks, max_connections=512)

    async def one(i: int) -> str:
        async with client(server) as c:
            r1 = await c.get(f"{origin.base}/c/{i}")
            r2 = await c.get(f"{origin.base}/c/{i}/again")
            return r1.text + "|" + r2.text

    async with server:
        results = await asyncio.gather(*(one(i) for i in range(100)))
    assert results == [f"GET /c/{i}|GET /c/{i}/again" for i in range(100)]
    assert all(s.headers["x-through"] == "segproxy" for s in origin.seen)


class SlowOnHttp(HTTPSForwardProxyHandler):
    """Sleeps (asynchronously) in its request hook; has no tunnel hooks."""

    sleeping = asyncio.Event()
    hook_done_at: float | None = None

    async def on_request_received(self) -> None:
        SlowOnHttp.sleeping.set()
        await asyncio.sleep(3)
        SlowOnHttp.hook_done_at = time.monotonic()
        await self.forward_http_request()


async def bulk_server() -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while chunk := await reader.read(1 << 16):
            total += len(chunk)
        writer.write(str(total).encode())
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def test_tunnel_not_slowed_by_sleeping_hook(origin: Origin) -> None:
    SlowOnHttp.sleeping = asyncio.Event()
    SlowOnHttp.hook_done_at = None
    server = await proxy(SlowOnHttp)
    bulk, bulk_port = await bulk_server()
    async with server:
        async with client(server) as c:
            slow = asyncio.create_task(c.get(f"{origin.base}/slow"))
            await SlowOnHttp.sleeping.wait()
            # a tunnel on another connection moves 16 MiB while the hook sleeps
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(
                f"CONNECT 127.0.0.1:{bulk_port} HTTP/1.1\r\nHost: 127.0.0.1:{bulk_port}\r\n\r\n".encode()
            )
            assert b" 200 " in await reader.readuntil(b"\r\n\r\n")
            block = b"y" * (1 << 20)
            for _ in range(16):
                writer.write(block)
                await writer.drain()
            writer.write_eof()
            assert int(await reader.read()) == 16 << 20
            tunnel_done = time.monotonic()
            writer.close()
            assert SlowOnHttp.hook_done_at is None, "the tunnel waited for the hook"
            r = await slow
            assert r.status_code == 200
            assert SlowOnHttp.hook_done_at is not None and tunnel_done < SlowOnHttp.hook_done_at
    bulk.close()


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


class ContextUser(HTTPSForwardProxyHandler):
    seen: list[tuple[str, str]] = []

    async def on_request_received(self) -> None:
        REQUEST_ID.set(self.request.path)
        await self.forward_http_request()

    async def on_response_received(self) -> None:
        ContextUser.seen.append(("response", REQUEST_ID.get()))

    async def on_response_complete(self) -> None:
        ContextUser.seen.append(("complete", REQUEST_ID.get()))


async def test_contextvar_continuity(origin: Origin) -> None:
    ContextUser.seen.clear()
    server = await proxy(ContextUser)
    async with server:
        async with client(server, limits=httpx.Limits(max_connections=1)) as c:
            await c.get(f"{origin.base}/one")
            await c.get(f"{origin.base}/two")
        await eventually(lambda: len(ContextUser.seen) == 4)
        assert ContextUser.seen == [
            ("response", "/one"),
            ("complete", "/one"),
            ("response", "/two"),
            ("complete", "/two"),
        ]
    assert REQUEST_ID.get() == "unset"  # the caller's context is untouched


class Tunnels(HTTPSForwardProxyHandler):
    events: list[tuple] = []

    async def on_connect(self, host: str, port: int) -> str | None:
        Tunnels.events.append(("connect", host, port))
        return "block" if port == 1 else "tunnel"

    async def on_tunnel_open(self, host: str, port: int) -> None:
        Tunnels.events.append(("open", host, port))

    async def on_tunnel_close(self, host: str, port: int, bytes_up: int, bytes_down: int) -> None:
        Tunnels.events.append(("close", host, port, bytes_up, bytes_down))


async def test_connect_and_tunnel_hooks() -> None:
    Tunnels.events.clear()
    server = await proxy(Tunnels)
    bulk, bulk_port = await bulk_server()
    async with server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
        assert b" 403 " in await reader.readuntil(b"\r\n\r\n")
        writer.close()
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f"CONNECT 127.0.0.1:{bulk_port} HTTP/1.1\r\n\r\n".encode())
        assert b" 200 " in await reader.readuntil(b"\r\n\r\n")
        writer.write(b"z" * 1000)
        writer.write_eof()
        assert await reader.read() == b"1000"
        writer.close()
        for _ in range(100):
            if any(e[0] == "close" for e in Tunnels.events):
                break
            await asyncio.sleep(0.05)
    bulk.close()
    assert Tunnels.events == [
        ("connect", "127.0.0.1", 1),
        ("connect", "127.0.0.1", bulk_port),
        ("open", "127.0.0.1", bulk_port),
        ("close", "127.0.0.1", bulk_port, 1000, 4),
    ]


class ConnectRaises(HTTPSForwardProxyHandler):
    errors: list[str] = []

    async def on_connect(self, host: str, port: int) -> str | None:
        raise RuntimeError("no CONNECT today")

    async def on_error(self, error: Exception) -> None:
        ConnectRaises.errors.append(f"{type(error).__name__}: {error}")


async def test_exception_in_on_connect_is_reported_once() -> None:
    ConnectRaises.errors.clear()
    async with await proxy(ConnectRaises) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 502 " in head
        assert b"no CONNECT today" in await reader.read()
        writer.close()
        await asyncio.sleep(0.2)  # a second report would arrive by now
    assert ConnectRaises.errors == ["RuntimeError: no CONNECT today"]


class Segmenting(HTTPSForwardProxyHandler):
    async def on_request_received(self) -> None:
        self.set_segmentation("fixed", chunk=1000)
        await self.forward_http_request()


async def test_set_segmentation(origin: Origin) -> None:
    server = await proxy(Segmenting, record_flows=True)
    async with server, client(server) as c:
        r = await c.get(f"{origin.base}/big")
        assert len(r.content) == 256 * 1024
    records = server.access_records()  # the server has stopped: every record is written
    assert any("fixed chunk=1000" in rec["policy"] for rec in records), records


def test_header_type() -> None:
    h = HTTPHeader(b"Host: a\r\nSet-Cookie: 1\r\nset-cookie: 2\r\n")
    assert list(h) == [("Host", "a"), ("Set-Cookie", "1"), ("set-cookie", "2")]
    assert h.first("SET-COOKIE") == "1" and h.get_all("set-cookie") == ["1", "2"]
    assert "host" in h and "nope" not in h and len(h) == 3
    assert h.to_dict() == {"Host": "a", "Set-Cookie": "1", "set-cookie": "2"}
    h.set("set-cookie", "3")
    assert h.get_all("Set-Cookie") == ["3"] and len(h) == 2
    h.add("X", "1")
    h.remove("host")
    assert list(h) == [("Set-Cookie", "3"), ("X", "1")]


def test_header_type_asyncio_https_proxy_parts() -> None:
    """What asyncio-https-proxy scripts use: the live `headers` list, last-wins `to_dict`,
    `to_raw`."""
    h = HTTPHeader(b"Host: a\r\nAccept: x\r\naccept: y\r\n")
    fields = h.headers
    fields.append(("X-Custom-Header", "Hello"))
    assert h.first("x-custom-header") == "Hello"
    assert h.to_dict() == {"Host": "a", "Accept": "x", "accept": "y", "X-Custom-Header": "Hello"}
    assert HTTPHeader([("A", "1"), ("A", "2")]).to_dict() == {"A": "2"}
    h.remove("accept")
    assert h.headers is fields and fields == [("Host", "a"), ("X-Custom-Header", "Hello")]
    # It ends with the blank line, as there: a head is status line + to_raw().
    assert h.to_raw() == b"Host: a\r\nX-Custom-Header: Hello\r\n\r\n"
    assert (
        HTTPHeader([("X", "caf\u00e9 \u2713")]).to_raw() == "X: caf\u00e9 \u2713\r\n\r\n".encode()
    )
    assert HTTPHeader(b"\r\n").to_raw() == b"\r\n\r\n"


# ------------------------------------------------------------------------------------------
# the same through HTTPS interception


def make_origin_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA for the origin and a 127.0.0.1 leaf it signed: (ca, cert, key) paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "handlers test origin CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "origin-ca.pem", directory / "origin-cert.pem", directory / "origin-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@dataclass
class Intercept:
    origin: Origin
    origin_ca: Path
    store: TLSStore
    proxy_ca: Path

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.origin.port}"

    async def proxy(self, builder: object, **options: object) -> ProxyServer:
        return await start_proxy_server(
            builder,
            "127.0.0.1",
            0,
            self.store,
            upstream_ca=[str(self.origin_ca)],
            **options,  # type: ignore[arg-type]
        )

    def client(self, server: ProxyServer, **kw: object) -> httpx.AsyncClient:
        ctx = ssl.create_default_context(cafile=str(self.proxy_ca))
        return httpx.AsyncClient(proxy=server.url, verify=ctx, timeout=20, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def intercept(tmp_path: Path) -> AsyncIterator[Intercept]:
    ca, cert, key = make_origin_pki(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    o = Origin()
    o.server = await asyncio.start_server(o.handle, "127.0.0.1", 0, ssl=tls)
    o.port = o.server.sockets[0].getsockname()[1]
    store = TLSStore.generate_ca(
        "FR", "Ile-de-France", "Paris", "segproxy tests", "segproxy handlers test CA"
    )
    proxy_ca = tmp_path / "proxy-ca.pem"
    proxy_ca.write_bytes(store.get_ca_pem())
    yield Intercept(o, ca, store, proxy_ca)
    o.server.close()


async def test_intercepted_hooks_in_order_over_keep_alive(intercept: Intercept) -> None:
    Recorder.built.clear()
    server = await intercept.proxy(Recorder)
    base = intercept.base
    async with server, intercept.client(server, limits=httpx.Limits(max_connections=1)) as c:
        for n in range(3):
            r = await c.get(f"{base}/item/{n}", headers={"X-N": str(n)})
            assert r.status_code == 200 and r.text == f"GET /item/{n}"
        await eventually(lambda: len(Recorder.built[0].events) == 16)
    assert len(Recorder.built) == 1
    expected: list[tuple] = [("connected",)]
    for n in range(3):
        expected += [
            ("request", "GET", f"{base}/item/{n}", str(n)),
            ("response", 200, "yes"),
            ("chunk", f"GET /item/{n}".encode()),
            ("complete",),
            ("forwarded", 200),
        ]
    assert Recorder.built[0].events == expected


async def test_intercepted_request_and_response_rewrite(intercept: Intercept) -> None:
    async with await intercept.proxy(Modifier) as server, intercept.client(server) as c:
        r = await c.post(
            f"{intercept.base}/echo-replace", content=b"original", headers={"X-Secret": "1"}
        )
        assert r.text == "replaced body"
    seen = intercept.origin.seen[0]
    assert (seen.method, seen.body, seen.headers["x-added"]) == ("PUT", b"replaced body", "yes")
    assert "x-secret" not in seen.headers
    async with await intercept.proxy(ResponseRewriter) as server, intercept.client(server) as c:
        r = await c.get(f"{intercept.base}/plain")
        assert (r.status_code, r.text, r.headers["x-rewritten"]) == (299, "FETCHED /plain", "1")
        r = await c.get(f"{intercept.base}/chunked")
        assert r.text == "ALPHA!!-gamma"


async def test_intercepted_mock_and_errors(intercept: Intercept) -> None:
    async with await intercept.proxy(Mock) as server, intercept.client(server) as c:
        r = await c.get(f"{intercept.base}/blocked")
        assert (r.status_code, r.text) == (403, "Blocked")
    Failing.errors.clear()
    Failing.where = "request"
    async with await intercept.proxy(Failing) as server:
        async with intercept.client(server) as c:
            assert (await c.get(f"{intercept.base}/x")).status_code == 502
        Failing.where = ""
        async with intercept.client(server) as c:
            assert (await c.get(f"{intercept.base}/y")).status_code == 200
    assert Failing.errors == ["RuntimeError: in request"]
    assert [s.path for s in intercept.origin.seen] == ["/y"]


class TunnelOnly(HTTPSForwardProxyHandler):
    async def on_connect(self, host: str, port: int) -> str | None:
        return "tunnel"

    async def on_request_received(self) -> None:
        raise AssertionError("a tunnelled flow is never decrypted")


class NotesErrors(HTTPSForwardProxyHandler):
    errors: list[str] = []

    async def on_error(self, error: Exception) -> None:
        NotesErrors.errors.append(str(error))


async def test_client_rejecting_our_certificate_reaches_on_error(intercept: Intercept) -> None:
    NotesErrors.errors.clear()
    async with await intercept.proxy(NotesErrors) as server:
        # The client trusts only the origin's CA, not ours: its handshake fails.
        ctx = ssl.create_default_context(cafile=str(intercept.origin_ca))
        async with httpx.AsyncClient(proxy=server.url, verify=ctx, timeout=20) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(f"{intercept.base}/refused")
        await eventually(lambda: bool(NotesErrors.errors))
        # The proxy carries on for a client that trusts it.
        async with intercept.client(server) as c:
            assert (await c.get(f"{intercept.base}/fine")).text == "GET /fine"
    assert any("rejected our certificate" in e for e in NotesErrors.errors), NotesErrors.errors


async def test_on_connect_tunnel_skips_interception(intercept: Intercept) -> None:
    async with await intercept.proxy(TunnelOnly) as server:
        ctx = ssl.create_default_context(cafile=str(intercept.origin_ca))  # the origin's own cert
        async with httpx.AsyncClient(proxy=server.url, verify=ctx, timeout=20) as c:
            r = await c.get(f"{intercept.base}/direct")
            assert r.text == "GET /direct"


# ------------------------------------------------------------------------------------------
# an asyncio-https-proxy script runs with only its import line changed


class CompatLogging(HTTPSForwardProxyHandler):
    """Written against asyncio-https-proxy's documented API (super().__init__, super() hooks,
    request.url(), header iteration, response hooks), nothing segproxy-specific."""

    log: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        self.response_size = 0

    async def on_client_connected(self) -> None:
        CompatLogging.log.append(f"connected {self.request.host}")
        await super().on_client_connected()

    async def on_request_received(self) -> None:
        CompatLogging.log.append(f"request {self.request.method} {self.request.url()}")
        for key, value in self.request.headers:
            assert isinstance(key, str) and isinstance(value, str)
        self.response_size = 0
        await super().on_request_received()

    async def on_response_received(self) -> None:
        if self.response:
            CompatLogging.log.append(
                f"response {self.response.status_code} {self.response.reason_phrase}"
            )
            if self.response.headers:
                dict(self.response.headers.to_dict())

    async def on_response_chunk(self, chunk: bytes) -> bytes:
        self.response_size += len(chunk)
        return chunk

    async def on_response_complete(self) -> None:
        CompatLogging.log.append(f"complete {self.response_size}")


class CompatBlocker(HTTPSProxyHandler):
    """asyncio-https-proxy's low-level style: answer in on_client_connected by hand."""

    async def on_client_connected(self) -> None:
        self.write_response(b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 3\r\n\r\ntea")
        await self.flush_response()


class CompatHeaderAppend(HTTPSForwardProxyHandler):
    """asyncio-https-proxy's header example: append to the raw field list, then forward."""

    async def on_request_received(self) -> None:
        self.request.headers.headers.append(("X-Custom-Header", "Hello from the proxy!"))
        await super().on_request_received()


class CompatCustomClient(HTTPSProxyHandler):
    """asyncio-https-proxy's custom-client example: fetch with httpx, streaming the request
    body in and the response out through write_response."""

    origin_ca: Path | None = None
    seen_response: list[object] = []

    async def on_request_received(self) -> None:
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(self.origin_ca)) if self.origin_ca else True
        )
        async with httpx.AsyncClient(verify=verify) as remote:
            async with remote.stream(
                self.request.method,
                self.request.url(),
                headers=self.request.headers.to_dict(),
                content=self.read_request_body(),
            ) as response:
                self.write_response(
                    f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n".encode()
                )
                for key, value in response.headers.items():
                    self.write_response(f"{key}: {value}\r\n".encode())
                self.write_response(b"\r\n")
                async for chunk in response.aiter_bytes():
                    self.write_response(chunk)


async def test_asyncio_https_proxy_example_patterns(origin: Origin, intercept: Intercept) -> None:
    """The two example styles not covered above: a forward handler appending to
    `headers.headers`, and an `HTTPSProxyHandler` doing its own fetching with httpx."""
    assert HTTPSForwardProxyHandler().response is None  # before any response, as upstream
    async with await proxy(lambda: CompatHeaderAppend()) as server, client(server) as c:
        r = await c.get(f"{origin.base}/appended")
        assert r.text == "GET /appended"
    assert origin.seen[-1].headers["x-custom-header"] == "Hello from the proxy!"

    CompatCustomClient.origin_ca = None
    async with await proxy(lambda: CompatCustomClient()) as server, client(server) as c:
        r = await c.post(f"{origin.base}/echo-plain", content=b"plain body")
        assert (r.status_code, r.text, r.headers["x-origin"]) == (200, "plain body", "yes")
    CompatCustomClient.origin_ca = intercept.origin_ca
    async with await intercept.proxy(lambda: CompatCustomClient()) as server:
        async with intercept.client(server, limits=httpx.Limits(max_connections=1)) as c:
            for n in range(2):  # the second request reuses the intercepted connection
                body = b"secret %d " % n * 1000
                r = await c.post(f"{intercept.base}/echo-tls", content=body)
                assert (r.status_code, r.content) == (200, body)
    # Read once the server has stopped: a record is written just after its response went
    # out, so the client can see the answer before the record exists.
    posts = [rec for rec in server.access_records() if rec["method"] == "POST"]
    assert len(posts) == 2 and len({rec["client"] for rec in posts}) == 1, posts
    assert [s.body for s in intercept.origin.seen] == [b"secret %d " % n * 1000 for n in range(2)]


async def test_asyncio_https_proxy_script_runs(intercept: Intercept) -> None:
    CompatLogging.log.clear()
    tls_store = TLSStore.generate_ca(
        country="FR",
        state="Ile-de-France",
        locality="Paris",
        organization="Compat",
        common_name="Compat CA",
    )
    server = await start_proxy_server(
        handler_builder=lambda: CompatLogging(),
        host="127.0.0.1",
        port=0,
        tls_store=tls_store,
        upstream_ca=[str(intercept.origin_ca)],
    )
    serving = asyncio.create_task(server.serve_forever())
    ctx = ssl.create_default_context(cadata=tls_store.get_ca_pem().decode())
    async with httpx.AsyncClient(proxy=server.url, verify=ctx, timeout=20) as c:
        r = await c.get(f"{intercept.base}/compat")
        assert r.text == "GET /compat"
    await eventually(lambda: len(CompatLogging.log) == 4)
    assert CompatLogging.log == [
        "connected 127.0.0.1",
        f"request GET {intercept.base}/compat",
        "response 200 OK",
        "complete 11",
    ]
    server.close()
    await server.wait_closed()
    await asyncio.wait_for(serving, 5)

    async with await start_proxy_server(lambda: CompatBlocker(), "127.0.0.1", 0) as server:
        async with client(server) as c:
            r = await c.get("http://127.0.0.1:9/anything")
            assert (r.status_code, r.text) == (418, "tea")
