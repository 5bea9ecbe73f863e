"""CONNECT tunnels and 101 upgrades: bytes relayed untouched, both directions, half-close."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct

import httpx
import pytest
from support import wait_for
from support.clients import Conn, curl
from support.origins import (
    MIB,
    SinkThenReplyOrigin,
    TlsEchoOrigin,
    WebSocketOrigin,
    pattern_chunks,
    pattern_sha256,
)

pytestmark = pytest.mark.timeout(60)


def connect_through(
    port: int, authority: str, timeout: float = 10.0, leftover: bytes = b""
) -> socket.socket:
    """A socket to the proxy after a successful ``CONNECT authority``; ``leftover`` is
    what the destination is expected to have sent already (read after the 200)."""
    c = Conn(port, timeout)
    c.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = c._read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert leftover.startswith(c.buf), f"unexpected bytes after the proxy's 200: {c.buf!r}"
    c.sock.setblocking(True)
    c.sock.settimeout(timeout)
    if c.buf:
        # Put what was read past the head back in front (tests then read the socket).
        return _Prefixed(c.sock, c.buf)
    return c.sock


class _Prefixed:
    """A socket whose first recv() returns bytes already read from it."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self._sock, self._prefix = sock, prefix

    def recv(self, n: int) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return self._sock.recv(n)

    def __getattr__(self, name):
        return getattr(self._sock, name)


def pem_to_der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(open(path).read())


# --- TLS through the tunnel, verified against the origin's own certificate ------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_curl_https_through_tunnel_verifies_origin_certificate(proxy, nginx_origin, host):
    url = nginx_origin.url("/1k.bin", tls=True, host=host)
    r = await curl("-x", proxy.url, "--cacert", str(nginx_origin.cert_path), url)
    assert r.returncode == 0, r.stderr
    assert r.stdout == bytes(range(256)) * 4
    # Not trusted without the origin's certificate: nothing in between re-signed it.
    r = await curl("-x", proxy.url, url)
    assert r.returncode == 60, r.stderr

    # A tunnel's record is written when it closes, which can be just after curl exits.
    def tunnels() -> list[dict]:
        return [x for x in proxy.access_records() if x["kind"] == "tunnel"]

    assert wait_for(lambda: len(tunnels()) == 2, timeout=5), proxy.access_records()
    recs = tunnels()
    assert len(recs) == 2 and all(x["method"] == "CONNECT" and x["status"] == 200 for x in recs)
    assert recs[0]["target"] == f"{host}:{nginx_origin.https_port}"
    assert recs[0]["bytes_up"] > 0 and recs[0]["bytes_down"] > 1024


async def test_python_ssl_through_tunnel_sees_origin_certificate(proxy, nginx_origin):
    ctx = ssl.create_default_context(cafile=str(nginx_origin.cert_path))
    raw = connect_through(proxy.port, f"localhost:{nginx_origin.https_port}")
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.getpeercert(binary_form=True) == pem_to_der(nginx_origin.leaf_path)
        tls.sendall(b"GET /large.bin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = bytearray()
        while chunk := tls.recv(1 << 20):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == (nginx_origin.www / "large.bin").read_bytes()


async def test_httpx_https_through_tunnel(proxy, nginx_origin):
    async with httpx.AsyncClient(
        proxy=proxy.url, verify=ssl.create_default_context(cafile=str(nginx_origin.cert_path))
    ) as c:
        for _ in range(3):
            r = await c.get(nginx_origin.url("/1k.bin", tls=True))
            assert r.status_code == 200 and r.content == bytes(range(256)) * 4
    # One tunnel carried the three requests (its record is written when it closes).
    assert wait_for(lambda: [x["kind"] for x in proxy.access_records()] == ["tunnel"], timeout=5), (
        proxy.access_records()
    )


async def test_tls_conversation_round_trips(proxy, tmp_path):
    with TlsEchoOrigin(tmp_path) as origin:
        ctx = ssl.create_default_context(cafile=str(origin.cert_path))
        raw = connect_through(proxy.port, origin.authority)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            f = tls.makefile("rwb")
            for i in range(20):
                f.write(f"line {i}\n".encode())
                f.flush()
                assert f.readline() == f"LINE {i}\n".encode()


async def test_client_bytes_sent_with_connect_are_not_lost(proxy, tmp_path):
    """A client may send its first bytes in the same packet as the CONNECT head."""
    with SinkThenReplyOrigin() as origin, Conn(proxy.port) as c:
        c.send(
            f"CONNECT {origin.authority} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\nearly-bytes".encode()
        )
        assert c._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        c.send(b"+late")
        c.sock.shutdown(socket.SHUT_WR)
        while c._fill():
            pass
        assert c.buf == f"16 {hashlib.sha256(b'early-bytes+late').hexdigest()}\n".encode()


# --- half-close and volume -------------------------------------------------------------------


async def test_client_half_close_reaches_origin_and_reply_still_flows(proxy):
    n = 64 * MIB
    with SinkThenReplyOrigin() as origin:
        s = connect_through(proxy.port, origin.authority, timeout=30)
        for piece in pattern_chunks(n):
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)  # the origin replies only once it sees end of stream
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        s.close()
    assert reply == f"{n} {pattern_sha256(n)}\n".encode()
    assert wait_for(lambda: any(r["kind"] == "tunnel" for r in proxy.access_records()))
    [rec] = [r for r in proxy.access_records() if r["kind"] == "tunnel"]
    assert rec["bytes_up"] == n and rec["bytes_down"] == len(reply)


async def test_origin_half_close_reaches_client_and_client_can_still_send(proxy):
    with SinkThenReplyOrigin(banner=b"server-says-bye") as origin:
        s = connect_through(proxy.port, origin.authority, leftover=b"server-says-bye")
        got = b""
        while chunk := s.recv(65536):  # EOF: the origin's FIN came through
            got += chunk
        assert got == b"server-says-bye"
        s.sendall(b"client-still-talking")
        s.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: origin.received == [b"client-still-talking"], timeout=5), (
            origin.received
        )
        s.close()


# --- upgrades (101) ---------------------------------------------------------------------------


async def test_raw_101_upgrade_relays_both_ways(proxy, origin):
    with Conn(proxy.port) as c:
        c.send(
            f"GET {origin.url('/upgrade')} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo-proto\r\n\r\n".encode()
        )
        head = c._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"upgrade: echo-proto" in head.lower()
        c.send(b"hello ")
        c.send(b"world")
        c.sock.shutdown(socket.SHUT_WR)
        while c._fill():
            pass
        assert c.buf == b"HELLO WORLD" + b"BYE"
    [req] = origin.requests
    assert req.header("upgrade") == "echo-proto" and req.header("connection").lower() == "upgrade"
    assert wait_for(lambda: any(r["kind"] == "upgrade" for r in proxy.access_records()))


async def test_upgraded_bytes_are_segmented_like_a_tunnel(make_proxy, origin):
    proxy = await make_proxy(
        rules="*=segment_upstream,strategy=fixed,chunk=3,direction=both", record_flows=True
    )
    with Conn(proxy.port) as c:
        c.send(
            f"GET {origin.url('/upgrade')} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo-proto\r\n\r\n".encode()
        )
        assert c._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        c.send(b"hello world")
        c.sock.shutdown(socket.SHUT_WR)
        while c._fill():
            pass
        assert c.buf == b"HELLO WORLDBYE"  # content unchanged
    assert wait_for(lambda: proxy.flows(), timeout=5)
    [flow] = proxy.flows()
    ups = [n for d, n, _ in flow["chunks"] if d == "up"]
    downs = [n for d, n, _ in flow["chunks"] if d == "down"]
    # Head and upgraded bytes alike leave in chunks of at most 3 bytes, each way.
    assert ups and downs and max(ups) <= 3 and max(downs) <= 3, flow["chunks"]
    assert sum(downs) >= len(b"HELLO WORLDBYE") + len(b"HTTP/1.1 101")
    assert sum(ups) >= len(b"hello world") + len(b"GET /upgrade HTTP/1.1")


def ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


async def test_websocket_upgrade_in_forward_mode(proxy):
    with WebSocketOrigin() as ws_origin, Conn(proxy.port) as c:
        key = base64.b64encode(os.urandom(16)).decode()
        c.send(
            (
                f"GET http://{ws_origin.authority}/chat HTTP/1.1\r\nHost: {ws_origin.authority}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = c._read_until(b"\r\n\r\n").decode()
        assert head.startswith("HTTP/1.1 101"), head
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        assert f"sec-websocket-accept: {accept.lower()}" in head.lower()
        c.send(ws_frame(b"ping through proxy"))
        while len(c.buf) < 2:
            assert c._fill()
        assert c.buf[0] == 0x81 and c.buf[1] == len(b"ping through proxy")
        while len(c.buf) < 2 + len(b"ping through proxy"):
            assert c._fill()
        assert c.buf[2:] == b"ping through proxy"


async def test_websocket_client_through_connect(proxy):
    from websockets.asyncio.client import connect

    with WebSocketOrigin() as ws_origin:
        async with connect(f"ws://{ws_origin.authority}/", proxy=proxy.url, open_timeout=10) as ws:
            for i in range(5):
                await ws.send(f"message {i}")
                assert await ws.recv() == f"message {i}"
            await ws.send(b"\x00\x01binary")
            assert await ws.recv() == b"\x00\x01binary"
    assert ws_origin.connections == 1
