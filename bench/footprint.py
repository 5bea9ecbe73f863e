#!/usr/bin/env python3
"""Per-tunnel footprint: descriptors and RSS of idle and segmented CONNECT tunnels.

Three phases, each on a fresh ``segproxy`` process (so each has its own baseline):

1. ``idle``: N plain tunnels opened and left idle (plain relay: no buffer while idle).
2. ``segmented``: N tunnels through ``*=segment_upstream,strategy=fixed,chunk=1024,
   delay=2,direction=both``, each carrying 64 KiB up and 64 KiB down, measured while
   the bytes are moving.
3. After each phase the tunnels close; RSS is read again a few seconds later.

It reports, per tunnel: descriptors (``/proc/PID/fd``) and RSS (``VmRSS``) above the
baseline, and the RSS after close above the baseline. Targets (docs/benchmarks.md): at
most 3 descriptors and 16 KiB per idle tunnel, 64 KiB per segmented tunnel carrying data,
RSS back within 10 MiB of the baseline after close; with every idle tunnel open, a plain
GET through the proxy (new connection each) is timed 20 times: under 50 ms.

    python bench/footprint.py                   # N = 10000 (raises the open-file limit; root)
    python bench/footprint.py --tunnels 2000 --rounds 3

The origin runs in a child process (it holds the other end of every tunnel), and the
client sockets live here; every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import http.server
import os
import resource
import selectors
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support import LOOPBACK, Segproxy  # noqa: E402
from support.loopback import read_head  # noqa: E402

PAYLOAD = 64 * 1024

ORIGIN_CODE = r"""
import selectors, socket, sys
payload = int(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 0), backlog=4096)
srv.setblocking(False)
print(srv.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ)
conns = {}
data = bytes(i % 251 for i in range(payload))
while True:
    for key, _ in sel.select():
        if key.fileobj is srv:
            while True:
                try:
                    c, _ = srv.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                conns[c] = 0
                sel.register(c, selectors.EVENT_READ)
            continue
        c = key.fileobj
        try:
            got = c.recv(65536)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            got = b""
        if not got:
            sel.unregister(c); c.close(); conns.pop(c, None); continue
        conns[c] += len(got)
        if payload and conns[c] >= payload and conns[c] - len(got) < payload:
            c.setblocking(True); c.sendall(data); c.setblocking(False)
"""


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(want, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):
            continue
    return soft


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_tunnels(proxy_port: int, origin_port: int, n: int) -> list[socket.socket]:
    """N CONNECT tunnels, opened 200 at a time, each past its 200 answer."""
    socks: list[socket.socket] = []
    request = f"CONNECT {LOOPBACK}:{origin_port} HTTP/1.1\r\nHost: {LOOPBACK}:{origin_port}\r\n\r\n".encode()
    while len(socks) < n:
        batch = []
        for _ in range(min(200, n - len(socks))):
            s = socket.create_connection((LOOPBACK, proxy_port), timeout=30)
            s.sendall(request)
            batch.append(s)
        for s in batch:
            head, _ = read_head(s)
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"tunnel {len(socks)}: {head[:60]!r}")
            socks.append(s)
    return socks


def move_data(socks: list[socket.socket], payload: int, measure) -> None:
    """Each tunnel sends ``payload`` bytes up and reads ``payload`` back; ``measure`` is
    called once while the bytes are moving (half of all bytes back)."""
    sel = selectors.DefaultSelector()
    data = bytes(i % 251 for i in range(payload))
    left = {}
    for s in socks:
        s.setblocking(False)
        left[s] = [memoryview(data), payload]
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    total, received, measured = payload * len(socks), 0, False
    deadline = time.monotonic() + 600
    while received < total and time.monotonic() < deadline:
        for key, events in sel.select(timeout=1):
            s = key.fileobj
            out, _want = left[s]
            if events & selectors.EVENT_WRITE and out:
                try:
                    n = s.send(out)
                    left[s][0] = out[n:]
                except BlockingIOError:
                    pass
                if not left[s][0]:
                    sel.modify(s, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                try:
                    got = s.recv(65536)
                except BlockingIOError:
                    continue
                received += len(got)
                left[s][1] -= len(got)
                if left[s][1] <= 0:
                    sel.unregister(s)
        if not measured and received >= total // 2:
            measure()
            measured = True
    sel.close()
    if received < total:
        raise RuntimeError(f"only {received} of {total} bytes came back")


class QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def request_latencies_ms(proxy_port: int, web_port: int, count: int = 20) -> list[float]:
    """Time of `count` plain GETs through the proxy, each on a new connection."""
    out = []
    for i in range(count):
        t0 = time.monotonic()
        with socket.create_connection((LOOPBACK, proxy_port), timeout=30) as s:
            s.sendall(
                f"GET http://{LOOPBACK}:{web_port}/{i} HTTP/1.1\r\nHost: {LOOPBACK}:{web_port}\r\n\r\n".encode()
            )
            got = b""
            while b"ok" not in got.split(b"\r\n\r\n", 1)[-1] or b"\r\n\r\n" not in got:
                piece = s.recv(4096)
                if not piece:
                    break
                got += piece
        if not got.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET through the proxy: {got[:80]!r}")
        out.append((time.monotonic() - t0) * 1000)
    return out


def phase(name: str, args, n: int, extra: list[str], payload: int) -> dict:
    origin = subprocess.Popen(
        [sys.executable, "-c", ORIGIN_CODE, str(payload)], stdout=subprocess.PIPE, text=True
    )
    proxy = None
    try:
        origin_port = int(origin.stdout.readline())
        command = shlex.split(args.segproxy_cmd)
        proxy = Segproxy(
            ["--max-connections", str(n + 500), "--log-level", "warning", *extra], command=command
        )
        proxy.__enter__()
        pid = proxy.pid
        # Warm up: a few tunnels open and close, so one-time allocations are in the baseline.
        for s in open_tunnels(proxy.port, origin_port, 50):
            s.close()
        time.sleep(1)
        base_rss, base_fds = rss_kib(pid), fds(pid)
        socks = open_tunnels(proxy.port, origin_port, n)
        snapshot = {}

        def measure() -> None:
            snapshot["rss"], snapshot["fds"] = rss_kib(pid), fds(pid)

        latencies: list[float] = []
        if payload:
            move_data(socks, payload, measure)
        else:
            time.sleep(1)
            measure()
            # A normal request while every idle tunnel is open.
            web = http.server.ThreadingHTTPServer((LOOPBACK, 0), QuietHandler)
            threading.Thread(target=web.serve_forever, daemon=True).start()
            try:
                latencies = request_latencies_ms(proxy.port, web.server_address[1])
            finally:
                web.shutdown()
                web.server_close()
        for s in socks:
            s.close()
        time.sleep(args.settle)
        after = rss_kib(pid)
        return {
            "phase": name,
            "tunnels": n,
            "fds_per_tunnel": (snapshot["fds"] - base_fds) / n,
            "kib_per_tunnel": (snapshot["rss"] - base_rss) / n,
            "base_mib": base_rss / 1024,
            "after_close_mib": (after - base_rss) / 1024,
            "request_ms": (statistics.median(latencies), max(latencies)) if latencies else None,
        }
    finally:
        if proxy is not None:
            proxy.stop()
        origin.kill()
        origin.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tunnels", type=int, default=10_000, help="idle tunnels")
    p.add_argument(
        "--segmented-tunnels",
        type=int,
        default=2_000,
        help="segmented tunnels (each paces its chunks: thousands at once only measure lateness)",
    )
    p.add_argument(
        "--settle", type=float, default=5.0, help="seconds after close before RSS is read again"
    )
    p.add_argument("--phases", default="idle,segmented")
    p.add_argument("--segproxy-cmd", default=f"{sys.executable} -m segproxy")
    args = p.parse_args(argv)
    # The proxy holds two descriptors a tunnel; the client sockets live here and the
    # origin's in its own process.
    limit = raise_nofile(2 * args.tunnels + 1000)
    if limit < 2 * args.tunnels + 500:
        args.tunnels = max(100, (limit - 500) // 2)
        print(
            f"open-file limit {limit}: measuring {args.tunnels} tunnels (as many as it allows)",
            file=sys.stderr,
        )
    segment = "*=segment_upstream,strategy=fixed,chunk=1024,delay=2,direction=both"
    print(
        "| phase | tunnels | fds / tunnel | RSS KiB / tunnel | baseline MiB | RSS after close, MiB above baseline | GET meanwhile, median / max ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.phases.split(","):
        if name == "idle":
            r = phase(name, args, args.tunnels, [], 0)
        else:
            r = phase(
                name,
                args,
                min(args.segmented_tunnels, args.tunnels),
                ["--segment-rule", segment],
                PAYLOAD,
            )
        print(
            f"| {r['phase']} | {r['tunnels']} | {r['fds_per_tunnel']:.2f} | {r['kib_per_tunnel']:.1f} | "
            f"{r['base_mib']:.1f} | {r['after_close_mib']:+.1f} | "
            + (
                f"{r['request_ms'][0]:.1f} / {r['request_ms'][1]:.1f} |"
                if r["request_ms"]
                else "– |"
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
