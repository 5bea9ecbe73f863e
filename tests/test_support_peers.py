"""The test peers work on their own: nginx serves, squid and tinyproxy proxy
(plain HTTP and CONNECT to an arbitrary port), dnsmasq answers, and stopping
a helper leaves no process behind. No segproxy involved."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess

import httpx
import pytest
from support import NginxOrigin, query_a, wait_for

pytestmark = pytest.mark.timeout(60)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    return subprocess.run(
        ["curl", "-sS", "--noproxy", "", "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
    )


def expected_1k() -> bytes:
    return bytes(range(256)) * 4


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; check its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_nginx_serves_http_and_https(nginx_origin):
    r = curl(nginx_origin.url("/1k.bin"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_1k()
    r = curl("--cacert", str(nginx_origin.cert_path), nginx_origin.url("/1k.bin", tls=True))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_1k()
    r = curl("-o", "/dev/null", "-w", "%{size_download}", nginx_origin.url("/large.bin"))
    assert int(r.stdout) == nginx_origin.large_size


def test_nginx_keeps_connections_alive(nginx_origin):
    url = nginx_origin.url("/1k.bin")
    r = curl("-v", "-o", "/dev/null", "-o", "/dev/null", url, url)
    assert r.returncode == 0, r.stderr
    assert b"Re-using existing connection" in r.stderr or b"Reusing existing" in r.stderr


@pytest.mark.parametrize("peer", ["squid_proxy", "tinyproxy_proxy"])
def test_peer_proxy_forwards_http(peer, nginx_origin, request):
    proxy = request.getfixturevalue(peer)
    r = curl("-x", proxy.proxy_url, nginx_origin.url("/1k.bin"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_1k()


@pytest.mark.parametrize("peer", ["squid_proxy", "tinyproxy_proxy"])
def test_peer_proxy_tunnels_connect_to_any_port(peer, nginx_origin, request):
    proxy = request.getfixturevalue(peer)
    # The HTTPS port is a random high port: CONNECT must be allowed to it.
    r = curl(
        "-x",
        proxy.proxy_url,
        "--cacert",
        str(nginx_origin.cert_path),
        nginx_origin.url("/1k.bin", tls=True),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_1k()


@pytest.mark.asyncio
async def test_httpx_through_squid(squid_proxy, nginx_origin):
    verify = ssl.create_default_context(cafile=str(nginx_origin.cert_path))
    async with httpx.AsyncClient(proxy=squid_proxy.proxy_url, verify=verify, timeout=20) as client:
        for tls in (False, True):
            resp = await client.get(nginx_origin.url("/1k.bin", tls=tls))
            assert resp.status_code == 200
            assert resp.content == expected_1k()


def test_squid_logs_requests(squid_proxy, nginx_origin):
    url = nginx_origin.url("/index.html?marker=squidlog")
    assert curl("-x", squid_proxy.proxy_url, url).returncode == 0
    assert wait_for(lambda: "marker=squidlog" in squid_proxy.access_log.read_text(), 10)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dnsmasq_answers(dnsmasq_server, tcp):
    port = dnsmasq_server.port
    assert query_a("www.test.zone", port, tcp=tcp) == ("NOERROR", ["127.0.0.1"])
    assert query_a("x.bad.zone", port, tcp=tcp)[0] == "NXDOMAIN"
    rcode, addrs = query_a("example.org", port, tcp=tcp)
    assert rcode != "NOERROR" or not addrs  # no upstream: never a real answer


def test_stop_kills_the_process_and_its_children():
    try:
        origin = NginxOrigin(large_size=1024)
    except Exception as e:  # MissingBinary
        pytest.skip(str(e))
    with origin:
        master = origin.pid
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == master]
        assert workers, "nginx master has workers"
        assert pid_alive(master)
        directory = origin.dir
    assert not pid_alive(master)
    assert not any(pid_alive(w) for w in workers)
    assert not directory.exists(), "temp dir removed"


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
