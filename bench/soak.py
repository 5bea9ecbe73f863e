#!/usr/bin/env python3
"""Soak: a proxy you can leave running.

Runs segproxy as a real process (this script with ``--role proxy``: ``start_proxy_server``
with a hook handler that sometimes raises, a CA for interception, rules that segment and
tunnel, a DNS server of ours) for ``--duration`` seconds under a mixed load, while origins
misbehave, and checks that

- every good operation succeeds and every completed body has the expected SHA-256
  (nothing lost or altered; a cut body must be a prefix of what the origin sent);
- every fault ends in its expected class (502, 504, a cut body...), never in a client
  timeout (nothing hangs);
- the proxy answers a probe request (a new connection, a 1 KiB GET, every 0.5 s) throughout;
- after the clients close, the proxy's open descriptors and RSS return to their idle level
  (the settle waits on the proxy's connection and descriptor counts, bounded in time).

Load (``--clients`` processes, each ``--concurrency`` workers plus ``--slow-workers``):

==================  =================================================================
kind                what
==================  =================================================================
http_keepalive      3-8 GETs on one client connection: nginx (1 KiB, 4 MiB files) and
                    our origin (Content-Length and chunked, 0 B - 2 MiB), by IP or by
                    name (50 names under soak.test, DNS TTL 10 s)
http_new            one GET per new client connection (Connection: close)
http_post           POST /echo, Content-Length or chunked, up to 512 KiB
tunnel              CONNECT (intercept=no rule), TLS to nginx through it, 1-4 GETs
intercept           CONNECT intercepted (the proxy's CA), 1-4 GETs: nginx by IP, our
                    TLS origin by name (chunked bodies too)
segment_http        GET/POST through a rule segmenting both ways (random 512-8192 B,
                    1 ms apart)
segment_tunnel      a tunnel segmented both ways (fixed 4 KiB chunks)
hook                GETs whose request and response heads a Python hook changes
fault_reset         the origin resets the connection mid-body (plain or intercepted)
fault_malformed_*   the origin answers a malformed head (502) or chunked body (cut)
fault_hook_raise    the request hook raises (502)
fault_dns_nx        the name does not exist (502)
fault_refused       nothing listens at the destination (502)
client_abort*       the client closes mid-download / mid-upload (RST)
fault_stall_head    the origin never answers (504 after the proxy's 5 s response timeout)
fault_stall_body    the origin stops mid-body (cut after the proxy's 6 s idle timeout)
fault_dns_timeout   the DNS server never answers (502 after the 5 s DNS timeout)
==================  =================================================================

The last three run on the slow workers, one after another.

    python bench/soak.py                      # 30 minutes
    python bench/soak.py --short              # ~45 s of load (CI), ~1.5 min in all
    python bench/soak.py --duration 300 --json soak.json
    python bench/soak.py --short --keep       # keep the work dir (logs of every process)

Exit status 0 when every check passed. The summary (text on stdout, ``--json FILE``) has
operations by kind and outcome, ops/s per 10 s window, bodies checked, mismatches, probe
latency, and the proxy's RSS / descriptors at idle before, peak, and idle after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from support import (  # noqa: E402
    LOOPBACK,
    ManagedProcess,
    NginxOrigin,
    Segproxy,
    free_port,
    make_origin_certs,
)

KIB = 1024
MIB = 1024 * KIB
WINDOW = 10.0  # seconds per throughput window
DNS_TTL = 10  # seconds: cached names expire and are asked again during the run
NAMES = 50  # www0..www49.soak.test
NGINX_LARGE = 4 * MIB
OP_TIMEOUT = 60.0  # no operation may take longer (a hang)
PROXY_IDLE_TIMEOUT = 6.0
PROXY_RESPONSE_TIMEOUT = 5.0
POOL_IDLE_TIMEOUT = 10.0

RULES = """\
# soak rules: segment HTTP both ways; tunnels not intercepted; everything else intercepted
seg.soak.test=segment_upstream,strategy=random,min=512,max=8192,delay=1,direction=both
segtun.soak.test=segment_upstream,strategy=fixed,chunk=4096,delay=0,direction=both,intercept=no
tunnel.soak.test=direct,intercept=no
"""

# ---------------------------------------------------------------------------------------------
# bodies: a slice of a fixed random block, so the client knows what the origin sent

_BLOCK = random.Random(20261202).randbytes(MIB)
_DOUBLE = _BLOCK + _BLOCK


def pattern(n: int, off: int) -> memoryview | bytes:
    """``n`` bytes of the repeating block starting at ``off`` (0 <= off < 1 MiB)."""
    if off + n <= len(_DOUBLE):
        return memoryview(_DOUBLE)[off : off + n]
    reps = (off + n) // MIB + 1
    return (_BLOCK * reps)[off : off + n]


def pattern_sha(n: int, off: int) -> str:
    return hashlib.sha256(pattern(n, off)).hexdigest()


def log_size(rng: random.Random, lo: int, hi: int) -> int:
    """A size spread evenly on a log scale between lo and hi (0 now and then)."""
    if rng.random() < 0.05:
        return 0
    return int(math.exp(rng.uniform(math.log(max(lo, 1)), math.log(hi))))


# ---------------------------------------------------------------------------------------------
# origins (--role origins): our HTTP/HTTPS origin with fault paths, a DNS server


def dns_reply(query: bytes) -> bytes | None:
    """The answer of our DNS server: *.soak.test -> 127.0.0.1 (TTL DNS_TTL), *.nx.soak.test
    NXDOMAIN, *.slow.soak.test no answer at all (None), anything else REFUSED."""
    if len(query) < 17:
        return None
    qid, flags = struct.unpack("!HH", query[:4])
    i, labels = 12, []
    while i < len(query) and query[i]:
        n = query[i]
        labels.append(query[i + 1 : i + 1 + n].decode("ascii", "replace").lower())
        i += 1 + n
    qend = i + 5
    if qend > len(query):
        return None
    qtype = struct.unpack("!H", query[i + 1 : i + 3])[0]
    name = ".".join(labels)
    question = query[12:qend]
    answers = b""
    if name == "slow.soak.test" or name.endswith(".slow.soak.test"):
        return None
    if name == "nx.soak.test" or name.endswith(".nx.soak.test"):
        rcode = 3
    elif name == "soak.test" or name.endswith(".soak.test"):
        rcode = 0
        if qtype == 1:
            answers = struct.pack("!HHHIH", 0xC00C, 1, 1, DNS_TTL, 4) + socket.inet_aton(LOOPBACK)
    else:
        rcode = 5
    head = struct.pack(
        "!HHHHHH", qid, 0x8480 | (flags & 0x0100) | rcode, 1, 1 if answers else 0, 0, 0
    )
    return head + question + answers


class DnsUdp(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        reply = dns_reply(data)
        if reply is not None:
            self.transport.sendto(reply, addr)


async def dns_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = dns_reply(await reader.readexactly(n))
            if reply is None:  # a slow name: say nothing until the client gives up
                await reader.read()
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, OSError):
        pass
    finally:
        writer.close()


MALFORMED = [
    # 0-3: a head no proxy may forward (502)
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTP/1.1 2OO OK\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nBad Header Line\r\nContent-Length: 5\r\n\r\nhello",
]
# a good head, then a chunked body that breaks: the proxy can only cut it
MALFORMED_BODY = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\nzz\r\n"
)


def parse_query(target: str) -> tuple[str, dict[str, str]]:
    path, _, q = target.partition("?")
    params = dict(p.split("=", 1) for p in q.split("&") if "=" in p)
    return path, params


class Origin:
    """Our origin: one handler for the plain and the TLS port."""

    def __init__(self) -> None:
        self.stats = Counter()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self.one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        except asyncio.LimitOverrunError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        _method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        close = headers.get("connection", "").lower() == "close"
        path, params = parse_query(target)
        parts = path.strip("/").split("/")
        what = parts[0]
        n = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        off = int(params.get("o", "0")) % MIB
        self.stats[what] += 1
        conn_hdr = b"Connection: close\r\n" if close else b""
        if what in ("cl", "hook"):
            extra = b""
            if what == "hook":
                extra = f"X-Soak-Hook-Seen: {headers.get('x-soak-hook', '-')}\r\n".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + extra
                + conn_hdr
                + f"Content-Length: {n}\r\n\r\n".encode()
            )
            writer.write(pattern(n, off))
        elif what == "chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + conn_hdr
                + b"Transfer-Encoding: chunked\r\n\r\n"
            )
            rng = random.Random(n ^ off)
            body_view = pattern(n, off)
            sent = 0
            while sent < n:
                k = min(n - sent, rng.randint(1, 64 * KIB))
                writer.write(b"%x\r\n" % k)
                writer.write(body_view[sent : sent + k])
                writer.write(b"\r\n")
                sent += k
                if writer.transport.get_write_buffer_size() > 256 * KIB:
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif what == "echo":
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                + conn_hdr
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        elif what == "reset":
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n".encode())
            writer.write(pattern(n, off)[: n // 2])
            await writer.drain()
            await asyncio.sleep(0.01)
            sock = writer.get_extra_info("socket")
            if sock is not None:  # close with RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif what == "stall-head":
            await reader.read()  # until the proxy gives up
            return False
        elif what == "stall-body":
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n".encode())
            writer.write(pattern(n, off)[: n // 3])
            await writer.drain()
            await reader.read()
            return False
        elif what == "malformed":
            writer.write(MALFORMED[n] if n < len(MALFORMED) else MALFORMED_BODY)
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        return not close


async def origins_main(cfg: dict) -> None:
    origin = Origin()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cfg["origin_cert"], cfg["origin_key"])
    plain = await asyncio.start_server(origin.handle, LOOPBACK, cfg["origin_http"], backlog=1024)
    tls = await asyncio.start_server(
        origin.handle, LOOPBACK, cfg["origin_tls"], ssl=ctx, backlog=1024
    )
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(DnsUdp, local_addr=(LOOPBACK, cfg["dns_port"]))
    tcp = await asyncio.start_server(dns_tcp, LOOPBACK, cfg["dns_port"])
    Path(cfg["origins_ready"]).write_text("ready")
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:  # the harness gone: stop too
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    for s in (plain, tls, tcp):
        s.close()
    udp.close()
    print(json.dumps({"origin_requests": dict(origin.stats)}), flush=True)


# ---------------------------------------------------------------------------------------------
# the proxy (--role proxy): start_proxy_server with a hook handler, stats for the harness


def proxy_main(args: argparse.Namespace) -> None:
    import segproxy
    from segproxy import HTTPSForwardProxyHandler, TLSStore

    counts = Counter()

    class SoakHandler(HTTPSForwardProxyHandler):
        """Marks /hook/ requests and responses; raises on /hook-raise/ (a hook bug)."""

        async def on_request_received(self) -> None:
            counts["requests"] += 1
            path = self.request.path
            if path.startswith("/hook-raise"):
                counts["raised"] += 1
                raise RuntimeError("soak: the request hook raises on purpose")
            if path.startswith("/hook/"):
                self.request.headers.set("X-Soak-Hook", "req")
            await self.forward_http_request()

        async def on_response_received(self) -> None:
            if self.request.path.startswith("/hook/"):
                self.response.headers.set("X-Soak-Hook-Resp", "1")

        async def on_error(self, error: Exception) -> None:
            counts["on_error"] += 1

    store = TLSStore()
    Path(args.ca_out).write_bytes(store.get_ca_pem())

    async def main() -> None:
        server = await segproxy.start_proxy_server(
            SoakHandler,
            args.listen_host,
            args.listen_port,
            store,
            rules=Path(args.rules).read_text(),
            dns_server=LOOPBACK,
            dns_port=args.dns_port,
            upstream_ca=args.upstream_ca,
            idle_timeout=PROXY_IDLE_TIMEOUT,
            response_timeout=PROXY_RESPONSE_TIMEOUT,
            pool_idle_timeout=POOL_IDLE_TIMEOUT,
            record_flows=not args.no_record_flows,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.close)
        print(f"segproxy listening on {server.host}:{server.port}", file=sys.stderr, flush=True)

        def stores() -> dict:
            """What the record stores hold, and what reading them costs (on this loop)."""
            t = time.perf_counter()
            records = server.access_records()
            t_access = time.perf_counter() - t
            t = time.perf_counter()
            flows = server.flows()
            t_flows = time.perf_counter() - t
            out = {
                "access_records": len(records),
                "access_records_s": round(t_access, 4),
                "flows": len(flows),
                "flow_chunks": sum(len(f["chunks"]) for f in flows),
                "flows_s": round(t_flows, 4),
            }
            del records, flows
            gc.collect()
            return out

        def memory() -> dict:
            """RSS as it is; after malloc_trim(0) (what is left is in use: the rest the
            allocator held free); and after the record stores are emptied too (what is left
            is the proxy's own state: a leak shows there)."""
            import ctypes

            def rss() -> int:
                status = Path("/proc/self/status").read_text()
                return int(status.split("VmRSS:")[1].split()[0])

            trim = ctypes.CDLL("libc.so.6").malloc_trim
            before = rss()
            trim(0)
            trimmed = rss()
            out = stores()
            server.access_records(clear=True)
            server.flows(clear=True)
            gc.collect()
            trim(0)
            return {
                "rss_kib": before,
                "rss_after_malloc_trim_kib": trimmed,
                "rss_without_stores_kib": rss(),
                **out,
            }

        async def stats() -> None:
            tick = 0
            objects = None
            measure = Path(args.stats + ".measure")
            parent = os.getppid()
            while server.is_serving():
                if os.getppid() != parent:  # the harness is gone: do not outlive it
                    server.close()
                    break
                if tick % 5 == 0:
                    objects = len(gc.get_objects())
                tick += 1
                if measure.exists():  # asked by the harness once the proxy is idle
                    Path(args.stats + ".stores").write_text(json.dumps(memory()))
                    measure.unlink()
                if args.poll_records and tick % args.poll_records == 0:
                    counts["polls"] += 1
                    polled = stores()
                    counts["poll_s"] = (
                        counts.get("poll_s", 0) + polled["access_records_s"] + polled["flows_s"]
                    )
                    counts["last_poll"] = polled
                data = {
                    "t": time.time(),
                    "active": server.active_connections(),
                    "python_objects": objects,
                    "gc": [s["collections"] for s in gc.get_stats()],
                    **counts,
                }
                tmp = Path(args.stats + ".tmp")
                tmp.write_text(json.dumps(data))
                tmp.replace(args.stats)
                await asyncio.sleep(1)

        task = asyncio.create_task(stats())
        await server.serve_forever()
        task.cancel()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# the client side: a small HTTP/1.1 client on asyncio streams


class Response:
    __slots__ = ("body", "complete", "error", "headers", "length", "sha", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.length = 0
        self.sha = ""
        self.complete = False
        self.body: bytes | None = None
        self.error = ""  # "", "closed" (no head), "truncated" (body cut), "bad_framing"


async def read_response(
    reader: asyncio.StreamReader, method: str = "GET", keep: bool = False, limit: int = -1
) -> Response:
    """Reads one response. ``keep`` keeps the body bytes; ``limit`` >= 0 stops reading after
    that many body bytes (the client aborting)."""
    r = Response()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
        r.error = "closed"
        return r
    except asyncio.LimitOverrunError:
        r.error = "bad_framing"
        return r
    lines = head.decode("latin-1").split("\r\n")
    try:
        r.status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        r.error = "bad_framing"
        return r
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            r.headers[k.strip().lower()] = v.strip()
    h = hashlib.sha256()
    kept: list[bytes] = []

    def take(data: bytes) -> None:
        h.update(data)
        r.length += len(data)
        if keep:
            kept.append(data)

    try:
        no_body = method == "HEAD" or (method == "CONNECT" and 200 <= r.status < 300)
        if no_body or r.status in (204, 304) or 100 <= r.status < 200:
            pass
        elif "chunked" in r.headers.get("transfer-encoding", "").lower():
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    r.error = "bad_framing"
                    break
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                take(await reader.readexactly(size))
                if await reader.readexactly(2) != b"\r\n":
                    r.error = "bad_framing"
                    break
                if 0 <= limit <= r.length:
                    r.error = "aborted"
                    break
        elif "content-length" in r.headers:
            left = int(r.headers["content-length"])
            while left > 0:
                data = await reader.read(min(left, 256 * KIB))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                take(data)
                left -= len(data)
                if 0 <= limit <= r.length and left:
                    r.error = "aborted"
                    break
        else:
            while data := await reader.read(256 * KIB):
                take(data)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
        r.error = "truncated"
    except asyncio.LimitOverrunError:
        r.error = "bad_framing"
    r.complete = not r.error
    r.sha = h.hexdigest()
    if keep:
        r.body = b"".join(kept)
    return r


def request_bytes(
    method: str,
    target: str,
    host: str,
    body: bytes | memoryview | None = None,
    chunked: bool = False,
    close: bool = False,
    extra: str = "",
) -> list[bytes | memoryview]:
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: segproxy-soak\r\n{extra}"
    if close:
        head += "Connection: close\r\n"
    out: list[bytes | memoryview] = []
    if body is None:
        out.append((head + "\r\n").encode())
    elif chunked:
        out.append((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        step = 32 * KIB
        for i in range(0, len(body), step):
            piece = body[i : i + step]
            out += [b"%x\r\n" % len(piece), piece, b"\r\n"]
        out.append(b"0\r\n\r\n")
    else:
        out += [(head + f"Content-Length: {len(body)}\r\n\r\n").encode(), body]
    return out


class OpFailed(Exception):
    """A good operation did not succeed: ``cls`` says how (status, truncated, ...)."""

    def __init__(self, cls: str, detail: str = "") -> None:
        super().__init__(f"{cls}: {detail}")
        self.cls = cls
        self.detail = detail


class Load:
    """One load process: workers running sessions until the deadline."""

    GOOD = {
        "http_keepalive",
        "http_new",
        "http_post",
        "tunnel",
        "intercept",
        "segment_http",
        "segment_tunnel",
        "hook",
    }
    # The classes each fault may end in. Anything else (a client timeout above all) fails.
    EXPECTED = {
        "fault_reset": {"truncated", "502"},
        "fault_reset_tls": {"truncated", "502"},
        "fault_malformed_head": {"502"},
        "fault_malformed_body": {"truncated", "502"},
        "fault_hook_raise": {"502"},
        "fault_dns_nx": {"502"},
        "fault_refused": {"502"},
        "client_abort": {"aborted"},
        "client_abort_upload": {"aborted"},
        "fault_stall_head": {"504"},
        "fault_stall_body": {"truncated"},
        "fault_dns_timeout": {"502", "504"},
    }

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.proxy = (LOOPBACK, cfg["proxy_port"])
        self.t0 = cfg["t0"]
        self.deadline = cfg["deadline"]
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.windows: dict[int, Counter] = defaultdict(Counter)
        self.window_bytes: Counter = Counter()
        self.connects: Counter = Counter()
        self.connect_s: Counter = Counter()
        self.latency_max: Counter = Counter()
        self.latency_sum: Counter = Counter()
        self.bodies_checked = 0
        self.bytes_checked = 0
        self.mismatches: list[dict] = []
        self.failures: list[dict] = []
        self.failure_count = 0
        self.drained = 0
        self.parent = os.getppid()  # the harness: a worker stops when it is gone
        self.nginx = cfg["nginx_files"]  # path -> [size, sha]
        self.tunnel_ctx = ssl.create_default_context(cafile=cfg["nginx_ca"])
        self.origin_ctx = ssl.create_default_context(cafile=cfg["origin_ca"])
        self.proxy_ctx = ssl.create_default_context(cafile=cfg["proxy_ca"])
        self.sessions = [
            (self.s_keepalive, 30),
            (self.s_new, 16),
            (self.s_post, 10),
            (self.s_tunnel, 8),
            (self.s_intercept, 10),
            (self.s_segment, 8),
            (self.s_hook, 8),
            (self.f_reset, 2),
            (self.f_malformed, 2),
            (self.f_hook_raise, 1.5),
            (self.f_dns_nx, 1),
            (self.f_refused, 1),
            (self.f_client_abort, 2),
        ]

    # --- bookkeeping -----------------------------------------------------------------------
    def record(self, kind: str, outcome: str, started: float, nbytes: int = 0) -> None:
        now = time.time()
        self.counts[kind][outcome] += 1
        if now < self.deadline:
            w = int((now - self.t0) // WINDOW)
            self.windows[w][kind] += 1
            self.window_bytes[w] += nbytes
        else:
            self.drained += 1
        lat = now - started
        self.latency_sum[kind] += lat
        self.latency_max[kind] = max(self.latency_max[kind], lat)

    def fail(self, kind: str, cls: str, detail: str, started: float) -> None:
        self.record(kind, "fail:" + cls, started)
        self.failure_count += 1
        if len(self.failures) < 50:
            self.failures.append(
                {"kind": kind, "class": cls, "detail": detail[:500], "t": time.time() - self.t0}
            )

    def check(self, kind: str, r: Response, n: int, sha: str, started: float, url: str) -> None:
        """A good exchange: 200 and the whole body with the expected hash, or OpFailed."""
        if r.error:
            raise OpFailed(r.error, f"{url}: status {r.status}, {r.length} of {n} bytes")
        if r.status != 200:
            raise OpFailed(str(r.status), url)
        self.bodies_checked += 1
        self.bytes_checked += r.length
        if r.length != n or r.sha != sha:
            self.mismatches.append(
                {"kind": kind, "url": url, "expected": [n, sha], "got": [r.length, r.sha]}
            )
            raise OpFailed("mismatch", url)
        self.record(kind, "ok", started, r.length)

    def fault(
        self, kind: str, r: Response | None, started: float, prefix: bytes | memoryview = b""
    ) -> None:
        """A fault's outcome: its class, and whether a cut body is a prefix of the original."""
        if r is None:
            cls = "closed"
        elif r.error in ("truncated", "aborted", "closed", "bad_framing"):
            cls = r.error
            if r.error == "closed" and r.status:
                cls = str(r.status)
        else:
            cls = str(r.status)
        if r is not None and r.body and prefix is not None and r.status == 200:
            self.bodies_checked += 1
            if bytes(prefix[: len(r.body)]) != r.body:
                self.mismatches.append({"kind": kind, "expected": "prefix", "got": r.length})
                cls = "mismatch"
        if cls in self.EXPECTED[kind]:
            self.record(kind, "expected:" + cls, started)
        else:
            self.fail(kind, cls, f"unexpected class {cls}", started)

    # --- connections -----------------------------------------------------------------------
    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        t = time.time()
        conn = await asyncio.wait_for(
            asyncio.open_connection(*self.proxy, limit=256 * KIB), timeout=15
        )
        w = int((t - self.t0) // WINDOW)
        self.connects[w] += 1
        self.connect_s[w] += time.time() - t
        return conn

    async def tunnel(
        self, host: str, port: int, ctx: ssl.SSLContext, sni: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self.connect()
        try:
            writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            r = await read_response(reader, "CONNECT")
            if r.status != 200:
                raise OpFailed(r.error or str(r.status), f"CONNECT {host}:{port}")
            await writer.start_tls(ctx, server_hostname=sni)
        except BaseException:
            await close(writer)
            raise
        return reader, writer

    # --- targets ---------------------------------------------------------------------------
    def name(self, rng: random.Random) -> str:
        return f"www{rng.randrange(NAMES)}.soak.test"

    def good_target(self, rng: random.Random) -> tuple[str, str, int, str]:
        """(authority, path, size, sha) of a good plain-HTTP GET."""
        host = LOOPBACK if rng.random() < 0.4 else self.name(rng)
        x = rng.random()
        if x < 0.45:
            port, path = self.cfg["nginx_http"], "/1k.bin" if rng.random() < 0.93 else "/large.bin"
            n, sha = self.nginx[path]
        else:
            port = self.cfg["origin_http"]
            n = log_size(rng, 16, 2 * MIB if rng.random() < 0.05 else 256 * KIB)
            off = rng.randrange(MIB)
            path = f"/{'cl' if x < 0.75 else 'chunked'}/{n}?o={off}"
            sha = pattern_sha(n, off)
        return f"{host}:{port}", path, n, sha

    # --- good sessions -------------------------------------------------------------------------
    async def get(
        self,
        kind: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: str,
        host: str,
        n: int,
        sha: str,
        close: bool = False,
        extra: str = "",
    ) -> Response:
        started = time.time()
        writer.writelines(request_bytes("GET", target, host, close=close, extra=extra))
        r = await read_response(reader)
        self.check(kind, r, n, sha, started, target)
        return r

    async def s_keepalive(self, rng: random.Random) -> None:
        reader, writer = await self.connect()
        try:
            for _ in range(rng.randint(3, 8)):
                auth, path, n, sha = self.good_target(rng)
                await self.get(
                    "http_keepalive", reader, writer, f"http://{auth}{path}", auth, n, sha
                )
        finally:
            await close(writer)

    async def s_new(self, rng: random.Random) -> None:
        auth, path, n, sha = self.good_target(rng)
        reader, writer = await self.connect()
        try:
            await self.get("http_new", reader, writer, f"http://{auth}{path}", auth, n, sha, True)
        finally:
            await close(writer)

    async def post(
        self, kind: str, reader, writer, host: str, rng: random.Random, max_size: int
    ) -> None:
        n = log_size(rng, 16, max_size)
        off = rng.randrange(MIB)
        body = pattern(n, off)
        auth = f"{host}:{self.cfg['origin_http']}"
        started = time.time()
        writer.writelines(
            request_bytes("POST", f"http://{auth}/echo", auth, body, chunked=rng.random() < 0.5)
        )
        r = await read_response(reader)
        self.check(kind, r, n, pattern_sha(n, off), started, f"POST http://{auth}/echo ({n})")

    async def s_post(self, rng: random.Random) -> None:
        reader, writer = await self.connect()
        try:
            for _ in range(rng.randint(1, 3)):
                host = LOOPBACK if rng.random() < 0.5 else self.name(rng)
                await self.post("http_post", reader, writer, host, rng, 512 * KIB)
        finally:
            await close(writer)

    async def s_tunnel(self, rng: random.Random) -> None:
        port = self.cfg["nginx_https"]
        started = time.time()
        try:
            reader, writer = await self.tunnel(
                "tunnel.soak.test", port, self.tunnel_ctx, "localhost"
            )
        except OpFailed as e:
            self.fail("tunnel", e.cls, e.detail, started)
            return
        try:
            for _ in range(rng.randint(1, 4)):
                path = "/1k.bin" if rng.random() < 0.9 else "/large.bin"
                n, sha = self.nginx[path]
                await self.get("tunnel", reader, writer, path, f"localhost:{port}", n, sha)
        finally:
            await close(writer)

    async def s_intercept(self, rng: random.Random) -> None:
        started = time.time()
        by_ip = rng.random() < 0.5
        if by_ip:
            host, port = LOOPBACK, self.cfg["nginx_https"]
        else:
            host, port = "tls.soak.test", self.cfg["origin_tls"]
        try:
            reader, writer = await self.tunnel(host, port, self.proxy_ctx, host)
        except OpFailed as e:
            self.fail("intercept", e.cls, e.detail, started)
            return
        try:
            for _ in range(rng.randint(1, 4)):
                if by_ip:
                    path = "/1k.bin" if rng.random() < 0.9 else "/large.bin"
                    n, sha = self.nginx[path]
                else:
                    n, off = log_size(rng, 16, 256 * KIB), rng.randrange(MIB)
                    path = f"/{rng.choice(['cl', 'chunked'])}/{n}?o={off}"
                    sha = pattern_sha(n, off)
                await self.get("intercept", reader, writer, path, f"{host}:{port}", n, sha)
        finally:
            await close(writer)

    async def s_segment(self, rng: random.Random) -> None:
        if rng.random() < 0.6:
            reader, writer = await self.connect()
            try:
                if rng.random() < 0.5:
                    await self.post("segment_http", reader, writer, "seg.soak.test", rng, 64 * KIB)
                else:
                    n, off = log_size(rng, 16, 64 * KIB), rng.randrange(MIB)
                    auth = f"seg.soak.test:{self.cfg['origin_http']}"
                    path = f"/{rng.choice(['cl', 'chunked'])}/{n}?o={off}"
                    await self.get(
                        "segment_http",
                        reader,
                        writer,
                        f"http://{auth}{path}",
                        auth,
                        n,
                        pattern_sha(n, off),
                    )
            finally:
                await close(writer)
            return
        port = self.cfg["nginx_https"]
        started = time.time()
        try:
            reader, writer = await self.tunnel(
                "segtun.soak.test", port, self.tunnel_ctx, "localhost"
            )
        except OpFailed as e:
            self.fail("segment_tunnel", e.cls, e.detail, started)
            return
        try:
            path = "/1k.bin" if rng.random() < 0.85 else "/large.bin"
            n, sha = self.nginx[path]
            await self.get("segment_tunnel", reader, writer, path, f"localhost:{port}", n, sha)
        finally:
            await close(writer)

    async def s_hook(self, rng: random.Random) -> None:
        reader, writer = await self.connect()
        try:
            for _ in range(rng.randint(1, 4)):
                host = LOOPBACK if rng.random() < 0.5 else self.name(rng)
                auth = f"{host}:{self.cfg['origin_http']}"
                n, off = log_size(rng, 16, 64 * KIB), rng.randrange(MIB)
                url = f"http://{auth}/hook/{n}?o={off}"
                started = time.time()
                writer.writelines(request_bytes("GET", url, auth))
                r = await read_response(reader)
                seen = (r.headers.get("x-soak-hook-seen"), r.headers.get("x-soak-hook-resp"))
                if r.status == 200 and seen != ("req", "1"):
                    raise OpFailed("hook_not_applied", f"{url}: {seen}")
                self.check("hook", r, n, pattern_sha(n, off), started, url)
        finally:
            await close(writer)

    # --- faults ------------------------------------------------------------------------------
    async def one_fault(
        self,
        kind: str,
        url: str,
        auth: str,
        prefix: bytes | memoryview = b"",
        conn=None,
    ) -> None:
        started = time.time()
        reader, writer = conn or await self.connect()
        try:
            writer.writelines(request_bytes("GET", url, auth))
            r = await read_response(reader, keep=True)
        finally:
            await close(writer)
        self.fault(kind, r, started, prefix)

    async def f_reset(self, rng: random.Random) -> None:
        n, off = rng.randint(64 * KIB, MIB), rng.randrange(MIB)
        if rng.random() < 0.7:
            auth = f"{self.name(rng)}:{self.cfg['origin_http']}"
            await self.one_fault(
                "fault_reset", f"http://{auth}/reset/{n}?o={off}", auth, pattern(n, off)
            )
        else:
            auth = f"tls.soak.test:{self.cfg['origin_tls']}"
            started = time.time()
            try:
                conn = await self.tunnel(
                    "tls.soak.test", self.cfg["origin_tls"], self.proxy_ctx, "tls.soak.test"
                )
            except OpFailed as e:
                self.fail("fault_reset_tls", e.cls, e.detail, started)
                return
            await self.one_fault(
                "fault_reset_tls", f"/reset/{n}?o={off}", auth, pattern(n, off), conn
            )

    async def f_malformed(self, rng: random.Random) -> None:
        k = rng.randrange(len(MALFORMED) + 1)
        kind = "fault_malformed_body" if k == len(MALFORMED) else "fault_malformed_head"
        auth = f"{LOOPBACK}:{self.cfg['origin_http']}"
        await self.one_fault(kind, f"http://{auth}/malformed/{k}", auth, b"0123456789abcdef")

    async def f_hook_raise(self, rng: random.Random) -> None:
        auth = f"{self.name(rng)}:{self.cfg['origin_http']}"
        await self.one_fault("fault_hook_raise", f"http://{auth}/hook-raise/1", auth)

    async def f_dns_nx(self, rng: random.Random) -> None:
        auth = f"x{rng.randrange(1000)}.nx.soak.test:{self.cfg['origin_http']}"
        await self.one_fault("fault_dns_nx", f"http://{auth}/cl/1", auth)

    async def f_refused(self, rng: random.Random) -> None:
        auth = f"{LOOPBACK}:{self.cfg['refused_port']}"
        await self.one_fault("fault_refused", f"http://{auth}/", auth)

    async def f_client_abort(self, rng: random.Random) -> None:
        started = time.time()
        reader, writer = await self.connect()
        try:
            if rng.random() < 0.6:
                kind = "client_abort"
                auth = f"{LOOPBACK}:{self.cfg['nginx_http']}"
                writer.writelines(request_bytes("GET", f"http://{auth}/large.bin", auth))
                r = await read_response(reader, limit=rng.randint(0, 2 * MIB))
            else:  # half an upload, then gone
                kind = "client_abort_upload"
                auth = f"{self.name(rng)}:{self.cfg['origin_http']}"
                n = rng.randint(64 * KIB, MIB)
                head = request_bytes("POST", f"http://{auth}/echo", auth, pattern(n, 0))
                writer.write(head[0])
                writer.write(head[1][: rng.randint(0, n - 1)])
                await writer.drain()
                r = Response()
                r.error = "aborted"
        finally:
            await close(writer, rst=True)
        if r.status == 200 and r.error == "":
            r.error = "aborted"  # the body came whole before the abort point: fine too
        self.fault(kind, r, started, None)

    async def f_stall_head(self, rng: random.Random) -> None:
        auth = f"{self.name(rng)}:{self.cfg['origin_http']}"
        await self.one_fault("fault_stall_head", f"http://{auth}/stall-head", auth)

    async def f_stall_body(self, rng: random.Random) -> None:
        n, off = rng.randint(64 * KIB, MIB), rng.randrange(MIB)
        auth = f"{LOOPBACK}:{self.cfg['origin_http']}"
        await self.one_fault(
            "fault_stall_body", f"http://{auth}/stall-body/{n}?o={off}", auth, pattern(n, off)
        )

    async def f_dns_timeout(self, rng: random.Random) -> None:
        auth = f"x{rng.randrange(10**6)}.slow.soak.test:{self.cfg['origin_http']}"
        await self.one_fault("fault_dns_timeout", f"http://{auth}/cl/1", auth)

    # --- workers ---------------------------------------------------------------------------
    async def run_session(self, session, rng: random.Random) -> None:
        kind = session.__name__
        started = time.time()
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                await session(rng)
        except OpFailed as e:
            self.fail(self.kind_of(kind), e.cls, e.detail, started)
        except TimeoutError:
            self.fail(self.kind_of(kind), "timeout", f"{kind} took over {OP_TIMEOUT}s", started)
        except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            self.fail(self.kind_of(kind), "client_error", f"{kind}: {e!r}", started)
        except Exception as e:
            self.fail(
                self.kind_of(kind), "exception", f"{kind}: {traceback.format_exc()[-400:]}", started
            )
            del e

    @staticmethod
    def kind_of(session_name: str) -> str:
        return {
            "s_keepalive": "http_keepalive",
            "s_new": "http_new",
            "s_post": "http_post",
            "s_tunnel": "tunnel",
            "s_intercept": "intercept",
            "s_segment": "segment_http",
            "s_hook": "hook",
        }.get(session_name, "fault_" + session_name[2:])

    async def worker(self, wid: int) -> None:
        rng = random.Random(self.cfg["seed"] * 1000 + wid)
        sessions, weights = zip(*self.sessions, strict=True)
        while time.time() < self.deadline and os.getppid() == self.parent:
            (session,) = rng.choices(sessions, weights)
            await self.run_session(session, rng)

    async def slow_worker(self, wid: int) -> None:
        rng = random.Random(self.cfg["seed"] * 1000 + 500 + wid)
        faults = [self.f_stall_head, self.f_stall_body, self.f_dns_timeout]
        i = wid
        while time.time() < self.deadline and os.getppid() == self.parent:
            await self.run_session(faults[i % len(faults)], rng)
            i += 1

    async def main(self) -> dict:
        tasks = [asyncio.create_task(self.worker(i)) for i in range(self.cfg["concurrency"])]
        tasks += [asyncio.create_task(self.slow_worker(i)) for i in range(self.cfg["slow_workers"])]
        await asyncio.gather(*tasks)
        return {
            "counts": {k: dict(v) for k, v in self.counts.items()},
            "windows": {str(w): dict(c) for w, c in self.windows.items()},
            "window_bytes": {str(w): b for w, b in self.window_bytes.items()},
            "connects": {str(w): [n, self.connect_s[w]] for w, n in self.connects.items()},
            "latency_max": dict(self.latency_max),
            "latency_sum": dict(self.latency_sum),
            "bodies_checked": self.bodies_checked,
            "bytes_checked": self.bytes_checked,
            "mismatches": self.mismatches,
            "failures": self.failures,
            "failure_count": self.failure_count,
            "drained": self.drained,
        }


async def close(writer: asyncio.StreamWriter, rst: bool = False) -> None:
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), timeout=5)


def load_main(cfg: dict, out: str) -> None:
    result = asyncio.run(Load(cfg).main())
    Path(out + ".tmp").write_text(json.dumps(result))
    Path(out + ".tmp").replace(out)


# ---------------------------------------------------------------------------------------------
# the probe (--role probe): a new connection and a 1 KiB GET every 0.5 s, one JSON line each


def probe_once(proxy_port: int, url: str, size: int, timeout: float = 10.0) -> tuple[bool, str]:
    with socket.create_connection((LOOPBACK, proxy_port), timeout=timeout) as s:
        s.settimeout(timeout)
        host = url.split("/")[2]
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    ok = head.startswith(b"HTTP/1.1 200") and len(body) == size
    return ok, "" if ok else head[:80].decode("latin-1")


def probe_main(cfg: dict, out: str, stop_file: str) -> None:
    url, size = cfg["probe_url"], cfg["probe_size"]
    with open(out, "a") as f:
        parent = os.getppid()
        while not os.path.exists(stop_file) and os.getppid() == parent:
            t = time.time()
            try:
                ok, err = probe_once(cfg["proxy_port"], url, size)
            except OSError as e:
                ok, err = False, repr(e)
            lat = time.time() - t
            f.write(json.dumps({"t": t, "ok": ok, "latency": lat, "error": err}) + "\n")
            f.flush()
            time.sleep(max(0.0, 0.5 - lat))


# ---------------------------------------------------------------------------------------------
# the harness (default role)


def proc_status(pid: int) -> dict | None:
    """RSS (KiB), open descriptors, threads and CPU seconds of ``pid``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "hwm_kib": int(fields["VmHWM"].split()[0]),
        "fds": fds,
        "threads": int(fields["Threads"]),
        "cpu": (int(stat[11]) + int(stat[12])) / tick,
    }


def fd_kinds(pid: int, ports: dict[int, str]) -> dict[str, int]:
    """The open descriptors of ``pid`` by kind; sockets by protocol, state and peer (peer
    ports named through ``ports``)."""
    sockets: dict[str, str] = {}
    for proto in ("tcp", "udp"):
        try:
            with open(f"/proc/net/{proto}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    remote = int(parts[2].split(":")[1], 16)
                    local = int(parts[1].split(":")[1], 16)
                    state = TCP_STATES.get(parts[3], parts[3]) if proto == "tcp" else ""
                    peer = ports.get(remote) or ports.get(local) or ("client" if remote else "-")
                    sockets[parts[9]] = f"{proto} {state} {peer}".replace("  ", " ")
        except OSError:
            pass
    kinds: Counter = Counter()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            kinds[sockets.get(target[8:-1], "unix socket")] += 1
        elif target.startswith("anon_inode:"):
            kinds[target] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        else:
            kinds["file"] += 1
    return dict(sorted(kinds.items()))


TCP_STATES = {
    "01": "ESTABLISHED",
    "06": "TIME_WAIT",
    "08": "CLOSE_WAIT",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "09": "LAST_ACK",
    "0A": "LISTEN",
}


def tcp_states() -> dict[str, int]:
    """Loopback TCP sockets by state (all of the machine's IPv4 sockets)."""
    counts: Counter = Counter()
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                st = line.split(None, 4)[3]
                counts[TCP_STATES.get(st, st)] += 1
    except OSError:
        pass
    return dict(counts)


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat: steal is time
    the hypervisor gave another guest while this one wanted to run."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(fields) - fields[3] - fields[4] - fields[7]
    return busy / tick, fields[7] / tick


NET_COUNTERS = (
    "Tcp.ActiveOpens",
    "Tcp.AttemptFails",
    "Tcp.EstabResets",
    "Tcp.RetransSegs",
    "TcpExt.ListenOverflows",
    "TcpExt.ListenDrops",
    "TcpExt.TCPTimeWaitOverflow",
    "TcpExt.TW",
    "TcpExt.TWRecycled",
)


def net_counters() -> dict[str, int]:
    """The machine's TCP counters that show port, backlog or retransmission trouble."""
    out: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for names, values in itertools.pairwise(lines):
            n, v = names.split(), values.split()
            if n[0] != v[0] or not v[1].lstrip("-").isdigit():
                continue
            prefix = n[0].rstrip(":")
            for k, x in zip(n[1:], v[1:], strict=False):
                if f"{prefix}.{k}" in NET_COUNTERS:
                    out[f"{prefix}.{k}"] = int(x)
    return out


_REF_DATA = random.Random(7).randbytes(4 * MIB)


def reference_ms() -> float:
    """CPU milliseconds this process needs for a fixed piece of work (SHA-256 of 4 MiB and a
    Python loop): it rises when the machine itself gets slower per instruction (contended
    caches, a busy sibling hyperthread, the host), whatever the soak does."""
    t = time.process_time()
    for _ in range(4):
        hashlib.sha256(_REF_DATA).digest()
    x = 0
    for i in range(200_000):
        x += i & 7
    return 1000 * (time.process_time() - t)


def group_cpu(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds of every process of each process group (nginx's workers with its master)."""
    names = {pgid: name for name, pgid in groups.items()}
    out = dict.fromkeys(groups, 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(stat[2]))
        if name is not None:
            out[name] += (int(stat[11]) + int(stat[12])) / tick
            out[name + ".sys"] = out.get(name + ".sys", 0.0) + int(stat[12]) / tick
    return out


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="segproxy-soak-"))
        self.services: list = []
        self.procs: list[ManagedProcess] = []
        self.samples: list[dict] = []
        self.notes: list[str] = []
        self.memory_before: dict = {}
        self.warm_up_ok = False
        self.fds_before: dict = {}
        self.fds_after: dict = {}
        self.memory_after: dict = {}
        self.reference_idle_ms = 0.0

    def log(self, msg: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def role(self, name: str, role: str, *extra: str) -> ManagedProcess:
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, *extra]
        p = ManagedProcess(name, argv, workdir=self.work)
        self.procs.append(p)
        p.start()
        return p

    def proxy_stats(self) -> dict:
        try:
            return json.loads((self.work / "proxy-stats.json").read_text())
        except (OSError, ValueError):
            return {}

    def proxy_memory(self) -> dict:
        """The proxy's RSS as it is, after malloc_trim and without its record stores; the
        stores' size and read cost. Changes the proxy (empties the stores): once idle only."""
        stats = Path(self.work / "proxy-stats.json")
        answer = Path(str(stats) + ".stores")
        answer.unlink(missing_ok=True)
        Path(str(stats) + ".measure").write_text("")
        deadline = time.monotonic() + 60
        while not answer.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            return json.loads(answer.read_text())
        except (OSError, ValueError):
            return {}

    def sample(self, phase: str) -> dict:
        st = proc_status(self.proxy.pid) or {}
        s = {"t": time.time(), "phase": phase, **st, "active": self.proxy_stats().get("active")}
        self.samples.append(s)
        return s

    def settle(self, level_fds: int, timeout: float) -> tuple[bool, float, dict]:
        """Waits until the proxy has no client connection, holds no connection to an origin
        (pooled ones close after POOL_IDLE_TIMEOUT) and its descriptors are back to
        ``level_fds`` (+2: the DNS resolver may keep its TCP connection) for 2 s in a row;
        bounded by ``timeout``."""
        start = time.monotonic()
        since = None
        while True:
            st = self.sample("settle")
            kinds = fd_kinds(self.proxy.pid, self.port_names)
            to_origins = sum(n for k, n in kinds.items() if "nginx" in k or "origin" in k)
            quiet = (
                st.get("active") == 0
                and to_origins == 0
                and st.get("fds", 1 << 30) <= level_fds + 2
            )
            now = time.monotonic()
            if quiet:
                since = since or now
                if now - since >= 2.0:
                    return True, now - start, st
            else:
                since = None
            if now - start > timeout:
                return False, now - start, st
            time.sleep(0.25)

    def run(self) -> dict:
        a = self.args
        self.log(f"work dir {self.work}")
        nginx = NginxOrigin(large_size=NGINX_LARGE)
        self.services.append(nginx)
        nginx.__enter__()
        nginx_files = {}
        for path in ("/1k.bin", "/large.bin"):
            data = (nginx.www / path.lstrip("/")).read_bytes()
            nginx_files[path] = [len(data), hashlib.sha256(data).hexdigest()]
        origin_ca, origin_cert, origin_key = make_origin_certs(
            self.work, dns_names=("localhost", "tls.soak.test")
        )
        cfg = {
            "origin_http": free_port(),
            "origin_tls": free_port(),
            "dns_port": free_port(udp_too=True),
            "refused_port": free_port(),
            "origin_cert": str(origin_cert),
            "origin_key": str(origin_key),
            "origins_ready": str(self.work / "origins.ready"),
            "nginx_http": nginx.http_port,
            "nginx_https": nginx.https_port,
            "nginx_files": nginx_files,
            "nginx_ca": str(nginx.cert_path),
            "origin_ca": str(origin_ca),
            "proxy_ca": str(self.work / "proxy-ca.pem"),
        }
        cfg_path = self.work / "config.json"
        cfg_path.write_text(json.dumps(cfg))
        origins = self.role("origins", "origins", "--config", str(cfg_path))
        origins.wait_ready(lambda: Path(cfg["origins_ready"]).exists(), what="ready")
        (self.work / "rules.txt").write_text(RULES)
        proxy_args = [
            "--dns-port",
            str(cfg["dns_port"]),
            "--rules",
            str(self.work / "rules.txt"),
            "--ca-out",
            cfg["proxy_ca"],
            "--upstream-ca",
            str(nginx.cert_path),
            "--upstream-ca",
            str(origin_ca),
            "--stats",
            str(self.work / "proxy-stats.json"),
        ]
        if a.no_record_flows:
            proxy_args.append("--no-record-flows")
        if a.poll_records:
            proxy_args += ["--poll-records", str(a.poll_records)]
        self.proxy = Segproxy(
            proxy_args, command=[sys.executable, str(Path(__file__).resolve()), "--role", "proxy"]
        )
        self.services.append(self.proxy)
        self.proxy.__enter__()
        cfg["proxy_port"] = self.proxy.port
        self.port_names = {
            cfg["proxy_port"]: "proxy",
            cfg["nginx_http"]: "nginx-http",
            cfg["nginx_https"]: "nginx-https",
            cfg["origin_http"]: "origin-http",
            cfg["origin_tls"]: "origin-tls",
            cfg["dns_port"]: "dns",
        }
        self.log(f"proxy pid {self.proxy.pid} on {self.proxy.proxy_url}")

        time.sleep(1.0)
        fresh = proc_status(self.proxy.pid)
        # Idle before: one pass of every kind first (imports, first certificates, DNS, the
        # hook bridge), then the settle.
        self.log("warm-up: every session once")
        cfg.update(
            t0=time.time(), deadline=time.time() + 2, seed=a.seed, concurrency=0, slow_workers=0
        )
        warm = Load(cfg)

        async def warm_up() -> None:
            rng = random.Random(a.seed)
            for session, _ in warm.sessions:
                await warm.run_session(session, rng)

        asyncio.run(warm_up())
        self.warm_up_ok = not (warm.failure_count or warm.mismatches)
        if not self.warm_up_ok:
            self.notes.append(f"warm-up failures: {warm.failures} {warm.mismatches}")
        # The warm-up leaves pooled origin connections; their idle timeout closes them.
        ok, waited, idle_before = self.settle(fresh["fds"], 60)
        if not ok:
            self.notes.append(f"idle before: not settled to {fresh['fds']} fds in 60 s")
        self.log(
            f"idle before: RSS {idle_before['rss_kib'] / 1024:.1f} MiB, {idle_before['fds']} fds "
            f"(settled in {waited:.1f}s)"
        )

        self.fds_before = fd_kinds(self.proxy.pid, self.port_names)
        self.memory_before = self.proxy_memory()
        self.reference_idle_ms = round(min(reference_ms() for _ in range(3)), 1)

        # The load.
        t0 = time.time() + 1.0
        cfg.update(
            t0=t0,
            deadline=t0 + a.duration,
            concurrency=a.concurrency,
            slow_workers=a.slow_workers,
            probe_url=f"http://{LOOPBACK}:{nginx.http_port}/1k.bin",
            probe_size=nginx_files["/1k.bin"][0],
        )
        cfg_path.write_text(json.dumps(cfg))
        probe_file = self.work / "probe.jsonl"
        stop_probe = self.work / "probe.stop"
        self.role(
            "probe",
            "probe",
            "--config",
            str(cfg_path),
            "--out",
            str(probe_file),
            "--stop-file",
            str(stop_probe),
        )
        loads = []
        for i in range(a.clients):
            ci = dict(cfg, seed=a.seed * 100 + i)
            p = self.work / f"load{i}.json"
            (self.work / f"load{i}.cfg.json").write_text(json.dumps(ci))
            out = self.work / f"load{i}.result.json"
            loads.append(
                (
                    self.role(
                        f"load{i}",
                        "load",
                        "--config",
                        str(p.with_suffix(".cfg.json")),
                        "--out",
                        str(out),
                    ),
                    out,
                )
            )
        pids = {"proxy": self.proxy.pid, "nginx": nginx.pid, "origins": origins.pid}
        pids.update({f"load{i}": p.pid for i, (p, _) in enumerate(loads)})
        windows: list[dict] = []
        cpu_last, machine_last, net_last = group_cpu(pids), machine_cpu(), net_counters()
        ops_last, t_last = 0, time.time()
        next_window = t0 + WINDOW
        self.log(f"load: {a.duration:g}s, {a.clients} x {a.concurrency} workers + slow faults")
        while any(p.proc is not None and p.proc.poll() is None for p, _ in loads):
            now = time.time()
            st = self.sample("load")
            if not st.get("rss_kib"):
                self.notes.append("the proxy process is gone")
                break
            if now >= next_window and now < t0 + a.duration + WINDOW:
                cpu, machine, net = group_cpu(pids), machine_cpu(), net_counters()
                span = now - t_last
                every = {k: round(100 * (cpu[k] - cpu_last.get(k, 0)) / span, 1) for k in cpu}
                cpu_pct = {k: v for k, v in every.items() if not k.endswith(".sys")}
                busy = 100 * (machine[0] - machine_last[0]) / span
                stats = self.proxy_stats()
                ops = stats.get("requests", 0)
                w = {
                    "window": len(windows),
                    "rss_kib": st.get("rss_kib"),
                    "fds": st.get("fds"),
                    "active": st.get("active"),
                    "python_objects": stats.get("python_objects"),
                    "proxy_hook_requests_per_s": round((ops - ops_last) / span, 1),
                    "cpu_pct": cpu_pct,
                    "sys_cpu_pct": {k[:-4]: v for k, v in every.items() if k.endswith(".sys")},
                    # CPU the machine spent outside the soak's processes (other jobs)
                    "cpu_pct_others": round(busy - sum(cpu_pct.values()), 1),
                    "steal_pct": round(100 * (machine[1] - machine_last[1]) / span, 1),
                    "reference_ms": round(reference_ms(), 1),
                    "machine_cpus": os.cpu_count(),
                    "tcp": tcp_states(),
                    "net": {k: net[k] - net_last.get(k, 0) for k in net},
                }
                cpu_last, machine_last, net_last, ops_last, t_last = cpu, machine, net, ops, now
                windows.append(w)
                self.log(
                    f"window {w['window']}: RSS {w['rss_kib'] / 1024:.1f} MiB, fds {w['fds']}, "
                    f"active {w['active']}, cpu% {w['cpu_pct']} others {w['cpu_pct_others']} "
                    f"steal {w['steal_pct']}, ref {w['reference_ms']} ms, "
                    f"TIME_WAIT {w['tcp'].get('TIME_WAIT', 0)}, net {w['net']}"
                )
                next_window += WINDOW
            time.sleep(1.0)
        for p, _ in loads:
            if p.proc is not None:
                try:
                    p.proc.wait(timeout=OP_TIMEOUT + 30)
                except Exception:
                    self.notes.append(f"{p.name} did not finish; stopped")
        stop_probe.write_text("stop")
        for p in self.procs:
            if p.name == "probe" and p.proc is not None:
                with contextlib.suppress(Exception):
                    p.proc.wait(timeout=15)
        load_end = time.time()
        peak = max((s for s in self.samples if s.get("rss_kib")), key=lambda s: s["rss_kib"])
        peak_fds = max(s.get("fds", 0) for s in self.samples)

        # Idle after: clients are gone; wait for the proxy to let go of everything.
        settled, waited, idle_after = self.settle(idle_before["fds"], a.settle_timeout)
        time.sleep(1.0)  # one more second for memory given back after the connections
        idle_after = {**idle_after, **(proc_status(self.proxy.pid) or {})}
        self.log(
            f"idle after: RSS {idle_after.get('rss_kib', 0) / 1024:.1f} MiB, "
            f"{idle_after.get('fds')} fds (settled: {settled}, {waited:.1f}s)"
        )
        self.fds_after = fd_kinds(self.proxy.pid, self.port_names)
        self.memory_after = self.proxy_memory()
        try:
            served_after, _ = probe_once(cfg["proxy_port"], cfg["probe_url"], cfg["probe_size"])
        except OSError:
            served_after = False

        results = []
        for p, out in loads:
            try:
                results.append(json.loads(out.read_text()))
            except (OSError, ValueError):
                self.notes.append(f"{p.name}: no result ({p.log_tail(5)})")
        probes = [json.loads(line) for line in probe_file.read_text().splitlines() if line]
        return self.summarize(
            results,
            probes,
            windows,
            idle_before,
            fresh,
            peak,
            peak_fds,
            idle_after,
            settled,
            waited,
            served_after,
            t0,
            load_end,
        )

    def summarize(
        self,
        results,
        probes,
        windows,
        idle_before,
        fresh,
        peak,
        peak_fds,
        idle_after,
        settled,
        settle_s,
        served_after,
        t0,
        load_end,
    ) -> dict:
        a = self.args
        counts: dict[str, Counter] = defaultdict(Counter)
        per_window: dict[int, Counter] = defaultdict(Counter)
        window_bytes: Counter = Counter()
        connects: Counter = Counter()
        connect_s: Counter = Counter()
        lat_max: Counter = Counter()
        lat_sum: Counter = Counter()
        mismatches, failures = [], []
        bodies = body_bytes = failure_count = drained = 0
        for r in results:
            for k, c in r["counts"].items():
                counts[k].update(c)
            for w, c in r["windows"].items():
                per_window[int(w)].update(c)
            for w, b in r["window_bytes"].items():
                window_bytes[int(w)] += b
            for w, (n, secs) in r["connects"].items():
                connects[int(w)] += n
                connect_s[int(w)] += secs
            for k, v in r["latency_max"].items():
                lat_max[k] = max(lat_max[k], v)
            lat_sum.update(r["latency_sum"])
            mismatches += r["mismatches"]
            failures += r["failures"]
            bodies += r["bodies_checked"]
            body_bytes += r["bytes_checked"]
            failure_count += r["failure_count"]
            drained += r["drained"]
        n_windows = math.ceil(a.duration / WINDOW)
        ops_windows = []
        for w in range(n_windows):
            length = min(WINDOW, a.duration - w * WINDOW)
            total = sum(per_window[w].values())
            ops_windows.append(
                {
                    "window": w,
                    "start_s": w * WINDOW,
                    "seconds": length,
                    "ops": total,
                    "ops_per_s": round(total / length, 1),
                    "mib_per_s": round(window_bytes[w] / length / MIB, 2),
                    "new_connections_per_s": round(connects[w] / length, 1),
                    "connect_ms_mean": round(1000 * connect_s[w] / max(1, connects[w]), 3),
                    "by_kind": dict(per_window[w]),
                    **(windows[w] if w < len(windows) else {}),
                }
            )
        good_fail = {
            k: sum(v for o, v in c.items() if o.startswith("fail:"))
            for k, c in counts.items()
            if k in Load.GOOD
        }
        fault_fail = {
            k: sum(v for o, v in c.items() if o.startswith("fail:"))
            for k, c in counts.items()
            if k not in Load.GOOD
        }
        good_ok = sum(c.get("ok", 0) for k, c in counts.items() if k in Load.GOOD)
        in_load = [p for p in probes if p["t"] <= load_end]
        probe_fail = [p for p in in_load if not p["ok"]]
        gaps = [b["t"] - a_["t"] for a_, b in itertools.pairwise(in_load)]
        max_gap = max(gaps, default=0.0)
        tol_fds = 2
        tol_rss_kib = a.rss_tolerance_mib * 1024
        checks = {
            "no_mismatch": not mismatches,
            "good_ops_all_ok": sum(good_fail.values()) == 0 and good_ok > 0,
            "faults_as_expected": sum(fault_fail.values()) == 0,
            "probe_served_throughout": bool(in_load) and not probe_fail and max_gap < 15.0,
            "served_after": bool(served_after),
            "warm_up_ok": self.warm_up_ok,
            "fds_back_to_idle": settled
            and idle_after.get("fds", 1 << 30) <= idle_before["fds"] + tol_fds,
            "rss_back_to_idle": idle_after.get("rss_kib", 1 << 40)
            <= idle_before["rss_kib"] + tol_rss_kib,
        }
        total_ops = sum(sum(c.values()) for c in counts.values())
        # A leak grows with time; bounded stores and caches stop growing early.
        rss_w = [w.get("rss_kib") for w in windows if w.get("rss_kib")]
        half = len(rss_w) // 2
        rss_growth_mib = round((rss_w[-1] - rss_w[half]) / 1024, 1) if half else None
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "duration_s": a.duration,
            "clients": a.clients,
            "concurrency": a.concurrency,
            "slow_workers": a.slow_workers,
            "record_flows": not a.no_record_flows,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
            "reference_idle_ms": self.reference_idle_ms,
            "ops_total": total_ops,
            "ops_after_deadline": drained,
            "ops_by_kind": {k: dict(sorted(c.items())) for k, c in sorted(counts.items())},
            "latency_max_s": {k: round(v, 3) for k, v in sorted(lat_max.items())},
            "latency_mean_s": {
                k: round(lat_sum[k] / max(1, sum(counts[k].values())), 4) for k in sorted(lat_sum)
            },
            "windows": ops_windows,
            "bodies_checked": bodies,
            "body_bytes_checked": body_bytes,
            "mismatches": len(mismatches),
            "mismatch_details": mismatches[:20],
            "good_failures": good_fail,
            "fault_failures": fault_fail,
            "failure_details": failures[:30],
            "probe": {
                "count": len(in_load),
                "failures": len(probe_fail),
                "failure_details": probe_fail[:10],
                "max_latency_s": round(max((p["latency"] for p in in_load), default=0.0), 4),
                "median_latency_s": round(
                    sorted(p["latency"] for p in in_load)[len(in_load) // 2], 4
                )
                if in_load
                else None,
                "max_gap_s": round(max_gap, 3),
                "served_after_settle": bool(served_after),
            },
            "proxy": {
                "fresh": fresh,
                "idle_before": {k: idle_before.get(k) for k in ("rss_kib", "fds", "threads")},
                "peak": {
                    "rss_kib": peak.get("rss_kib"),
                    "fds": peak_fds,
                    "hwm_kib": peak.get("hwm_kib"),
                },
                "idle_after": {k: idle_after.get(k) for k in ("rss_kib", "fds", "threads")},
                "rss_growth_second_half_mib": rss_growth_mib,
                "settled": settled,
                "settle_s": round(settle_s, 1),
                "tolerance": {"fds": tol_fds, "rss_mib": a.rss_tolerance_mib},
                "stats": self.proxy_stats(),
                "fds_before": self.fds_before,
                "fds_after": self.fds_after,
                "memory_before": self.memory_before,
                "memory_after": self.memory_after,
            },
            "checks": checks,
            "passed": all(checks.values()),
            "notes": self.notes,
        }

    def cleanup(self) -> None:
        proxy = getattr(self, "proxy", None)
        if proxy is not None and proxy.process is not None:
            with contextlib.suppress(Exception):
                (self.work / "proxy.out.log").write_text(proxy.output())
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()
        for s in reversed(self.services):
            with contextlib.suppress(Exception):
                s.stop()
        if self.args.keep:
            self.log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def text_summary(s: dict) -> str:
    p = s["proxy"]
    mib = lambda kib: f"{(kib or 0) / 1024:.1f} MiB"  # noqa: E731
    lines = [
        f"soak: {s['duration_s']:g}s, {s['clients']} clients x {s['concurrency']} workers "
        f"+ {s['slow_workers']} slow, started {s['started']}",
        f"operations: {s['ops_total']} ({s['ops_after_deadline']} finished after the deadline)",
        "",
        f"{'kind':<22} {'ops':>8}  outcomes",
    ]
    for kind, c in s["ops_by_kind"].items():
        outs = ", ".join(f"{o} {n}" for o, n in c.items())
        lines.append(f"{kind:<22} {sum(c.values()):>8}  {outs}")
    lines += [
        "",
        f"reference work (CPU ms, lower is a faster machine): {s.get('reference_idle_ms')} before the load",
        "window   ops/s   MiB/s   proxy RSS   fds  TIME_WAIT  proxy µs/op  ref ms"
        "  cpu% proxy/origins/nginx/loads/others",
    ]
    for w in s["windows"]:
        cpu = w.get("cpu_pct", {})
        loads = sum(v for k, v in cpu.items() if k.startswith("load"))
        lines.append(
            f"{w['start_s']:>5.0f}s {w['ops_per_s']:>7.1f} {w['mib_per_s']:>7.2f} "
            f"{mib(w.get('rss_kib')):>11} {w.get('fds') or 0:>5} {w.get('tcp', {}).get('TIME_WAIT', 0):>10}"
            f" {10_000 * cpu.get('proxy', 0) / max(w['ops_per_s'], 1):>12.0f} {w.get('reference_ms', 0):>7.1f}"
            f"  {cpu.get('proxy', 0):.0f}/{cpu.get('origins', 0):.0f}/{cpu.get('nginx', 0):.0f}/{loads:.0f}"
            f"/{w.get('cpu_pct_others', 0):.0f}"
        )
    pr = s["probe"]
    lines += [
        "",
        f"bodies checked by SHA-256: {s['bodies_checked']} ({s['body_bytes_checked'] / MIB:.0f} MiB); mismatches: {s['mismatches']}",
        f"good-operation failures: {sum(s['good_failures'].values())}; faults outside their expected class: {sum(s['fault_failures'].values())}",
        f"probe: {pr['count']} requests, {pr['failures']} failed, latency median {pr['median_latency_s']} s, max {pr['max_latency_s']} s, longest gap {pr['max_gap_s']} s; served after settle: {pr['served_after_settle']}",
        f"proxy RSS: idle before {mib(p['idle_before']['rss_kib'])}, peak {mib(p['peak']['rss_kib'])}, idle after {mib(p['idle_after']['rss_kib'])} (tolerance +{p['tolerance']['rss_mib']} MiB)",
        f"proxy RSS growth over the second half of the load: {p['rss_growth_second_half_mib']} MiB",
        f"proxy RSS in use (after malloc_trim): before {mib(p['memory_before'].get('rss_after_malloc_trim_kib'))}, after {mib(p['memory_after'].get('rss_after_malloc_trim_kib'))}; "
        f"without the record stores: before {mib(p['memory_before'].get('rss_without_stores_kib'))}, after {mib(p['memory_after'].get('rss_without_stores_kib'))}",
        f"record stores after: {p['memory_after'].get('access_records')} access records (read in {p['memory_after'].get('access_records_s')} s), "
        f"{p['memory_after'].get('flows')} flows with {p['memory_after'].get('flow_chunks')} chunks (read in {p['memory_after'].get('flows_s')} s)",
        f"proxy fds: idle before {p['idle_before']['fds']}, peak {p['peak']['fds']}, idle after {p['idle_after']['fds']} (tolerance +{p['tolerance']['fds']}; settled in {p['settle_s']} s: {p['settled']})",
        f"proxy descriptors before: {p.get('fds_before')}",
        f"proxy descriptors after:  {p.get('fds_after')}",
        "checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in s["checks"].items()),
    ]
    for f in s["failure_details"][:10]:
        lines.append(f"  failure: {f}")
    for m in s["mismatch_details"][:5]:
        lines.append(f"  mismatch: {m}")
    for n in s["notes"]:
        lines.append(f"  note: {n}")
    lines.append("PASSED" if s["passed"] else "FAILED")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of load (1800)")
    ap.add_argument("--short", action="store_true", help="45 s of load (CI)")
    ap.add_argument("--clients", type=int, default=2, help="load processes (2)")
    ap.add_argument("--concurrency", type=int, default=8, help="workers per load process (8)")
    ap.add_argument("--slow-workers", type=int, default=1, help="slow-fault workers per process")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--settle-timeout", type=float, default=90.0)
    ap.add_argument("--rss-tolerance-mib", type=float, default=48.0)
    ap.add_argument("--no-record-flows", action="store_true", help="proxy without record_flows")
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--keep", action="store_true", help="keep the work dir and its logs")
    # internal roles
    ap.add_argument("--role", default="harness", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--stop-file", help=argparse.SUPPRESS)
    ap.add_argument("--listen-host", default=LOOPBACK, help=argparse.SUPPRESS)
    ap.add_argument("--listen-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dns-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rules", help=argparse.SUPPRESS)
    ap.add_argument("--ca-out", help=argparse.SUPPRESS)
    ap.add_argument("--upstream-ca", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument(
        "--poll-records",
        type=int,
        default=0,
        metavar="SECONDS",
        help="the proxy reads server.access_records() and server.flows() every SECONDS "
        "(as a monitoring script would); off by default",
    )
    args = ap.parse_args()

    if args.role == "proxy":
        proxy_main(args)
        return 0
    if args.role == "origins":
        asyncio.run(origins_main(json.loads(Path(args.config).read_text())))
        return 0
    if args.role == "load":
        load_main(json.loads(Path(args.config).read_text()), args.out)
        return 0
    if args.role == "probe":
        probe_main(json.loads(Path(args.config).read_text()), args.out, args.stop_file)
        return 0

    if args.short:
        args.duration = 45.0
    # SIGTERM ends the harness through its cleanup, which stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    harness = Harness(args)
    try:
        summary = harness.run()
    finally:
        harness.cleanup()
    print(text_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
