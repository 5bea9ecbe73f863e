"""Counters of a running server: `server.stats()` in process and `/metrics` (Prometheus text
format) from the CLI's `--stats-port`, after known traffic through the proxy with real
clients and origins on loopback (a GET, a POST with a body, a CONNECT tunnel, a request a
rule blocks, a malformed request, a connection refused at the limit, an intercepted CONNECT).
Every wait polls with a deadline."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import segproxy
from support import Segproxy, wait_for
from support.clients import Conn, get_via
from support.origins import SinkThenReplyOrigin

pytestmark = pytest.mark.timeout(90)

BLOCK_RULE = "blocked.test=direct,action=block,reason=not here"
OUTCOMES = [
    "blocked",
    "rejected",
    "refused_limit",
    "error",
    "client_aborted",
    "origin_aborted",
    "idle_timeout",
    "cut_at_shutdown",
    "fault",
]
METRICS_LINE = re.compile(r"segproxy: metrics at (http://\S+/metrics)")


def errors(**counts: int) -> dict[str, int]:
    return {o: counts.get(o, 0) for o in OUTCOMES}


def zero_stats() -> dict:
    return {
        "connections_open": 0,
        "connections_total": 0,
        "requests_total": 0,
        "tunnels_open": 0,
        "tunnels_total": 0,
        "intercepts_open": 0,
        "intercepts_total": 0,
        "bytes_up": 0,
        "bytes_down": 0,
        "errors": errors(),
    }


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    """Polls `predicate` until true; fails naming `what` past the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def open_tunnel(port: int, authority: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = s.recv(1)  # one at a time: nothing past the head is consumed
        assert byte, f"proxy closed during CONNECT: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 200 "), head
    return s


def read_to_eof(s: socket.socket) -> bytes:
    out = b""
    while piece := s.recv(65536):
        out += piece
    return out


class Traffic:
    """Drives the known traffic through a proxy on `port`, in steps, and says what the
    counters must show afterwards."""

    UP = 300  # the POST's body
    GEN = 1000  # the GET's response body
    TUNNELLED = 5000  # bytes sent through the tunnel

    def __init__(self, port: int, origin, sink: SinkThenReplyOrigin) -> None:
        self.port, self.origin, self.sink = port, origin, sink
        self.reply = b""

    def plain(self) -> None:
        r = get_via(self.port, self.origin.url(f"/gen/{self.GEN}"))
        assert r.status == 200 and r.body_len == self.GEN
        body = b"u" * self.UP
        with Conn(self.port) as c:
            url = self.origin.url("/echo")
            c.send(
                f"POST {url} HTTP/1.1\r\nHost: {self.origin.authority}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            r = c.read_response()
        assert r.status == 200 and r.body == body

    def open_tunnel(self) -> socket.socket:
        return open_tunnel(self.port, f"127.0.0.1:{self.sink.port}")

    def finish_tunnel(self, s: socket.socket) -> None:
        with s:
            s.sendall(b"t" * self.TUNNELLED)
            s.shutdown(socket.SHUT_WR)
            self.reply = read_to_eof(s)
        assert self.reply.startswith(f"{self.TUNNELLED} ".encode()), self.reply

    def refused(self) -> None:
        r = get_via(self.port, "http://blocked.test/x")
        assert r.status == 403 and b"not here" in r.body
        with Conn(self.port) as c:
            c.send(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n")
            assert c.read_response().status == 400

    def expected(self) -> dict:
        return {
            **zero_stats(),
            # GET, POST, CONNECT, blocked, malformed: one connection each.
            "connections_total": 5,
            "requests_total": 5,
            "tunnels_total": 1,
            "bytes_up": self.UP + self.TUNNELLED,
            "bytes_down": self.GEN + self.UP + len(self.reply),
            "errors": errors(blocked=1, rejected=1),
        }


async def test_stats_after_known_traffic(make_proxy, origin):
    server = await make_proxy(rules=BLOCK_RULE)
    assert server.stats() == zero_stats()
    assert server.stats_address is None and server.metrics_url is None
    with SinkThenReplyOrigin() as sink:
        traffic = Traffic(server.port, origin, sink)
        traffic.plain()
        tunnel = traffic.open_tunnel()
        await until(lambda: server.stats()["tunnels_open"] == 1, "the tunnel to count as open")
        during = server.stats()
        assert during["tunnels_total"] == 1 and during["connections_open"] >= 1
        traffic.finish_tunnel(tunnel)
        traffic.refused()
        await until(
            lambda: (
                server.stats()["requests_total"] == 5 and server.stats()["connections_open"] == 0
            ),
            "every record written and every connection closed",
        )
    stats = server.stats()
    assert stats == traffic.expected()
    # The counts agree with the access records they were counted from.
    records = server.access_records()
    assert len(records) == stats["requests_total"]
    assert sum(r["bytes_up"] for r in records) == stats["bytes_up"]
    assert sum(r["bytes_down"] for r in records) == stats["bytes_down"]
    for outcome in OUTCOMES:
        assert stats["errors"][outcome] == sum(r["outcome"] == outcome for r in records)


async def test_refused_at_the_connection_limit(make_proxy):
    server = await make_proxy(max_connections=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10):
        await until(lambda: server.stats()["connections_open"] == 1, "the held connection")
        with Conn(server.port) as c:
            assert c.read_response().status == 503
        await until(lambda: server.stats()["requests_total"] == 1, "the refusal's record")
    await until(lambda: server.stats()["connections_open"] == 0, "connections to close")
    # The held connection sent nothing, so it leaves no record.
    assert server.stats() == {
        **zero_stats(),
        "connections_total": 2,
        "requests_total": 1,
        "errors": errors(refused_limit=1),
    }


async def test_intercepted_connects_are_counted(make_proxy, tmp_path):
    pytest.importorskip("cryptography")
    import ssl

    from support import make_origin_certs
    from support.origins import HttpsEchoOrigin
    from support.tls_clients import get, read_response_from_file, trusting_context

    origin_dir = tmp_path / "origin"
    origin_dir.mkdir()
    origin_ca, leaf, key = make_origin_certs(origin_dir)
    store = segproxy.load_or_create_ca(tmp_path / "ca")
    server = await make_proxy(tls_store=store, upstream_ca=[origin_ca])
    with HttpsEchoOrigin(leaf, key) as echo:
        s = open_tunnel(server.port, f"localhost:{echo.port}")
        ctx = trusting_context(tmp_path / "ca" / "ca-cert.pem")
        with ctx.wrap_socket(s, server_hostname="localhost") as tls:
            assert isinstance(tls, ssl.SSLSocket)
            f = tls.makefile("rb")
            status, _, body = get(tls, "localhost", "/chunked?n=4&size=500", f)
            assert status == 200 and len(body) == 2000
            tls.sendall(b"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 700\r\n\r\n")
            tls.sendall(b"p" * 700)
            status, _, answer = read_response_from_file(f)
            assert status == 200 and answer.endswith(b" 700")
            await until(lambda: server.stats()["requests_total"] == 2, "the inner records")
            during = server.stats()
            assert (during["intercepts_open"], during["intercepts_total"]) == (1, 1)
            assert during["tunnels_total"] == 0
            f.close()  # the file holds the socket open too
    await until(
        lambda: (
            server.stats()["intercepts_open"] == 0
            and server.stats()["connections_open"] == 0
            and server.stats()["requests_total"] == 3
        ),
        "the intercepted connection to close",
    )
    stats = server.stats()
    # The CONNECT's own record carries no bytes: the inner requests' records do.
    assert stats["bytes_up"] == 700
    assert stats["bytes_down"] == 2000 + len(answer)
    assert stats["intercepts_total"] == 1 and stats["tunnels_total"] == 0


def scrape(url: str) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.get(url)


def parse_metrics(text: str) -> dict[str, int]:
    """Samples by name with labels (``segproxy_errors_total{outcome="blocked"}``); checks
    that every sample's family has HELP and TYPE lines, counters named ``_total``."""
    samples: dict[str, int] = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split(" ", 3)[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line:
            name, value = line.rsplit(" ", 1)
            samples[name] = int(value)
            family = name.split("{")[0]
            assert family in types and family in helps, line
            assert family.startswith("segproxy_"), line
            assert (types[family] == "counter") == family.endswith("_total"), line
    return samples


def as_stats(samples: dict[str, int]) -> dict:
    """The samples in the shape of `server.stats()`."""
    return {
        "connections_open": samples["segproxy_connections_open"],
        "connections_total": samples["segproxy_connections_total"],
        "requests_total": samples["segproxy_requests_total"],
        "tunnels_open": samples["segproxy_tunnels_open"],
        "tunnels_total": samples["segproxy_tunnels_total"],
        "intercepts_open": samples["segproxy_intercepts_open"],
        "intercepts_total": samples["segproxy_intercepts_total"],
        "bytes_up": samples['segproxy_bytes_total{direction="up"}'],
        "bytes_down": samples['segproxy_bytes_total{direction="down"}'],
        "errors": {o: samples[f'segproxy_errors_total{{outcome="{o}"}}'] for o in OUTCOMES},
    }


async def test_stats_port_in_process_serves_what_stats_says(make_proxy, origin):
    server = await make_proxy(stats_port=0)
    host, port = server.stats_address
    assert host == "127.0.0.1" and port not in (0, server.port)
    assert server.metrics_url == f"http://127.0.0.1:{port}/metrics"
    assert get_via(server.port, origin.url("/gen/10")).status == 200
    await until(lambda: server.stats()["connections_open"] == 0, "the client to close")
    r = scrape(server.metrics_url)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert as_stats(parse_metrics(r.text)) == server.stats()
    assert scrape(f"http://127.0.0.1:{port}/").status_code == 404
    await server.aclose()
    assert server.stats_address is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_stats_port_must_be_a_port(make_proxy):
    with pytest.raises(ValueError, match="stats_port must be a port number"):
        await make_proxy(stats_port=70000)


def test_cli_stats_port_serves_metrics(origin):
    with (
        SinkThenReplyOrigin() as sink,
        Segproxy(["--stats-port", "0", "--segment-rule", BLOCK_RULE]) as sp,
    ):
        assert wait_for(lambda: METRICS_LINE.search(sp.output()), timeout=10), sp.output()
        url = METRICS_LINE.search(sp.output()).group(1)
        assert url.startswith("http://127.0.0.1:") and url != f"http://127.0.0.1:{sp.port}/metrics"
        before = scrape(url)
        assert before.status_code == 200
        assert before.headers["content-type"].startswith("text/plain; version=0.0.4")
        # The harness's readiness probes connected (and sent nothing): nothing else counted.
        probes = as_stats(parse_metrics(before.text))["connections_total"]
        assert as_stats(parse_metrics(before.text)) == {
            **zero_stats(),
            "connections_total": probes,
        }

        traffic = Traffic(sp.port, origin, sink)
        traffic.plain()
        tunnel = traffic.open_tunnel()
        assert wait_for(
            lambda: as_stats(parse_metrics(scrape(url).text))["tunnels_open"] == 1, timeout=10
        )
        traffic.finish_tunnel(tunnel)
        traffic.refused()

        def settled() -> dict | None:
            stats = as_stats(parse_metrics(scrape(url).text))
            done = stats["requests_total"] == 5 and stats["connections_open"] == 0
            return stats if done else None

        assert wait_for(settled, timeout=10), scrape(url).text
        expected = traffic.expected()
        expected["connections_total"] += probes
        assert settled() == expected
        assert scrape(url.removesuffix("/metrics") + "/other").status_code == 404


def test_cli_busy_stats_port_exits_1_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "segproxy", "--listen-port", "0", "--stats-port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    assert r.returncode == 1, r.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port} (stats port)" in r.stderr, r.stderr


def test_cli_stats_port_is_checked():
    r = subprocess.run(
        [sys.executable, "-m", "segproxy", "--stats-port", "70000"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2 and "port must be 0..65535" in r.stderr, r.stderr


def test_every_metric_is_documented():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "stats.md").read_text()
    for name in [
        "segproxy_connections_open",
        "segproxy_connections_total",
        "segproxy_requests_total",
        "segproxy_tunnels_open",
        "segproxy_tunnels_total",
        "segproxy_intercepts_open",
        "segproxy_intercepts_total",
        "segproxy_bytes_total",
        "segproxy_errors_total",
        *OUTCOMES,
    ]:
        assert f"`{name}" in doc, name
