"""Bad input and failing destinations get one exact, clear HTTP error, and the server
keeps serving afterwards."""

from __future__ import annotations

import json
import time

import pytest
from support import wait_for
from support.clients import Conn, get_via
from support.origins import ScriptedOrigin, blackhole_port, full_backlog_port, refused_port

pytestmark = pytest.mark.timeout(60)


def still_serves(proxy, origin) -> None:
    r = get_via(proxy.port, origin.url("/alive"))
    assert r.status == 200 and json.loads(r.body)["target"] == "/alive"


def one_line_reason(resp) -> str:
    text = resp.body.decode()
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    assert resp.header(
        "content-type",
    ).startswith("text/plain")
    return text.strip()


def refused_with(port: int, raw: bytes, status: int, reason: str) -> str:
    """Sends ``raw``; expects exactly ``status reason``, then the connection closed."""
    with Conn(port) as c:
        c.send(raw)
        r = c.read_response()
        assert (r.version, r.status, r.reason) == ("HTTP/1.1", status, reason), r.raw_head
        assert c.at_eof(), "connection left open after a framing error"
    return one_line_reason(r)


# --- malformed requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/9.9\r\n\r\n",
        b"GET http://127.0.0.1/\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"G\x00T http://127.0.0.1/ HTTP/1.1\r\n\r\n",
    ],
    ids=["garbage", "bad-version", "no-version", "header-without-colon", "nul-in-method"],
)
async def test_malformed_request_gets_400(proxy, origin, raw):
    reason = refused_with(proxy.port, raw, 400, "Bad Request")
    assert reason.startswith("segproxy: ")
    assert origin.connections == 0
    still_serves(proxy, origin)


@pytest.mark.parametrize("fields", [70, 1024], ids=["70KiB", "1MiB"])
async def test_oversized_header_section_gets_431(proxy, origin, fields):
    raw = (
        f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(fields))
        + b"\r\n"
    )
    reason = refused_with(proxy.port, raw, 431, "Request Header Fields Too Large")
    assert "header section larger than" in reason
    assert origin.connections == 0
    still_serves(proxy, origin)


async def test_too_many_header_fields_gets_431(proxy, origin):
    raw = (
        f"GET {origin.url('/')} HTTP/1.1\r\n".encode()
        + b"".join(b"X-%d: 1\r\n" % i for i in range(300))
        + b"\r\n"
    )
    refused_with(proxy.port, raw, 431, "Request Header Fields Too Large")
    still_serves(proxy, origin)


async def test_origin_form_request_is_not_a_proxy_request(proxy, origin):
    raw = f"GET / HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode()
    with Conn(proxy.port) as c:
        c.send(raw)
        r = c.read_response()
    assert (r.status, r.reason) == (400, "Bad Request")
    assert "not a proxy request" in one_line_reason(r)
    assert origin.connections == 0
    still_serves(proxy, origin)


@pytest.mark.parametrize(
    "fields,why",
    [
        (
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "both Transfer-Encoding and Content-Length",
        ),
        ("Content-Length: 5\r\nContent-Length: 6\r\n", "conflicting Content-Length"),
        ("Content-Length: 5, 6\r\n", "conflicting Content-Length"),
        ("Content-Length: -1\r\n", "invalid Content-Length"),
        ("Transfer-Encoding: gzip\r\n", "must end in chunked"),
    ],
    ids=["cl+te", "two-cl", "cl-list", "negative-cl", "te-not-chunked"],
)
async def test_ambiguous_body_framing_gets_400(proxy, origin, fields, why):
    raw = f"POST {origin.url('/smuggle')} HTTP/1.1\r\nHost: x\r\n{fields}\r\nhello".encode()
    reason = refused_with(proxy.port, raw, 400, "Bad Request")
    assert why in reason
    assert origin.connections == 0  # nothing reached the origin
    still_serves(proxy, origin)


async def test_https_url_in_plain_request_gets_400(proxy, origin):
    with Conn(proxy.port) as c:
        c.send(f"GET https://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = c.read_response()
    assert r.status == 400 and "CONNECT" in one_line_reason(r)
    still_serves(proxy, origin)


@pytest.mark.parametrize("target", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "[::1"])
async def test_bad_connect_target_gets_400(proxy, origin, target):
    reason = refused_with(
        proxy.port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode(), 400, "Bad Request"
    )
    assert "bad CONNECT target" in reason
    still_serves(proxy, origin)


# --- destinations that cannot be reached or do not answer --------------------------------------


async def test_unresolvable_host_gets_502_naming_it(proxy, origin):
    r = get_via(proxy.port, "http://nosuch-host.invalid/x")
    assert (r.status, r.reason) == (502, "Bad Gateway")
    assert one_line_reason(r).startswith("segproxy: cannot resolve nosuch-host.invalid")
    with Conn(proxy.port) as c:
        c.send(b"CONNECT nosuch-host.invalid:443 HTTP/1.1\r\n\r\n")
        r = c.read_response()
    assert r.status == 502 and "nosuch-host.invalid" in one_line_reason(r)
    recs = proxy.access_records()
    assert [x["status"] for x in recs] == [502, 502]
    assert all("nosuch-host.invalid" in (x["error"] or "") for x in recs)
    still_serves(proxy, origin)


async def test_refused_port_gets_502_naming_destination(proxy, origin):
    port = refused_port()
    with Conn(proxy.port) as c:
        c.send(f"GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = c.read_response()
        assert r.status == 502
        assert one_line_reason(r).startswith(f"segproxy: cannot connect to 127.0.0.1:{port}")
        # The request was complete, so the client connection carries on.
        c.send(f"GET {origin.url('/same-conn')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert json.loads(c.read_response().body)["target"] == "/same-conn"
    with Conn(proxy.port) as c:
        c.send(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        r = c.read_response()
        assert r.status == 502 and f"127.0.0.1:{port}" in one_line_reason(r)
    still_serves(proxy, origin)


async def test_connect_timeout_gets_502_naming_destination(make_proxy, origin):
    proxy = await make_proxy(connect_timeout=1.0)
    lsock, fillers, port = full_backlog_port()
    try:
        t0 = time.monotonic()
        r = get_via(proxy.port, f"http://127.0.0.1:{port}/slow-connect")
        elapsed = time.monotonic() - t0
        assert r.status == 502, r
        assert one_line_reason(r) == f"segproxy: timed out connecting to 127.0.0.1:{port}"
        assert 0.9 <= elapsed < 10, elapsed
    finally:
        for c in fillers:
            c.close()
        lsock.close()
    still_serves(proxy, origin)


async def test_silent_origin_gets_504_after_response_timeout(make_proxy, origin):
    proxy = await make_proxy(response_timeout=1.0)
    with Conn(proxy.port) as c:
        t0 = time.monotonic()
        c.send(f"GET {origin.url('/never')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = c.read_response()
        elapsed = time.monotonic() - t0
        assert (r.status, r.reason) == (504, "Gateway Timeout")
        assert f"no response from {origin.authority}" in one_line_reason(r)
        assert 0.9 <= elapsed < 5, elapsed
        c.send(f"GET {origin.url('/after-504')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert json.loads(c.read_response().body)["target"] == "/after-504"
    # An origin whose listener never even accepts.
    lsock, port = blackhole_port()
    try:
        r = get_via(proxy.port, f"http://127.0.0.1:{port}/")
        assert r.status == 504
    finally:
        lsock.close()
    still_serves(proxy, origin)


@pytest.mark.parametrize(
    "reply,why",
    [
        (b"", "closed the connection without a response"),
        (b"NOT HTTP AT ALL\r\n\r\n", "bad response from"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
            "bad response from",
        ),
    ],
    ids=["closed", "garbage", "conflicting-length"],
)
async def test_broken_origin_response_gets_502(proxy, origin, reply, why):
    with ScriptedOrigin(reply) as bad:
        r = get_via(proxy.port, bad.url("/"))
        assert r.status == 502
        assert why in one_line_reason(r) and bad.authority in one_line_reason(r)
    still_serves(proxy, origin)


# --- slow clients and limits -------------------------------------------------------------------


async def test_header_trickle_is_dropped_after_header_timeout(make_proxy, origin):
    proxy = await make_proxy(header_timeout=1.0, idle_timeout=30)
    with Conn(proxy.port) as c:
        t0 = time.monotonic()
        c.send(f"GET {origin.url('/')} HTTP/1.1\r\n".encode())
        closed_at = None
        for _ in range(100):  # one byte every 0.1 s, never finishing the head
            try:
                c.send(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            c.sock.settimeout(0.01)
            try:
                data = c.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            c.buf += data
            closed_at = time.monotonic() - t0
            break
        assert closed_at is not None, "proxy kept a trickling client past its header timeout"
        assert 0.9 <= closed_at < 4, closed_at
        assert c.buf == b"" or c.buf.startswith(b"HTTP/1.1 408 "), c.buf
    assert origin.connections == 0
    still_serves(proxy, origin)


async def test_idle_client_connection_is_closed_after_idle_timeout(make_proxy, origin):
    proxy = await make_proxy(idle_timeout=1.0)
    with Conn(proxy.port) as c:
        c.send(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert c.read_response().status == 200
        t0 = time.monotonic()
        assert c.at_eof(timeout=5)
        assert 0.8 <= time.monotonic() - t0 < 4


async def test_max_connections_answers_503_and_recovers(make_proxy, origin):
    proxy = await make_proxy(max_connections=2)
    held = [Conn(proxy.port), Conn(proxy.port)]
    for c in held:  # make sure both are accepted and being served
        c.send(f"GET {origin.url('/held')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert c.read_response().status == 200
    with Conn(proxy.port) as extra:
        extra.send(f"GET {origin.url('/extra')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = extra.read_response()
        assert (r.status, r.reason) == (503, "Service Unavailable")
        assert "too many connections (limit 2)" in one_line_reason(r)
        assert extra.at_eof()
    held.pop().close()
    assert wait_for(lambda: proxy.active_connections() <= 1, timeout=5)
    still_serves(proxy, origin)
    for c in held:
        c.close()
    assert [r.target for r in origin.requests] == ["/held", "/held", "/alive"]
