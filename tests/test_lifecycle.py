"""Starting and stopping the in-process server: asyncio.Server-like surface, graceful
shutdown with a transfer in flight, refusal of new connections."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import segproxy
from support import LOOPBACK, wait_for
from support.clients import Conn, get_via
from support.origins import MIB, pattern_sha256

pytestmark = pytest.mark.timeout(60)


def refuses(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


async def test_server_surface(origin):
    server = await segproxy.start_proxy_server(host="127.0.0.1", port=0)
    try:
        host, port = server.address
        assert host == "127.0.0.1" and port == server.port > 0
        assert server.url == f"http://127.0.0.1:{port}"
        [sock] = server.sockets
        assert sock.getsockname() == (host, port) and sock.family == socket.AF_INET
        assert server.is_serving()
        assert get_via(port, origin.url("/x")).status == 200
        # The record is written once the response's last byte went out: the client may
        # read that byte first.
        assert wait_for(server.access_records, timeout=10)
        [rec] = server.access_records(clear=True)
        assert set(rec) >= {
            "id",
            "client",
            "method",
            "target",
            "status",
            "bytes_up",
            "bytes_down",
            "duration",
            "kind",
            "error",
            "line",
        }
        assert rec["client"].startswith("127.0.0.1:") and rec["duration"] > 0
        assert server.access_records() == []
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
    assert not server.is_serving() and server.sockets == ()
    assert refuses(port)


async def test_async_with_closes_and_port_is_released(origin):
    async with await segproxy.start_proxy_server(port=0) as server:
        port = server.port
        assert get_via(port, origin.url("/")).status == 200
    assert refuses(port)
    # The port can be bound again right away.
    again = await segproxy.start_proxy_server(port=port)
    await again.aclose()


async def test_bad_options_and_busy_port_are_reported():
    with pytest.raises(TypeError, match="unknown option"):
        await segproxy.start_proxy_server(port=0, no_such_option=1)
    with pytest.raises(ValueError):
        await segproxy.start_proxy_server(port=0, idle_timeout=0)
    async with await segproxy.start_proxy_server(port=0) as server:
        with pytest.raises(OSError, match="cannot listen"):
            await segproxy.start_proxy_server(port=server.port)


async def test_serve_forever_cancelled_closes_server(origin):
    server = await segproxy.start_proxy_server(port=0)
    task = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0.1)
    assert get_via(server.port, origin.url("/")).status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert refuses(server.port)


def slow_download(port: int, url: str, expect_len: int, started: asyncio.Event, loop) -> dict:
    """Blocking client (run in a thread): GET url through the proxy, report what arrived."""
    with Conn(port, timeout=30) as c:
        c.send(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = c._read_until(b"\r\n\r\n")
        loop.call_soon_threadsafe(started.set)
        import hashlib

        h = hashlib.sha256()
        got = len(c.buf)
        h.update(c.buf)
        c.buf = b""
        while got < expect_len:
            try:
                data = c.sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not data:
                break
            got += len(data)
            h.update(data)
        closed_after = c.at_eof(timeout=5)
        return {"head": head, "got": got, "sha": h.hexdigest(), "closed_after": closed_after}


async def test_shutdown_lets_inflight_transfer_finish_and_refuses_new_connections(origin):
    server = await segproxy.start_proxy_server(port=0)
    port = server.port
    n = 4 * MIB  # 64 KiB every 20 ms: about 1.3 s
    started = asyncio.Event()
    idle = Conn(port)  # an idle keep-alive client: closed at once, it holds nothing up
    download = asyncio.ensure_future(
        asyncio.to_thread(
            slow_download,
            port,
            origin.url(f"/gen-slow/{n}?ms=20"),
            n,
            started,
            asyncio.get_running_loop(),
        )
    )
    await asyncio.wait_for(started.wait(), 10)
    t0 = time.monotonic()
    server.close(grace=20)
    assert await asyncio.to_thread(wait_for, lambda: refuses(port), 2.0), (
        "new connections still accepted"
    )
    assert idle.at_eof(timeout=3), "idle connection not closed at shutdown"
    result = await asyncio.wait_for(download, 30)
    await asyncio.wait_for(server.wait_closed(), 30)
    elapsed = time.monotonic() - t0
    assert result["head"].startswith(b"HTTP/1.1 200")
    assert (result["got"], result["sha"]) == (n, pattern_sha256(n))
    assert result["closed_after"], "connection kept open after the last response during shutdown"
    assert elapsed < 10, f"shutdown waited {elapsed:.1f}s although the transfer ended sooner"
    idle.close()


async def test_shutdown_cuts_transfers_after_grace(origin):
    server = await segproxy.start_proxy_server(port=0)
    n = 64 * MIB  # about 20 s at this rate: longer than the grace
    started = asyncio.Event()
    download = asyncio.ensure_future(
        asyncio.to_thread(
            slow_download,
            server.port,
            origin.url(f"/gen-slow/{n}?ms=20"),
            n,
            started,
            asyncio.get_running_loop(),
        )
    )
    await asyncio.wait_for(started.wait(), 10)
    t0 = time.monotonic()
    await asyncio.wait_for(server.aclose(grace=1.0), 15)
    assert 0.9 <= time.monotonic() - t0 < 5
    result = await asyncio.wait_for(download, 15)
    assert 0 < result["got"] < n


async def test_shutdown_with_tunnel_in_flight(origin):
    server = await segproxy.start_proxy_server(port=0)
    c = Conn(server.port)
    c.send(f"CONNECT {LOOPBACK}:{origin.port} HTTP/1.1\r\n\r\n".encode())
    assert c._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    server.close(grace=10)
    # The tunnel still carries traffic while the server drains...
    c.send(f"GET /in-tunnel HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode())
    assert json.loads(c.read_response().body)["target"] == "/in-tunnel"
    c.close()
    # ...and the server finishes as soon as it ends.
    t0 = time.monotonic()
    await asyncio.wait_for(server.wait_closed(), 15)
    assert time.monotonic() - t0 < 5
