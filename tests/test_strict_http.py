"""Strict HTTP/1.1 (RFC 9112, RFC 9110): every request head or body a server must reject is
answered 400 naming the rule, the connection is closed, and the origin receives nothing; a
malformed or ambiguous origin response becomes a 502 and never reaches the client.

Raw sockets against the proxy, real origins on loopback that record what they receive."""

from __future__ import annotations

import json
import ssl

import pytest
from support.clients import Conn, get_via
from support.origins import RecordingOrigin, ScriptedOrigin

pytestmark = pytest.mark.timeout(60)


def refused(port: int, raw: bytes, status: int = 400) -> str:
    """Sends ``raw``; expects one ``status`` answer with a one-line reason, then EOF."""
    with Conn(port) as c:
        c.send(raw)
        r = c.read_response()
        assert r.status == status, r.raw_head
        assert c.at_eof(), "connection left open after a request that must be rejected"
    text = r.body.decode()
    assert text.startswith("segproxy: ") and text.count("\n") == 1, repr(text)
    return text.strip()


def still_serves(proxy, origin) -> None:
    r = get_via(proxy.port, origin.url("/alive"))
    assert r.status == 200 and json.loads(r.body)["target"] == "/alive"


# (head fields after the request line, body, words the answer must contain)
HEADS = {
    "no-host": (b"Accept: */*\r\n", b"", "without a Host header (RFC 9112 section 3.2)"),
    "two-hosts": (
        b"Host: a\r\nHost: b\r\n",
        b"",
        "2 Host headers in one request (RFC 9112 section 3.2)",
    ),
    "cl-te": (
        b"Host: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"0\r\n\r\n",
        "both Transfer-Encoding and Content-Length are present (RFC 9112 section 6.1)",
    ),
    "te-cl": (
        b"Host: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"0\r\n\r\n",
        "both Transfer-Encoding and Content-Length are present (RFC 9112 section 6.1)",
    ),
    "two-cl": (
        b"Host: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n",
        b"hello",
        "conflicting Content-Length values (RFC 9112 section 6.3)",
    ),
    "cl-list": (
        b"Host: a\r\nContent-Length: 5, 6\r\n",
        b"hello",
        "conflicting Content-Length values",
    ),
    "cl-invalid": (b"Host: a\r\nContent-Length: 0x5\r\n", b"hello", "invalid Content-Length"),
    "cl-negative": (b"Host: a\r\nContent-Length: -5\r\n", b"hello", "invalid Content-Length"),
    "te-not-chunked-last": (
        b"Host: a\r\nTransfer-Encoding: chunked, gzip\r\n",
        b"0\r\n\r\n",
        "must end in chunked (RFC 9112 section 6.1)",
    ),
    "te-identity": (b"Host: a\r\nTransfer-Encoding: identity\r\n", b"hello", "must end in chunked"),
    "host-with-space": (b"Host: a b\r\n", b"", 'invalid Host header "a b" (RFC 9112 section 3.2)'),
    "host-with-userinfo": (b"Host: user@a\r\n", b"", "invalid Host header"),
    "obs-fold": (
        b"Host: a\r\nX-A: 1\r\n b\r\n",
        b"",
        "obs-fold: a header line starts with whitespace (RFC 9112 section 5.2)",
    ),
    "obs-fold-tab": (b"Host: a\r\nX-A: 1\r\n\tb\r\n", b"", "obs-fold"),
    "space-before-colon": (
        b"Host: a\r\nContent-Length : 5\r\n",
        b"hello",
        'whitespace between the field name "Content-Length" and the colon (RFC 9112 section 5.1)',
    ),
    "tab-before-colon": (b"Host\t: a\r\n", b"", "RFC 9112 section 5.1"),
    "bare-cr-in-value": (b"Host: a\r\nX-A: 1\rX-B: 2\r\n", b"", "bare CR at offset"),
    "bare-cr-line-end": (b"Host: a\rX-B: 2\r\n", b"", "bare CR"),
    "nul-in-value": (b"Host: a\r\nX-A: a\x00b\r\n", b"", "NUL byte"),
    "bad-field-name": (
        b"Host: a\r\nX@A: 1\r\n",
        b"",
        'the field name "X@A" is not a token (RFC 9110 section 5.1)',
    ),
    "empty-field-name": (b"Host: a\r\n: 1\r\n", b"", "is not a token"),
}


@pytest.mark.parametrize("case", HEADS, ids=list(HEADS))
async def test_bad_request_head_gets_400_and_never_reaches_the_origin(proxy, origin, case):
    fields, body, why = HEADS[case]
    raw = f"POST {origin.url('/strict')} HTTP/1.1\r\n".encode() + fields + b"\r\n" + body
    reason = refused(proxy.port, raw)
    assert why in reason, reason
    assert origin.connections == 0 and origin.requests == []
    still_serves(proxy, origin)


@pytest.mark.parametrize(
    "request_line,why",
    [
        (b"G(T", 'the method "G(T" is not a token (RFC 9110 section 9.1)'),
        (b"GET ", "invalid request head"),  # two spaces before the target (RFC 9112 section 3)
        (b"GE\x7fT", "is not a token"),
        (b"G\x00T", "NUL byte"),
    ],
    ids=["paren", "double-space", "del", "nul"],
)
async def test_invalid_method_gets_400(proxy, origin, request_line, why):
    raw = request_line + f" {origin.url('/')} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    assert why in refused(proxy.port, raw)
    assert origin.connections == 0
    still_serves(proxy, origin)


async def test_http10_without_host_is_still_served(proxy, origin):
    with Conn(proxy.port) as c:
        c.send(f"GET {origin.url('/old')} HTTP/1.0\r\n\r\n".encode())
        r = c.read_response()
    assert r.status == 200
    assert [q.target for q in origin.requests] == ["/old"]


CHUNKED = {
    "non-hex-size": b"zz\r\nhello\r\n0\r\n\r\n",
    "plus-sign": b"+5\r\nhello\r\n0\r\n\r\n",
    "0x-prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "overflow": b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n",
    "huge": b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "bare-cr-in-extension": b"5;a=b\rc\r\nhello\r\n0\r\n\r\n",
    "bare-lf-after-extension": b"5;a=b\nhello\r\n0\r\n\r\n",
    "bare-lf-after-size": b"5\nhello\r\n0\r\n\r\n",
    "data-not-followed-by-crlf": b"5\r\nhelloXX0\r\n\r\n",
}


@pytest.mark.parametrize("case", CHUNKED, ids=list(CHUNKED))
async def test_bad_chunked_request_body_gets_400_and_nothing_is_forwarded(proxy, case):
    """The body is sent with its head in one write and the first chunk is already bad: the
    proxy refuses before the origin has seen a byte of this request."""
    with RecordingOrigin() as origin:
        raw = (
            f"POST {origin.url('/chunked')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode() + CHUNKED[case]
        reason = refused(proxy.port, raw)
        assert "RFC 9112 section 7.1" in reason, reason
        # The origin may have been connected to (the head goes first, the body streams), but
        # it never received a complete request.
        assert origin.requests == []


@pytest.mark.parametrize(
    "reply,why",
    [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "conflicting Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "both Transfer-Encoding and Content-Length",
        ),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "bad response"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n", "obs-fold"),
        (b"HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 0\r\n\r\n", "bare CR"),
    ],
    ids=["two-cl", "cl+te", "bad-status-line", "obs-fold", "bare-cr"],
)
async def test_malformed_origin_response_gets_502(proxy, reply, why):
    with ScriptedOrigin(reply) as bad:
        with Conn(proxy.port) as c:
            c.send(f"GET {bad.url('/')} HTTP/1.1\r\nHost: {bad.authority}\r\n\r\n".encode())
            r = c.read_response()
        assert r.status == 502, r.raw_head
        assert b"hello" not in r.body
        assert why in r.body.decode(), r.body
        assert len(bad.heads) == 1


class TlsRecordingOrigin(RecordingOrigin):
    """The recording origin over TLS, with a leaf for localhost signed by a test CA
    (``cert_path``, what the proxy is told to trust)."""

    def __init__(self, directory) -> None:
        super().__init__()
        from support.certs import make_origin_certs

        self.cert_path, leaf_path, key_path = make_origin_certs(directory)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(leaf_path, key_path)
        self.ssl_context = ctx


@pytest.mark.parametrize(
    "case", ["no-host", "two-hosts", "cl-te", "obs-fold", "space-before-colon"]
)
def test_same_checks_inside_interception(tmp_path, case):
    """The inner HTTP/1.1 loop of an intercepted CONNECT refuses the same heads."""
    pytest.importorskip("cryptography")
    import segproxy
    from support.inprocess import ProxyThread
    from support.tls_clients import connect_tunnel, get, trusting_context

    segproxy.load_or_create_ca(tmp_path / "ca")
    store = segproxy.TLSStore.load_ca_from_disk(
        tmp_path / "ca" / "ca-key.pem", tmp_path / "ca" / "ca-cert.pem"
    )
    with (
        TlsRecordingOrigin(tmp_path) as origin,
        ProxyThread(tls_store=store, upstream_ca=[origin.cert_path]) as p,
    ):
        ctx = trusting_context(tmp_path / "ca" / "ca-cert.pem")
        fields, body, why = HEADS[case]
        if case == "no-host":
            why = "without a Host header"
        with ctx.wrap_socket(
            connect_tunnel(p.port, f"localhost:{origin.port}"), server_hostname="localhost"
        ) as tls:
            tls.sendall(b"POST /strict HTTP/1.1\r\n" + fields + b"\r\n" + body)
            f = tls.makefile("rb")
            status_line = f.readline()
            assert status_line.startswith(b"HTTP/1.1 400 "), status_line
            rest = f.read()  # up to EOF: the proxy closes the connection
        assert why.encode() in rest, rest
        assert origin.requests == []
        # A well-formed request through the same interception is forwarded.
        with ctx.wrap_socket(
            connect_tunnel(p.port, f"localhost:{origin.port}"), server_hostname="localhost"
        ) as tls:
            status, _, _ = get(tls, "localhost", "/fine")
        assert status == 200
        assert [r.target for r in origin.requests] == ["/fine"]
