"""Helpers for the interception tests: an in-process segproxy on its own asyncio loop, raw
CONNECT + TLS clients, and a small HTTPS origin of our own (chunked bodies, echo)."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import segproxy
from support import LOOPBACK

TIMEOUT = 30.0


class ProxyThread:
    """`start_proxy_server(...)` on an asyncio loop in a background thread, so blocking clients
    (curl, Python ssl) can run in the test thread while the engine's own threads serve."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: segproxy.ProxyServer | None = None

    def __enter__(self) -> ProxyThread:
        self.thread.start()
        try:
            self.server = self.call(segproxy.start_proxy_server(port=0, **self.options))
        except BaseException:
            self._stop_loop()
            raise
        return self

    def call(self, coro, timeout: float = TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __exit__(self, *exc) -> None:
        try:
            if self.server is not None:
                self.call(self.server.aclose(grace=1.0))
        finally:
            self._stop_loop()


def connect_tunnel(proxy_port: int, target: str, timeout: float = TIMEOUT) -> socket.socket:
    """A TCP connection to the proxy after a successful ``CONNECT target``."""
    sock = socket.create_connection((LOOPBACK, proxy_port), timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing after the head may be consumed
        if not chunk:
            raise ConnectionError(f"proxy closed during CONNECT: {head!r}")
        head += chunk
    status = head.split(b" ", 2)[1]
    if status != b"200":
        sock.close()
        raise ConnectionError(f"CONNECT refused: {head!r}")
    return sock


def read_response(f) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a buffered binary file (Content-Length or chunked)."""
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split(b" ", 2)[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int(f.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += f.read(size)
            f.readline()
        return status, headers, bytes(body)
    n = int(headers.get("content-length", "0"))
    return status, headers, f.read(n)


def get(tls: ssl.SSLSocket, host: str, path: str, f=None) -> tuple[int, dict[str, str], bytes]:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return read_response(f if f is not None else tls.makefile("rb"))


def trusting_context(cafile: Path | str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """GET /chunked?n=N&size=S: N chunks of S bytes (chunked encoding);
    POST /sha256: the sha256 and length of the request body (chunked or Content-Length);
    GET /conn: the id of this TCP connection and requests served on it."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]
        self.conn_id = self.server.connections  # type: ignore[attr-defined]
        self.served = 0

    def _send(self, status: int, body: bytes) -> None:
        self.served += 1
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/chunked"):
            from urllib.parse import parse_qs, urlsplit

            q = parse_qs(urlsplit(self.path).query)
            n, size = int(q.get("n", ["10"])[0]), int(q.get("size", ["1000"])[0])
            self.served += 1
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                piece = bytes([i % 256]) * size
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/conn":
            self._send(200, f"{self.conn_id} {self.served + 1}\n".encode())
            return
        self._send(404, b"not found\n")

    def do_POST(self) -> None:
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    piece = self.rfile.read(min(left, 1 << 20))
                    if not piece:
                        raise ConnectionError("client went away")
                    h.update(piece)
                    n += len(piece)
                    left -= len(piece)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                piece = self.rfile.read(min(left, 1 << 20))
                if not piece:
                    raise ConnectionError("client went away")
                h.update(piece)
                n += len(piece)
                left -= len(piece)
        self._send(200, f"{h.hexdigest()} {n}".encode())


class EchoOrigin:
    """A threaded HTTPS origin on 127.0.0.1 serving `_EchoHandler`, with the certificate of an
    `NginxOrigin` (a leaf signed by its test CA)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), _EchoHandler)
        self.httpd.daemon_threads = True
        self.httpd.connections = 0  # type: ignore[attr-defined]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def __enter__(self) -> EchoOrigin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
