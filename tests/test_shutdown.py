"""Graceful shutdown: `close()` / SIGTERM stop accepting, let exchanges in flight finish up to
`shutdown_timeout`, then cut the rest. Every wait is on an event, bounded."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading

import pytest
import segproxy
from support import Segproxy, wait_for
from support.loopback import TIMEOUT, read_response

pytestmark = pytest.mark.timeout(60)


class HeldOrigin:
    """Answers its one request only when `release` is set; `asked` is set when the request
    head has arrived."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.asked = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                piece = conn.recv(4096)
                if not piece:
                    return
                head += piece
            self.asked.set()
            if self.release.wait(TIMEOUT):
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nfinished"
                )

    def close(self) -> None:
        self.release.set()
        self.thread.join(TIMEOUT)
        self.listener.close()


def send_request(port: int, origin_port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.sendall(f"GET http://127.0.0.1:{origin_port}/slow HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


async def test_close_lets_a_request_in_flight_finish_within_shutdown_timeout():
    origin = HeldOrigin()
    try:
        server = await segproxy.start_proxy_server(port=0, shutdown_timeout=30)
        assert server.shutdown_timeout == 30
        client = send_request(server.port, origin.port)
        assert await asyncio.to_thread(origin.asked.wait, TIMEOUT)
        server.close()  # no grace given: the server's shutdown_timeout applies
        assert await asyncio.to_thread(wait_for, lambda: refuses(server.port), TIMEOUT), (
            "still accepting after close()"
        )
        origin.release.set()
        response = await asyncio.to_thread(read_response, client)
        assert response.status == 200 and response.body == b"finished"
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
        client.close()
    finally:
        origin.close()


async def test_requests_still_in_flight_at_the_deadline_are_cut():
    origin = HeldOrigin()
    try:
        server = await segproxy.start_proxy_server(port=0, shutdown_timeout=0.3)
        client = send_request(server.port, origin.port)
        assert await asyncio.to_thread(origin.asked.wait, TIMEOUT)
        await asyncio.wait_for(server.aclose(), TIMEOUT)
        # Cut: the client's connection ends without a response.
        assert await asyncio.to_thread(client.recv, 100) == b""
        client.close()
        (record,) = server.access_records()
        assert record["outcome"] == "cut_at_shutdown" and record["status"] == 0, record
    finally:
        origin.close()


def test_sigterm_lets_the_cli_finish_a_request_in_flight():
    origin = HeldOrigin()
    try:
        with Segproxy(["--shutdown-timeout", "30"]) as proxy:
            client = send_request(proxy.port, origin.port)
            assert origin.asked.wait(TIMEOUT)
            proxy.process.proc.send_signal(signal.SIGTERM)
            origin.release.set()
            response = read_response(client)
            assert response.status == 200 and response.body == b"finished"
            client.close()
            assert proxy.process.proc.wait(TIMEOUT) == 0
    finally:
        origin.close()


async def test_shutdown_timeout_must_be_seconds():
    with pytest.raises(ValueError, match="shutdown_timeout"):
        await segproxy.start_proxy_server(port=0, shutdown_timeout=-1)
