#!/usr/bin/env python3
"""Shaping as asked: does `rate=` give the asked time, and does `latency=` keep throughput?

Through one in-process segproxy per case, on loopback, a client downloads from a raw TCP
origin through a CONNECT tunnel (and, for `rate=`, from an HTTP origin through plain HTTP):

- ``rate``: a 1 MB download at ``rate=100k`` (expected 10 s; the issue asks for ± 5 %);
- ``latency``: time to first byte and throughput of a 20 MB download with ``latency=100``,
  against the same download with no rules in the same run (ratio), and the time a pause of
  100 ms per 16 KiB read would take instead.

    python bench/shaping.py               # both
    python bench/shaping.py --only rate
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from segproxy import Rules, start_proxy_server
from support.loopback import (
    HttpOrigin,
    SourceOrigin,
    proxy_connect,
    proxy_request,
    recv_exact,
)


async def tunnel_download(rules_text: str | None, size: int) -> tuple[float, float]:
    """(seconds to the first byte, seconds to the last) of a tunnel download of ``size``."""
    with SourceOrigin(size, seed=1) as origin:
        rules = Rules.parse(rules_text.format(port=origin.port)) if rules_text else None
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules)
        try:

            def run() -> tuple[float, float]:
                t0 = time.monotonic()
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{origin.port}")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                with s:
                    first = r.body or s.recv(65536)
                    t_first = time.monotonic() - t0
                    recv_exact(s, size - len(first))
                    return t_first, time.monotonic() - t0

            return await asyncio.to_thread(run)
        finally:
            await server.aclose()


async def http_download(rules_text: str, size: int) -> float:
    with HttpOrigin() as origin:
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=Rules.parse(rules_text))
        try:

            def run() -> float:
                t0 = time.monotonic()
                r = proxy_request(
                    ("127.0.0.1", server.port), "GET", origin.url(f"/blob?n={size}&seed=2")
                )
                assert r.status == 200 and len(r.body) == size
                return time.monotonic() - t0

            return await asyncio.to_thread(run)
        finally:
            await server.aclose()


async def bench_rate() -> None:
    size, rate = 1_000_000, 100_000
    expected = size / rate
    _, tunnel = await tunnel_download("127.0.0.1=direct,direction=down,rate=100k,port={port}", size)
    http = await http_download("127.0.0.1=direct,direction=down,rate=100k", size)
    print("| path | rate | bytes | expected s | measured s | error |")
    print("|---|---|---|---|---|---|")
    for path, took in (("tunnel", tunnel), ("plain HTTP", http)):
        print(
            f"| {path} | 100k | {size:,} | {expected:.2f} | {took:.3f} | "
            f"{(took / expected - 1) * 100:+.2f} % |"
        )


async def bench_latency() -> None:
    size, latency_ms = 20_000_000, 100
    base_first, base_total = await tunnel_download(None, size)
    first, total = await tunnel_download(
        f"127.0.0.1=direct,direction=down,latency={latency_ms},port={{port}}", size
    )
    pause_per_read = (size / 16384) * latency_ms / 1000
    mb = size / 1e6
    print("| tunnel, 20 MB down | first byte ms | total s | MB/s |")
    print("|---|---|---|---|")
    print(f"| no rules | {base_first * 1e3:.1f} | {base_total:.3f} | {mb / base_total:.0f} |")
    print(f"| latency={latency_ms} | {first * 1e3:.1f} | {total:.3f} | {mb / total:.0f} |")
    print(
        f"\nlatency run minus the latency, over no rules: "
        f"{(total - latency_ms / 1000) / base_total:.2f}x; a {latency_ms} ms pause per 16 KiB "
        f"read would take {pause_per_read:.0f} s"
    )


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["rate", "latency"])
    args = p.parse_args()
    if args.only in (None, "rate"):
        await bench_rate()
        print()
    if args.only in (None, "latency"):
        await bench_latency()


if __name__ == "__main__":
    asyncio.run(main())
