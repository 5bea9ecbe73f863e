#!/usr/bin/env python3
"""Intercepted HTTP/2 against intercepted HTTP/1.1: requests per second of h2load
(nghttp2-client) through segproxy's interception to an HTTP/1.1 nginx origin.

h2load cannot use a proxy, so a socat relay on loopback stands in for the client's proxy
setting: each connection h2load opens to it is a ``CONNECT localhost:ORIGIN`` through
segproxy, then raw bytes. h2load then speaks TLS (no verification) with SNI ``localhost``
to segproxy's minted certificate, in HTTP/2 (``-m`` streams at once per connection) or in
HTTP/1.1 (``--h1``, one request at a time per connection), alternately, round by round.
The relay costs both the same. Prints one line per round and the medians.

    python bench/h2load.py --rounds 3 --requests 20000 --clients 10 --streams 10
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import NginxOrigin, Segproxy  # noqa: E402
from support.procs import LOOPBACK, ManagedProcess, free_port, port_accepts  # noqa: E402


def h2load(url: str, requests: int, clients: int, streams: int, h1: bool) -> float:
    args = ["h2load", "-n", str(requests), "-c", str(clients), "-m", str(streams if not h1 else 1)]
    if h1:
        args.append("--h1")
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=600).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not (done and rate) or done.group(1) != done.group(2) or int(done.group(2)) != requests:
        raise RuntimeError(f"h2load did not complete every request:\n{out}")
    return float(rate.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--streams", type=int, default=10, help="concurrent streams per connection")
    p.add_argument("--path", default="/1k.bin")
    a = p.parse_args()
    for tool in ("h2load", "socat"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install nghttp2-client socat)")
    with tempfile.TemporaryDirectory() as tmp:
        ca_dir = Path(tmp) / "ca"
        with NginxOrigin(large_size=1024 * 1024) as origin:
            proxy_args = ["--ca-dir", str(ca_dir), "--upstream-ca", str(origin.cert_path)]
            with Segproxy(proxy_args) as proxy:
                relay_port = free_port()
                relay = ManagedProcess(
                    "socat",
                    [
                        "socat",
                        f"TCP-LISTEN:{relay_port},bind={LOOPBACK},fork,reuseaddr,nodelay",
                        f"PROXY:{LOOPBACK}:localhost:{origin.https_port},proxyport={proxy.port},nodelay",
                    ],
                    workdir=Path(tmp),
                )
                relay.start()
                try:
                    relay.wait_ready(lambda: port_accepts(relay_port), what="listening")
                    url = f"https://localhost:{relay_port}{a.path}"
                    figures: dict[str, list[float]] = {"HTTP/2": [], "HTTP/1.1": []}
                    for n in range(a.rounds):
                        for name, h1 in (("HTTP/2", False), ("HTTP/1.1", True)):
                            rate = h2load(url, a.requests, a.clients, a.streams, h1)
                            figures[name].append(rate)
                            print(f"round {n + 1}: intercepted {name}: {rate:,.0f} req/s")
                finally:
                    relay.stop()
    for name, rates in figures.items():
        print(f"median intercepted {name}: {statistics.median(rates):,.0f} req/s")


if __name__ == "__main__":
    main()
