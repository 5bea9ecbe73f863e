"""asyncio-https-proxy's public API, with its behaviour, measured by its own tests: the cases of
its tests/test_http_request.py, test_http_response.py, test_https_proxy_handler.py,
test_https_forward_proxy_handler.py, test_server.py and test_tls_store.py, written again for
segproxy with their imports pointed at segproxy (its module paths included). Where a test
there mocks asyncio.open_connection or a stream, the case runs here over real sockets on
loopback and asserts on what the client and the origin saw.

Not ported (they test asyncio-https-proxy's internals, which segproxy does not have):
`TLSStore._ca` / `._store` / `._generate_cert` (the same checks run here on the certificates
the public API gives), the forwarding internals `_read_and_forward_response`,
`_forward_response_body`, `_forward_chunked_response` and `_response_complete`, and the
cases that patch `asyncio.open_connection` to see what `forward_http_request()` writes (the
engine connects; the same checks run here against a real origin). test_server's
`isinstance(server, asyncio.Server)` does not hold: `start_proxy_server` returns a
`ProxyServer` with asyncio.Server's methods.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from segproxy import (
    HTTPHeader,
    HTTPRequest,
    HTTPResponse,
    HTTPSForwardProxyHandler,
    HTTPSProxyHandler,
    ProxyError,
    ProxyServer,
    TLSStore,
    start_proxy_server,
)
from segproxy.handlers import overridden_hooks, reads_response_body
from segproxy.https_forward_proxy_handler import MAX_CHUNK_SIZE
from segproxy.tls_store import CERTIFICATE_VALIDITY_DAYS
from support.certs import make_origin_certs
from support.origins import RecordingOrigin, pattern_chunks, pattern_sha256

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------
# HTTPHeader.to_raw ends the head


def test_to_raw_ends_with_the_blank_line():
    h = HTTPHeader(b"Host: example.com\r\nUser-Agent: test\r\nAccept: */*\r\n\r\n")
    assert h.to_raw() == b"Host: example.com\r\nUser-Agent: test\r\nAccept: */*\r\n\r\n"
    assert HTTPHeader(b"\r\n").to_raw() == b"\r\n\r\n"
    assert HTTPHeader(b"\r\n").headers == []


async def test_handler_writing_status_line_plus_to_raw_sends_a_valid_response():
    """`b"HTTP/1.1 200 OK\\r\\n" + headers.to_raw() + body`, the asyncio-https-proxy idiom, is a
    whole response a real client reads."""

    class Answer(HTTPSProxyHandler):
        async def on_request_received(self) -> None:
            body = b"answered by the handler"
            headers = HTTPHeader(
                [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            )
            self.write_response(b"HTTP/1.1 200 OK\r\n" + headers.to_raw() + body)
            await self.flush_response()

    import httpx

    server = await start_proxy_server(Answer, port=0)
    try:
        async with httpx.AsyncClient(proxy=server.url, timeout=20) as client:
            r = await client.get("http://nowhere.invalid/x")
        assert r.status_code == 200 and r.text == "answered by the handler"
        assert r.headers["content-type"] == "text/plain"
    finally:
        await server.aclose()


# --------------------------------------------------------------------------------------
# HTTPRequest.parse_request_line / parse_headers


def test_parse_get_request_line():
    request = HTTPRequest()
    request.parse_request_line(b"GET http://example.com:8080/path?q=1 HTTP/1.1")
    assert (request.method, request.scheme, request.host, request.port, request.version) == (
        "GET",
        "http",
        "example.com",
        8080,
        "HTTP/1.1",
    )
    assert request.path == "/path?q=1"
    assert request.url() == "http://example.com:8080/path?q=1"


def test_parse_connect_request_line():
    request = HTTPRequest()
    request.parse_request_line(b"CONNECT example.com:443 HTTP/1.1")
    assert (request.method, request.scheme, request.host, request.port, request.version) == (
        "CONNECT",
        "https",
        "example.com",
        443,
        "HTTP/1.1",
    )


def test_parse_request_line_default_port():
    request = HTTPRequest()
    request.parse_request_line(b"GET http://example.com/path HTTP/1.1")
    assert request.port == 80


@pytest.mark.parametrize(
    "line, message",
    [
        (b"GET /", "Invalid request line"),
        (b"GET / HTTP/1.1 extra", "Invalid request line"),
        (b"CONNECT example.com HTTP/1.1", "Invalid CONNECT request line"),
    ],
)
def test_parse_request_line_errors(line, message):
    with pytest.raises(ValueError, match=message):
        HTTPRequest().parse_request_line(line)


def test_request_parse_headers():
    request = HTTPRequest()
    request.parse_headers(b"Host: a\r\nX: 1\r\nx: 2\r\n")
    assert isinstance(request.headers, HTTPHeader)
    assert request.headers.first("x") == "1" and request.headers.to_dict() == {
        "Host": "a",
        "X": "1",
        "x": "2",
    }


# --------------------------------------------------------------------------------------
# HTTPResponse.parse_status_line / parse_headers


@pytest.mark.parametrize(
    "line, version, code, reason",
    [
        (b"HTTP/1.1 200 OK", "HTTP/1.1", 200, "OK"),
        (b"HTTP/1.1 404", "HTTP/1.1", 404, ""),
        (b"HTTP/1.1 500 Internal Server Error", "HTTP/1.1", 500, "Internal Server Error"),
        (b"HTTP/2 200 OK", "HTTP/2", 200, "OK"),
        (b"  HTTP/1.1 200 OK  \r\n", "HTTP/1.1", 200, "OK"),
        (b"HTTP/1.1 301 Moved Permanently", "HTTP/1.1", 301, "Moved Permanently"),
    ],
)
def test_parse_status_line(line, version, code, reason):
    response = HTTPResponse()
    response.parse_status_line(line)
    assert (response.version, response.status_code, response.reason_phrase) == (
        version,
        code,
        reason,
    )


@pytest.mark.parametrize("line", [b"INVALID", b"HTTP/1.1"])
def test_parse_status_line_too_short(line):
    with pytest.raises(ValueError, match="Invalid status line"):
        HTTPResponse().parse_status_line(line)


def test_parse_status_line_bad_code():
    with pytest.raises(ValueError):
        HTTPResponse().parse_status_line(b"HTTP/1.1 NOT_A_NUMBER OK")


def test_response_parse_headers():
    response = HTTPResponse()
    response.parse_headers(b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Type: text/html")
    assert (
        response.headers.first("set-cookie") == "a=1"
        and response.headers.first("CONTENT-TYPE") == "text/html"
    )
    response.parse_headers(b"")
    assert isinstance(response.headers, HTTPHeader) and len(response.headers) == 0


# --------------------------------------------------------------------------------------
# TLSStore(ca_key, ca_cert), get_ssl_context, CERTIFICATE_VALIDITY_DAYS


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA made with `cryptography`, as an asyncio-https-proxy user would have one."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def test_tls_store_from_cryptography_objects_and_pem():
    key, cert = make_ca()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    for store in (
        TLSStore(key, cert),
        TLSStore(ca_key=key, ca_cert=cert),
        TLSStore(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert_pem.decode(),
        ),
    ):
        assert store.get_ca_pem() == cert_pem
        leaf = x509.load_pem_x509_certificate(store.get_cert_pem("a.example.test"))
        assert leaf.issuer == cert.subject
    with pytest.raises(TypeError, match="both"):
        TLSStore(key)
    other_key, _ = make_ca()
    with pytest.raises(ValueError):
        TLSStore(other_key, cert)  # a key that is not the certificate's


async def test_get_ssl_context_serves_a_minted_certificate(tmp_path):
    store = TLSStore.generate_ca("FR", "Ile-de-France", "Paris", "Test", "Test CA")
    context = store.get_ssl_context("served.example.test")
    assert isinstance(context, ssl.SSLContext) and context.protocol == ssl.PROTOCOL_TLS_SERVER

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"hello over TLS\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(store.get_ca_pem())
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="served.example.test"
        )
        writer.write(b"hi\n")
        assert await reader.readline() == b"hello over TLS\n"
        peer = writer.get_extra_info("ssl_object").getpeercert()
        assert ("DNS", "served.example.test") in peer["subjectAltName"]
        writer.close()
        # Another name is refused by a verifying client: the certificate is the domain's.
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="other.example.test"
            )
    finally:
        server.close()
        await server.wait_closed()


def test_certificate_validity_days_is_the_minted_period():
    store = TLSStore()
    leaf = x509.load_pem_x509_certificate(store.get_cert_pem("validity.example.test"))
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == CERTIFICATE_VALIDITY_DAYS
    ca = x509.load_pem_x509_certificate(store.get_ca_pem())
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= CERTIFICATE_VALIDITY_DAYS - 1
    assert 0 < CERTIFICATE_VALIDITY_DAYS <= 398  # what browsers accept


# --------------------------------------------------------------------------------------
# hooks: on_response_complete when forwarding fails; Transfer-Encoding as the origin sent it


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_on_response_complete_runs_when_forwarding_fails():
    events: list[str] = []
    done = asyncio.Event()

    class Watch(HTTPSForwardProxyHandler):
        async def on_response_complete(self) -> None:
            events.append("complete")

        async def on_error(self, error: Exception) -> None:
            events.append(f"error: {error}")
            done.set()

    import httpx

    server = await start_proxy_server(Watch, port=0)
    try:
        async with httpx.AsyncClient(proxy=server.url, timeout=20) as client:
            r = await client.get(f"http://127.0.0.1:{closed_port()}/nothing-listens")
        assert r.status_code == 502
        await asyncio.wait_for(done.wait(), 20)
        # As in asyncio-https-proxy: the completion hook first, then the error.
        assert events[0] == "complete" and events[1].startswith("error: "), events
        assert len(events) == 2, events
    finally:
        await server.aclose()


async def test_response_hooks_see_transfer_encoding():
    from support.origins import RecordingOrigin

    seen: list[list[tuple[str, str]]] = []

    class Look(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            seen.append(list(self.response.headers))

    import httpx

    with RecordingOrigin() as origin:
        server = await start_proxy_server(Look, port=0)
        try:
            async with httpx.AsyncClient(proxy=server.url, timeout=20) as client:
                r = await client.get(origin.url("/gen-chunked/1000"))
                assert r.status_code == 200 and len(r.content) == 1000
                r = await client.get(origin.url("/gen/10"))
                assert r.status_code == 200 and len(r.content) == 10
        finally:
            await server.aclose()
    assert ("Transfer-Encoding", "chunked") in seen[0], seen
    assert not any(name.lower() == "transfer-encoding" for name, _ in seen[1]), seen


@pytest.mark.parametrize(
    "scheme, host_header, host, port",
    [
        ("http", "example.com", "example.com", 80),
        ("https", "example.com", "example.com", 443),
        ("http", "example.com:8080", "example.com", 8080),
        ("https", "[::1]:8443", "::1", 8443),
        ("https", "[::1]", "::1", 443),
    ],
)
def test_parse_host_from_the_host_header(scheme, host_header, host, port):
    request = HTTPRequest(scheme=scheme)
    request.parse_headers(f"Host: {host_header}\r\nAccept: */*\r\n".encode())
    request.parse_host()
    assert (request.host, request.port) == (host, port)


def test_parse_host_without_host_header():
    request = HTTPRequest()
    request.parse_headers(b"Accept: */*\r\n")
    with pytest.raises(ValueError, match="Host"):
        request.parse_host()


# --------------------------------------------------------------------------------------
# module paths and names: `from asyncio_https_proxy.X import Y` -> `from segproxy.X import Y`


def test_asyncio_https_proxy_module_paths():
    import segproxy
    from segproxy.http_header import HTTPHeader as Header
    from segproxy.http_request import HTTPRequest as Request
    from segproxy.http_response import HTTPResponse as Response
    from segproxy.https_forward_proxy_handler import MAX_CHUNK_SIZE as FORWARD_MAX
    from segproxy.https_forward_proxy_handler import HTTPSForwardProxyHandler as Forward
    from segproxy.https_proxy_handler import MAX_CHUNK_SIZE
    from segproxy.https_proxy_handler import HTTPSProxyHandler as Base
    from segproxy.server import start_proxy_server as start
    from segproxy.tls_store import CERTIFICATE_VALIDITY_DAYS as DAYS
    from segproxy.tls_store import TLSStore as Store

    assert (Header, Request, Response) == (HTTPHeader, HTTPRequest, HTTPResponse)
    assert (Base, Forward, Store, start) == (
        HTTPSProxyHandler,
        HTTPSForwardProxyHandler,
        TLSStore,
        start_proxy_server,
    )
    assert MAX_CHUNK_SIZE == FORWARD_MAX == 4096
    assert DAYS == CERTIFICATE_VALIDITY_DAYS
    # Its package exports, from the package itself.
    for name in (
        "start_proxy_server",
        "HTTPSProxyHandler",
        "HTTPSForwardProxyHandler",
        "HTTPHeader",
        "HTTPRequest",
        "HTTPResponse",
        "TLSStore",
    ):
        assert name in segproxy.__all__ and hasattr(segproxy, name)


# --------------------------------------------------------------------------------------
# test_http_response.py: the blank response, repr, whole heads


def test_response_init_default_values():
    response = HTTPResponse()
    assert response.version == ""
    assert response.status_code == 0
    assert response.reason_phrase == ""
    assert response.headers is None
    # With a status line's parts, headers start empty (segproxy's own use).
    given = HTTPResponse("HTTP/1.1", 200, "OK")
    assert isinstance(given.headers, HTTPHeader) and len(given.headers) == 0


def test_response_repr():
    response = HTTPResponse()
    response.status_code = 200
    response.reason_phrase = "OK"
    assert "HTTPResponse" in repr(response) and "200" in repr(response) and "OK" in repr(response)
    response = HTTPResponse()
    response.status_code = 404
    assert "HTTPResponse" in repr(response) and "404" in repr(response)


def test_complete_response_parsing():
    response = HTTPResponse()
    response.parse_status_line(b"HTTP/1.1 200 OK")
    response.parse_headers(
        b"Content-Type: application/json\r\nContent-Length: 42\r\n"
        b"Cache-Control: no-cache\r\nConnection: close"
    )
    assert (response.version, response.status_code, response.reason_phrase) == (
        "HTTP/1.1",
        200,
        "OK",
    )
    assert response.headers.first("content-type") == "application/json"
    assert response.headers.first("CONTENT-LENGTH") == "42"
    assert response.headers.first("Cache-Control") == "no-cache"
    assert response.headers.first("Connection") == "close"


@pytest.mark.parametrize(
    "code, phrase",
    [
        (100, "Continue"),
        (201, "Created"),
        (204, "No Content"),
        (302, "Found"),
        (304, "Not Modified"),
        (400, "Bad Request"),
        (401, "Unauthorized"),
        (403, "Forbidden"),
        (404, "Not Found"),
        (502, "Bad Gateway"),
        (503, "Service Unavailable"),
    ],
)
def test_parse_common_status_codes(code, phrase):
    response = HTTPResponse()
    response.parse_status_line(f"HTTP/1.1 {code} {phrase}".encode())
    assert (response.status_code, response.reason_phrase) == (code, phrase)


def test_request_repr():
    request = HTTPRequest()
    request.parse_request_line(b"GET http://example.com:8080/path HTTP/1.1")
    assert repr(request) == "HTTPRequest(host=example.com, port=8080)"


# --------------------------------------------------------------------------------------
# test_https_proxy_handler.py: read_request_body over a client_reader the script set


class CountingReader:
    """A real StreamReader (a loopback connection) that notes the size of every read."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.sizes: list[int] = []
        self.read_done = asyncio.Event()

    async def read(self, n: int = -1) -> bytes:
        self.sizes.append(n)
        try:
            return await self.reader.read(n)
        finally:
            self.read_done.set()


async def loopback_reader(feed) -> tuple[CountingReader, asyncio.Server, asyncio.StreamWriter]:
    """A CountingReader on a loopback connection whose server side runs `feed(writer,
    counting_reader)`, then closes."""
    holder: list[CountingReader] = []
    ready = asyncio.Event()

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ready.wait()
        try:
            await feed(writer, holder[0])
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    holder.append(CountingReader(reader))
    ready.set()
    return holder[0], server, writer


async def body_read_by(content_length: str | None, feed) -> tuple[list[bytes], list[int]]:
    reader, server, writer = await loopback_reader(feed)
    try:
        handler = HTTPSProxyHandler()
        handler.client_reader = reader
        request = HTTPRequest()
        head = (
            b"" if content_length is None else b"Content-Length: %s\r\n" % content_length.encode()
        )
        request.headers = HTTPHeader(head + b"\r\n")
        handler.request = request
        assert handler.client_reader is reader
        chunks = [chunk async for chunk in handler.read_request_body()]
        return chunks, reader.sizes
    finally:
        writer.close()
        server.close()


async def test_read_request_body_with_content_length():
    async def feed(writer: asyncio.StreamWriter, reader: CountingReader) -> None:
        writer.write(b"hello")
        await writer.drain()
        await reader.read_done.wait()  # the first read has returned "hello" alone
        writer.write(b"world")
        await writer.drain()

    chunks, sizes = await body_read_by("10", feed)
    assert chunks == [b"hello", b"world"]
    assert sizes == [10, 5]  # min(length, MAX_CHUNK_SIZE), then what is left


async def test_read_request_body_without_content_length():
    async def feed(writer: asyncio.StreamWriter, reader: CountingReader) -> None:
        writer.write(b"not a body")

    chunks, sizes = await body_read_by(None, feed)
    assert chunks == [] and sizes == []


async def test_read_request_body_zero_content_length():
    async def feed(writer: asyncio.StreamWriter, reader: CountingReader) -> None:
        pass

    chunks, sizes = await body_read_by("0", feed)
    assert chunks == [] and sizes == [0]


async def test_read_request_body_large_content():
    from segproxy.https_proxy_handler import MAX_CHUNK_SIZE

    data = b"a" * 4096 + b"b" * 4096

    async def feed(writer: asyncio.StreamWriter, reader: CountingReader) -> None:
        writer.write(data)
        await writer.drain()

    chunks, sizes = await body_read_by("8192", feed)
    assert b"".join(chunks) == data
    assert sizes[0] == MAX_CHUNK_SIZE and all(0 < n <= MAX_CHUNK_SIZE for n in sizes)


async def test_read_request_body_client_disconnects():
    async def feed(writer: asyncio.StreamWriter, reader: CountingReader) -> None:
        writer.write(b"hello")  # then the connection closes: 15 of 20 bytes never come

    chunks, sizes = await body_read_by("20", feed)
    assert chunks == [b"hello"]
    assert len(sizes) == 2


def test_handler_not_served_by_a_proxy_says_so():
    handler = HTTPSForwardProxyHandler()
    handler.request = HTTPRequest()
    with pytest.raises(RuntimeError, match="not serving a request"):
        handler.write_response(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(RuntimeError, match="not serving a request"):
        asyncio.run(handler.forward_http_request())


# --------------------------------------------------------------------------------------
# test_https_forward_proxy_handler.py, over a real origin


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def proxy_client(server: ProxyServer, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(proxy=server.url, timeout=20, **kw)  # type: ignore[arg-type]


class TlsRecordingOrigin(RecordingOrigin):
    """RecordingOrigin over TLS, with a leaf from a test CA (`ca_path` to trust)."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.ca_path, cert, key = make_origin_certs(directory)
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl_context.load_cert_chain(cert, key)

    def https(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"


@pytest.fixture
def proxy_ca(tmp_path: Path) -> tuple[TLSStore, ssl.SSLContext]:
    """A TLSStore, and a client context that trusts its CA."""
    store = TLSStore.generate_ca("FR", "Ile-de-France", "Paris", "Test Org", "Test CA")
    return store, ssl.create_default_context(cadata=store.get_ca_pem().decode())


async def test_on_request_received_calls_forward_http_request():
    """Its default on_request_received forwards through `forward_http_request`, so a class
    overriding only that sees every request."""
    calls: list[str] = []

    class CountsForwards(HTTPSForwardProxyHandler):
        async def forward_http_request(self) -> None:
            calls.append(self.request.path)
            await super().forward_http_request()

    with RecordingOrigin() as origin:
        async with await start_proxy_server(CountsForwards, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.get(origin.url("/gen/10"))
                assert r.status_code == 200 and len(r.content) == 10
    assert calls == ["/gen/10"]
    assert [req.target for req in origin.requests] == ["/gen/10"]


class Forwards(HTTPSForwardProxyHandler):
    async def on_request_received(self) -> None:
        await super().on_request_received()


async def test_handle_http_request():
    """The request line and headers as `self.request` has them reach the origin."""
    with RecordingOrigin() as origin:
        async with await start_proxy_server(Forwards, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.get(origin.url("/test"), headers={"X-Test": "1"})
                assert r.status_code == 200
    (seen,) = origin.requests
    assert (seen.method, seen.target, seen.version) == ("GET", "/test", "HTTP/1.1")
    assert seen.header("Host") == origin.authority and seen.header("X-Test") == "1"


async def test_handle_https_request(tmp_path, proxy_ca):
    """An intercepted request goes to the origin over TLS (the origin speaks nothing else)."""
    store, client_ctx = proxy_ca
    with TlsRecordingOrigin(tmp_path) as origin:
        server = await start_proxy_server(
            Forwards, "127.0.0.1", 0, tls_store=store, upstream_ca=[str(origin.ca_path)]
        )
        async with server, proxy_client(server, verify=client_ctx) as client:
            r = await client.get(origin.https("/test"))
            assert r.status_code == 200 and r.json()["target"] == "/test"
    (seen,) = origin.requests
    assert (seen.method, seen.target) == ("GET", "/test")


async def test_error_hook_called_on_ssl_failure(tmp_path, proxy_ca):
    """An origin whose certificate does not verify: on_error hears of it, the request is
    not forwarded (there: aborted silently; here the client gets a 502)."""
    store, client_ctx = proxy_ca
    errors: list[Exception] = []
    reported = asyncio.Event()

    class LogsErrors(HTTPSForwardProxyHandler):
        async def on_error(self, error: Exception) -> None:
            errors.append(error)
            reported.set()

    with TlsRecordingOrigin(tmp_path) as origin:  # its CA is not given to the proxy
        server = await start_proxy_server(LogsErrors, "127.0.0.1", 0, tls_store=store)
        async with server, proxy_client(server, verify=client_ctx) as client:
            r = await client.get(origin.https("/secret"))
            assert r.status_code == 502
            await asyncio.wait_for(reported.wait(), 20)
    assert len(errors) == 1 and isinstance(errors[0], ProxyError)
    assert "certificate" in str(errors[0]).lower(), errors
    assert origin.requests == []


class ChunkWatcher(HTTPSForwardProxyHandler):
    """Notes the pieces on_response_chunk gets and when on_response_complete runs."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, bytes]] = []
        self.completed = asyncio.Event()

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        self.events.append(("chunk", chunk))
        return await super().on_response_chunk(chunk)

    async def on_response_complete(self) -> None:
        self.events.append(("complete", b""))
        self.completed.set()


async def watched(handler: ChunkWatcher, path: str) -> httpx.Response:
    with RecordingOrigin() as origin:
        async with await start_proxy_server(lambda: handler, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.get(origin.url(path))
            await asyncio.wait_for(handler.completed.wait(), 20)
    return r


async def test_on_response_chunk_called_for_content_length_response():
    handler = ChunkWatcher()
    r = await watched(handler, "/gen/300000")
    assert digest(r.content) == pattern_sha256(300000)
    pieces = [c for what, c in handler.events if what == "chunk"]
    assert digest(b"".join(pieces)) == pattern_sha256(300000)
    assert handler.events[-1] == ("complete", b"")
    assert [what for what, _ in handler.events].count("complete") == 1


async def test_chunked_response_only_calls_hook_for_data_chunks():
    handler = ChunkWatcher()
    r = await watched(handler, "/gen-chunked/250000")
    assert digest(r.content) == pattern_sha256(250000)
    pieces = [c for what, c in handler.events if what == "chunk"]
    # The origin's chunk framing never reaches the hook: the pieces are the data alone.
    assert digest(b"".join(pieces)) == pattern_sha256(250000)


async def test_on_response_chunk_can_modify_data():
    class Modifies(HTTPSForwardProxyHandler):
        async def on_response_chunk(self, chunk: bytes) -> bytes | None:
            return chunk.replace(b"Hello", b"Hi")

    with RecordingOrigin() as origin:
        async with await start_proxy_server(Modifies, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.post(origin.url("/echo"), content=b"Hello")
    assert r.content == b"Hi"


async def test_on_response_chunk_can_filter_chunks():
    class Filters(HTTPSForwardProxyHandler):
        async def on_response_chunk(self, chunk: bytes) -> bytes | None:
            return None if b"World" in chunk else chunk

    with RecordingOrigin() as origin:
        async with await start_proxy_server(Filters, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.post(origin.url("/echo"), content=b"HelloWorld")
                assert (r.status_code, r.content) == (200, b"")  # a valid, empty body
                r = await client.post(origin.url("/echo"), content=b"Hello")
                assert r.content == b"Hello"


async def test_on_response_complete_called_after_forwarding():
    handler = ChunkWatcher()
    await watched(handler, "/gen/5")
    assert handler.events == [("chunk", next(pattern_chunks(5))), ("complete", b"")]


# --------------------------------------------------------------------------------------
# read_response_body(), upstream_reader, upstream_writer


async def test_read_response_body_from_an_upstream_reader_the_script_set():
    """Its test: `response` with Content-Length 11 and a stream from the origin set by hand;
    here the stream is a loopback connection that also sends bytes past the body."""

    async def feed(writer: asyncio.StreamWriter, reader: CountingReader) -> None:
        writer.write(b"Hello")
        await writer.drain()
        await reader.read_done.wait()
        writer.write(b" World and what follows the body")
        await writer.drain()

    reader, server, writer = await loopback_reader(feed)
    try:
        handler = HTTPSForwardProxyHandler()
        handler.response = HTTPResponse()
        handler.response.headers = HTTPHeader(b"Content-Length: 11\r\n\r\n")
        handler.upstream_reader = reader
        assert [chunk async for chunk in handler.read_response_body()] == [b"Hello", b" World"]
        assert reader.sizes == [11, 6]
    finally:
        writer.close()
        server.close()

    # Without Content-Length: to the end of the stream, MAX_CHUNK_SIZE at a time.
    data = bytes(range(256)) * 40

    async def feed_all(writer: asyncio.StreamWriter, reader: CountingReader) -> None:
        writer.write(data)
        await writer.drain()

    reader, server, writer = await loopback_reader(feed_all)
    try:
        handler = HTTPSForwardProxyHandler()
        handler.response = HTTPResponse("HTTP/1.1", 200, "OK")
        handler.upstream_reader = reader
        chunks = [chunk async for chunk in handler.read_response_body()]
        assert b"".join(chunks) == data and max(map(len, chunks)) <= MAX_CHUNK_SIZE
    finally:
        writer.close()
        server.close()
    # Nothing set, no server: nothing to read, as there.
    assert [c async for c in HTTPSForwardProxyHandler().read_response_body()] == []


class OwnForwarding(HTTPSForwardProxyHandler):
    """asyncio-https-proxy style, driving the forwarding by hand: its own connection to the
    origin in upstream_reader / upstream_writer, the head parsed with HTTPResponse's parsers,
    the body streamed with read_response_body()."""

    async def on_request_received(self) -> None:
        r = self.request
        self.upstream_reader, self.upstream_writer = await asyncio.open_connection(r.host, r.port)
        head = f"{r.method} {r.path} {r.version}\r\n".encode() + r.headers.to_raw()
        self.upstream_writer.write(head)
        await self.upstream_writer.drain()
        status_line = await self.upstream_reader.readline()
        self.response = HTTPResponse()
        self.response.parse_status_line(status_line)
        self.response.parse_headers(await self.upstream_reader.readuntil(b"\r\n\r\n"))
        self.write_response(status_line + self.response.headers.to_raw())
        async for chunk in self.read_response_body():
            self.write_response(chunk)
        await self.flush_response()
        self.upstream_writer.close()


async def test_handler_forwarding_by_itself_reads_its_own_upstream():
    with RecordingOrigin() as origin:
        async with await start_proxy_server(OwnForwarding, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.get(origin.url("/gen/100000"))
    assert r.status_code == 200 and digest(r.content) == pattern_sha256(100000)
    assert [req.target for req in origin.requests] == ["/gen/100000"]


class BodyReader(HTTPSForwardProxyHandler):
    """Reads every response body in on_response_received, after changing the head."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[object, ...]] = []
        self.completed = asyncio.Event()

    async def on_response_received(self) -> None:
        self.response.headers.set("X-Body-Read", "yes")  # before the first read: sent
        h = hashlib.sha256()
        sizes = []
        async for piece in self.read_response_body():
            h.update(piece)
            sizes.append(len(piece))
        self.events.append(("read", self.request.path, sum(sizes), max(sizes, default=0)))
        self.events.append(("digest", h.hexdigest()))

    async def on_response_complete(self) -> None:
        self.events.append(("complete", self.request.path))
        self.completed.set()


@pytest.mark.parametrize("kind", ["gen", "gen-chunked", "gen-close"])
async def test_read_response_body_in_on_response_received(kind):
    """The body as the origin sent it (de-chunked), in pieces of at most MAX_CHUNK_SIZE, and
    the client still gets all of it, with the head as the hook left it."""
    n = 150_000
    handler = BodyReader()
    with RecordingOrigin() as origin:
        async with await start_proxy_server(lambda: handler, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.get(origin.url(f"/{kind}/{n}"))
            await asyncio.wait_for(handler.completed.wait(), 20)
    assert r.status_code == 200 and digest(r.content) == pattern_sha256(n)
    assert r.headers["x-body-read"] == "yes"
    assert handler.events == [
        ("read", f"/{kind}/{n}", n, MAX_CHUNK_SIZE),
        ("digest", pattern_sha256(n)),
        ("complete", f"/{kind}/{n}"),
    ]


async def test_read_response_body_over_keep_alive_and_without_body():
    handler = BodyReader()
    with RecordingOrigin() as origin:
        async with await start_proxy_server(lambda: handler, port=0) as server:
            limits = httpx.Limits(max_connections=1)
            async with proxy_client(server, limits=limits) as client:
                for path in ("/gen/5000", "/status/204", "/gen/0", "/gen-chunked/7000"):
                    handler.completed.clear()
                    r = await client.get(origin.url(path))
                    await asyncio.wait_for(handler.completed.wait(), 20)
                    n = int(path.rsplit("/", 1)[1]) if "gen" in path else 0
                    assert digest(r.content) == pattern_sha256(n), path
                r = await client.head(origin.url("/anything"))
                assert r.status_code == 200 and r.content == b""
    reads = [e for e in handler.events if e[0] == "read"]
    assert [(path, n) for _, path, n, _ in reads] == [
        ("/gen/5000", 5000),
        ("/status/204", 0),
        ("/gen/0", 0),
        ("/gen-chunked/7000", 7000),
        ("/anything", 0),  # HEAD: Content-Length 12345, no body
    ]
    assert all(largest <= MAX_CHUNK_SIZE for *_, largest in reads)
    assert len({req.conn for req in origin.requests}) == 1  # one connection to the origin


async def test_read_pieces_go_on_through_on_response_chunk():
    """What the hook reads is the origin's body; what the client gets went through
    on_response_chunk, which the rest of the body goes through too."""

    class ReadsAndUppercases(HTTPSForwardProxyHandler):
        read: bytes = b""

        async def on_response_received(self) -> None:
            ReadsAndUppercases.read = b"".join([p async for p in self.read_response_body()])

        async def on_response_chunk(self, chunk: bytes) -> bytes | None:
            return chunk.upper()

    body = b"some lower case text, " * 1000
    with RecordingOrigin() as origin:
        async with await start_proxy_server(ReadsAndUppercases, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.post(origin.url("/echo"), content=body)
    assert ReadsAndUppercases.read == body
    assert r.content == body.upper()


async def test_reading_part_of_the_body_sends_the_rest_on():
    firsts: list[bytes] = []

    class ReadsFirstPiece(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            async for piece in self.read_response_body():
                firsts.append(piece)
                break
            # upstream_reader is the same body: what was not read is still there.
            firsts.append(await self.upstream_reader.readexactly(10))

    n = 400_000
    with RecordingOrigin() as origin:
        async with await start_proxy_server(ReadsFirstPiece, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.get(origin.url(f"/gen/{n}"))
    assert digest(r.content) == pattern_sha256(n)
    first = len(firsts[0])
    assert 0 < first <= MAX_CHUNK_SIZE and firsts[0] + firsts[1] == r.content[: first + 10]


async def test_upstream_reader_reads_like_a_stream_reader():
    seen: list[bytes] = []

    class ReadsStream(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            seen.append(await self.upstream_reader.readexactly(3))
            seen.append(await self.upstream_reader.read())
            seen.append(await self.upstream_reader.read())  # at EOF

    with RecordingOrigin() as origin:
        async with await start_proxy_server(ReadsStream, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.post(origin.url("/echo"), content=b"abcdefgh")
    assert r.content == b"abcdefgh" and seen == [b"abc", b"defgh", b""]


class ReadsWhereItCannot(HTTPSForwardProxyHandler):
    """read_response_body() where the body is not there: a clear RuntimeError to on_error."""

    where = ""
    errors: list[str] = []
    reported = asyncio.Event()

    async def on_request_received(self) -> None:
        if self.where == "before":
            async for _ in self.read_response_body():
                pass
        await self.forward_http_request()
        if self.where == "after":
            async for _ in self.read_response_body():
                pass

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        if self.where == "chunk":
            async for _ in self.read_response_body():
                pass
        return chunk

    async def on_response_complete(self) -> None:
        if self.where == "complete":
            async for _ in self.read_response_body():
                pass

    async def on_error(self, error: Exception) -> None:
        ReadsWhereItCannot.errors.append(str(error))
        ReadsWhereItCannot.reported.set()


@pytest.mark.parametrize("where", ["before", "chunk", "complete", "after"])
async def test_read_response_body_elsewhere_raises(where):
    ReadsWhereItCannot.where = where
    ReadsWhereItCannot.errors = []
    ReadsWhereItCannot.reported = asyncio.Event()
    with RecordingOrigin() as origin:
        async with await start_proxy_server(ReadsWhereItCannot, port=0) as server:
            async with proxy_client(server) as client:
                try:
                    r = await client.get(origin.url("/gen/1000"))
                    status = r.status_code
                except httpx.RemoteProtocolError:  # cut while the body was going out
                    status = None
            await asyncio.wait_for(ReadsWhereItCannot.reported.wait(), 20)
    assert any("reads the body of the response in hand" in e for e in ReadsWhereItCannot.errors)
    if where == "before":
        assert status == 502 and origin.requests == []
    if where == "chunk":
        assert status != 200


async def body_of(handler: HTTPSForwardProxyHandler) -> bytes:
    """A helper outside the class: segproxy cannot see from the class that it reads."""
    return b"".join([piece async for piece in handler.read_response_body()])


async def test_reading_from_a_helper_needs_reads_response_body():
    errors: list[str] = []
    bodies: list[bytes] = []

    class ReadsViaHelper(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            bodies.append(await body_of(self))

        async def on_error(self, error: Exception) -> None:
            errors.append(str(error))

    class SaysItReads(ReadsViaHelper):
        reads_response_body = True

    with RecordingOrigin() as origin:
        async with await start_proxy_server(ReadsViaHelper, port=0) as server:
            async with proxy_client(server) as client:
                assert (await client.post(origin.url("/echo"), content=b"x")).status_code == 502
        assert len(errors) == 1 and "reads_response_body = True" in errors[0], errors
        async with await start_proxy_server(SaysItReads, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.post(origin.url("/echo"), content=b"helper body")
    assert r.content == b"helper body" and bodies == [b"helper body"]


def test_bodies_reach_python_only_for_classes_that_read_them():
    class Logs(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            pass

    class Reads(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            async for _ in self.read_response_body():
                pass

    class ReadsStream(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            await self.upstream_reader.read()

    class Declines(Reads):
        reads_response_body = False

    assert "response_chunk" not in overridden_hooks(Logs)
    assert "response_chunk" in overridden_hooks(Reads)
    assert "response_chunk" in overridden_hooks(ReadsStream)
    assert "response_chunk" not in overridden_hooks(Declines)
    assert not reads_response_body(HTTPSForwardProxyHandler)


async def test_upstream_writer_stands_for_the_engines_connection():
    notes: list[object] = []

    class LooksAtUpstream(HTTPSForwardProxyHandler):
        async def on_request_received(self) -> None:
            notes.append(("before", self.upstream_reader, self.upstream_writer))
            await self.forward_http_request()
            notes.append(("after", self.upstream_writer.is_closing()))

        async def on_response_received(self) -> None:
            w = self.upstream_writer
            notes.append(("during", w.is_closing(), w.get_extra_info("peername", "n/a")))
            with pytest.raises(RuntimeError, match="owns the connection"):
                w.write(b"more bytes for the origin")
            w.close()
            await w.wait_closed()

    with RecordingOrigin() as origin:
        async with await start_proxy_server(LooksAtUpstream, port=0) as server:
            async with proxy_client(server) as client:
                r = await client.get(origin.url("/gen/100"))
    assert r.status_code == 200 and len(r.content) == 100
    assert notes == [("before", None, None), ("during", False, "n/a"), ("after", True)]


# --------------------------------------------------------------------------------------
# test_server.py: raw clients on loopback


class MockProxyHandler(HTTPSProxyHandler):
    """Its test handler: no super().__init__(), notes each on_client_connected."""

    def __init__(self) -> None:
        self.connected_calls: list[bool] = []
        self.requests: list[HTTPRequest] = []
        self.seen = asyncio.Event()

    async def on_client_connected(self) -> None:
        self.connected_calls.append(True)
        self.requests.append(self.request)
        self.seen.set()


async def test_start_proxy_server(proxy_ca):
    store, _ = proxy_ca
    server = await start_proxy_server(
        handler_builder=lambda: MockProxyHandler(), host="127.0.0.1", port=0, tls_store=store
    )
    assert server is not None and server.is_serving()
    host, port = server.sockets[0].getsockname()
    assert host == "127.0.0.1" and port > 0
    for name in ("close", "wait_closed", "serve_forever", "start_serving", "is_serving"):
        assert callable(getattr(server, name))
    server.close()
    await server.wait_closed()
    assert not server.is_serving()


async def test_proxy_handles_get_request(proxy_ca):
    store, _ = proxy_ca
    handler = MockProxyHandler()
    server = await start_proxy_server(lambda: handler, "127.0.0.1", 0, tls_store=store)
    try:
        host, port = server.sockets[0].getsockname()
        _, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"GET http://example.com/test HTTP/1.1\r\nHost: example.com\r\n"
            b"User-Agent: test-client\r\n\r\n"
        )
        await writer.drain()
        await asyncio.wait_for(handler.seen.wait(), 20)
        assert len(handler.connected_calls) == 1 and len(handler.requests) == 1
        request = handler.requests[0]
        assert (request.method, request.host, request.version) == ("GET", "example.com", "HTTP/1.1")
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_proxy_handles_connect_request(proxy_ca):
    store, client_ctx = proxy_ca
    handler = MockProxyHandler()
    server = await start_proxy_server(lambda: handler, "127.0.0.1", 0, tls_store=store)
    try:
        host, port = server.sockets[0].getsockname()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 20)
        assert line == b"HTTP/1.1 200 Connection Established\r\n"
        assert await asyncio.wait_for(reader.readline(), 20) == b"\r\n"
        await writer.start_tls(client_ctx, server_hostname="example.com")
        writer.write(b"GET /secure HTTP/1.1\r\nHost: example.com\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(handler.seen.wait(), 20)
        assert len(handler.connected_calls) == 1 and len(handler.requests) == 1
        request = handler.requests[0]
        assert (request.method, request.path, request.scheme) == ("GET", "/secure", "https")
        assert (request.host, request.port, request.version) == ("example.com", 443, "HTTP/1.1")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_proxy_handles_multiple_connections(proxy_ca):
    store, _ = proxy_ca
    built: list[MockProxyHandler] = []

    def handler_builder() -> MockProxyHandler:
        handler = MockProxyHandler()
        built.append(handler)
        return handler

    server = await start_proxy_server(handler_builder, "127.0.0.1", 0, tls_store=store)
    try:
        host, port = server.sockets[0].getsockname()

        async def make_connection() -> None:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET http://example.com/test HTTP/1.1\r\nHost: example.com\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)  # answered: 502
            writer.close()
            await writer.wait_closed()

        await asyncio.gather(make_connection(), make_connection(), make_connection())
        # One handler a connection (the first was built at start, to learn the class).
        assert len(built) == 3
        for handler in built:
            assert len(handler.connected_calls) == 1 and len(handler.requests) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_proxy_handles_client_disconnect(proxy_ca):
    store, _ = proxy_ca
    handler = MockProxyHandler()
    server = await start_proxy_server(lambda: handler, "127.0.0.1", 0, tls_store=store)
    try:
        host, port = server.sockets[0].getsockname()
        _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()
        deadline = asyncio.get_running_loop().time() + 20
        while server.active_connections() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert server.active_connections() == 0
        assert handler.connected_calls == [] and handler.requests == []
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------------------
# test_tls_store.py, on the certificates the public API gives (not `_ca` / `_store`)


@pytest.fixture
def named_store() -> TLSStore:
    return TLSStore.generate_ca(
        country="FR",
        state="Ile-de-France",
        locality="Paris",
        organization="Asyncio HTTPS Proxy",
        common_name="Asyncio HTTPS Proxy CA",
    )


def test_get_ca_pem(named_store):
    ca_pem = named_store.get_ca_pem()
    assert isinstance(ca_pem, bytes)
    assert ca_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert ca_pem.endswith(b"-----END CERTIFICATE-----\n")
    assert x509.load_pem_x509_certificate(ca_pem).serial_number > 0


def test_ca_certificate_properties(named_store):
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate(named_store.get_ca_pem())
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= CERTIFICATE_VALIDITY_DAYS - 1
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    subject = {attr.oid: attr.value for attr in ca.subject}
    assert subject == {
        NameOID.COUNTRY_NAME: "FR",
        NameOID.STATE_OR_PROVINCE_NAME: "Ile-de-France",
        NameOID.LOCALITY_NAME: "Paris",
        NameOID.ORGANIZATION_NAME: "Asyncio HTTPS Proxy",
        NameOID.COMMON_NAME: "Asyncio HTTPS Proxy CA",
    }


async def served_certificate(store: TLSStore, domain: str) -> x509.Certificate:
    """The certificate a TLS server using `store.get_ssl_context(domain)` presents to a client
    that verifies it against the store's CA and the name `domain` (loopback)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=store.get_ssl_context(domain))
    client_ctx = ssl.create_default_context(cadata=store.get_ca_pem().decode())
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1",
            server.sockets[0].getsockname()[1],
            ssl=client_ctx,
            server_hostname=domain,
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der)
    finally:
        server.close()


@pytest.mark.parametrize(
    "domain",
    [
        "simple.com",
        "sub.domain.com",
        "multiple-dashes.example.com",
        "numbers123.test.org",
        "localhost",
    ],
)
async def test_various_domain_names(named_store, domain):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert = await served_certificate(named_store, domain)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert domain in san.get_values_for_type(x509.DNSName)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    ca = x509.load_pem_x509_certificate(named_store.get_ca_pem())
    assert cert.issuer == ca.subject
    # Signed by the CA: its key verifies the signature.
    cert.verify_directly_issued_by(ca)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.key_identifier
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


async def test_certificates_per_domain(named_store):
    """One certificate per domain, reused; different domains, different serials."""
    now = datetime.datetime.now(datetime.UTC)
    first = await served_certificate(named_store, "reuse.example.com")
    again = await served_certificate(named_store, "reuse.example.com")
    other = await served_certificate(named_store, "other.example.com")
    assert first == again and first != other
    ca = x509.load_pem_x509_certificate(named_store.get_ca_pem())
    assert len({first.serial_number, other.serial_number, ca.serial_number}) == 3
    for cert in (first, other):
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert days == CERTIFICATE_VALIDITY_DAYS


async def test_hook_failing_after_reading_cuts_the_response():
    errors: list[str] = []
    reported = asyncio.Event()

    class ReadsThenFails(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            async for _ in self.read_response_body():
                raise ValueError("seen enough")

        async def on_error(self, error: Exception) -> None:
            errors.append(str(error))
            reported.set()

    with RecordingOrigin() as origin:
        async with await start_proxy_server(ReadsThenFails, port=0) as server:
            async with proxy_client(server) as client:
                # The head went out with the first read; the body is cut short.
                with pytest.raises(httpx.RemoteProtocolError):
                    await client.get(origin.url("/gen/500000"))
                await asyncio.wait_for(reported.wait(), 20)
                # The proxy carries on.
                async with proxy_client(server) as other:
                    assert (await other.get(origin.url("/status/204"))).status_code == 204
    assert errors[0] == "seen enough", errors


async def test_forward_http_request_does_not_raise_when_forwarding_fails():
    """Where asyncio-https-proxy raises ConnectionRefusedError out of forward_http_request,
    segproxy returns; on_response_complete, then on_error, tell of the failure."""
    events: list[str] = []
    done = asyncio.Event()

    class Forwards(HTTPSForwardProxyHandler):
        async def on_request_received(self) -> None:
            try:
                await self.forward_http_request()
                events.append("returned")
            except Exception as exc:  # pragma: no cover - what would be a failure here
                events.append(f"raised {exc!r}")

        async def on_response_complete(self) -> None:
            events.append("complete")

        async def on_error(self, error: Exception) -> None:
            events.append(type(error).__name__)
            done.set()

    async with await start_proxy_server(Forwards, port=0) as server:
        async with proxy_client(server) as client:
            r = await client.get(f"http://127.0.0.1:{closed_port()}/refused")
        assert r.status_code == 502
        await asyncio.wait_for(done.wait(), 20)
    assert sorted(events) == sorted(["complete", "ProxyError", "returned"]), events
    assert events.index("complete") < events.index("ProxyError")
