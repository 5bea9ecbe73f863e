"""Segmentation fidelity and footprint, and records that say what happened.

- Chunks are exact across the proxy's source reads: every chunk the engine wrote is of the
  policy's size unless the flow record marks it short (and says why).
- Chunk starts are never closer than the delay (the engine's own clock in the flow record,
  and the receiving socket's arrival times).
- An idle tunnel costs the proxy its two sockets and nothing more.
- Every connection leaves one access record with an outcome: refused at the limit, cut at
  shutdown, a client that went away mid-upload (no status that was never sent).

Nothing here asserts a speed; waits are on events with bounded timeouts.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import time

import pytest
from segproxy import Rules, start_proxy_server
from support import Segproxy, wait_for
from support.loopback import (
    TIMEOUT,
    Recording,
    SinkOrigin,
    blob,
    group_reads,
    proxy_connect,
    recv_exact,
    sha,
)

pytestmark = pytest.mark.timeout(120)


async def until(predicate, what: str) -> None:
    """Waits (without blocking the loop) until ``predicate()`` is true, at most TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def tunnel(port: int, origin_port: int) -> socket.socket:
    s, r = proxy_connect(("127.0.0.1", port), f"127.0.0.1:{origin_port}")
    assert r.status == 200, r
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def unmarked_and_short(flow: dict, direction: str) -> tuple[list[int], list[tuple[int, str]]]:
    short = dict(flow["short_chunks"])
    sizes, shorts = [], []
    for i, (d, size, _t) in enumerate(flow["chunks"]):
        if d != direction:
            continue
        if i in short:
            shorts.append((size, short[i]))
        else:
            sizes.append(size)
    return sizes, shorts


@pytest.mark.parametrize(
    "rule, ok",
    [
        ("strategy=fixed,chunk=100", lambda n: n == 100),
        ("strategy=random,min=50,max=150", lambda n: 50 <= n <= 150),
    ],
)
async def test_chunks_are_exact_across_source_reads(rule, ok):
    data = blob(21, 300_000)
    rng = random.Random(5)
    rules = Rules.parse(f"*=segment_upstream,{rule},delay=0,direction=up")
    server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
    try:
        with SinkOrigin(len(data)) as sink:

            def run() -> str:
                with tunnel(server.port, sink.port) as s:
                    # Many writes of odd sizes: the proxy's reads cut the stream anywhere.
                    off = 0
                    while off < len(data):
                        n = rng.randint(1, 5000)
                        s.sendall(data[off : off + n])
                        off += n
                    return recv_exact(s, 32).hex()

            assert await asyncio.to_thread(run) == sha(data)
        await until(server.flows, "the tunnel's flow record")
        flow = server.flows()[-1]
        sizes, shorts = unmarked_and_short(flow, "up")
        assert sum(sizes) + sum(n for n, _ in shorts) == len(data)
        # Every chunk not marked short has the policy's size, whatever the read boundaries.
        bad = [n for n in sizes if not ok(n)]
        assert not bad, f"{len(bad)} unmarked chunks of the wrong size: {bad[:20]}"
        # A short chunk is the stream's end, or a flush after the source went quiet.
        assert all(why in ("end", "idle") for _, why in shorts), shorts
        assert len(shorts) <= len(sizes) // 20, f"too many short chunks: {shorts}"
    finally:
        await server.aclose()


async def test_chunk_starts_are_never_closer_than_the_delay():
    rules = Rules.parse("*=segment_upstream,strategy=fixed,chunk=200,delay=3,direction=both")
    server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
    data = blob(22, 40 * 200)
    try:
        with SinkOrigin(len(data)) as sink:

            def run() -> None:
                with tunnel(server.port, sink.port) as s:
                    s.sendall(data)
                    assert recv_exact(s, 32).hex() == sha(data)

            await asyncio.to_thread(run)
            rec: Recording = sink.recordings[0]
        await until(server.flows, "the flow record")
        starts = [t for d, _n, t in server.flows()[-1]["chunks"] if d == "up"]
        assert len(starts) == 40
        # The engine's clock: each chunk started no earlier than the previous start + 3 ms.
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert min(gaps) >= 0.003 - 1e-6, gaps
        # The receiver saw whole chunks: a late reader may find two in one read, but a chunk
        # (one write, TCP_NODELAY) never arrives split.
        bursts = group_reads(rec.reads, 0.0005)
        assert sum(n for _, n in bursts) == len(data)
        assert all(n % 200 == 0 for _, n in bursts), rec.reads
        assert len(bursts) >= 5, rec.reads
    finally:
        await server.aclose()


def test_idle_tunnels_hold_two_descriptors_each():
    with SinkOrigin(1 << 30) as sink, Segproxy() as proxy:
        fd_dir = f"/proc/{proxy.pid}/fd"
        # One tunnel first, moving bytes, so lazily created runtime state is in the baseline.
        with tunnel(proxy.port, sink.port) as s:
            s.sendall(b"x" * 100_000)
        before = len(os.listdir(fd_dir))
        socks = [tunnel(proxy.port, sink.port) for _ in range(100)]
        try:
            for s in socks:
                s.sendall(b"hello")  # bytes moved, then idle
            assert wait_for(
                lambda: (
                    len(sink.recordings) >= 101
                    and all(len(r.data) >= 5 for r in sink.recordings[1:])
                ),
                timeout=TIMEOUT,
            ), "bytes through every tunnel"
            held = len(os.listdir(fd_dir)) - before
            assert held <= 100 * 3, f"{held} descriptors for 100 idle tunnels"
            # (The warm-up tunnel's sockets may close meanwhile: a little under 200 is fine.)
            assert held >= 100 * 2 - 10, f"{held}: each tunnel needs its two sockets"
        finally:
            for s in socks:
                s.close()


async def test_refusal_at_the_connection_limit_is_recorded():
    server = await start_proxy_server(
        host="127.0.0.1", port=0, max_connections=1, record_flows=True
    )
    try:

        def run() -> bytes:
            first = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            try:
                # The first connection is being served (it sent a partial head).
                first.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\n")
                second = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
                with second:
                    answer = b""
                    while chunk := second.recv(4096):
                        answer += chunk
                    return answer
            finally:
                first.close()

        answer = await asyncio.to_thread(run)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        records = [r for r in server.access_records() if r["outcome"] == "refused_limit"]
        assert len(records) == 1, server.access_records()
        assert records[0]["status"] == 503
        assert "too many connections" in records[0]["line"]
        # One flow record too, the same flow: every connection touched leaves one of each.
        (flow,) = [f for f in server.flows() if f["outcome"] == "refused_limit"]
        assert (flow["id"], flow["status"], flow["kind"]) == (records[0]["id"], 503, "refused")
    finally:
        await server.aclose()


async def test_a_rejected_head_leaves_one_access_and_one_flow_record():
    server = await start_proxy_server(host="127.0.0.1", port=0, record_flows=True)
    try:

        def run() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
                s.sendall(b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n")
                return s.recv(100)

        assert (await asyncio.to_thread(run)).startswith(b"HTTP/1.1 400 ")
        await until(server.flows, "the flow record")
        (record,) = server.access_records()
        (flow,) = server.flows()
        assert record["id"] == flow["id"]
        assert (flow["status"], flow["outcome"], flow["kind"]) == (400, "rejected", "forward")
        assert flow["error"] == record["error"] and flow["end"] >= flow["start"]
    finally:
        await server.aclose()


async def test_a_client_gone_mid_upload_is_not_logged_as_a_status_never_sent():
    with SinkOrigin(1 << 20) as sink:
        server = await start_proxy_server(host="127.0.0.1", port=0)
        try:

            def run() -> None:
                s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
                s.sendall(
                    f"POST http://127.0.0.1:{sink.port}/up HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: 100000\r\n\r\n".encode()
                    + b"a" * 1000
                )
                assert wait_for(
                    lambda: sink.recordings and len(sink.recordings[0].data) >= 1000,
                    timeout=TIMEOUT,
                ), "the origin got the first bytes"
                s.close()

            await asyncio.to_thread(run)
            await until(server.access_records, "the access record")
            (record,) = server.access_records()
            assert record["outcome"] == "client_aborted", record
            assert record["status"] == 0, record
            assert "outcome=client_aborted" in record["line"]
        finally:
            await server.aclose()


async def test_exchanges_and_tunnels_cut_at_shutdown_leave_records():
    """An exchange waiting for a response and an open tunnel, cut at the shutdown deadline:
    one record each, outcome cut_at_shutdown."""
    silent = socket.create_server(("127.0.0.1", 0))
    silent_port = silent.getsockname()[1]
    accepted: list[socket.socket] = []
    try:
        with SinkOrigin(1 << 20) as sink:
            server = await start_proxy_server(host="127.0.0.1", port=0, record_flows=True)
            s1 = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            s1.sendall(f"GET http://127.0.0.1:{silent_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            conn, _ = await asyncio.to_thread(silent.accept)  # the request reached the origin
            accepted.append(conn)
            s2 = await asyncio.to_thread(tunnel, server.port, sink.port)
            await server.aclose(grace=0.2)
            outcomes = sorted((r["method"], r["outcome"]) for r in server.access_records())
            assert outcomes == [("CONNECT", "cut_at_shutdown"), ("GET", "cut_at_shutdown")], (
                server.access_records()
            )
            assert sorted(f["outcome"] for f in server.flows()) == [
                "cut_at_shutdown",
                "cut_at_shutdown",
            ]
            s1.close()
            s2.close()
    finally:
        for c in accepted:
            c.close()
        silent.close()


def test_cli_access_log_names_the_outcome(tmp_path):
    log = tmp_path / "access.log"
    with Segproxy(["--access-log", str(log)]) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        with s:
            s.sendall(b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400 ")
        assert wait_for(lambda: log.exists() and "outcome=" in log.read_text(), timeout=TIMEOUT), (
            "an access line"
        )
    assert "outcome=rejected" in log.read_text()
