"""Client helpers for HTTPS through the proxy (interception tests): a raw ``CONNECT``
that consumes nothing past the proxy's answer, an SSL context trusting a given CA, and
HTTP/1.1 requests and responses over the TLS socket's buffered file (keep-alive: one
file per connection, several requests on it)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from .loopback import read_chunked_file
from .procs import LOOPBACK

TIMEOUT = 30.0


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


def trusting_context(cafile: Path | str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def read_response_from_file(f) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a buffered binary file (Content-Length or chunked):
    (status, lower-cased header names to values, body)."""
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
        return status, headers, b"".join(read_chunked_file(f))
    n = int(headers.get("content-length", "0"))
    return status, headers, f.read(n)


def get(tls: ssl.SSLSocket, host: str, path: str, f=None) -> tuple[int, dict[str, str], bytes]:
    """``GET path`` on ``tls``; the response is read from ``f`` (the connection's buffered
    file, when the connection serves more than one request) or a new file."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return read_response_from_file(f if f is not None else tls.makefile("rb"))
