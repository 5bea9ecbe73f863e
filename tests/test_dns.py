"""DNS: --dns-server with dnsmasq on loopback serving a test zone (``*.test.zone`` ->
127.0.0.1, ``*.bad.zone`` NXDOMAIN, anything else REFUSED); UDP, TCP, the UDP->TCP
fallback, the cache and what the access log says."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from segproxy import start_proxy_server
from support import Dnsmasq, Segproxy, free_port, wait_for
from support.loopback import (
    FramedOrigin,
    HttpOrigin,
    TcpRelay,
    blob,
    framed_exchange,
    proxy_connect,
    proxy_request,
    sha,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def origin():
    # Closes after each response: every request through the proxy needs a new connection,
    # hence a name lookup (a pooled connection needs none and logs dns=-).
    with HttpOrigin(keep_alive=False) as o:
        yield o


def name(zone: str = "test.zone") -> str:
    """A fresh name, so no cache (ours or another test's) has seen it."""
    return f"h{uuid.uuid4().hex[:10]}.{zone}"


def dns_args(dns: Dnsmasq, *extra: str, port: int | None = None) -> list[str]:
    return ["--dns-server", "127.0.0.1", "--dns-port", str(port or dns.port), *extra]


def access_lines(proxy: Segproxy, n: int) -> list[str]:
    assert wait_for(lambda: proxy.access_log.read_text().count("\n") >= n), (
        proxy.access_log.read_text()
    )
    return proxy.access_log.read_text().splitlines()


def test_name_in_zone_reaches_local_origin(dnsmasq_server, origin):
    host = name()
    with Segproxy(dns_args(dnsmasq_server), with_access_log=True) as proxy:
        addr = ("127.0.0.1", proxy.port)
        r = proxy_request(addr, "GET", f"http://{host}:{origin.port}/one")
        assert r.status == 200 and r.body == b"origin ok /one\n"
        r = proxy_request(addr, "GET", f"http://{host}:{origin.port}/two")
        assert r.status == 200
        lines = access_lines(proxy, 2)
    assert "dns=custom cache=miss" in lines[0], lines
    assert "dns=custom cache=hit" in lines[1], lines
    assert origin.requests[0][1][0] == ("Host", f"{host}:{origin.port}")
    # dnsmasq answered it (the system resolver knows nothing of test.zone).
    assert host in dnsmasq_server.query_log()


def test_connect_to_name_in_zone(dnsmasq_server):
    host = name()
    with (
        FramedOrigin() as framed,
        Segproxy(dns_args(dnsmasq_server), with_access_log=True) as proxy,
    ):
        s, r = proxy_connect(("127.0.0.1", proxy.port), f"{host}:{framed.port}")
        assert r.status == 200
        with s:
            digest, down = framed_exchange(s, b"hello", 1000, 3)
        assert digest.hex() == sha(b"hello") and down == blob(3, 1000)
        lines = access_lines(proxy, 1)
    assert (
        f"method=CONNECT host={host} port={framed.port} " in lines[0]
        and " status=200 " in lines[0]
        and "dns=custom cache=miss" in lines[0]
    ), lines


@pytest.mark.parametrize("zone", ["bad.zone", "unknown.example"])
def test_failing_name_gives_502_naming_it(dnsmasq_server, origin, zone):
    host = name(zone)  # NXDOMAIN (bad.zone) or REFUSED (no such zone here)
    with Segproxy(dns_args(dnsmasq_server), with_access_log=True) as proxy:
        addr = ("127.0.0.1", proxy.port)
        r = proxy_request(addr, "GET", f"http://{host}:{origin.port}/x")
        assert r.status == 502
        assert host.encode() in r.body, r.body
        s, r = proxy_connect(addr, f"{host}:443")
        s.close()
        assert r.status == 502 and host.encode() in r.body, r.body
        # A good name still works afterwards.
        r = proxy_request(addr, "GET", f"http://{name()}:{origin.port}/ok")
        assert r.status == 200
        lines = access_lines(proxy, 3)
    assert " status=502 " in lines[0] and host in lines[0]
    assert origin.requests and all("/x" not in line for line, _ in origin.requests)


def test_tcp_transport(dnsmasq_server, origin):
    # A TCP-only relay in front of dnsmasq: nothing answers UDP on its port, so an answer
    # proves the query went over TCP.
    with TcpRelay(("127.0.0.1", dnsmasq_server.port)) as relay:
        args = dns_args(dnsmasq_server, "--dns-transport", "tcp", port=relay.port)
        with Segproxy(args, with_access_log=True) as proxy:
            host = name()
            r = proxy_request(("127.0.0.1", proxy.port), "GET", f"http://{host}:{origin.port}/tcp")
            assert r.status == 200 and r.body == b"origin ok /tcp\n"
            lines = access_lines(proxy, 1)
        assert relay.connections >= 1
    assert "dns=custom cache=miss" in lines[0], lines


def test_udp_falls_back_to_tcp(dnsmasq_server, origin):
    with TcpRelay(("127.0.0.1", dnsmasq_server.port)) as relay:
        args = dns_args(dnsmasq_server, "--dns-transport", "udp", port=relay.port)
        with Segproxy(args) as proxy:
            r = proxy_request(
                ("127.0.0.1", proxy.port), "GET", f"http://{name()}:{origin.port}/fallback"
            )
            assert r.status == 200
        assert relay.connections >= 1


def test_cache_size_zero_asks_every_time(dnsmasq_server, origin):
    host = name()
    with Segproxy(dns_args(dnsmasq_server, "--dns-cache-size", "0"), with_access_log=True) as proxy:
        addr = ("127.0.0.1", proxy.port)
        for i in range(3):
            r = proxy_request(addr, "GET", f"http://{host}:{origin.port}/{i}")
            assert r.status == 200
        lines = access_lines(proxy, 3)
    for line in lines:
        assert "dns=custom cache=off" in line, lines
    assert wait_for(lambda: dnsmasq_server.query_log().count(f"query[A] {host}") >= 3), (
        dnsmasq_server.query_log()[-2000:]
    )


def test_cache_respects_ttl(origin):
    # Answers with a 1 s TTL: a hit right away, a miss (new query) after it expired.
    with Dnsmasq(ttl=1) as dns:
        host = name()
        with Segproxy(dns_args(dns), with_access_log=True) as proxy:
            addr = ("127.0.0.1", proxy.port)
            assert proxy_request(addr, "GET", f"http://{host}:{origin.port}/a").status == 200
            assert proxy_request(addr, "GET", f"http://{host}:{origin.port}/b").status == 200
            time.sleep(2.2)
            assert proxy_request(addr, "GET", f"http://{host}:{origin.port}/c").status == 200
            lines = access_lines(proxy, 3)
    assert [
        "dns=custom cache=miss" in lines[0],
        "dns=custom cache=hit" in lines[1],
        "dns=custom cache=miss" in lines[2],
    ] == [True] * 3, lines


def test_system_resolver_by_default(origin):
    with Segproxy([], with_access_log=True) as proxy:
        r = proxy_request(("127.0.0.1", proxy.port), "GET", f"http://localhost:{origin.port}/sys")
        assert r.status == 200
        r = proxy_request(("127.0.0.1", proxy.port), "GET", origin.url("/literal"))
        assert r.status == 200
        lines = access_lines(proxy, 2)
    assert "dns=system cache=miss transport=udp fallback=0" in lines[0], lines
    assert "dns=literal" in lines[1], lines


def test_unreachable_dns_server_gives_502(origin):
    dead = free_port(udp_too=True)
    with Segproxy(["--dns-server", "127.0.0.1", "--dns-port", str(dead)]) as proxy:
        host = name()
        r = proxy_request(("127.0.0.1", proxy.port), "GET", f"http://{host}:{origin.port}/x")
    assert r.status in (502, 504)
    assert host.encode() in r.body


async def test_dns_options_in_process(dnsmasq_server, origin):
    server = await start_proxy_server(
        port=0,
        dns_server="127.0.0.1",
        dns_port=dnsmasq_server.port,
        dns_transport="tcp",
        dns_cache_size=0,
    )
    try:
        host = name()
        r = await asyncio.to_thread(
            proxy_request, server.address, "GET", f"http://{host}:{origin.port}/p"
        )
        assert r.status == 200
        # The record is written once the exchange is over, just after the client got its answer.
        assert await asyncio.to_thread(wait_for, lambda: len(server.access_records()) == 1)
        rec = server.access_records()[-1]
        assert rec["dns"] == "custom/off"
    finally:
        await server.aclose()
