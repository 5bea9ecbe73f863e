"""WebSocket messages through `on_websocket_message`: real `websockets` clients and servers on
loopback, plain (an absolute-form upgrade to the proxy) and intercepted (wss through CONNECT),
with permessage-deflate negotiated as the package does by default."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import segproxy
from segproxy import FlowRecord, HTTPSForwardProxyHandler, WebSocketMessage
from support import make_origin_certs
from support.origins import WebSocketOrigin

websockets = pytest.importorskip("websockets")
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

Seen = list[tuple[bool, bool, bytes]]


def watching(
    seen: Seen, change: Callable[[Any, WebSocketMessage], Any] | None = None
) -> type[HTTPSForwardProxyHandler]:
    """A forwarding handler that records every message its hook sees, then lets `change`
    act on it."""

    class Watching(HTTPSForwardProxyHandler):
        async def on_websocket_message(self, message: WebSocketMessage) -> None:
            seen.append((message.from_client, message.is_text, message.content))
            if change is not None:
                change(self, message)

        async def on_connect(self, host: str, port: int) -> str:
            return "intercept"

    return Watching


def absolute_form(url: str) -> type[ClientConnection]:
    """A websockets client connection whose upgrade request names `url` in absolute form, as
    a client of a plain HTTP proxy sends it."""

    class AbsoluteForm(ClientConnection):
        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            make = self.protocol.connect

            def absolute() -> Any:
                request = make()
                request.path = url
                return request

            self.protocol.connect = absolute  # type: ignore[method-assign]
            await super().handshake(*args, **kwargs)

    return AbsoluteForm


def through_proxy(proxy: Any, origin: WebSocketOrigin, path: str = "/chat", **kw: Any) -> Any:
    """A websockets client to `origin` through the plain proxy (absolute-form GET + Upgrade)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    return connect(
        f"ws://{origin.authority}{path}",
        sock=sock,
        proxy=None,
        create_connection=absolute_form(f"http://{origin.authority}{path}"),
        open_timeout=10,
        **kw,
    )


async def recv(ws: Any) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), 10)


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Polls `predicate` without blocking the loop (the proxy's hooks run on it), at most
    `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def flow_of(proxy: Any) -> dict[str, Any]:
    """The upgrade's flow record, once the proxy has committed it."""
    assert await eventually(lambda: any(f["kind"] == "upgrade" for f in proxy.flows()))
    [flow] = [f for f in proxy.flows() if f["kind"] == "upgrade"]
    return flow


@pytest.fixture
def ws_origin():
    with WebSocketOrigin() as o:
        yield o


# --- plain: a text and a binary message seen both ways, and the flow record ---------------


async def test_hook_sees_text_and_binary_both_ways_and_the_record_counts_them(
    make_proxy, ws_origin
):
    seen: Seen = []
    proxy = await make_proxy(handler_builder=watching(seen), record_flows=True)
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send("hello")
        assert await recv(ws) == "hello"
        await ws.send(b"\x00\x01binary\xff")
        assert await recv(ws) == b"\x00\x01binary\xff"
    assert ws_origin.received == ["hello", b"\x00\x01binary\xff"]
    assert "permessage-deflate" in (ws_origin.extensions[0] or "")
    assert seen == [
        (True, True, b"hello"),
        (False, True, b"hello"),
        (True, False, b"\x00\x01binary\xff"),
        (False, False, b"\x00\x01binary\xff"),
    ]
    flow = await flow_of(proxy)
    assert set(flow) == set(FlowRecord.__annotations__)
    assert (flow["websocket_up"], flow["websocket_down"]) == (2, 2)
    got = [(d, n, text) for d, n, _t, text in flow["websocket_messages"]]
    assert sorted(got) == sorted(
        [("up", 5, True), ("down", 5, True), ("up", 9, False), ("down", 9, False)]
    )
    times = [t for _d, _n, t, _x in flow["websocket_messages"]]
    assert times == sorted(times) and flow["start"] <= times[0] <= flow["end"]


async def test_replaced_content_reaches_the_server_and_the_client(make_proxy, ws_origin):
    def change(handler: Any, m: WebSocketMessage) -> None:
        if m.from_client and m.content == b"secret":
            m.content = b"public"
        elif not m.from_client and m.is_text:
            m.text = m.text.upper()

    proxy = await make_proxy(handler_builder=watching([], change))
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send("secret")
        assert await recv(ws) == "PUBLIC"
        await ws.send("other")
        assert await recv(ws) == "OTHER"
    assert ws_origin.received == ["public", "other"]


async def test_dropped_messages_never_arrive_and_later_ones_do(make_proxy, ws_origin):
    def change(handler: Any, m: WebSocketMessage) -> None:
        if m.content.startswith(b"drop"):
            m.drop()

    proxy = await make_proxy(handler_builder=watching([], change), record_flows=True)
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send("drop me")
        await ws.send("keep me")
        assert await recv(ws) == "keep me"
    assert ws_origin.received == ["keep me"]
    flow = await flow_of(proxy)
    assert (flow["websocket_up"], flow["websocket_down"]) == (1, 1)


async def test_injected_messages_go_to_the_client_and_to_the_server(make_proxy, ws_origin):
    def change(handler: Any, m: WebSocketMessage) -> None:
        if m.from_client and m.content == b"inject":
            handler.inject_websocket_message("to client")
            handler.inject_websocket_message(b"to server", to_client=False)

    proxy = await make_proxy(handler_builder=watching([], change), record_flows=True)
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send("inject")
        got = [await recv(ws) for _ in range(3)]
    # To the client: the injected text, and the echoes of both messages the server got.
    assert sorted(got, key=repr) == sorted(["to client", "inject", b"to server"], key=repr)
    assert ws_origin.received == ["inject", b"to server"]
    flow = await flow_of(proxy)
    assert (flow["websocket_up"], flow["websocket_down"]) == (2, 3)


async def test_fragmented_messages_reach_the_hook_whole(make_proxy, ws_origin):
    seen: Seen = []
    proxy = await make_proxy(handler_builder=watching(seen))
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send(["frag", "mented ", "message"])
        assert await recv(ws) == "fragmented message"
        await ws.send([b"\x01", b"\x02\x03"])
        assert await recv(ws) == b"\x01\x02\x03"
        await ws.send("fragments:a,bc,def")  # the server answers in three fragments
        assert await recv(ws) == "abcdef"
    assert (True, True, b"fragmented message") in seen
    assert (True, False, b"\x01\x02\x03") in seen
    assert (False, True, b"abcdef") in seen
    assert ws_origin.received[:2] == ["fragmented message", b"\x01\x02\x03"]


async def test_pings_and_pongs_pass_through(make_proxy, ws_origin):
    seen: Seen = []
    proxy = await make_proxy(handler_builder=watching(seen))
    async with through_proxy(proxy, ws_origin) as ws:
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 10)
        await ws.send("after the ping")
        assert await recv(ws) == "after the ping"
    # Control frames are not messages: the hook saw only the data.
    assert [c for _f, _t, c in seen] == [b"after the ping", b"after the ping"]


async def test_a_ping_inside_a_fragmented_message_goes_on_at_once(make_proxy, ws_origin):
    seen: Seen = []
    proxy = await make_proxy(handler_builder=watching(seen))
    async with through_proxy(proxy, ws_origin) as ws:

        async def pieces():
            yield "first half, "
            # The message is incomplete: its frames wait in the proxy, the ping does not.
            pong = await ws.ping(b"mid-message")
            await asyncio.wait_for(pong, 10)
            yield "second half"

        await ws.send(pieces())
        assert await recv(ws) == "first half, second half"
    assert seen[0] == (True, True, b"first half, second half")


async def test_a_hook_that_does_not_return_ends_the_websocket(make_proxy, ws_origin):
    class Stuck(HTTPSForwardProxyHandler):
        async def on_websocket_message(self, message: WebSocketMessage) -> None:
            await asyncio.Event().wait()

    proxy = await make_proxy(handler_builder=Stuck, hook_timeout=0.5, record_flows=True)
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send("anything")
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
    assert ws_origin.received == []
    flow = await flow_of(proxy)
    assert "on_websocket_message did not return" in (flow["error"] or ""), flow


# --- permessage-deflate ---------------------------------------------------------------------


async def test_compressed_messages_pass_compressed_and_survive_changes(make_proxy, ws_origin):
    """Unchanged compressed messages go on in their frames (the wire carries far fewer bytes
    than the content); a changed one goes on uncompressed, and later messages, whose
    compression refers to the changed one's bytes, still arrive intact."""
    big = "a" * 200_000
    phrase = "the same words again and again " * 20

    def change(handler: Any, m: WebSocketMessage) -> None:
        if m.from_client and m.content == b"change " + phrase.encode():
            m.content = b"changed"
        if not m.from_client and m.content == b"drop " + phrase.encode():
            m.drop()

    seen: Seen = []
    proxy = await make_proxy(handler_builder=watching(seen, change), record_flows=True)
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send(big)
        assert await recv(ws) == big
        await ws.send(phrase)
        assert await recv(ws) == phrase
        await ws.send("change " + phrase)
        assert await recv(ws) == "changed"
        await ws.send("drop " + phrase)  # the server's echo is dropped
        for _ in range(3):  # each refers back to what the receiver never got
            await ws.send(phrase)
            assert await recv(ws) == phrase
    assert ws_origin.received == [big, phrase, "changed", "drop " + phrase] + [phrase] * 3
    assert "permessage-deflate" in (ws_origin.extensions[0] or "")
    assert (True, True, big.encode()) in seen  # the hook got the content inflated
    flow = await flow_of(proxy)
    # 200 kB each way went compressed: the wire carried a small part of it.
    assert flow["bytes_up"] < 100_000 and flow["bytes_down"] < 100_000, flow


async def test_uncompressed_peers_work_too(make_proxy):
    with WebSocketOrigin(compression=None) as origin:
        proxy = await make_proxy(handler_builder=watching([]))
        async with through_proxy(proxy, origin, compression=None) as ws:
            await ws.send("x" * 70_000)
            assert await recv(ws) == "x" * 70_000
        assert origin.extensions == [None]


# --- intercepted: wss through CONNECT -----------------------------------------------------


async def test_intercepted_wss_messages_are_seen_and_changed(make_proxy, tmp_path):
    origin_ca, cert, key = make_origin_certs(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    store = segproxy.TLSStore()
    client_ctx = ssl.create_default_context(cadata=store.get_ca_pem().decode())

    def change(handler: Any, m: WebSocketMessage) -> None:
        if m.from_client and m.content == b"over tls":
            m.content = b"over tls, changed"

    seen: Seen = []
    with WebSocketOrigin(ssl_context=server_ctx) as origin:
        proxy = await make_proxy(
            handler_builder=watching(seen, change),
            tls_store=store,
            upstream_ca=[str(origin_ca)],
            record_flows=True,
        )
        async with connect(
            f"wss://localhost:{origin.port}/secure",
            proxy=proxy.url,
            ssl=client_ctx,
            open_timeout=10,
        ) as ws:
            await ws.send("over tls")
            assert await recv(ws) == "over tls, changed"
            await ws.send(["in ", "pieces"])
            assert await recv(ws) == "in pieces"
        assert origin.received == ["over tls, changed", "in pieces"]
    assert (True, True, b"over tls") in seen and (False, True, b"in pieces") in seen
    flow = await flow_of(proxy)
    assert flow["target"].startswith("https://localhost:")
    assert (flow["websocket_up"], flow["websocket_down"]) == (2, 2)


# --- without the hook: the byte relay -------------------------------------------------------


async def test_a_handler_without_the_hook_keeps_the_byte_relay(make_proxy, ws_origin):
    class Plain(HTTPSForwardProxyHandler):
        pass

    proxy = await make_proxy(handler_builder=Plain, record_flows=True)
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send("bytes only")
        assert await recv(ws) == "bytes only"
    flow = await flow_of(proxy)
    assert flow["websocket_messages"] == [] and flow["websocket_up"] == 0
    assert flow["bytes_up"] > 0 and flow["bytes_down"] > 0


async def test_a_failing_hook_cuts_the_websocket_and_reaches_on_error(make_proxy, ws_origin):
    errors: list[Exception] = []

    class Failing(HTTPSForwardProxyHandler):
        async def on_websocket_message(self, message: WebSocketMessage) -> None:
            raise ValueError("no messages today")

        async def on_error(self, error: Exception) -> None:
            errors.append(error)

    proxy = await make_proxy(handler_builder=Failing, record_flows=True)
    async with through_proxy(proxy, ws_origin) as ws:
        await ws.send("anything")
        with pytest.raises(websockets.ConnectionClosed):
            await recv(ws)
    assert ws_origin.received == []
    flow = await flow_of(proxy)
    assert "no messages today" in (flow["error"] or ""), flow
    assert await eventually(lambda: errors) and isinstance(errors[0], ValueError)


async def test_injecting_without_a_websocket_says_why():
    handler = HTTPSForwardProxyHandler()
    with pytest.raises(RuntimeError, match="no WebSocket is open"):
        handler.inject_websocket_message("hello")


def test_message_content_rules():
    m = WebSocketMessage(True, True, b"abc")
    assert m._verdict() is None
    m.content = b"abc"  # the same content is no change
    assert m._verdict() is None
    m.text = "d\u00e9f"
    assert m.content == "d\u00e9f".encode() and m._verdict() == "d\u00e9f".encode()
    with pytest.raises(ValueError, match="UTF-8"):
        m.content = b"\xff"
    m.drop()
    assert m.dropped and m._verdict() == "drop"
    binary = WebSocketMessage(False, False, b"\xff")
    binary.content = b"\xfe"
    assert binary._verdict() == b"\xfe"


def test_only_classes_with_the_hook_ask_for_messages():
    from segproxy.handlers import HTTPSProxyHandler, overridden_hooks

    assert "websocket_message" in overridden_hooks(watching([]))
    assert "websocket_message" not in overridden_hooks(HTTPSForwardProxyHandler)
    assert "websocket_message" not in overridden_hooks(HTTPSProxyHandler)
