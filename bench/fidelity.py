#!/usr/bin/env python3
"""Segmentation fidelity: do chunks leave with the asked size and spacing?

For every path segproxy segments (CONNECT tunnels up and down, plain HTTP
bodies up and down, and both sides of an intercepted TLS flow), a receiver on
loopback records the size and arrival time of every ``recv`` (TCP_NODELAY on
the proxy side makes each chunk its own segment). From those it reports:

- ``median``/``p99``/``max`` of (gap between consecutive chunk arrivals - asked
  delay), in milliseconds; ``short`` is the share of gaps shorter than asked;
- ``exact``: the share of chunks (the stream's last one excluded) of exactly the
  fixed size, or within [min, max] for random;
- ``cpu``: the proxy's CPU time over the scenario, in % of one core.

Arrival times are the kernel's (SO_TIMESTAMPNS), so the receiver's own wake-up latency
is not counted against the proxy. Intercepted flows are measured on the encrypted bytes: the receiver reads the
raw TCP stream under its TLS session (``ssl.MemoryBIO``), after the handshake.

    python bench/fidelity.py                  # delays 1, 5, 20 ms; fixed and random
    python bench/fidelity.py --chunks 100 --delays 5 --paths tunnel-down
    python bench/fidelity.py --json out.json
    python bench/fidelity.py --nice -10       # the proxy ahead of this script's own threads

The segproxy under test is ``python -m segproxy`` (override: --segproxy-cmd).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from support import LOOPBACK, Segproxy, make_origin_certs  # noqa: E402

PATHS = ["tunnel-up", "tunnel-down", "http-up", "http-down", "intercept-up", "intercept-down"]


def cpu_seconds(pid: int) -> float:
    """CPU time of every live thread of ``pid``, from the scheduler's own nanosecond
    accounting (utime/stime in /proc/PID/stat are sampled at clock ticks, which periodic
    timers like ours can dodge)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    return total / 1e9


@dataclass
class Policy:
    strategy: str  # "fixed" or "random"
    delay_ms: float
    chunk: int = 100
    lo: int = 50
    hi: int = 150

    def rule(self) -> str:
        sizes = (
            f"chunk={self.chunk}" if self.strategy == "fixed" else f"min={self.lo},max={self.hi}"
        )
        return f"*=segment_upstream,strategy={self.strategy},{sizes},delay={self.delay_ms:g},direction=both"

    def label(self) -> str:
        sizes = f"{self.chunk}" if self.strategy == "fixed" else f"{self.lo}-{self.hi}"
        return f"{self.strategy} {sizes} B, {self.delay_ms:g} ms"

    def exact(self, size: int) -> bool:
        return size == self.chunk if self.strategy == "fixed" else self.lo <= size <= self.hi

    def mean_size(self) -> int:
        return self.chunk if self.strategy == "fixed" else (self.lo + self.hi) // 2


@dataclass
class Reads:
    """(arrival time, size) of every recv while recording."""

    events: list[tuple[float, int]] = field(default_factory=list)
    recording: bool = True

    def add(self, n: int, at: float | None = None) -> None:
        if self.recording and n:
            self.events.append((time.time() if at is None else at, n))


TIMESTAMPING = hasattr(socket, "SO_TIMESTAMPNS")


def stamp(sock: socket.socket) -> socket.socket:
    """Ask the kernel to timestamp what arrives (SO_TIMESTAMPNS): the arrival time of a
    chunk then does not include how late this process woke up to read it."""
    if TIMESTAMPING:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_TIMESTAMPNS, 1)
    return sock


def recv_stamped(sock: socket.socket, size: int = 65536) -> tuple[bytes, float | None]:
    """One recv and the kernel's arrival time of its bytes (wall clock), if it gave one."""
    if not TIMESTAMPING:
        return sock.recv(size), None
    data, ancdata, _flags, _addr = sock.recvmsg(size, 64)
    for level, kind, value in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SO_TIMESTAMPNS and len(value) >= 16:
            sec, nsec = struct.unpack("qq", value[:16])
            return data, sec + nsec / 1e9
    return data, None


def recv_raw(sock: socket.socket, reads: Reads, total: int) -> bytes:
    """Read exactly ``total`` bytes, recording every recv."""
    stamp(sock)
    out = bytearray()
    while len(out) < total:
        data, at = recv_stamped(sock)
        if not data:
            raise ConnectionError(f"closed after {len(out)} of {total} bytes")
        reads.add(len(data), at)
        out += data
    return bytes(out)


class RawTLS:
    """A TLS session over a plain socket through MemoryBIOs, so every raw recv of the
    encrypted stream can be recorded."""

    def __init__(
        self, sock: socket.socket, ctx: ssl.SSLContext, server: bool, host: str | None = None
    ) -> None:
        self.sock = stamp(sock)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server, server_hostname=host
        )
        self.reads = Reads(recording=False)

    def _push(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _pull(self) -> None:
        data, at = recv_stamped(self.sock)
        if not data:
            self.incoming.write_eof()
            return
        self.reads.add(len(data), at)
        self.incoming.write(data)

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._push()
                return
            except ssl.SSLWantReadError:
                self._push()
                self._pull()

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.obj.write(view[:16384])
            view = view[n:]
            self._push()

    def recv_exact(self, total: int) -> bytes:
        out = bytearray()
        while len(out) < total:
            try:
                out += self.obj.read(total - len(out))
            except ssl.SSLWantReadError:
                self._pull()
        return bytes(out)

    def read_head(self) -> bytes:
        out = bytearray()
        while b"\r\n\r\n" not in out:
            try:
                out += self.obj.read(1)
            except ssl.SSLWantReadError:
                self._pull()
        return bytes(out)


def recv_message(sock: socket.socket, reads: Reads, body_size: int) -> None:
    """Reads an HTTP head and a body of ``body_size`` bytes, recording every recv of both."""
    got = bytearray()
    stamp(sock)
    while b"\r\n\r\n" not in got:
        data, at = recv_stamped(sock)
        if not data:
            raise ConnectionError("closed in the head")
        reads.add(len(data), at)
        got += data
    body_have = len(got) - got.index(b"\r\n\r\n") - 4
    recv_raw(sock, reads, body_size - body_have)


def read_head_plain(sock: socket.socket, reads: Reads | None = None) -> bytes:
    out = bytearray()
    while b"\r\n\r\n" not in out:
        data = sock.recv(1)
        if not data:
            raise ConnectionError("closed in head")
        out += data
        if reads is not None:
            reads.add(1)
    return bytes(out)


class Origin:
    """One-connection-at-a-time origin on loopback, run in a thread per scenario."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.tls = tls

    def serve_once(self, work) -> threading.Thread:
        def run() -> None:
            conn, _ = self.listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                work(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.listener.close()


def connect_tunnel(proxy_port: int, target: str) -> socket.socket:
    s = socket.create_connection((LOOPBACK, proxy_port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = read_head_plain(s)
    if b" 200 " not in head.split(b"\r\n")[0]:
        raise RuntimeError(f"CONNECT {target}: {head[:80]!r}")
    return s


def run_path(path: str, proxy: Segproxy, tls_proxy: Segproxy | None, certs, size: int) -> Reads:
    """Moves ``size`` bytes along ``path`` and returns what the receiver saw."""
    reads = Reads()
    payload = bytes(i % 251 for i in range(size))
    if path.startswith("tunnel"):
        origin = Origin()
        if path == "tunnel-up":
            t = origin.serve_once(lambda c: recv_raw(c, reads, size))
            s = connect_tunnel(proxy.port, f"{LOOPBACK}:{origin.port}")
            s.sendall(payload)
            t.join(120)
        else:
            t = origin.serve_once(lambda c: (c.sendall(payload), c.recv(1)))
            s = connect_tunnel(proxy.port, f"{LOOPBACK}:{origin.port}")
            recv_raw(s, reads, size)
            s.close()
            t.join(120)
        s.close()
        origin.close()
        return reads
    if path.startswith("http"):
        origin = Origin()
        url = f"http://{LOOPBACK}:{origin.port}/x"
        if path == "http-up":
            head = f"POST {url} HTTP/1.1\r\nHost: {LOOPBACK}:{origin.port}\r\nContent-Length: {size}\r\n\r\n".encode()

            def serve(c: socket.socket) -> None:
                # The head and the body are one segmented stream: record both.
                recv_message(c, reads, size)
                c.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

            t = origin.serve_once(serve)
            s = socket.create_connection((LOOPBACK, proxy.port), timeout=120)
            s.sendall(head + payload)
            read_head_plain(s)
            t.join(120)
        else:
            # Connection: close, so the origin need not wait for the proxy's pool to let go.
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode()
            )

            def serve(c: socket.socket) -> None:
                read_head_plain(c)
                c.sendall(head + payload)

            t = origin.serve_once(serve)
            s = socket.create_connection((LOOPBACK, proxy.port), timeout=120)
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: {LOOPBACK}:{origin.port}\r\n\r\n".encode())
            recv_message(s, reads, size)
            s.close()
            t.join(120)
        s.close()
        origin.close()
        return reads
    # Intercepted: the client trusts segproxy's CA; the origin serves a leaf of its test CA.
    assert tls_proxy is not None
    _ca_file, origin_ctx, proxy_ca = certs
    client_ctx = ssl.create_default_context(cafile=str(proxy_ca))
    origin = Origin()
    target = f"localhost:{origin.port}"
    result: dict[str, RawTLS] = {}
    if path == "intercept-up":
        head = f"POST /x HTTP/1.1\r\nHost: {target}\r\nContent-Length: {size}\r\n\r\n".encode()

        def serve(c: socket.socket) -> None:
            tls = RawTLS(c, origin_ctx, server=True)
            result["origin"] = tls
            tls.handshake()
            tls.reads.recording = True
            tls.read_head()
            tls.recv_exact(size)
            tls.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

        t = origin.serve_once(serve)
        s = connect_tunnel(tls_proxy.port, target)
        client = RawTLS(s, client_ctx, server=False, host="localhost")
        client.handshake()
        client.sendall(head + payload)
        client.read_head()
        t.join(120)
        s.close()
        origin.close()
        return result["origin"].reads
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode()

    def serve_down(c: socket.socket) -> None:
        tls = RawTLS(c, origin_ctx, server=True)
        tls.handshake()
        tls.read_head()
        tls.sendall(head + payload)

    t = origin.serve_once(serve_down)
    s = connect_tunnel(tls_proxy.port, target)
    client = RawTLS(s, client_ctx, server=False, host="localhost")
    client.handshake()
    client.reads.recording = True
    client.sendall(f"GET /x HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    client.read_head()
    client.recv_exact(size)
    s.close()
    t.join(120)
    origin.close()
    return client.reads


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def analyse(reads: Reads, policy: Policy) -> dict:
    events = reads.events
    sizes = [n for _, n in events][:-1]  # the stream's last chunk may be short
    gaps = [(b[0] - a[0]) * 1000 - policy.delay_ms for a, b in itertools.pairwise(events)]
    gaps = gaps[1:]  # the first gap spans the switch from head or handshake to the body
    return {
        "chunks": len(events),
        "median": statistics.median(gaps) if gaps else float("nan"),
        "p99": percentile(gaps, 0.99) if gaps else float("nan"),
        "max": max(gaps) if gaps else float("nan"),
        "short": sum(1 for g in gaps if g < -0.05) / len(gaps) if gaps else float("nan"),
        "exact": sum(1 for n in sizes if policy.exact(n)) / len(sizes) if sizes else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--delays", default="1,5,20", help="delays in ms, comma-separated")
    p.add_argument("--strategies", default="fixed,random")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument(
        "--chunks",
        type=int,
        default=0,
        help="chunks per measurement (default: 300 for delays under 10 ms, 100 above)",
    )
    p.add_argument("--segproxy-cmd", default=f"{sys.executable} -m segproxy")
    p.add_argument(
        "--nice",
        type=int,
        default=None,
        help="run segproxy at this niceness (e.g. -10, as root), so this script's own "
        "sender and receiver threads do not delay its wake-ups",
    )
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)

    delays = [float(d) for d in args.delays.split(",")]
    strategies = args.strategies.split(",")
    paths = args.paths.split(",")
    work = Path(tempfile.mkdtemp(prefix="segproxy-fidelity-"))
    ca_file, cert, key = make_origin_certs(work)
    origin_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    origin_ctx.load_cert_chain(cert, key)
    rows = []
    print(
        "| path | policy | chunks | gap error median ms | p99 ms | max ms | short gaps | exact chunks | proxy CPU % |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for strategy in strategies:
        for delay in delays:
            policy = Policy(strategy, delay)
            command = shlex.split(args.segproxy_cmd)
            if args.nice is not None:
                command = ["nice", "-n", str(args.nice), *command]
            common = ["--segment-rule", policy.rule(), "--log-level", "warning"]
            proxy = Segproxy(common, command=command).__enter__()
            tls_proxy = None
            try:
                if any(x.startswith("intercept") for x in paths):
                    ca_dir = work / f"ca-{strategy}-{delay:g}"
                    tls_proxy = Segproxy(
                        common + ["--ca-dir", str(ca_dir), "--upstream-ca", str(ca_file)],
                        command=command,
                    ).__enter__()
                    proxy_ca = ca_dir / "ca-cert.pem"
                else:
                    proxy_ca = None
                n_chunks = args.chunks or (300 if delay < 10 else 100)
                for path in paths:
                    target = tls_proxy if path.startswith("intercept") else proxy
                    assert target is not None
                    size = n_chunks * policy.mean_size()
                    before, t0 = cpu_seconds(target.pid), time.monotonic()
                    reads = run_path(path, proxy, tls_proxy, (ca_file, origin_ctx, proxy_ca), size)
                    cpu = (cpu_seconds(target.pid) - before) / (time.monotonic() - t0) * 100
                    row = {
                        "path": path,
                        "policy": policy.label(),
                        **analyse(reads, policy),
                        "cpu": cpu,
                    }
                    rows.append(row)
                    print(
                        f"| {path} | {row['policy']} | {row['chunks']} | {row['median']:+.3f} | {row['p99']:+.3f} | "
                        f"{row['max']:+.3f} | {row['short']:.1%} | {row['exact']:.1%} | {cpu:.1f} |",
                        flush=True,
                    )
            finally:
                proxy.stop()
                if tls_proxy is not None:
                    tls_proxy.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
