"""A hook that *blocks* the asyncio loop (time.sleep, a synchronous client) stops other hooks,
but never flows that need no Python: a CONNECT tunnel moves its bytes meanwhile."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time

import pytest
from segproxy import HTTPSForwardProxyHandler, start_proxy_server

pytestmark = pytest.mark.timeout(60)

hook_started = threading.Event()
times: dict[str, float] = {}


class BlocksTheLoop(HTTPSForwardProxyHandler):
    async def on_request_received(self) -> None:
        if self.request.path == "/block":
            hook_started.set()
            time.sleep(2.0)  # deliberately blocking: the whole loop stops
            times["hook_end"] = time.monotonic()
            self.write_response(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
            return
        await self.forward_http_request()


def echo_server() -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def tunnel_round_trip(proxy_port: int, echo_port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as s:
        s.sendall(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1024)
        assert head.startswith(b"HTTP/1.1 200"), head
        received = bytearray()
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        while len(received) < len(payload):
            chunk = s.recv(1 << 16)
            assert chunk, "tunnel closed early"
            received += chunk
        sender.join()
        return bytes(received)


async def test_tunnel_flows_while_a_hook_blocks_the_loop() -> None:
    hook_started.clear()
    times.clear()
    listener, echo_port = echo_server()
    server = await start_proxy_server(BlocksTheLoop, port=0)
    payload = os.urandom(8 << 20)
    result: dict[str, bytes] = {}

    def blocked_client() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
            s.sendall(b"GET http://127.0.0.1:9/block HTTP/1.1\r\nHost: x\r\n\r\n")
            result["blocked"] = s.recv(1024)

    def tunnel_client() -> None:
        assert hook_started.wait(10), "the blocking hook never started"
        result["echo"] = tunnel_round_trip(server.port, echo_port, payload)
        times["tunnel_end"] = time.monotonic()

    threads = [threading.Thread(target=blocked_client), threading.Thread(target=tunnel_client)]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            # Yield to the loop so the hook can run (and block it); bounded by the timeout mark.
            await asyncio.sleep(0.05)
    finally:
        for t in threads:
            t.join(timeout=20)
        await server.aclose()
        listener.close()
    assert hashlib.sha256(result["echo"]).digest() == hashlib.sha256(payload).digest()
    assert result["blocked"].startswith(b"HTTP/1.1 200") and result["blocked"].endswith(b"done")
    # The tunnel finished its 8 MiB round trip while the loop was still blocked.
    assert times["tunnel_end"] < times["hook_end"], times
