"""Engine behaviour seen from outside, on loopback with real sockets: client
``Connection: close`` and HTTP/1.0 clients, the tunnel idle timeout, pool idle expiry
(when an option exposes it), and repeated ``--rules-file`` / ``--validate-rules``.

Assertions are on what clients and origins saw; timings have wide margins and nothing
asserts speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from support import Segproxy, wait_for
from support.clients import Conn, get_via
from support.loopback import TcpEchoOrigin, proxy_connect
from support.origins import pattern_sha256

pytestmark = pytest.mark.timeout(60)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segproxy", *args], capture_output=True, text=True, timeout=timeout
    )


def tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in (value or "").split(",") if t.strip()}


# --------------------------------------------------------------------------------------
# Connection: close and HTTP/1.0 clients


async def test_client_connection_close_is_honoured(proxy, origin):
    with Conn(proxy.port) as c:
        c.send(
            f"GET {origin.url('/gen/5000')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body_sha256 == pattern_sha256(5000)
        assert "close" in tokens(resp.header("connection")), resp.raw_head
        # The proxy closes the client connection once the response is complete.
        assert c.at_eof(timeout=5), (
            "the proxy kept the client connection open after Connection: close"
        )

    [req] = origin.requests
    assert (req.method, req.target, req.version) == ("GET", "/gen/5000", "HTTP/1.1")
    assert req.header("host") == origin.authority
    # Connection is hop-by-hop: only a connection option of the proxy's own may reach the
    # origin, never a field the client named or a proxy-only field.
    assert tokens(req.header("connection")) <= {"close", "keep-alive"}, req.headers
    assert "proxy-connection" not in req.header_names()

    # The origin connection is either closed (the proxy passed "close" on) or kept and
    # reused: a later request through a new client connection is served either way, and
    # only reuses the origin connection when the proxy did not ask the origin to close.
    assert get_via(proxy.port, origin.url("/after")).status == 200
    assert [r.target for r in origin.requests] == ["/gen/5000", "/after"]
    if "close" in tokens(req.header("connection")):
        assert origin.requests[1].conn != req.conn
    else:
        assert origin.requests[1].conn == req.conn, "an origin connection left open was not reused"


async def test_connection_close_on_a_later_request_of_a_keep_alive_connection(proxy, origin):
    with Conn(proxy.port) as c:
        c.send(f"GET {origin.url('/first')} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode())
        first = c.read_response()
        assert first.status == 200 and json.loads(first.body)["target"] == "/first"
        assert "close" not in tokens(first.header("connection"))
        c.send(
            f"GET {origin.url('/last')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        last = c.read_response()
        assert last.status == 200 and json.loads(last.body)["target"] == "/last"
        assert "close" in tokens(last.header("connection"))
        assert c.at_eof(timeout=5)
    assert [r.target for r in origin.requests] == ["/first", "/last"]


async def test_http10_client_gets_a_response_and_the_connection_closed(proxy, origin):
    with Conn(proxy.port) as c:
        # No Host header: HTTP/1.0 does not require one; the absolute URL names the origin.
        c.send(f"GET {origin.url('/ten?x=1')} HTTP/1.0\r\n\r\n".encode())
        resp = c.read_response()
        assert resp.status == 200
        seen = json.loads(resp.body)
        assert seen["target"] == "/ten?x=1"
        assert resp.header("transfer-encoding") is None
        assert c.at_eof(timeout=5), (
            "an HTTP/1.0 client without keep-alive must see the connection closed"
        )
    # The origin got a well-formed request naming its authority.
    [req] = origin.requests
    assert req.target == "/ten?x=1"
    assert req.header("host") == origin.authority

    # A body the origin sends chunked reaches an HTTP/1.0 client intact, ended by the close.
    with Conn(proxy.port) as c:
        c.send(f"GET {origin.url('/gen-chunked/70000')} HTTP/1.0\r\n\r\n".encode())
        resp = c.read_response()
        assert resp.status == 200
        assert resp.header("transfer-encoding") is None
        assert resp.body_len == 70000 and resp.body_sha256 == pattern_sha256(70000)
        assert c.at_eof(timeout=5)


# --------------------------------------------------------------------------------------
# CONNECT tunnel idle timeout


async def test_idle_connect_tunnel_is_closed(make_proxy):
    proxy = await make_proxy(idle_timeout=1)
    with TcpEchoOrigin() as echo:
        s, answer = proxy_connect(("127.0.0.1", proxy.port), f"127.0.0.1:{echo.port}")
        with s:
            assert answer.status == 200
            # A tunnel in use stays open past the idle timeout: traffic every 0.25 s for ~2.5 s.
            for i in range(10):
                s.sendall(b"tick %d\n" % i)
                expected = b"tick %d\n" % i
                got = b""
                while len(got) < len(expected):
                    piece = s.recv(64)
                    assert piece, f"tunnel closed while in use (after {i} ticks)"
                    got += piece
                assert got == expected
                time.sleep(0.25)
            # Then, left idle, it is closed within a few seconds.
            s.settimeout(10)
            try:
                rest = s.recv(64)
            except ConnectionResetError:
                rest = b""
            except TimeoutError:
                pytest.fail("idle tunnel still open 10 s after idle_timeout=1")
            assert rest == b""
        # The proxy closed the origin's side too.
        assert echo.recordings[0].done.wait(5), "origin side of the idle tunnel still open"
        assert echo.recordings[0].data == b"".join(b"tick %d\n" % i for i in range(10))


# --------------------------------------------------------------------------------------
# Pool idle expiry through the Python API


async def test_pool_idle_expiry_through_the_python_api(make_proxy, origin):
    proxy = await make_proxy(pool_idle_timeout=0.3)
    assert get_via(proxy.port, origin.url("/one")).status == 200
    assert wait_for(lambda: origin.call(lambda: len(origin._writers)) == 0, timeout=15)
    assert get_via(proxy.port, origin.url("/two")).status == 200
    assert origin.connections == 2


# --------------------------------------------------------------------------------------
# Repeated --rules-file


def two_rule_files(tmp_path):
    one = tmp_path / "one.rules"
    one.write_text(
        "# file one\n127.0.0.1=direct,action=block,reason=blocked by file one,path_prefix=/one\n"
    )
    two = tmp_path / "two.rules"
    two.write_text(
        "\n"
        "127.0.0.1=direct,action=block,reason=blocked by file two,path_prefix=/two\n"
        "late.test=segment_upstream,strategy=fixed,chunk=64\n"
    )
    return one, two


def test_repeated_rules_file_rules_from_both_apply(tmp_path, origin):
    one, two = two_rule_files(tmp_path)
    with Segproxy(
        ["--rules-file", str(one), "--rules-file", str(two)], with_access_log=True
    ) as proxy:
        r1 = get_via(proxy.port, origin.url("/one/x"))
        assert r1.status == 403 and b"blocked by file one" in r1.body, r1
        r2 = get_via(proxy.port, origin.url("/two/y"))
        assert r2.status == 403 and b"blocked by file two" in r2.body, r2
        r3 = get_via(proxy.port, origin.url("/three"))
        assert r3.status == 200 and json.loads(r3.body)["target"] == "/three"
        assert [r.target for r in origin.requests] == ["/three"]

        assert wait_for(lambda: proxy.access_log.read_text().count("\n") >= 3, timeout=10)
        lines = proxy.access_log.read_text().splitlines()
        blocked = [line for line in lines if " status=403 " in line]
        assert any(f"rule={one}:2" in line and "/one/x" in line for line in blocked), lines
        assert any(f"rule={two}:2" in line and "/two/y" in line for line in blocked), lines


def test_validate_rules_lists_rules_of_both_files_with_file_and_line(tmp_path):
    one, two = two_rule_files(tmp_path)
    out = run_cli("--rules-file", str(one), "--rules-file", str(two), "--validate-rules")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Default policy: "), out.stdout
    numbered = lines[2:]
    assert len(numbered) == 3, out.stdout
    assert numbered[0].startswith("01. host=127.0.0.1") and f"source={one}:2" in numbered[0], (
        numbered
    )
    assert "reason=blocked by file one" in numbered[0]
    assert numbered[1].startswith("02. host=127.0.0.1") and f"source={two}:2" in numbered[1], (
        numbered
    )
    assert "reason=blocked by file two" in numbered[1]
    assert numbered[2].startswith("03. host=late.test") and f"source={two}:3" in numbered[2], (
        numbered
    )
    assert "strategy=fixed chunk=64" in numbered[2]


def test_validate_rules_bad_line_in_second_file_names_that_file_and_line(tmp_path):
    one, _ = two_rule_files(tmp_path)
    bad = tmp_path / "bad.rules"
    bad.write_text(
        "fine.test=direct\n# a comment\nbroken.test=segment_upstream,strategy=fixed,chunk=0\n"
    )
    out = run_cli("--rules-file", str(one), "--rules-file", str(bad), "--validate-rules")
    assert out.returncode != 0, out.stdout
    assert f"{bad}:3" in out.stderr, out.stderr
    assert "chunk" in out.stderr, out.stderr
    assert f"{one}:" not in out.stderr, out.stderr  # the good file is not blamed
    assert "Traceback" not in out.stderr
    assert "default:" not in out.stdout  # nothing is listed when a file is bad
