"""Plain HTTP forwarding through segproxy, with real clients (curl, httpx, raw sockets)
and origins that record what they received (tests/support/origins.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time

import httpx
import pytest
from support import Segproxy, wait_for
from support.clients import Conn, curl, get_via, request
from support.origins import MIB, RecordingOrigin, ScriptedOrigin, pattern_chunks, pattern_sha256

pytestmark = pytest.mark.timeout(60)


def records(server, expected: int, kind: str | None = None) -> list[dict]:
    """The access records (of `kind`, if given) once `expected` exist, waiting (bounded): a
    record is written just after the client got its response."""

    def found() -> list[dict]:
        return [r for r in server.access_records() if kind is None or r["kind"] == kind]

    wait_for(lambda: len(found()) >= expected)
    return found()


def conn_ids(server, expected: int = 0) -> list[str]:
    """Connection part of each forward record's id ("7.3" -> "7"), once `expected` exist."""
    return [r["id"].split(".")[0] for r in records(server, expected, "forward")]


# --- GET and POST with real clients -------------------------------------------------------


async def test_get_with_curl(proxy, origin):
    r = await curl("-x", proxy.url, origin.url("/a/b?x=1&y=two%20words&z"))
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["method"] == "GET"
    assert seen["target"] == "/a/b?x=1&y=two%20words&z"
    assert seen["version"] == "HTTP/1.1"
    [req] = origin.requests
    assert req.header("host") == origin.authority
    assert "proxy-connection" not in req.header_names()  # curl sends it to proxies
    [rec] = records(proxy, 1)
    assert (rec["method"], rec["status"], rec["kind"]) == ("GET", 200, "forward")
    assert rec["target"] == origin.url("/a/b?x=1&y=two%20words&z")


async def test_get_with_httpx(proxy, origin):
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        resp = await client.get(origin.url("/hello?q=%2Fslash"), headers={"X-Test": "1"})
    assert resp.status_code == 200
    seen = resp.json()
    assert seen["target"] == "/hello?q=%2Fslash"
    assert ["X-Test", "1"] in seen["headers"]


async def test_post_content_length_with_curl(proxy, origin, tmp_path):
    body = os.urandom(3 * MIB + 17)  # > 1 MiB: curl sends Expect: 100-continue
    f = tmp_path / "body.bin"
    f.write_bytes(body)
    r = await curl(
        "-x",
        proxy.url,
        "--data-binary",
        f"@{f}",
        "-H",
        "Content-Type: application/x-test",
        origin.url("/echo"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == body
    [req] = origin.requests
    assert req.method == "POST" and not req.chunked
    assert req.header("content-length") == str(len(body))
    assert req.body_sha256 == hashlib.sha256(body).hexdigest()
    assert req.header("expect") is None  # the proxy answered the 100-continue itself
    [rec] = records(proxy, 1)
    assert (rec["bytes_up"], rec["bytes_down"]) == (len(body), len(body))


async def test_post_chunked_with_curl(proxy, origin, tmp_path):
    body = os.urandom(MIB + 5)
    f = tmp_path / "body.bin"
    f.write_bytes(body)
    r = await curl(
        "-x",
        proxy.url,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{f}",
        origin.url("/echo"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == body
    [req] = origin.requests
    assert req.chunked and req.header("content-length") is None
    assert req.body == body


async def test_post_with_httpx_length_and_chunked(proxy, origin):
    body = os.urandom(200_000)

    async def gen():
        for i in range(0, len(body), 30_000):
            yield body[i : i + 30_000]

    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        r1 = await client.post(origin.url("/echo"), content=body)
        r2 = await client.post(origin.url("/echo"), content=gen())
    assert r1.content == body and r2.content == body
    a, b = origin.requests
    assert not a.chunked and a.header("content-length") == str(len(body))
    assert b.chunked and b.body == body


# --- what the origin gets: hop-by-hop fields, Host, target -----------------------------------


async def test_hop_by_hop_request_fields_are_not_forwarded(proxy, origin):
    raw = (
        f"GET {origin.url('/h')} HTTP/1.1\r\n"
        f"Host: {origin.authority}\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Connection: keep-alive, X-Secret\r\n"
        "X-Secret: do-not-forward\r\n"
        "Keep-Alive: timeout=5\r\n"
        "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        "TE: trailers\r\n"
        "X-Dup: one\r\nX-Normal: kept\r\nX-Dup: two\r\n\r\n"
    ).encode()
    resp = request(proxy.port, raw)
    assert resp.status == 200
    [req] = origin.requests
    names = req.header_names()
    for hop in (
        "proxy-connection",
        "connection",
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "te",
    ):
        assert hop not in names, f"{hop} was forwarded: {req.headers}"
    assert req.header("x-normal") == "kept"
    assert [v for k, v in req.headers if k.lower() == "x-dup"] == ["one", "two"]


async def test_hop_by_hop_response_fields_are_not_returned(proxy, origin):
    resp = get_via(proxy.port, origin.url("/hop"))
    assert resp.status == 200 and resp.body == b"hop\n"
    names = resp.header_names()
    assert (
        "x-resp-secret" not in names
        and "keep-alive" not in names
        and "proxy-connection" not in names
    )
    assert resp.header("x-resp-normal") == "yes"


async def test_host_is_rewritten_from_the_absolute_url(proxy, origin):
    raw = f"GET http://localhost:{origin.port}/p HTTP/1.1\r\nHost: wrong.example\r\n\r\n"
    resp = request(proxy.port, raw.encode())
    assert resp.status == 200
    [req] = origin.requests
    assert [v for k, v in req.headers if k.lower() == "host"] == [f"localhost:{origin.port}"]
    assert req.target == "/p"
    # No Host at all from an HTTP/1.0 client (HTTP/1.1 requires one): the proxy adds it.
    request(proxy.port, f"GET http://127.0.0.1:{origin.port}/q HTTP/1.0\r\n\r\n".encode())
    assert origin.requests[1].header("host") == origin.authority
    # Two Host headers, or none in HTTP/1.1, are refused (tests/test_strict_http.py).


@pytest.mark.parametrize(
    "sent,seen",
    [
        ("/p?x=1&y=%2F&z", "/p?x=1&y=%2F&z"),
        ("/p?", "/p?"),
        ("?only=query", "/?only=query"),
        ("", "/"),
        ("/%7Euser/a%20b?q=%E2%9C%93", "/%7Euser/a%20b?q=%E2%9C%93"),
    ],
)
async def test_path_and_query_string_are_preserved(proxy, origin, sent, seen):
    resp = request(
        proxy.port, f"GET http://{origin.authority}{sent} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert resp.status == 200
    assert origin.requests[0].target == seen


# --- keep-alive -------------------------------------------------------------------------------


async def test_many_requests_on_one_client_connection_use_one_origin_connection(proxy, origin):
    with Conn(proxy.port) as c:
        for i in range(10):
            c.send(f"GET {origin.url(f'/r{i}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            resp = c.read_response()
            assert resp.status == 200 and json.loads(resp.body)["target"] == f"/r{i}"
    assert origin.connections == 1
    assert [r.conn for r in origin.requests] == [1] * 10
    ids = conn_ids(proxy, 10)
    assert len(ids) == 10 and len(set(ids)) == 1


async def test_pipelined_requests_are_answered_in_order(proxy, origin):
    with Conn(proxy.port) as c:
        c.send(
            b"".join(
                f"GET {origin.url(f'/p{i}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5)
            )
        )
        targets = [json.loads(c.read_response().body)["target"] for _ in range(5)]
    assert targets == [f"/p{i}" for i in range(5)]
    assert origin.connections == 1


async def test_curl_with_several_urls_reuses_connections(proxy, origin):
    urls = [origin.url(f"/u{i}") for i in range(4)]
    r = await curl("-x", proxy.url, *urls)
    assert r.returncode == 0, r.stderr
    assert [
        json.loads(line)["target"] for line in r.stdout.replace(b"}{", b"}\n{").splitlines()
    ] == [f"/u{i}" for i in range(4)]
    assert origin.connections == 1
    ids = conn_ids(proxy, 4)
    assert len(ids) == 4 and len(set(ids)) == 1, ids


async def test_httpx_client_reuse(proxy, origin):
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        for i in range(10):
            r = await client.get(origin.url(f"/x{i}"))
            assert r.json()["target"] == f"/x{i}"
    assert origin.connections == 1
    assert len(set(conn_ids(proxy, 10))) == 1


async def test_origin_connection_closed_while_pooled_is_replaced(proxy, origin):
    assert get_via(proxy.port, origin.url("/one")).status == 200
    # The origin drops its side of the pooled connection.
    origin.call(lambda: [w.transport.abort() for w in list(origin._writers)])
    time.sleep(0.2)
    assert get_via(proxy.port, origin.url("/two")).status == 200
    assert origin.connections == 2


# --- HTTP/1.0 clients, bodiless responses, re-framing --------------------------------------


async def test_http10_client(proxy, origin):
    with Conn(proxy.port) as c:
        c.send(f"GET {origin.url('/gen-chunked/100000')} HTTP/1.0\r\n\r\n".encode())
        resp = c.read_response()
        assert resp.status == 200
        assert resp.header("transfer-encoding") is None  # HTTP/1.0 knows no chunked
        assert resp.body_sha256 == pattern_sha256(100_000)
        assert c.at_eof()
    # HTTP/1.0 keep-alive with a known length keeps the connection.
    with Conn(proxy.port) as c:
        for _i in range(2):
            c.send(
                f"GET {origin.url('/gen/1000')} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode()
            )
            resp = c.read_response()
            assert resp.status == 200 and resp.body_sha256 == pattern_sha256(1000)
            assert (resp.header("connection") or "").lower() == "keep-alive"
    r = await curl("--http1.0", "-x", proxy.url, origin.url("/v"))
    assert r.returncode == 0 and json.loads(r.stdout)["target"] == "/v"


async def test_head_204_304_have_no_body_and_keep_framing(proxy, origin):
    with Conn(proxy.port) as c:
        c.send(f"HEAD {origin.url('/thing')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = c.read_response("HEAD")
        assert r.status == 200 and r.header("content-length") == "12345"
        c.send(f"GET {origin.url('/status/204')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert c.read_response().status == 204
        c.send(
            f'GET {origin.url("/status/304")} HTTP/1.1\r\nHost: x\r\nIf-None-Match: "v1"\r\n\r\n'.encode()
        )
        r = c.read_response()
        assert r.status == 304 and r.header("etag") == '"v1"'
        # Had the proxy waited for (or invented) a body, this answer would be garbled or late.
        c.send(f"GET {origin.url('/after')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = c.read_response()
        assert r.status == 200 and json.loads(r.body)["target"] == "/after"
        assert c.buf == b""
    assert origin.connections == 1


async def test_other_transfer_codings_survive_rechunking(proxy, origin):
    """`Transfer-Encoding: gzip, chunked`: the proxy re-frames the chunks but the gzip coding
    belongs to the message, so it is still named, both ways."""
    with Conn(proxy.port) as c:
        c.send(
            f"POST {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            "5\r\nhello\r\n0\r\n\r\n".encode()
        )
        assert c.read_response().status == 200
    [req] = origin.requests
    assert req.header("transfer-encoding") == "gzip, chunked" and req.body == b"hello"
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    with ScriptedOrigin(reply) as coded, Conn(proxy.port) as c:
        c.send(f"GET {coded.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = c.read_response()
        assert r.status == 200 and r.body == b"abc"
        assert r.header("transfer-encoding") == "gzip, chunked", r.raw_head


@pytest.mark.parametrize("path", ["/gen-chunked/300001", "/gen-close/300001", "/gen/300001"])
async def test_response_framings_reach_an_http11_client_intact(proxy, origin, path):
    with Conn(proxy.port) as c:
        c.send(f"GET {origin.url(path)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = c.read_response()
        assert r.status == 200 and r.body_sha256 == pattern_sha256(300_001)
        # The client connection survives even a close-delimited origin response.
        c.send(f"GET {origin.url('/next')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert json.loads(c.read_response().body)["target"] == "/next"


async def test_other_statuses_are_relayed(proxy, origin):
    for code in (201, 404, 500, 503):
        r = get_via(proxy.port, origin.url(f"/status/{code}"))
        assert r.status == code and r.body == f"status {code}\n".encode()


# --- large streamed bodies, bounded memory (CLI process) ------------------------------------

BIG = 200 * MIB


def vm_hwm_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(240)
def test_large_bodies_stream_both_ways_with_bounded_memory(tmp_path):
    with RecordingOrigin() as origin, Segproxy(["--idle-timeout", "60"]) as sp:
        assert get_via(sp.port, origin.url("/warm")).status == 200
        base = vm_hwm_kib(sp.pid)

        # Upload, Content-Length: the origin hashes what it received.
        with Conn(sp.port, timeout=60) as c:
            c.send(
                f"PUT {origin.url('/up')} HTTP/1.1\r\nHost: x\r\nContent-Length: {BIG}\r\n\r\n".encode()
            )
            for piece in pattern_chunks(BIG):
                c.send(piece)
            r = c.read_response()
        assert r.status == 200
        seen = json.loads(r.body)
        assert (seen["body_len"], seen["body_sha256"]) == (BIG, pattern_sha256(BIG))

        # Upload, chunked.
        with Conn(sp.port, timeout=60) as c:
            c.send(
                f"POST {origin.url('/upc')} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            )
            for piece in pattern_chunks(BIG):
                c.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            c.send(b"0\r\n\r\n")
            r = c.read_response()
        seen = json.loads(r.body)
        assert (seen["body_len"], seen["body_sha256"], seen["chunked"]) == (
            BIG,
            pattern_sha256(BIG),
            True,
        )

        # Downloads, Content-Length and chunked.
        for path in (f"/gen/{BIG}", f"/gen-chunked/{BIG}"):
            with Conn(sp.port, timeout=60) as c:
                c.send(f"GET {origin.url(path)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                r = c.read_response(keep_body=0)
            assert (r.status, r.body_len, r.body_sha256) == (200, BIG, pattern_sha256(BIG))

        peak = vm_hwm_kib(sp.pid)
        # 800 MiB went through; the proxy's peak grew by a small bounded amount.
        assert peak - base < 32 * 1024, f"VmHWM grew from {base} to {peak} KiB"
        assert peak < 80 * 1024, f"VmHWM {peak} KiB"


# --- connection lanes ------------------------------------------------------------------------


@pytest.mark.parametrize("lanes", ["default", "off"])
async def test_concurrent_keep_alive_clients_on_lanes_and_without(origin, lanes):
    """Connections run on the engine's lanes (a current-thread runtime per CPU) unless
    SEGPROXY_LANES=0: either way many kept-alive clients at once each get their own answers,
    and origin connections are reused across them."""
    env = dict(os.environ, SEGPROXY_WORKERS="2")
    if lanes == "off":
        env["SEGPROXY_LANES"] = "0"
    with Segproxy(env=env) as proxy:
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(proxy=proxy.proxy_url, limits=limits, timeout=10) as client:

            async def one(i: int) -> None:
                for j in range(5):
                    r = await client.get(origin.url(f"/c{i}/r{j}"))
                    assert r.status_code == 200
                    assert r.json()["target"] == f"/c{i}/r{j}"

            await asyncio.gather(*(one(i) for i in range(8)))
    targets = sorted(req.target for req in origin.requests)
    assert targets == sorted(f"/c{i}/r{j}" for i in range(8) for j in range(5))
    # 40 requests over at most 8 client connections: origin connections were kept and reused.
    assert len({req.conn for req in origin.requests}) <= 8
