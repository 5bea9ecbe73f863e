"""`rate=`: bytes per second, per direction, on tunnels and plain HTTP, with the content
untouched. Tolerances a loaded 2-core machine holds: never faster than the rate allows
(at least 95 % of size / rate, the first chunk going at once), and not more than three times
slower."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
from segproxy import Rule, Rules, start_proxy_server
from support import Segproxy
from support.loopback import (
    HttpOrigin,
    SourceOrigin,
    blob,
    proxy_connect,
    proxy_request,
    recv_exact,
    sha,
)

pytestmark = pytest.mark.timeout(120)


def within_rate(elapsed: float, size: int, rate: int) -> None:
    expected = size / rate
    assert elapsed >= 0.95 * expected - 0.02, f"{elapsed:.3f} s, faster than {rate} B/s"
    assert elapsed <= 3 * expected + 0.5, f"{elapsed:.3f} s for {expected:.2f} s of data"


async def test_a_tunnel_download_at_a_rate() -> None:
    size, rate = 300_000, 200_000
    with SourceOrigin(size, seed=5) as origin:
        rules = Rules.parse(f"127.0.0.1=direct,rate=200k,direction=down,port={origin.port}")
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
        try:

            def run() -> tuple[bytes, float]:
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{origin.port}")
                assert r.status == 200
                with s:
                    t0 = time.monotonic()
                    # The first chunk may come with the CONNECT answer (the origin speaks first).
                    data = r.body + recv_exact(s, size - len(r.body))
                    return data, time.monotonic() - t0

            data, elapsed = await asyncio.to_thread(run)
            assert sha(data) == sha(blob(5, size)), "content unchanged"
            within_rate(elapsed, size, rate)
        finally:
            await server.aclose()
        (flow,) = server.flows()
        assert "rate=200000B/s" in flow["policy"]
        down = [size for d, size, _ in flow["chunks"] if d == "down"]
        assert max(down) <= rate // 100, "a burst is at most one chunk (a hundredth of a second)"


async def test_an_http_response_at_a_rate_and_the_request_unshaped() -> None:
    size, rate = 150_000, 100_000
    with HttpOrigin() as origin:
        rules = Rules.from_rules([Rule("127.0.0.1", rate="100k", direction="down")])
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules)
        try:

            def run() -> tuple[bytes, float]:
                t0 = time.monotonic()
                r = proxy_request(
                    ("127.0.0.1", server.port), "GET", origin.url(f"/blob?n={size}&seed=9")
                )
                assert r.status == 200
                return r.body, time.monotonic() - t0

            body, elapsed = await asyncio.to_thread(run)
            assert body == blob(9, size)
            within_rate(elapsed, size, rate)
        finally:
            await server.aclose()


def test_rate_values() -> None:
    assert "rate=1500000B/s" in Rules.parse("a.test=direct,rate=1.5M").describe()
    assert "rate=64000B/s" in Rules.parse("a.test=direct,rate=64000").describe()
    assert Rule("a.test", rate="100k").text() == "a.test=direct,rate=100k"
    assert "rate=50000B/s" in Rules(rate="50k").describe()
    for bad, message in (("0", "at least 1 byte"), ("fast", "invalid rate 'fast'")):
        with pytest.raises(ValueError, match=message):
            Rules.parse(f"a.test=direct,rate={bad}", source="r.txt")


def test_an_intercepted_download_at_a_rate(nginx_origin, tmp_path) -> None:
    """Interception shapes the client's encrypted bytes: a 300 kB range at 200k."""
    size, rate = 300_000, 200_000
    ca_dir = tmp_path / "ca"
    port = nginx_origin.https_port
    args = [
        "--ca-dir",
        str(ca_dir),
        "--upstream-ca",
        str(nginx_origin.cert_path),
        "--segment-rule",
        f"localhost=direct,rate=200k,direction=down,port={port}",
    ]
    with Segproxy(args) as proxy:
        out = tmp_path / "range.bin"
        t0 = time.monotonic()
        r = subprocess.run(
            [
                "curl",
                "-sS",
                "-x",
                proxy.proxy_url,
                "--cacert",
                str(ca_dir / "ca-cert.pem"),
                "-r",
                f"0-{size - 1}",
                "-o",
                str(out),
                "-w",
                "%{http_code}",
                f"https://localhost:{port}/large.bin",
            ],
            capture_output=True,
            timeout=60,
        )
        elapsed = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout == b"206", r
    assert out.stat().st_size == size
    # The TLS handshake and records add a little to the bytes paced; curl's start adds time.
    within_rate(elapsed, size, rate)


async def test_ttfb_holds_the_first_byte_of_responses_and_tunnels() -> None:
    hold = 0.3
    with HttpOrigin() as origin, SourceOrigin(10_000, seed=2) as source:
        rules = Rules.from_rules([Rule("127.0.0.1", ttfb=300)])
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
        try:

            def http() -> float:
                t0 = time.monotonic()
                r = proxy_request(("127.0.0.1", server.port), "GET", origin.url("/t"))
                assert r.status == 200 and r.body == b"origin ok /t\n"
                return time.monotonic() - t0

            def tunnel() -> float:
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{source.port}")
                assert r.status == 200
                with s:
                    t0 = time.monotonic()
                    data = r.body + recv_exact(s, 10_000 - len(r.body))
                    first = time.monotonic() - t0
                assert data == blob(2, 10_000)
                return first

            assert await asyncio.to_thread(http) >= hold * 0.95
            assert await asyncio.to_thread(tunnel) >= hold * 0.95
        finally:
            await server.aclose()
        assert all("ttfb=300ms" in f["policy"] for f in server.flows()), server.flows()
    assert "ttfb=300ms" in Rules(ttfb_ms=300).describe()
    with pytest.raises(ValueError, match="ttfb must be"):
        Rules.parse("a.test=direct,ttfb=-5")
