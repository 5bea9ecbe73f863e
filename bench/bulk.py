"""Bulk-transfer endpoints for the tunnel benchmark.

Server (its own process: ``python bench/bulk.py serve --port N``): for each
connection, reads one line ``UP <bytes>`` or ``DOWN <bytes>``.
  UP:   reads exactly <bytes>, then answers ``OK\\n``.
  DOWN: sends <bytes>, then closes.
Client (``transfer``): connects directly or through an HTTP proxy with
``CONNECT``, sends the line, moves the bytes, returns the elapsed seconds from
the request line to the last byte (UP: to the server's OK).

Both sides use 1 MiB buffers, ``sendall`` of one preallocated buffer and
``recv_into`` a preallocated buffer, so Python costs a few system calls per
MiB; direct loopback reaches several GB/s (the run reports it, so a slow
measuring tool would be visible).
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

BUF = 1 << 20


def _recv_exact_into(sock: socket.socket, total: int) -> int:
    buf = bytearray(BUF)
    view = memoryview(buf)
    got = 0
    while got < total:
        n = sock.recv_into(view, min(BUF, total - got))
        if n == 0:
            break
        got += n
    return got


def _send_n(sock: socket.socket, total: int) -> None:
    block = memoryview(bytes(BUF))
    left = total
    while left >= BUF:
        sock.sendall(block)
        left -= BUF
    if left:
        sock.sendall(block[:left])


def _read_line(sock: socket.socket, limit: int = 8192) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        ch = sock.recv(1)
        if not ch or len(data) > limit:
            raise ConnectionError(f"connection closed in header line: {data!r}")
        data += ch
    return data


def _serve_one(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * BUF)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * BUF)
        try:
            verb, size = _read_line(conn).split()
            n = int(size)
            if verb == b"UP":
                got = _recv_exact_into(conn, n)
                conn.sendall(b"OK\n" if got == n else b"SHORT\n")
            elif verb == b"DOWN":
                _send_n(conn, n)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)  # wait for the client to close
        except (OSError, ValueError):
            pass


def serve(port: int, host: str = "127.0.0.1") -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


def open_tunnel(
    proxy: tuple[str, int], target: tuple[str, int], timeout: float = 30
) -> socket.socket:
    """A socket through ``proxy`` to ``target`` after a successful CONNECT."""
    sock = socket.create_connection(proxy, timeout=timeout)
    host, port = target
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing past the head may be eaten
        if not chunk:
            raise ConnectionError(f"proxy closed during CONNECT: {head!r}")
        head += chunk
        if len(head) > 65536:
            raise ConnectionError("CONNECT response head too large")
    status = head.split(b"\r\n", 1)[0]
    parts = status.split()
    if len(parts) < 2 or parts[1] != b"200":
        raise ConnectionError(f"CONNECT refused: {status.decode(errors='replace')}")
    return sock


def transfer(
    direction: str,
    nbytes: int,
    target: tuple[str, int],
    proxy: tuple[str, int] | None = None,
    timeout: float = 120,
) -> float:
    """Move ``nbytes`` ``"up"`` (client to server) or ``"down"``; seconds taken."""
    if proxy is None:
        sock = socket.create_connection(target, timeout=timeout)
    else:
        sock = open_tunnel(proxy, target, timeout)
    with sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * BUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * BUF)
        start = time.perf_counter()
        if direction == "up":
            sock.sendall(f"UP {nbytes}\n".encode())
            _send_n(sock, nbytes)
            reply = _read_line(sock)
            elapsed = time.perf_counter() - start
            if reply != b"OK\n":
                raise ConnectionError(f"server got a short upload: {reply!r}")
        elif direction == "down":
            sock.sendall(f"DOWN {nbytes}\n".encode())
            got = _recv_exact_into(sock, nbytes)
            elapsed = time.perf_counter() - start
            if got != nbytes:
                raise ConnectionError(f"short download: {got} of {nbytes} bytes")
        else:
            raise ValueError(direction)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    if args.cmd == "serve":
        serve(args.port, args.host)


if __name__ == "__main__":
    main()
