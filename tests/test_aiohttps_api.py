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
import ssl

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
    TLSStore,
    start_proxy_server,
)
from segproxy.tls_store import CERTIFICATE_VALIDITY_DAYS

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
