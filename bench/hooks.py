#!/usr/bin/env python3
"""Cost of Python hooks, loopback only.

1. Hook round trip through the doorbell bridge, engine-free (`_engine.hook_roundtrip`: a tokio
   task asks an `on_response_chunk` hook and awaits its answer): median µs per call with one
   flow calling sequentially, and µs per call (wall time / calls) with 64 flows at once.
2. Forwarded keep-alive rate: wrk -t2 -c64, 1 KiB GETs from nginx, through segproxy run
   in-process by a child Python (one asyncio loop) with
     - no handler,
     - a handler overriding nothing (must run at engine speed: ratio >= 0.95),
     - a handler overriding on_request_received that reads a header and forwards,
   and squid (Debian's, no cache) as the baseline in the same run: the target is the
   handler's rate >= 2 x squid's plain forwarding.

    python bench/hooks.py                 # 3 rounds of 5 s wrk runs
    python bench/hooks.py --quick         # 1 round, 2 s
    python bench/hooks.py --json out.json

Run it with the extension built in release mode (maturin develop --release, or cargo build
--release and copy lib_engine.so to python/segproxy/_engine.abi3.so): debug builds are slow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "python"))

import run as runbench  # noqa: E402  (bench/run.py: wrk helpers, nginx origin)

# ------------------------------------------------------------------------------------------
# the proxy process (child): `hooks.py --serve MODE`


def serve(mode: str) -> None:
    import segproxy

    class Nothing(segproxy.HTTPSForwardProxyHandler):
        pass

    class ReadsHeader(segproxy.HTTPSForwardProxyHandler):
        async def on_request_received(self) -> None:
            if self.request.headers.first("X-Block") is not None:
                self.write_response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            await self.forward_http_request()

    builders = {"none": None, "nothing": Nothing, "header": ReadsHeader}

    async def main() -> None:
        server = await segproxy.start_proxy_server(
            builders[mode], "127.0.0.1", 0, max_connections=4096
        )
        print(f"ready {server.port}", flush=True)
        await server.serve_forever()

    asyncio.run(main())


class ProxyProcess:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __enter__(self) -> ProxyProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", self.mode],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self.proc.kill()
            raise RuntimeError(f"proxy ({self.mode}) did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def proxy_process(mode: str) -> Iterator[tuple[int, int]]:
    """(port, pid) of a fresh proxy for ``mode``: segproxy in a child Python, or squid."""
    if mode == "squid":
        squid = runbench.Squid().__enter__()
        try:
            yield squid.port, squid.pid
        finally:
            squid.stop()
        return
    with ProxyProcess(mode) as p:
        yield p.port, p.proc.pid


# ------------------------------------------------------------------------------------------
# measurements


async def roundtrip(rounds: int) -> dict[str, float]:
    from segproxy import HTTPSForwardProxyHandler, _engine
    from segproxy.handlers import HookRunner

    class Echo(HTTPSForwardProxyHandler):
        async def on_response_chunk(self, chunk: bytes) -> bytes | None:
            return chunk

    runner = HookRunner(Echo, asyncio.get_running_loop())
    try:
        await _engine.hook_roundtrip(runner.bridge, 64, 50)  # warm-up
        seq, conc, lat = [], [], []
        for _ in range(rounds):
            seq.append(statistics.median(await _engine.hook_roundtrip(runner.bridge, 1, 2000)))
            w0, (n0_wake, n0_items) = time.perf_counter(), runner.bridge.stats()
            times = await _engine.hook_roundtrip(runner.bridge, 64, 200)
            wall = time.perf_counter() - w0
            conc.append(wall * 1e6 / len(times))
            lat.append(statistics.median(times))
            wake, items = runner.bridge.stats()
        batch = (items - n0_items) / max(1, wake - n0_wake)
        return {
            "seq_us": statistics.median(seq),
            "conc64_us_per_call": statistics.median(conc),
            "conc64_latency_us": statistics.median(lat),
            "items_per_wakeup": batch,
        }
    finally:
        runner.close()


def keepalive(
    rounds: int, duration: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """req/s and proxy CPU µs per request (utime+stime of the proxy process: load-independent)."""
    bench = SimpleNamespace(args=SimpleNamespace(wrk_threads=2, wrk_connections=64))
    rates: dict[str, list[float]] = {"none": [], "nothing": [], "header": [], "squid": []}
    cpu: dict[str, list[float]] = {k: [] for k in rates}
    tmp = Path(tempfile.mkdtemp(prefix="segproxy-bench-hooks-"))
    with runbench.NginxOrigin(worker_processes=1) as origin:
        hostport = f"{runbench.LOOPBACK}:{origin.http_port}"
        target = f"http://{hostport}/1k.bin"
        for r in range(rounds):
            modes = list(rates)
            modes = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in modes:
                with proxy_process(mode) as (port, pid):
                    url = f"http://127.0.0.1:{port}/"
                    runbench.run_wrk(bench, url, target, hostport, 1, tmp)  # warm-up
                    c0 = runbench.cpu_seconds(pid)
                    res = runbench.run_wrk(bench, url, target, hostport, duration, tmp)
                    used = runbench.cpu_seconds(pid) - c0
                errors = (
                    res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
                )
                rate = res["requests"] / (res["duration_us"] / 1e6)
                per_req = used * 1e6 / max(1, res["requests"])
                print(
                    f"  round {r + 1} {mode:8s} {rate:9.0f} req/s  {per_req:6.1f} µs CPU/req  errors {errors}",
                    file=sys.stderr,
                )
                rates[mode].append(rate)
                cpu[mode].append(per_req)
    return rates, cpu


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
        return 0
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-wrk", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.quick:
        a.rounds, a.duration = 1, 2.0

    rt = asyncio.run(roundtrip(max(a.rounds, 3)))
    print("| hook round trip | µs |\n|---|---|")
    print(f"| sequential, median | {rt['seq_us']:.1f} |")
    print(f"| 64 concurrent flows, wall time per call | {rt['conc64_us_per_call']:.1f} |")
    print(f"| 64 concurrent flows, median latency of one call | {rt['conc64_latency_us']:.0f} |")
    print(f"| hook calls per doorbell wake-up (64 flows) | {rt['items_per_wakeup']:.1f} |")
    out: dict[str, object] = {"roundtrip": rt}
    if not a.skip_wrk:
        rates, cpu = keepalive(a.rounds, a.duration)
        med = {k: statistics.median(v) for k, v in rates.items()}
        mcpu = {k: statistics.median(v) for k, v in cpu.items()}
        print(
            "\n| keep-alive 1 KiB GET, wrk -t2 -c64 | req/s | vs no handler | proxy CPU µs/req |\n|---|---|---|---|"
        )
        for mode, label in [
            ("none", "no handler"),
            ("nothing", "handler overriding nothing"),
            ("header", "on_request_received reads a header, forwards"),
            ("squid", "squid, plain forwarding (baseline)"),
        ]:
            print(
                f"| {label} | {med[mode]:.0f} | {med[mode] / med['none']:.3f} | {mcpu[mode]:.1f} |"
            )
        print(
            f"\nhandler reading a header / squid: {med['header'] / med['squid']:.2f}x (target >= 2)"
        )
        out["keepalive"] = {"rounds": rates, "median": med, "cpu_us_per_request": cpu}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
