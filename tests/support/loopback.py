"""Small servers and clients written here, on loopback, for the rules / segmentation /
upstream / DNS tests: a recording origin, an HTTP origin that hashes bodies, a fake
upstream proxy that records what it is sent, a TCP relay, and proxy clients.

Every server runs in daemon threads of the test process, listens on 127.0.0.1 on a
free port, has bounded socket timeouts, and is closed by ``close()`` (context
managers). Nothing here mocks the network: they are real sockets.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .procs import LOOPBACK

TIMEOUT = 20.0


def blob(seed: int, n: int) -> bytes:
    """``n`` pseudo-random bytes, the same for the same seed (cheap to make and check)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 32
        counter += 1
    return bytes(out[:n])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(min(1 << 20, n - len(buf)))
        if not piece:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += piece
    return bytes(buf)


def read_head(sock: socket.socket, limit: int = 65536) -> tuple[bytes, bytes]:
    """Reads an HTTP head; returns (head without the blank line, bytes read past it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        piece = sock.recv(4096)
        if not piece:
            raise ConnectionError(f"closed before the end of the head: {buf[:200]!r}")
        buf += piece
        if len(buf) > limit:
            raise ValueError("head too large")
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def read_chunked_file(f, piece: int = 1 << 20):
    """Yields the pieces (at most ``piece`` bytes each) of a chunked body read from a
    buffered binary file, trailers consumed. (``origins.read_chunked_async`` is the
    asyncio-stream counterpart.)"""
    while True:
        size = int(f.readline().split(b";")[0].strip(), 16)
        if size == 0:
            while f.readline() not in (b"\r\n", b"\n", b""):
                pass
            return
        left = size
        while left:
            data = f.read(min(left, piece))
            if not data:
                raise ConnectionError(f"closed with {left} bytes of a chunk missing")
            left -= len(data)
            yield data
        f.readline()


def parse_headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    for n, v in headers:
        if n.lower() == name.lower():
            return v
    return None


# --------------------------------------------------------------------------------------
# a threaded TCP server base


class ThreadedServer:
    """Accepts on 127.0.0.1:``port`` and runs ``handle(conn)`` in a thread per client."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.errors: list[BaseException] = []
        self.connections = 0
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accept = threading.Thread(target=self._loop, daemon=True)
        self._accept.start()

    @property
    def addr(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def _loop(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            # Listed only once started: close() may join it at any moment.
            with self._lock:
                self._threads.append(t)

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except (OSError, ConnectionError) as e:
            if not self.closed:
                self.errors.append(e)
        except BaseException as e:
            self.errors.append(e)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def handle(self, conn: socket.socket) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True
        try:
            # shutdown() wakes a thread blocked in accept(); close() alone does not.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        # Once the accept thread is gone no connection or thread is added.
        self._accept.join(timeout=5)
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# recording origin (raw TCP): read sizes and arrival times


@dataclass
class Recording:
    reads: list[tuple[float, int]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    done: threading.Event = field(default_factory=threading.Event)

    def bursts(self, gap: float) -> list[tuple[float, int]]:
        """Reads grouped into bursts: a read starts a new burst when it comes more than
        ``gap`` seconds after the previous one. (start time, total size) per burst."""
        return group_reads(self.reads, gap)


def group_reads(reads: list[tuple[float, int]], gap: float) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []
    last = None
    for t, n in reads:
        if last is not None and t - last <= gap:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((t, n))
        last = t
    return out


def recording_recv(sock: socket.socket, total: int, rec: Recording, bufsize: int = 65536) -> None:
    """Reads ``total`` bytes from ``sock``, noting each read's size and monotonic time."""
    while len(rec.data) < total:
        piece = sock.recv(min(bufsize, total - len(rec.data)))
        if not piece:
            raise ConnectionError(f"closed after {len(rec.data)} of {total} bytes")
        rec.reads.append((time.monotonic(), len(piece)))
        rec.data += piece
    rec.done.set()


class FramedOrigin(ThreadedServer):
    """A raw TCP origin speaking a tiny framed protocol, so both directions are checked:

    client -> origin: 8-byte length N, 8-byte reply length M, 8-byte reply seed, then N bytes.
    origin -> client: 32-byte sha256 of the N bytes, then M bytes of ``blob(seed, M)``.

    The N bytes are read with ``recording_recv`` (``bufsize``), so ``recordings`` holds
    each connection's read sizes and arrival times.
    """

    def __init__(self, bufsize: int = 65536) -> None:
        self.bufsize = bufsize
        self.recordings: list[Recording] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n, m, seed = struct.unpack("!QQQ", recv_exact(conn, 24))
        rec = Recording()
        self.recordings.append(rec)
        recording_recv(conn, n, rec, self.bufsize)
        conn.sendall(hashlib.sha256(rec.data).digest() + blob(seed, m))
        # Wait for the client to close (bounded by the socket timeout).
        try:
            conn.recv(1)
        except OSError:
            pass


# --------------------------------------------------------------------------------------
# HTTP origin: hashes request bodies, serves deterministic blobs, records request heads


class HttpOrigin:
    """A threaded HTTP/1.1 origin on 127.0.0.1.

    - ``POST /upload``: answers JSON-free headers ``X-Body-Sha256`` and ``X-Body-Length``
      (body read by Content-Length or chunked) and a body ``blob(seed, n)`` if the query
      has ``n`` and ``seed``.
    - ``GET /blob?n=N&seed=S``: ``blob(S, N)``.
    - anything else: 200 ``origin ok <path>``.
    Every request's (request line, headers) is appended to ``requests``. With
    ``keep_alive=False`` every response says ``Connection: close`` (so a proxy opens, and
    resolves, a new connection per request).
    """

    def __init__(self, keep_alive: bool = True) -> None:
        origin = self
        self.keep_alive = keep_alive
        self.requests: list[tuple[str, list[tuple[str, str]]]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = TIMEOUT

            def log_message(self, *args) -> None:
                pass

            def _record(self) -> None:
                origin.requests.append((self.requestline, list(self.headers.items())))

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    return b"".join(read_chunked_file(self.rfile))
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n)

            def _send(self, body: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                if not origin.keep_alive:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def _query_blob(self) -> bytes:
                q = parse_qs(urlsplit(self.path).query)
                if "n" in q:
                    return blob(int(q.get("seed", ["0"])[0]), int(q["n"][0]))
                return b""

            def do_GET(self) -> None:
                self._record()
                if self.path.startswith("/blob"):
                    self._send(self._query_blob())
                else:
                    self._send(f"origin ok {self.path}\n".encode())

            def do_POST(self) -> None:
                self._record()
                body = self._body()
                self._send(
                    self._query_blob(),
                    {"X-Body-Sha256": sha(body), "X-Body-Length": str(len(body))},
                )

            do_PUT = do_POST

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str = "/", host: str = LOOPBACK) -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HttpOrigin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# a fake upstream proxy that records request heads


class FakeUpstream(ThreadedServer):
    """A minimal forward proxy that records every request head it gets.

    - CONNECT: answers ``connect_status`` (200 by default); on 200 it connects to the
      target and relays bytes both ways.
    - absolute-form requests: answers 200 itself with body ``fake upstream saw <target>``
      (it does not forward; the tests only need what it was sent).
    ``heads`` holds (request line, headers) per request.
    """

    def __init__(self, connect_status: int = 200, request_reply: str = "answer") -> None:
        """``request_reply`` for absolute-form requests: "answer", "close" (hang up without a
        response) or "407" (ask for credentials)."""
        self.connect_status = connect_status
        self.request_reply = request_reply
        self.heads: list[tuple[str, list[tuple[str, str]]]] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        head, rest = read_head(conn)
        line, headers = parse_headers(head)
        self.heads.append((line, headers))
        method, target, _ = line.split(" ", 2)
        if method == "CONNECT":
            if self.connect_status != 200:
                reason = {403: "Forbidden", 407: "Proxy Authentication Required"}.get(
                    self.connect_status, "No"
                )
                conn.sendall(
                    f"HTTP/1.1 {self.connect_status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
                )
                return
            host, _, port = target.rpartition(":")
            with socket.create_connection((host, int(port)), timeout=TIMEOUT) as out:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    out.sendall(rest)
                relay(conn, out)
            return
        if self.request_reply == "close":
            return
        if self.request_reply == "407":
            conn.sendall(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
            return
        body = f"fake upstream saw {target}".encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copies bytes both ways until either side closes (each direction in its own thread)."""

    def copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    t = threading.Thread(target=copy, args=(b, a), daemon=True)
    t.start()
    copy(a, b)
    t.join(timeout=TIMEOUT)


class TcpRelay(ThreadedServer):
    """Relays each TCP connection to ``target`` (counting them in ``connections``)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with socket.create_connection(self.target, timeout=TIMEOUT) as out:
            relay(conn, out)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------------------
# clients through a proxy


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return header(self.headers, name)


def read_response(sock: socket.socket, head_only: bool = False) -> Response:
    head, rest = read_head(sock)
    line, headers = parse_headers(head)
    parts = line.split(" ", 2)
    status, reason = int(parts[1]), (parts[2] if len(parts) > 2 else "")
    if head_only:
        return Response(status, reason, headers, rest)
    length = header(headers, "Content-Length")
    body = rest
    if length is not None:
        body += recv_exact(sock, int(length) - len(rest)) if int(length) > len(rest) else b""
        body = body[: int(length)]
    elif (header(headers, "Transfer-Encoding") or "").lower() == "chunked":
        buf = rest
        out = bytearray()
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError("closed inside a chunk")
                buf += more
            if size == 0:
                break
            out += buf[:size]
            buf = buf[size + 2 :]
        body = bytes(out)
    else:
        while True:
            try:
                more = sock.recv(65536)
            except OSError:
                break
            if not more:
                break
            body += more
    return Response(status, reason, headers, body)


def proxy_connect(
    proxy: tuple[str, int], target: str, extra_headers: str = ""
) -> tuple[socket.socket, Response]:
    """Opens a socket to the proxy and sends ``CONNECT target``; returns the socket and the
    answer (if 200, its body holds any tunnel bytes read with the head)."""
    s = socket.create_connection(proxy, timeout=TIMEOUT)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra_headers}\r\n".encode())
    head, rest = read_head(s)
    line, headers = parse_headers(head)
    status = int(line.split(" ", 2)[1])
    if status == 200:
        # ``body``: tunnel bytes that came with the answer (a destination that speaks first).
        return s, Response(status, line, headers, rest)
    length = int(header(headers, "Content-Length") or 0)
    body = rest + (recv_exact(s, length - len(rest)) if length > len(rest) else b"")
    return s, Response(status, line, headers, body)


def proxy_request(
    proxy: tuple[str, int],
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One absolute-form request through the proxy on a fresh connection (Connection: close)."""
    parts = urlsplit(url)
    lines = [f"{method} {url} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection(proxy, timeout=TIMEOUT) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return read_response(s)


def framed_exchange(
    sock: socket.socket, up: bytes, down_len: int, seed: int, rec: Recording | None = None
) -> tuple[bytes, bytes]:
    """Runs FramedOrigin's protocol on ``sock``; returns (origin's sha256 of ``up``, the
    ``down_len`` bytes received). With ``rec``, the downstream bytes are recorded."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(struct.pack("!QQQ", len(up), down_len, seed) + up)
    digest = recv_exact(sock, 32)
    if rec is None:
        rec = Recording()
    recording_recv(sock, down_len, rec)
    return digest, bytes(rec.data)


class SinkOrigin(ThreadedServer):
    """A raw TCP origin that records every read (size, monotonic time) of each connection
    until ``expect`` bytes came (or EOF), then answers the 32-byte sha256 of them and
    waits for the client to close. ``recordings`` holds one Recording per connection."""

    def __init__(self, expect: int, bufsize: int = 65536) -> None:
        self.expect = expect
        self.bufsize = bufsize
        self.recordings: list[Recording] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        rec = Recording()
        self.recordings.append(rec)
        recording_recv(conn, self.expect, rec, self.bufsize)
        conn.sendall(hashlib.sha256(rec.data).digest())
        try:
            conn.recv(1)
        except OSError:
            pass


class SourceOrigin(ThreadedServer):
    """A raw TCP origin that sends ``blob(seed, n)`` in one ``sendall`` as soon as a client
    connects, then waits for the client to close."""

    def __init__(self, n: int, seed: int = 1) -> None:
        self.n = n
        self.seed = seed
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(blob(self.seed, self.n))
        try:
            conn.recv(1)
        except OSError:
            pass


class TcpEchoOrigin(ThreadedServer):
    """A raw TCP origin that echoes every read back at once, recording the reads
    (``recordings``, one per connection) until the client closes."""

    def __init__(self, bufsize: int = 65536) -> None:
        self.bufsize = bufsize
        self.recordings: list[Recording] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rec = Recording()
        self.recordings.append(rec)
        while True:
            piece = conn.recv(self.bufsize)
            if not piece:
                break
            rec.reads.append((time.monotonic(), len(piece)))
            rec.data += piece
            conn.sendall(piece)
        rec.done.set()


class HttpRecordingOrigin(ThreadedServer):
    """A raw HTTP origin that records the reads of each request (head and Content-Length
    body, ``recordings``), then answers ``200`` with body ``ok`` and closes."""

    def __init__(self, bufsize: int = 65536) -> None:
        self.bufsize = bufsize
        self.recordings: list[Recording] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        rec = Recording()
        self.recordings.append(rec)
        need = None
        while need is None or len(rec.data) < need:
            piece = conn.recv(self.bufsize)
            if not piece:
                raise ConnectionError(f"closed after {len(rec.data)} bytes")
            rec.reads.append((time.monotonic(), len(piece)))
            rec.data += piece
            if need is None and b"\r\n\r\n" in rec.data:
                head = bytes(rec.data).split(b"\r\n\r\n", 1)[0]
                _, headers = parse_headers(head)
                need = len(head) + 4 + int(header(headers, "Content-Length") or 0)
        rec.done.set()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def split_sizes(total: int, chunk: int) -> list[int]:
    """The chunk sizes fixed-size segmentation makes of one write of ``total`` bytes."""
    out = [chunk] * (total // chunk)
    if total % chunk:
        out.append(total % chunk)
    return out


class OneRequestOrigin(ThreadedServer):
    """An HTTP origin that answers the first request of each connection as keep-alive (no
    ``Connection: close``), then reads the next request and closes without answering: a
    keep-alive connection closed by the server just as the client reuses it."""

    def __init__(self) -> None:
        self.answered = 0
        self.dropped = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        head, _ = read_head(conn)
        line, _ = parse_headers(head)
        body = f"answered {line.split(' ')[1]}".encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.answered += 1
        try:
            read_head(conn)
        except (OSError, ConnectionError):
            return
        self.dropped += 1
