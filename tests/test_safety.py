"""Safety options: --allow-domain / --deny-domain (``.example.com`` includes subdomains) and
--deny-private (off by default), answered with 403 and the reason, for HTTP and CONNECT.

Names under ``test.zone`` resolve to 127.0.0.1 through dnsmasq on loopback; denied names
are refused before any lookup."""

from __future__ import annotations

import asyncio

import pytest
from segproxy import start_proxy_server
from support import Segproxy, wait_for
from support.loopback import (
    FramedOrigin,
    HttpOrigin,
    blob,
    framed_exchange,
    proxy_connect,
    proxy_request,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def origin():
    with HttpOrigin() as o:
        yield o


def dns(dnsmasq) -> list[str]:
    return ["--dns-server", "127.0.0.1", "--dns-port", str(dnsmasq.port)]


def get(proxy, host: str, port: int, path: str = "/"):
    return proxy_request(("127.0.0.1", proxy.port), "GET", f"http://{host}:{port}{path}")


def connect(proxy, host: str, port: int):
    s, r = proxy_connect(("127.0.0.1", proxy.port), f"{host}:{port}")
    s.close()
    return r


def test_deny_domain_with_subdomains(dnsmasq_server, origin):
    args = dns(dnsmasq_server) + [
        "--deny-domain",
        ".deny.test.zone",
        "--deny-domain",
        "exact.test.zone",
    ]
    with Segproxy(args, with_access_log=True) as proxy:
        for host in ("deny.test.zone", "a.deny.test.zone", "b.a.DENY.test.zone", "exact.test.zone"):
            r = get(proxy, host, origin.port, "/denied")
            assert r.status == 403, (host, r)
            assert b"denied" in r.body and host.lower().encode() in r.body, r.body
            r = connect(proxy, host, origin.port)
            assert r.status == 403 and b"denied" in r.body, (host, r)
        r = get(proxy, "a.deny.test.zone", origin.port)
        assert b".deny.test.zone" in r.body  # names the entry that matched
        # Not a subdomain: a longer label, a parent, or below an exact entry.
        for host in ("xdeny.test.zone", "test.zone", "sub.exact.test.zone"):
            r = get(proxy, host, origin.port, "/ok")
            assert r.status == 200, (host, r)
        assert wait_for(lambda: proxy.access_log.read_text().count("\n") >= 12)
        log = proxy.access_log.read_text().splitlines()
    assert all("/denied" not in line for line, _ in origin.requests)
    denied = [line for line in log if " status=403 " in line]
    assert len(denied) == 9 and all("denied" in line for line in denied), log


def test_allow_domain_only(dnsmasq_server, origin):
    args = dns(dnsmasq_server) + [
        "--allow-domain",
        ".ok.test.zone",
        "--allow-domain",
        "single.test.zone",
    ]
    with Segproxy(args) as proxy:
        for host in ("ok.test.zone", "a.ok.test.zone", "single.test.zone"):
            assert get(proxy, host, origin.port).status == 200, host
        with FramedOrigin() as framed:
            s, r = proxy_connect(("127.0.0.1", proxy.port), f"x.ok.test.zone:{framed.port}")
            assert r.status == 200
            with s:
                assert framed_exchange(s, b"abc", 3, 1)[1] == blob(1, 3)
        for host in ("other.test.zone", "a.single.test.zone", "127.0.0.1", "localhost"):
            r = get(proxy, host, origin.port, "/nope")
            assert r.status == 403, (host, r)
            assert b"not in the allow list" in r.body and host.encode() in r.body, r.body
            r = connect(proxy, host, origin.port)
            assert r.status == 403 and b"allow list" in r.body
    assert all("/nope" not in line for line, _ in origin.requests)


def test_deny_wins_over_allow(dnsmasq_server, origin):
    args = dns(dnsmasq_server) + [
        "--allow-domain",
        ".test.zone",
        "--deny-domain",
        "bad.host.test.zone",
    ]
    with Segproxy(args) as proxy:
        assert get(proxy, "good.host.test.zone", origin.port).status == 200
        r = get(proxy, "bad.host.test.zone", origin.port)
        assert r.status == 403 and b"denied" in r.body


def test_deny_private_refuses_loopback(dnsmasq_server, origin):
    with Segproxy(dns(dnsmasq_server) + ["--deny-private"], with_access_log=True) as proxy:
        for host in ("127.0.0.1", "localhost", "127.1.2.3"):
            r = get(proxy, host, origin.port, "/private")
            assert r.status == 403, (host, r)
            assert b"denied" in r.body, r.body
            r = connect(proxy, host, origin.port)
            assert r.status == 403, (host, r)
        # A name is checked after it resolves: a.test.zone is 127.0.0.1.
        r = get(proxy, "a.test.zone", origin.port, "/private")
        assert r.status == 403 and b"a.test.zone" in r.body, r.body
        r = connect(proxy, "a.test.zone", origin.port)
        assert r.status == 403, r
        r = get(proxy, "[::1]", origin.port, "/private")
        assert r.status == 403, r
        assert wait_for(lambda: proxy.access_log.read_text().count("\n") >= 9)
    assert origin.requests == []


def test_private_destinations_allowed_by_default(dnsmasq_server, origin):
    with Segproxy(dns(dnsmasq_server)) as proxy:
        for host in ("127.0.0.1", "a.test.zone"):
            r = get(proxy, host, origin.port, "/default")
            assert r.status == 200, (host, r)
        with FramedOrigin() as framed:
            s, r = proxy_connect(("127.0.0.1", proxy.port), f"127.0.0.1:{framed.port}")
            assert r.status == 200
            s.close()
    assert len(origin.requests) == 2


async def test_safety_options_in_process(origin):
    server = await start_proxy_server(port=0, deny_domains=[".example.com"], deny_private=True)
    try:
        r = await asyncio.to_thread(proxy_request, server.address, "GET", "http://www.example.com/")
        assert r.status == 403 and b".example.com" in r.body
        r = await asyncio.to_thread(proxy_request, server.address, "GET", origin.url("/p"))
        assert r.status == 403
        assert await asyncio.to_thread(wait_for, lambda: len(server.access_records()) == 2)
        records = server.access_records()
        assert [rec["status"] for rec in records] == [403, 403]
        assert all(rec["error"] and "denied" in rec["error"] for rec in records), records
    finally:
        await server.aclose()
    server = await start_proxy_server(port=0, allow_domains=["localhost"])
    try:
        r = await asyncio.to_thread(
            proxy_request, server.address, "GET", f"http://localhost:{origin.port}/a"
        )
        assert r.status == 200
        r = await asyncio.to_thread(proxy_request, server.address, "GET", origin.url("/b"))
        assert r.status == 403
    finally:
        await server.aclose()
