"""Segmentation through the proxy: content never changes; chunk sizes and spacing seen by a
receiving socket on loopback; directions up / down / both; flow records.

Timing checks assert structure (chunk sizes, order, that a gap exists) with generous
tolerances, never a speed. Reads are grouped into bursts by arrival gaps: with a delay D
between chunks, the reads of one chunk arrive together and the next chunk at least ~D later.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import socket
import time
from pathlib import Path

import pytest
from segproxy import Rules, start_proxy_server
from support import Segproxy, free_port, wait_for
from support.loopback import (
    TIMEOUT,
    FramedOrigin,
    HttpOrigin,
    HttpRecordingOrigin,
    Recording,
    SinkOrigin,
    SourceOrigin,
    TcpEchoOrigin,
    blob,
    framed_exchange,
    group_reads,
    proxy_connect,
    proxy_request,
    recording_recv,
    recv_exact,
    sha,
    split_sizes,
)

pytestmark = pytest.mark.timeout(120)

DELAY_MS = 60
GAP = DELAY_MS / 1000 / 3  # reads closer than this belong to one chunk


def bursts(rec: Recording) -> list[tuple[float, int]]:
    return group_reads(rec.reads, GAP)


def proxy_chunks(flows_file: Path, direction: str, target: str = "") -> list[tuple[float, int]]:
    """The proxy's own account of the chunks it wrote one way, from its flow records
    (`--record-flows`): (start time, size) per chunk, across the file's flows in order
    (only flows whose target contains ``target``)."""
    chunks: list[tuple[float, int]] = []
    for line in flows_file.read_text().splitlines():
        flow = json.loads(line)
        if target not in flow["target"]:
            continue
        for d, size, t in flow["chunks"]:
            if d == direction:
                chunks.append((t, size))
    return chunks


def assert_chunked(
    rec: Recording, sizes: list[int], flows_file: Path, direction: str, target: str = ""
) -> None:
    """The receiver saw the bytes cut exactly at the chunks' ends, and the proxy wrote those
    chunks, each starting at least the delay after the previous one.

    A receiver on a loaded machine may run late and read two chunks in one go (the kernel
    joins them), so it is checked for never seeing a chunk split; the exact sizes and the
    spacing are the proxy's flow records, whose times are taken as each chunk is written.
    """
    reads = [n for _, n in bursts(rec)]
    ends = set(itertools.accumulate(sizes))
    seen = list(itertools.accumulate(reads))
    assert seen and seen[-1] == sum(sizes), (reads, sizes)
    assert set(seen) <= ends, f"a chunk was split on the wire: reads {reads}, chunks {sizes}"
    written = proxy_chunks(flows_file, direction, target)
    assert [n for _, n in written] == sizes, (written, sizes)
    starts = [t for t, _ in written]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Deadlines, not sleeps: a chunk never starts before the previous start + delay.
    assert gaps and min(gaps) >= DELAY_MS / 1000 - 1e-4, f"chunks closer than the delay: {gaps}"


def tunnel(addr, origin_port: int, rec: Recording | None = None) -> socket.socket:
    """A CONNECT tunnel; tunnel bytes read with the answer go to ``rec`` as its first read
    (else there must be none)."""
    s, r = proxy_connect(addr, f"127.0.0.1:{origin_port}")
    assert r.status == 200, r
    if rec is not None and r.body:
        rec.reads.append((time.monotonic(), len(r.body)))
        rec.data += r.body
    else:
        assert not r.body, f"unexpected bytes after the CONNECT answer: {r.body[:100]!r}"
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


# --------------------------------------------------------------------------------------
# content never changes


def random_policy(rng: random.Random, size: int) -> dict:
    strategy = rng.choice(["none", "fixed", "random"])
    direction = rng.choice(["up", "down", "both"])
    # A delay only with chunks big enough that the transfer stays short (< ~1 s).
    delay = rng.choice([0, 0, 1, 3])
    smallest = 1 if delay == 0 else max(1, size // 200)
    chunk = rng.randint(smallest, max(smallest, rng.choice([16, 1500, 70000])))
    lo = rng.randint(smallest, max(smallest, chunk))
    hi = rng.randint(lo, lo + rng.choice([0, 10, 5000]))
    return dict(strategy=strategy, chunk=chunk, min=lo, max=hi, delay_ms=delay, direction=direction)


@pytest.mark.parametrize("seed", range(8))
async def test_content_never_changes_random_policies(seed):
    rng = random.Random(seed)
    up_size = rng.choice([0, 1, 1000, 65537, 300_000])
    down_size = rng.choice([1, 999, 100_000, 250_000])
    policy = random_policy(rng, max(up_size, down_size))
    up = rng.randbytes(up_size)
    server = await start_proxy_server(port=0, rules=Rules(**policy), record_flows=True)
    try:
        with FramedOrigin() as framed, HttpOrigin() as http:

            def run():
                # CONNECT tunnel, both directions.
                with tunnel(server.address, framed.port) as s:
                    digest, down = framed_exchange(s, up, down_size, seed)
                assert digest.hex() == sha(up), f"tunnel upload changed under {policy}"
                assert sha(down) == sha(blob(seed, down_size)), (
                    f"tunnel download changed under {policy}"
                )
                # HTTP request body up and response body down (fresh connection each).
                r = proxy_request(
                    server.address, "POST", http.url(f"/upload?n={down_size}&seed={seed}"), body=up
                )
                assert r.status == 200, r
                assert r.header("X-Body-Sha256") == sha(up), f"HTTP body changed under {policy}"
                assert r.header("X-Body-Length") == str(len(up))
                assert sha(r.body) == sha(blob(seed, down_size)), (
                    f"HTTP response changed under {policy}"
                )

            await asyncio.to_thread(run)
            assert not framed.errors, framed.errors
        # The flow records saw every byte the client sent through the tunnel.
        assert await asyncio.to_thread(wait_for, lambda: len(server.flows()) >= 2)
        flows = server.flows()
        t = next(f for f in flows if f["kind"] == "tunnel")
        assert sum(n for d, n, _ in t["chunks"] if d == "up") == 24 + up_size
        assert sum(n for d, n, _ in t["chunks"] if d == "down") == 32 + down_size
    finally:
        await server.aclose()


# --------------------------------------------------------------------------------------
# chunk sizes and spacing on the wire


N = 700
TOTAL = 5 * N + 300  # 3800 bytes: five full chunks and a short one


def seg_args(
    direction: str = "up", chunk: int = N, delay: int = DELAY_MS, flows: Path | None = None
) -> list[str]:
    return (["--record-flows", str(flows)] if flows else []) + [
        "--segmentation",
        "segment_upstream",
        "--segment-strategy",
        "fixed",
        "--segment-chunk-size",
        str(chunk),
        "--segment-delay-ms",
        str(delay),
        "--segment-direction",
        direction,
    ]


def test_tunnel_up_fixed_chunks_with_delay(tmp_path):
    data = blob(7, TOTAL)
    flows = tmp_path / "flows.jsonl"
    with SinkOrigin(TOTAL) as sink, Segproxy(seg_args("up", flows=flows)) as proxy:
        with tunnel(("127.0.0.1", proxy.port), sink.port) as s:
            s.sendall(data)
            assert recv_exact(s, 32).hex() == sha(data)
    rec = sink.recordings[0]
    assert bytes(rec.data) == data
    assert_chunked(rec, split_sizes(TOTAL, N), flows, "up")


def test_tunnel_down_fixed_chunks_with_delay_and_up_untouched(tmp_path):
    flows = tmp_path / "flows.jsonl"
    with SourceOrigin(TOTAL, seed=9) as source, Segproxy(seg_args("down", flows=flows)) as proxy:
        rec = Recording()
        with tunnel(("127.0.0.1", proxy.port), source.port, rec) as s:
            recording_recv(s, TOTAL, rec)
    assert bytes(rec.data) == blob(9, TOTAL)
    assert_chunked(rec, split_sizes(TOTAL, N), flows, "down")

    # direction=down leaves client -> destination bytes alone: one burst, no pauses.
    data = blob(8, TOTAL)
    with SinkOrigin(TOTAL) as sink, Segproxy(seg_args("down")) as proxy:
        with tunnel(("127.0.0.1", proxy.port), sink.port) as s:
            s.sendall(data)
            assert recv_exact(s, 32).hex() == sha(data)
    assert [n for _, n in bursts(sink.recordings[0])] == [TOTAL], sink.recordings[0].reads


def test_tunnel_both_directions_segmented(tmp_path):
    data = blob(5, TOTAL)
    flows = tmp_path / "flows.jsonl"
    with TcpEchoOrigin() as echo, Segproxy(seg_args("both", flows=flows)) as proxy:
        with tunnel(("127.0.0.1", proxy.port), echo.port) as s:
            s.sendall(data)
            rec = Recording()
            recording_recv(s, TOTAL, rec)
    assert bytes(rec.data) == data
    up = echo.recordings[0]
    assert bytes(up.data) == data
    assert_chunked(up, split_sizes(TOTAL, N), flows, "up")
    # Each echoed chunk comes back as its own chunk, spaced again by the delay.
    assert_chunked(rec, split_sizes(TOTAL, N), flows, "down")


def test_http_request_body_fixed_chunks_with_delay(tmp_path):
    body = blob(3, TOTAL)
    flows = tmp_path / "flows.jsonl"
    with HttpRecordingOrigin() as origin, Segproxy(seg_args("up", flows=flows)) as proxy:
        r = proxy_request(
            ("127.0.0.1", proxy.port), "POST", f"http://127.0.0.1:{origin.port}/up", body=body
        )
        assert r.status == 200 and r.body == b"ok"
    rec = origin.recordings[0]
    head, got = bytes(rec.data).split(b"\r\n\r\n", 1)
    assert got == body
    head_len = len(head) + 4
    # The head and the body are one stream cut into N-byte chunks: a chunk may hold the
    # head's end and the body's start, and only the message's last chunk is short.
    assert_chunked(rec, split_sizes(head_len + TOTAL, N), flows, "up")


def test_http_response_body_down_fixed_chunks_with_delay(tmp_path):
    flows = tmp_path / "flows.jsonl"
    with HttpOrigin() as origin, Segproxy(seg_args("down", flows=flows)) as proxy:
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        with s:
            s.sendall(
                f"GET {origin.url(f'/blob?n={TOTAL}&seed=4')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            rec = Recording()
            while True:
                piece = s.recv(65536)
                if not piece:
                    break
                rec.reads.append((time.monotonic(), len(piece)))
                rec.data += piece
    head, got = bytes(rec.data).split(b"\r\n\r\n", 1)
    assert got == blob(4, TOTAL)
    assert_chunked(rec, split_sizes(len(head) + 4 + TOTAL, N), flows, "down")


def test_random_strategy_chunk_bounds(tmp_path):
    data = blob(11, 6000)
    flows = tmp_path / "flows.jsonl"
    args = [
        "--record-flows",
        str(flows),
        "--segmentation",
        "segment_upstream",
        "--segment-strategy",
        "random",
        "--segment-min-size",
        "300",
        "--segment-max-size",
        "900",
        "--segment-delay-ms",
        str(DELAY_MS),
    ]
    with SinkOrigin(len(data)) as sink, Segproxy(args) as proxy:
        with tunnel(("127.0.0.1", proxy.port), sink.port) as s:
            s.sendall(data)
            assert recv_exact(s, 32).hex() == sha(data)
    sizes = [n for _, n in proxy_chunks(flows, "up")]
    assert sum(sizes) == len(data)
    assert all(300 <= n <= 900 for n in sizes[:-1]), sizes
    assert 1 <= sizes[-1] <= 900
    assert len(set(sizes[:-1])) > 1, f"random sizes all equal: {sizes}"
    assert_chunked(sink.recordings[0], sizes, flows, "up")


def test_rule_policy_applies_only_to_matching_destination(tmp_path):
    data = blob(12, TOTAL)
    flows = tmp_path / "flows.jsonl"
    with SinkOrigin(TOTAL) as seg_sink, SinkOrigin(TOTAL) as plain_sink:
        rule = f"127.0.0.1=segment_upstream,chunk={N},delay={DELAY_MS},port={seg_sink.port}"
        with Segproxy(["--segment-rule", rule, "--record-flows", str(flows)]) as proxy:
            for sink in (seg_sink, plain_sink):
                with tunnel(("127.0.0.1", proxy.port), sink.port) as s:
                    s.sendall(data)
                    assert recv_exact(s, 32).hex() == sha(data)
    # chunk= without strategy= means fixed.
    assert_chunked(seg_sink.recordings[0], split_sizes(TOTAL, N), flows, "up", f":{seg_sink.port}")
    assert [n for _, n in bursts(plain_sink.recordings[0])] == [TOTAL]


# --------------------------------------------------------------------------------------
# flow records


async def test_flow_records_in_memory():
    rules = Rules.parse(
        "127.0.0.1=segment_upstream,strategy=fixed,chunk=500,direction=both", source="flows"
    )
    server = await start_proxy_server(port=0, rules=rules, record_flows=True)
    try:
        up = blob(1, 4321)
        with FramedOrigin() as framed, HttpOrigin() as http:

            def run():
                with tunnel(server.address, framed.port) as s:
                    digest, down = framed_exchange(s, up, 2345, 2)
                assert digest.hex() == sha(up) and down == blob(2, 2345)
                r = proxy_request(
                    server.address, "POST", http.url("/upload?n=1500&seed=6"), body=up
                )
                assert r.status == 200 and r.body == blob(6, 1500)

            await asyncio.to_thread(run)
        assert await asyncio.to_thread(wait_for, lambda: len(server.flows()) >= 2)
        flows = server.flows()
        kinds = sorted(f["kind"] for f in flows)
        assert "tunnel" in kinds, flows
        t = next(f for f in flows if f["kind"] == "tunnel")
        assert t["method"] == "CONNECT" and t["rule"] == "flows:1"
        assert "fixed" in t["policy"] and "500" in t["policy"]
        assert t["direction"] == "both"
        ups = [n for d, n, _ in t["chunks"] if d == "up"]
        downs = [n for d, n, _ in t["chunks"] if d == "down"]
        assert sum(ups) == 24 + len(up) and max(ups) <= 500
        assert sum(downs) == 32 + 2345 and max(downs) <= 500
        times = [ts for _, _, ts in t["chunks"]]
        assert times == sorted(times)
        assert t["start"] <= times[0] and t["end"] is not None and times[-1] <= t["end"]
        assert t["dropped_chunks"] == 0
        f = next(f for f in flows if f["kind"] != "tunnel")
        ups = [n for d, n, _ in f["chunks"] if d == "up"]
        downs = [n for d, n, _ in f["chunks"] if d == "down"]
        # The HTTP flow's up chunks carry the request head and body, at most 500 bytes each.
        assert sum(ups) > len(up) and max(ups) <= 500
        assert sum(downs) >= 1500 and max(downs) <= 500
        assert server.flows(clear=True) and server.flows() == []
    finally:
        await server.aclose()


async def test_refused_and_failed_flows_are_recorded_with_their_status():
    """A blocked CONNECT, one to a refused port and a failed HTTP request are flows too, with
    the status the client got and the reason; a tunnel that opened has status 200."""
    rules = Rules.parse("blocked.test=direct,action=block,reason=not this one", source="r")
    server = await start_proxy_server(port=0, rules=rules, record_flows=True)
    dead = free_port()
    try:
        with FramedOrigin() as framed:

            def run():
                for target in ("blocked.test:443", f"127.0.0.1:{dead}"):
                    s, r = proxy_connect(server.address, target)
                    s.close()
                    assert r.status in (403, 502), r
                with tunnel(server.address, framed.port) as s:
                    framed_exchange(s, b"x" * 100, 10, 1)
                assert (
                    proxy_request(server.address, "GET", f"http://127.0.0.1:{dead}/gone").status
                    == 502
                )

            await asyncio.to_thread(run)
        assert await asyncio.to_thread(wait_for, lambda: len(server.flows()) >= 4)
        by_target = {f["target"]: f for f in server.flows()}
        blocked = by_target["blocked.test:443"]
        assert (blocked["status"], blocked["rule"]) == (403, "r:1") and "not this one" in blocked[
            "error"
        ]
        refused = by_target[f"127.0.0.1:{dead}"]
        assert refused["status"] == 502 and f"127.0.0.1:{dead}" in refused["error"]
        opened = by_target[f"127.0.0.1:{framed.port}"]
        assert (opened["status"], opened["error"], opened["kind"]) == (200, None, "tunnel")
        failed = next(f for f in server.flows() if f["method"] == "GET")
        assert failed["status"] == 502 and failed["error"] and failed["end"] is not None
    finally:
        await server.aclose()


async def test_flows_empty_without_record_flows():
    server = await start_proxy_server(port=0, rules=Rules(strategy="fixed", chunk=100))
    try:
        with FramedOrigin() as framed:

            def run():
                with tunnel(server.address, framed.port) as s:
                    framed_exchange(s, b"x" * 1000, 10, 1)

            await asyncio.to_thread(run)
        await asyncio.sleep(0.2)
        assert server.flows() == []
    finally:
        await server.aclose()


def test_record_flows_file_and_chunk_size_without_strategy_means_fixed(tmp_path):
    flows_file = tmp_path / "flows.jsonl"
    data = blob(13, 3000)
    args = [
        "--segmentation",
        "segment_upstream",
        "--segment-chunk-size",
        "256",
        "--record-flows",
        str(flows_file),
    ]
    with SinkOrigin(len(data)) as sink, Segproxy(args) as proxy:
        with tunnel(("127.0.0.1", proxy.port), sink.port) as s:
            s.sendall(data)
            assert recv_exact(s, 32).hex() == sha(data)
        assert wait_for(
            lambda: flows_file.exists() and flows_file.read_text().strip() != "", timeout=10
        )
    lines = [json.loads(line) for line in flows_file.read_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    flow = lines[0]
    assert flow["kind"] == "tunnel" and flow["method"] == "CONNECT"
    assert flow["rule"] == "default"
    assert "fixed" in flow["policy"] and "256" in flow["policy"], flow["policy"]
    ups = [n for d, n, _ in flow["chunks"] if d == "up"]
    assert ups == split_sizes(len(data), 256), ups
    downs = [n for d, n, _ in flow["chunks"] if d == "down"]
    assert sum(downs) == 32
    assert bytes(sink.recordings[0].data) == data
