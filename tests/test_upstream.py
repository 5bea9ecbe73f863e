"""action=upstream: through tinyproxy (a real proxy not written here), through a recording
fake upstream (Proxy-Authorization from the rule's credentials), and segproxy chained to
segproxy; failures answer 502 naming the upstream hop."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
from segproxy import Rules, start_proxy_server
from support import Segproxy, free_port, wait_for
from support.loopback import (
    TIMEOUT,
    FakeUpstream,
    FramedOrigin,
    HttpOrigin,
    OneRequestOrigin,
    SinkOrigin,
    basic,
    blob,
    framed_exchange,
    group_reads,
    header,
    proxy_connect,
    proxy_request,
    read_response,
    recv_exact,
    sha,
    split_sizes,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def origin():
    with HttpOrigin() as o:
        yield o


def tag() -> str:
    return uuid.uuid4().hex[:12]


def upstream_rule(upstream: str, host: str = "127.0.0.1", extra: str = "") -> str:
    return f"{host}=direct,action=upstream,upstream={upstream}{extra}"


# --------------------------------------------------------------------------------------
# tinyproxy


def test_http_through_tinyproxy(tinyproxy_proxy, origin):
    t = tag()
    rule = upstream_rule(f"127.0.0.1:{tinyproxy_proxy.port}", extra=f",port={origin.port}")
    with Segproxy(["--segment-rule", rule], with_access_log=True) as proxy:
        addr = ("127.0.0.1", proxy.port)
        r = proxy_request(addr, "GET", origin.url(f"/tp-{t}"))
        assert r.status == 200 and r.body == f"origin ok /tp-{t}\n".encode()
        # Two requests on one client connection: tinyproxy closes its connection after
        # each response, so the second needs a fresh upstream connection.
        with socket.create_connection(addr, timeout=TIMEOUT) as s:
            for i in range(2):
                s.sendall(f"GET {origin.url(f'/tp-{t}-{i}')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                r = read_response(s)
                assert r.status == 200 and r.body == f"origin ok /tp-{t}-{i}\n".encode()
        assert wait_for(lambda: proxy.access_log.read_text().count("\n") >= 3)
        log = proxy.access_log.read_text()
        assert (
            "action=upstream " in log and f" upstream=127.0.0.1:{tinyproxy_proxy.port} " in log
        ), log
    tp_log = tinyproxy_proxy.log.read_text()
    # tinyproxy got every request, in absolute form.
    for path in (f"/tp-{t}", f"/tp-{t}-0", f"/tp-{t}-1"):
        assert f"GET http://127.0.0.1:{origin.port}{path} HTTP/1.1" in tp_log, tp_log[-2000:]
    assert len(origin.requests) == 3
    for _, headers in origin.requests:
        assert header(headers, "Proxy-Authorization") is None


def test_connect_through_tinyproxy(tinyproxy_proxy):
    up = blob(21, 50_000)
    with FramedOrigin() as framed:
        rule = upstream_rule(f"127.0.0.1:{tinyproxy_proxy.port}", extra=f",port={framed.port}")
        with Segproxy(["--segment-rule", rule]) as proxy:
            s, r = proxy_connect(("127.0.0.1", proxy.port), f"127.0.0.1:{framed.port}")
            assert r.status == 200
            with s:
                digest, down = framed_exchange(s, up, 70_000, 22)
            assert digest.hex() == sha(up) and down == blob(22, 70_000)
    assert wait_for(
        lambda: f"CONNECT 127.0.0.1:{framed.port} HTTP/1.1" in tinyproxy_proxy.log.read_text()
    )


def test_segmentation_applies_on_the_way_to_tinyproxy(tinyproxy_proxy):
    data = blob(23, 2100)
    with SinkOrigin(len(data)) as sink:
        rule = upstream_rule(f"127.0.0.1:{tinyproxy_proxy.port}", extra=f",port={sink.port}")
        rule = rule.replace("=direct,", "=segment_upstream,strategy=fixed,chunk=700,delay=80,", 1)
        with Segproxy(["--segment-rule", rule]) as proxy:
            s, r = proxy_connect(("127.0.0.1", proxy.port), f"127.0.0.1:{sink.port}")
            assert r.status == 200
            with s:
                s.sendall(data)
                assert recv_exact(s, 32).hex() == sha(data)
    rec = sink.recordings[0]
    assert bytes(rec.data) == data
    # tinyproxy relays what it reads: the 80 ms pauses survive the extra hop.
    assert [n for _, n in group_reads(rec.reads, 0.03)] == split_sizes(len(data), 700), rec.reads


# --------------------------------------------------------------------------------------
# credentials, with a recording fake upstream


def test_credentials_sent_to_the_upstream_only(origin):
    with FakeUpstream() as fake, FramedOrigin() as framed:
        rule = upstream_rule(f"alice:s3cret@127.0.0.1:{fake.port}")
        with Segproxy(["--segment-rule", rule], with_access_log=True) as proxy:
            addr = ("127.0.0.1", proxy.port)
            # The client's own Proxy-Authorization (for segproxy) is not passed on.
            r = proxy_request(
                addr,
                "GET",
                origin.url("/cred"),
                headers={"Proxy-Authorization": basic("client", "pw")},
            )
            assert r.status == 200
            assert r.body == f"fake upstream saw {origin.url('/cred')}".encode()
            s, r = proxy_connect(addr, f"127.0.0.1:{framed.port}")
            assert r.status == 200
            up = blob(24, 3000)
            with s:
                digest, down = framed_exchange(s, up, 500, 25)
            assert digest.hex() == sha(up) and down == blob(25, 500)
            assert wait_for(lambda: proxy.access_log.read_text().count("\n") >= 2)
            log = proxy.access_log.read_text()
            assert "s3cret" not in log and "s3cret" not in proxy.output()
    assert len(fake.heads) == 2, fake.heads
    (get_line, get_headers), (connect_line, connect_headers) = fake.heads
    assert get_line == f"GET {origin.url('/cred')} HTTP/1.1"
    assert connect_line == f"CONNECT 127.0.0.1:{framed.port} HTTP/1.1"
    for headers in (get_headers, connect_headers):
        values = [v for n, v in headers if n.lower() == "proxy-authorization"]
        assert values == [basic("alice", "s3cret")], headers
    # The tunnel's destination got the tunnel bytes only.
    assert b"Proxy-Authorization" not in bytes(framed.recordings[0].data)
    assert origin.requests == []


def test_origin_never_sees_proxy_authorization_direct(origin):
    with Segproxy([]) as proxy:
        r = proxy_request(
            ("127.0.0.1", proxy.port),
            "GET",
            origin.url("/direct"),
            headers={"Proxy-Authorization": basic("u", "p")},
        )
        assert r.status == 200
    assert len(origin.requests) == 1
    assert header(origin.requests[0][1], "Proxy-Authorization") is None


def test_segproxy_chained_to_segproxy(origin):
    with Segproxy([], with_access_log=True) as second:
        rule = upstream_rule(f"bob:pw@127.0.0.1:{second.port}", host="*")
        with (
            Segproxy(["--segment-rule", rule], with_access_log=True) as first,
            FramedOrigin() as framed,
        ):
            addr = ("127.0.0.1", first.port)
            r = proxy_request(addr, "GET", origin.url("/chain"))
            assert r.status == 200 and r.body == b"origin ok /chain\n"
            r = proxy_request(
                addr, "POST", origin.url("/upload?n=10&seed=1"), body=blob(26, 100_000)
            )
            assert r.status == 200 and r.header("X-Body-Sha256") == sha(blob(26, 100_000))
            s, r = proxy_connect(addr, f"127.0.0.1:{framed.port}")
            assert r.status == 200
            up = blob(27, 200_000)
            with s:
                digest, down = framed_exchange(s, up, 300_000, 28)
            assert digest.hex() == sha(up) and down == blob(28, 300_000)
            assert wait_for(lambda: second.access_log.read_text().count("\n") >= 3)
            assert wait_for(lambda: first.access_log.read_text().count("\n") >= 3)
            first_log = first.access_log.read_text()
            second_log = second.access_log.read_text()
    assert first_log.count(f" upstream=127.0.0.1:{second.port} ") == 3, first_log
    # The second proxy saw all three, as a plain direct proxy.
    assert (
        "method=GET " in second_log
        and " status=200 client=" in second_log
        and f" target={origin.url('/chain')} " in second_log
    ), second_log
    assert f"method=CONNECT host=127.0.0.1 port={framed.port} " in second_log, second_log
    assert second_log.count("action=direct") == 3
    assert len(origin.requests) == 2
    for _, headers in origin.requests:
        assert header(headers, "Proxy-Authorization") is None, headers


async def test_flow_records_through_upstream():
    with FakeUpstream() as fake, FramedOrigin() as framed:
        rules = Rules.parse(
            upstream_rule(f"127.0.0.1:{fake.port}").replace(
                "=direct,", "=segment_upstream,chunk=333,", 1
            )
        )
        server = await start_proxy_server(port=0, rules=rules, record_flows=True)
        try:
            up = blob(29, 5000)

            def run():
                s, r = proxy_connect(server.address, f"127.0.0.1:{framed.port}")
                assert r.status == 200
                with s:
                    return framed_exchange(s, up, 10, 1)

            digest, _ = await asyncio.to_thread(run)
            assert digest.hex() == sha(up)
            assert await asyncio.to_thread(wait_for, lambda: len(server.flows()) == 1)
            flow = server.flows()[0]
            assert flow["action"] == f"upstream:127.0.0.1:{fake.port}"
            ups = [n for d, n, _ in flow["chunks"] if d == "up"]
            assert sum(ups) == 24 + len(up) and max(ups) <= 333
        finally:
            await server.aclose()


# --------------------------------------------------------------------------------------
# failing upstreams -> 502 naming the hop


def test_upstream_refusing_connections_gives_502(origin):
    dead = free_port()  # nothing listens there
    with Segproxy(
        ["--segment-rule", upstream_rule(f"127.0.0.1:{dead}")], with_access_log=True
    ) as proxy:
        addr = ("127.0.0.1", proxy.port)
        r = proxy_request(addr, "GET", origin.url("/x"))
        assert r.status == 502
        assert f"upstream proxy 127.0.0.1:{dead}".encode() in r.body, r.body
        s, r = proxy_connect(addr, f"127.0.0.1:{origin.port}")
        s.close()
        assert r.status == 502
        assert f"upstream proxy 127.0.0.1:{dead}".encode() in r.body, r.body
        # The proxy carries on.
        r = proxy_request(addr, "GET", f"http://localhost:{origin.port}/still")
        assert r.status == 200
    assert [line for line, _ in origin.requests] == ["GET /still HTTP/1.1"]


@pytest.mark.parametrize("status", [403, 407])
def test_upstream_refusing_connect_gives_502_with_its_status(status, origin):
    with FakeUpstream(connect_status=status) as fake:
        with Segproxy(["--segment-rule", upstream_rule(f"u:p@127.0.0.1:{fake.port}")]) as proxy:
            s, r = proxy_connect(("127.0.0.1", proxy.port), f"127.0.0.1:{origin.port}")
            s.close()
    assert r.status == 502
    body = r.body.decode()
    assert f"127.0.0.1:{fake.port}" in body and str(status) in body, body
    assert "CONNECT" in body
    assert "u:p" not in body and "Basic" not in body
    assert len(fake.heads) == 1


@pytest.mark.parametrize(
    "reply, words", [("close", "closed the connection"), ("407", "answered 407")]
)
def test_failing_upstream_on_plain_http_is_named(reply, words, origin):
    """Plain HTTP goes to the upstream in absolute form: when the upstream fails, the 502
    names that hop (not the destination behind it); its 407 is for the rule's credentials,
    which the client cannot fix, so it becomes a 502 too."""
    with FakeUpstream(request_reply=reply) as fake:
        with Segproxy(["--segment-rule", upstream_rule(f"u:p@127.0.0.1:{fake.port}")]) as proxy:
            r = proxy_request(("127.0.0.1", proxy.port), "GET", origin.url("/via"))
    assert r.status == 502, r
    body = r.body.decode()
    assert f"upstream proxy 127.0.0.1:{fake.port}" in body and words in body, body
    assert "u:p" not in body
    assert fake.heads and fake.heads[0][0] == f"GET {origin.url('/via')} HTTP/1.1"


# --------------------------------------------------------------------------------------
# reused connections the peer closed (what tinyproxy does after every response)


def test_request_on_a_pooled_connection_the_origin_closed_is_retried():
    with OneRequestOrigin() as origin, Segproxy([]) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as s:
            for i in range(3):
                s.sendall(
                    f"GET http://127.0.0.1:{origin.port}/{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                )
                r = read_response(s)
                assert r.status == 200, r
                assert r.body == f"answered /{i}".encode()
    # Requests 2 and 3 went first to the pooled connection, which the origin dropped.
    assert origin.answered == 3
    assert origin.dropped == 2
