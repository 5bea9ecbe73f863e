"""Small origin servers written for the proxy tests, each on its own thread and loop.

They run on a private asyncio loop in a background thread (``ThreadedOrigin``), so
a test may use blocking clients (curl, raw sockets) or async ones (httpx) without
starving them; ``HttpsEchoOrigin`` (for the interception tests) is an
``http.server`` with a thread per connection instead. Every origin binds 127.0.0.1
on a free port, is a context manager, and stops (closing every connection it holds)
on exit::

    with RecordingOrigin() as origin:
        ...  # origin.url("/gen/1000"), origin.requests, origin.connections

``RecordingOrigin`` records what it received (request line, headers in order,
body length and SHA-256, which TCP connection carried it) and answers by path:

- ``/gen/N``          N pattern bytes with Content-Length (``pattern_sha256(N)``)
- ``/gen-chunked/N``  the same, chunked
- ``/gen-close/N``    the same, close-delimited (no length, connection closed)
- ``/gen-slow/N``     the same with Content-Length, 64 KiB every ``?ms=`` (20) ms
- ``/echo``           the request body back, in the request's framing
- ``/status/NNN``     that status; 204 and 304 carry no body (304 with a
  misleading Content-Length, as RFC 9110 allows)
- ``/hop``            a response carrying hop-by-hop fields
- ``/never``          reads the request and never answers
- ``/upgrade``        ``101 Switching Protocols`` then echoes raw bytes
- anything else       JSON describing the request as received

A HEAD request gets the head a GET would get (Content-Length 12345) without a body.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .loopback import blob, header, parse_headers, read_chunked_file
from .procs import LOOPBACK

MIB = 1024 * 1024
# The pattern is loopback's ``blob`` data (one maker of test bytes), 1 MiB of it repeated,
# so that bodies of any size stream without being built in memory.
_BLOCK = blob(20240611, MIB)


def pattern_chunks(n: int, piece: int = MIB):
    """The deterministic body of ``/gen/N`` in pieces of at most ``piece`` bytes: the first
    MiB of ``blob(20240611, ...)``, repeated."""
    sent = 0
    while sent < n:
        off = sent % MIB
        k = min(piece, MIB - off, n - sent)
        yield _BLOCK[off : off + k]
        sent += k


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for c in pattern_chunks(n):
        h.update(c)
    return h.hexdigest()


@dataclass
class Received:
    """One request as the origin read it off the wire."""

    conn: int
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body_len: int = 0
    body_sha256: str = hashlib.sha256().hexdigest()
    body: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        return header(self.headers, name)

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def as_json(self) -> dict:
        return {
            "conn": self.conn,
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": self.headers,
            "body_len": self.body_len,
            "body_sha256": self.body_sha256,
            "chunked": self.chunked,
        }


class ThreadedOrigin:
    """Base: an asyncio server on its own loop in a daemon thread."""

    ssl_context: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.connections = 0

    def url(self, path: str = "/", host: str = LOOPBACK) -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def authority(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        self._writers.add(writer)
        try:
            await self.handle(reader, writer, conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def handle(self, reader, writer, conn: int) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _start_server(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(
            self._client, LOOPBACK, 0, ssl=self.ssl_context, limit=256 * 1024
        )

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        try:
            self._server = loop.run_until_complete(self._start_server())
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        # Stopped: cancel what is left and close the loop.
        tasks = asyncio.all_tasks(loop)
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    def start(self):
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        loop, self.loop = self.loop, None
        if loop is None or self._thread is None:
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), loop)
        self._thread.join(10)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the origin's loop and return its result (thread-safe read)."""
        assert self.loop is not None

        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def read_head_async(
    reader: asyncio.StreamReader,
) -> tuple[str, list[tuple[str, str]]] | None:
    """Request or status line and header fields from an asyncio stream; None at a clean
    end of stream. (``loopback.read_head`` is the blocking-socket counterpart.)"""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    return parse_headers(raw[:-4])


async def read_chunked_async(reader: asyncio.StreamReader):
    """Yields the pieces of a chunked body read from an asyncio stream (trailers consumed)."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return
        left = size
        while left:
            data = await reader.read(min(left, 256 * 1024))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            yield data
        assert await reader.readexactly(2) == b"\r\n"


class RecordingOrigin(ThreadedOrigin):
    """HTTP/1.1 origin with keep-alive that records every request (see module doc)."""

    #: Bodies up to this size are kept in ``Received.body`` (and echoed by /echo).
    keep_body = 16 * MIB

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Received] = []
        self.raw_heads: list[bytes] = []

    def requests_for(self, path_prefix: str) -> list[Received]:
        return [r for r in list(self.requests) if urlsplit(r.target).path.startswith(path_prefix)]

    async def handle(self, reader, writer, conn) -> None:
        while True:
            head = await read_head_async(reader)
            if head is None:
                return
            line, headers = head
            method, target, version = line.split(" ", 2)
            req = Received(conn, method, target, version, headers)
            h = hashlib.sha256()
            keep = []
            te = (req.header("transfer-encoding") or "").lower()
            if "chunked" in te:
                req.chunked = True
                pieces = read_chunked_async(reader)
            else:
                pieces = _read_length(reader, int(req.header("content-length") or 0))
            async for piece in pieces:
                h.update(piece)
                req.body_len += len(piece)
                if req.body_len <= self.keep_body:
                    keep.append(piece)
            req.body_sha256 = h.hexdigest()
            if req.body_len <= self.keep_body:
                req.body = b"".join(keep)
            self.requests.append(req)
            close = (req.header("connection") or "").lower() == "close" or version == "HTTP/1.0"
            if not await self.respond(req, reader, writer, close):
                return
            if close:
                return

    async def respond(
        self, req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close: bool
    ) -> bool:
        """Answers one request; returns False when the connection must end."""
        parts = urlsplit(req.target)
        path = parts.path
        query = parse_qs(parts.query)
        conn_hdr = "Connection: close\r\n" if close else ""

        def head(status: str, extra: str = "") -> bytes:
            return (
                f"HTTP/1.1 {status}\r\nServer: recording-origin\r\n{extra}{conn_hdr}\r\n".encode()
            )

        if req.method == "HEAD":
            writer.write(
                head(
                    "200 OK", "Content-Type: application/octet-stream\r\nContent-Length: 12345\r\n"
                )
            )
        elif path.startswith("/gen/") or path.startswith("/gen-slow/"):
            n = int(path.rsplit("/", 1)[1])
            writer.write(
                head("200 OK", f"Content-Type: application/octet-stream\r\nContent-Length: {n}\r\n")
            )
            slow = path.startswith("/gen-slow/")
            delay = float(query.get("ms", ["20"])[0]) / 1000
            for piece in pattern_chunks(n, 64 * 1024 if slow else MIB):
                writer.write(piece)
                await writer.drain()
                if slow:
                    await asyncio.sleep(delay)
        elif path.startswith("/gen-chunked/"):
            n = int(path.rsplit("/", 1)[1])
            writer.write(head("200 OK", "Transfer-Encoding: chunked\r\n"))
            for piece in pattern_chunks(n, 100_000):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif path.startswith("/gen-close/"):
            n = int(path.rsplit("/", 1)[1])
            writer.write(
                b"HTTP/1.1 200 OK\r\nServer: recording-origin\r\nConnection: close\r\n\r\n"
            )
            for piece in pattern_chunks(n):
                writer.write(piece)
                await writer.drain()
            await writer.drain()
            return False
        elif path == "/echo":
            ctype = req.header("content-type") or "application/octet-stream"
            if req.chunked:
                writer.write(
                    head("200 OK", f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n")
                )
                for i in range(0, len(req.body), 7777):
                    piece = req.body[i : i + 7777]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(
                    head("200 OK", f"Content-Type: {ctype}\r\nContent-Length: {len(req.body)}\r\n")
                )
                writer.write(req.body)
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            if code == 204:
                writer.write(head("204 No Content"))
            elif code == 304:
                writer.write(head("304 Not Modified", 'ETag: "v1"\r\nContent-Length: 500\r\n'))
            else:
                body = f"status {code}\n".encode()
                writer.write(head(f"{code} Whatever", f"Content-Length: {len(body)}\r\n") + body)
        elif path == "/hop":
            body = b"hop\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: X-Resp-Secret\r\nX-Resp-Secret: 1\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Resp-Normal: yes\r\n"
                b"Content-Length: 4\r\n\r\n" + body
            )
        elif path == "/never":
            await writer.drain()
            await asyncio.sleep(3600)
        elif path == "/upgrade" and req.header("upgrade"):
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo-proto\r\nConnection: Upgrade\r\n\r\n"
            )
            await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data.upper())
                await writer.drain()
            writer.write(b"BYE")
            await writer.drain()
            return False
        else:
            body = json.dumps(req.as_json()).encode()
            writer.write(
                head("200 OK", f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
                + body
            )
        await writer.drain()
        return True


async def _read_length(reader: asyncio.StreamReader, n: int):
    left = n
    while left:
        data = await reader.read(min(left, 256 * 1024))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(data)
        yield data


class TlsRecordingOrigin(RecordingOrigin):
    """`RecordingOrigin` over TLS, serving a leaf of a test CA (`certs.make_origin_certs`):
    clients and proxies trust ``ca_path``; ``url()`` gives ``https://`` URLs."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        from .certs import make_origin_certs

        directory.mkdir(parents=True, exist_ok=True)
        self.ca_path, cert_path, key_path = make_origin_certs(directory)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_path, key_path)
        self.ssl_context = ctx

    def url(self, path: str = "/", host: str = LOOPBACK) -> str:
        return f"https://{host}:{self.port}{path}"


class SinkThenReplyOrigin(ThreadedOrigin):
    """Raw TCP: reads until the client half-closes, then answers ``N SHA256\\n`` and closes.

    With ``banner``, first sends the banner and half-closes its own side, then reads
    until end of stream (what it got is in ``received``)."""

    def __init__(self, banner: bytes | None = None) -> None:
        super().__init__()
        self.banner = banner
        self.received: list[bytes] = []

    async def handle(self, reader, writer, conn) -> None:
        if self.banner is not None:
            writer.write(self.banner)
            await writer.drain()
            writer.write_eof()
        h = hashlib.sha256()
        n = 0
        got = []
        while True:
            data = await reader.read(256 * 1024)
            if not data:
                break
            h.update(data)
            n += len(data)
            if n <= MIB:
                got.append(data)
        self.received.append(b"".join(got))
        if self.banner is None:
            writer.write(f"{n} {h.hexdigest()}\n".encode())
            await writer.drain()


class TlsEchoOrigin(ThreadedOrigin):
    """TLS server with a self-signed certificate: echoes each line it reads, uppercased."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        from .certs import make_self_signed

        self.cert_path, key_path = make_self_signed(directory)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_path, key_path)
        self.ssl_context = ctx

    async def handle(self, reader, writer, conn) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            writer.write(line.upper())
            await writer.drain()


class _HttpsEchoHandler(http.server.BaseHTTPRequestHandler):
    """GET /chunked?n=N&size=S: N chunks of S bytes (chunked encoding);
    POST /sha256: the sha256 and length of the request body (chunked or Content-Length);
    GET /conn: the id of this TCP connection and requests served on it;
    GET /headers: the request line's version, then the request's header lines."""

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
        if self.path == "/headers":
            lines = [self.request_version] + [f"{k.lower()}: {v}" for k, v in self.headers.items()]
            self._send(200, "\n".join(lines).encode())
            return
        self._send(404, b"not found\n")

    def do_POST(self) -> None:
        h = hashlib.sha256()
        n = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            for piece in read_chunked_file(self.rfile):
                h.update(piece)
                n += len(piece)
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


class HttpsEchoOrigin:
    """A threaded HTTPS origin on 127.0.0.1 (``http.server``, a thread per connection)
    serving ``_HttpsEchoHandler``: chunked responses, the SHA-256 of request bodies, and
    which connection served a request. Given the certificate of an ``NginxOrigin`` (a leaf
    signed by its test CA)."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), _HttpsEchoHandler)
        self.httpd.daemon_threads = True
        self.httpd.connections = 0  # type: ignore[attr-defined]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def __enter__(self) -> HttpsEchoOrigin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class WebSocketOrigin(ThreadedOrigin):
    """A real WebSocket server (the ``websockets`` package, permessage-deflate on by default)
    echoing every message. It records what it received (``received``: str for text, bytes for
    binary) and the ``Sec-WebSocket-Extensions`` each handshake answered (``extensions``). A
    text message ``fragments:A,B,C`` is answered by one message sent in those fragments. With
    ``ssl_context`` it serves wss."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None = None, compression: str | None = "deflate"
    ) -> None:
        super().__init__()
        self.ssl_context = ssl_context
        self.compression = compression
        self.received: list[str | bytes] = []
        self.extensions: list[str | None] = []

    async def _start_server(self):
        from websockets.asyncio.server import serve

        async def echo(ws):
            self.connections += 1
            self.extensions.append(ws.response.headers.get("Sec-WebSocket-Extensions"))
            async for msg in ws:
                self.received.append(msg)
                if isinstance(msg, str) and msg.startswith("fragments:"):
                    await ws.send(msg.split(":", 1)[1].split(","))
                else:
                    await ws.send(msg)

        return await serve(echo, LOOPBACK, 0, ssl=self.ssl_context, compression=self.compression)


def blackhole_port() -> tuple[socket.socket, int]:
    """A listening socket that never accepts (its backlog takes connections): the
    caller closes it. Useful for "origin accepts TCP but never answers"."""
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    s.listen(16)
    return s, s.getsockname()[1]


def full_backlog_port() -> tuple[socket.socket, list[socket.socket], int]:
    """A listener whose accept queue is full, so a new connect to it hangs until the
    connector's timeout (the kernel drops the SYNs): (listener, fillers, port). The caller
    closes them all."""
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    s.listen(0)
    port = s.getsockname()[1]
    fillers: list[socket.socket] = []
    for _ in range(16):  # bounded: the queue holds a handful at most
        c = socket.socket()
        c.setblocking(False)
        fillers.append(c)
        if c.connect_ex((LOOPBACK, port)) not in (0, 115):  # 115: EINPROGRESS
            break
        time.sleep(0.02)
        try:
            c.getpeername()
        except OSError:  # this one did not get in: the queue is full
            break
    return s, fillers, port


def refused_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ScriptedOrigin(ThreadedOrigin):
    """Reads one request head, answers with exactly ``reply`` (raw bytes) and closes."""

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply
        self.heads: list[bytes] = []

    async def handle(self, reader, writer, conn) -> None:
        self.heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(self.reply)
        await writer.drain()


class H2GoawayOrigin:
    """An HTTP/2-only TLS origin on 127.0.0.1 (the ``h2`` pip package over Python ssl, a
    thread per connection) that answers one request per connection, ``"N\\n"`` where N counts
    its connections, then sends GOAWAY (and reads on until the client closes): every request
    after the first on a connection is refused. Given the certificate of an ``NginxOrigin``."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.set_alpn_protocols(["h2"])
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.goaways = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> H2GoawayOrigin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()
        self.thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock, self.connections), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        import h2.config
        import h2.connection
        import h2.events
        import h2.exceptions

        try:
            tls = self.ctx.wrap_socket(sock, server_side=True)
            tls.settimeout(30)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            tls.sendall(conn.data_to_send())
            answered = False
            while True:
                data = tls.recv(65536)
                if not data:
                    return  # after GOAWAY, the client closes once its streams are done
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded) and not answered:
                        body = f"{number}\n".encode()
                        conn.send_headers(
                            event.stream_id,
                            [(":status", "200"), ("content-length", str(len(body)))],
                        )
                        conn.send_data(event.stream_id, body, end_stream=True)
                        conn.close_connection()
                        answered = True
                        self.goaways += 1
                tls.sendall(conn.data_to_send())
        except (OSError, ssl.SSLError):
            return
        except h2.exceptions.ProtocolError:
            # Frames the client sent before it saw the GOAWAY (its SETTINGS acknowledgement)
            # reach a connection h2 holds closed: nothing is left to answer.
            return
