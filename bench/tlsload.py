#!/usr/bin/env python3
"""A small load client for HTTPS through an intercepting proxy (wrk can neither CONNECT nor
trust a custom CA).

Several worker processes (one per CPU by default), each with an epoll loop over its share of
the connections. Every connection is set up before the clock starts: TCP to the proxy,
``CONNECT host:port``, a TLS handshake that verifies the certificate against ``cafile`` and
the host name, then keep-alive ``GET``s one after another (no pipelining) for ``duration``
seconds. Without a proxy it talks to the origin directly (the baseline, same client);
with ``tls=False`` it sends absolute-form requests to the proxy (plain HTTP forwarding).

``handshakes()`` measures new connections instead: CONNECT + full TLS handshake (no session
resumption) + close, in a loop, from several threads per process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass


@dataclass
class Target:
    host: str  # the name in the URL (SNI, Host, CONNECT target)
    port: int
    path: str
    tls: bool
    cafile: str | None = None
    proxy: tuple[str, int] | None = None
    connect_addr: str = "127.0.0.1"  # where `host` really is (direct mode)


def _context(t: Target) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=t.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _recv_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        b = sock.recv(1)
        if not b:
            raise ConnectionError(f"closed during CONNECT: {head!r}")
        head += b
    return head


def open_conn(t: Target, ctx: ssl.SSLContext | None, timeout: float = 30.0) -> socket.socket:
    if t.proxy is not None:
        sock = socket.create_connection(t.proxy, timeout=timeout)
        if t.tls:
            sock.sendall(
                f"CONNECT {t.host}:{t.port} HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n\r\n".encode()
            )
            head = _recv_head(sock)
            if not head.split(b" ", 2)[1].startswith(b"2"):
                raise ConnectionError(f"CONNECT refused: {head!r}")
    else:
        sock = socket.create_connection((t.connect_addr, t.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if t.tls:
        assert ctx is not None
        sock = ctx.wrap_socket(sock, server_hostname=t.host)
    return sock


def _request(t: Target) -> bytes:
    if t.tls or t.proxy is None:
        line = f"GET {t.path} HTTP/1.1\r\n"
    else:
        line = f"GET http://{t.host}:{t.port}{t.path} HTTP/1.1\r\n"
    return (line + f"Host: {t.host}:{t.port}\r\nUser-Agent: segproxy-bench\r\n\r\n").encode()


def _worker(t: Target, nconn: int, ready, start, duration: float, out) -> None:
    try:
        ctx = _context(t) if t.tls else None
        req = _request(t)
        socks = [open_conn(t, ctx) for _ in range(nconn)]
        ep = select.epoll()
        state: dict[int, list] = {}
        for s in socks:
            s.setblocking(False)
            state[s.fileno()] = [s, bytearray(), -1, 0.0]  # sock, buffer, body end, sent at
            ep.register(s.fileno(), select.EPOLLIN)
        ready.put(os.getpid())
        start.wait()
        t0 = time.perf_counter()
        end = t0 + duration
        for st in state.values():
            st[3] = time.perf_counter()
            st[0].sendall(req)
        done = errors = 0
        lat: list[float] = []
        now = t0
        while now < end:
            for fd, _ in ep.poll(0.2):
                st = state[fd]
                s, buf = st[0], st[1]
                try:
                    while True:
                        data = s.recv(65536)
                        if not data:
                            raise ConnectionError("closed")
                        buf += data
                        if not isinstance(s, ssl.SSLSocket) or not s.pending():
                            break
                except (ssl.SSLWantReadError, BlockingIOError):
                    pass
                except (OSError, ConnectionError):
                    errors += 1
                    ep.unregister(fd)
                    continue
                while True:
                    if st[2] < 0:
                        i = buf.find(b"\r\n\r\n")
                        if i < 0:
                            break
                        head = bytes(buf[:i]).lower()
                        j = head.find(b"content-length:")
                        if j >= 0:
                            k = head.find(b"\r\n", j)
                            n = int(head[j + 15 : k if k > 0 else len(head)])
                        else:
                            n = 0
                        if not head.startswith(b"http/1.1 200"):
                            errors += 1
                        st[2] = i + 4 + n
                    if len(buf) < st[2]:
                        break
                    del buf[: st[2]]
                    st[2] = -1
                    done += 1
                    now = time.perf_counter()
                    lat.append(now - st[3])
                    st[3] = now
                    s.sendall(req)
            now = time.perf_counter()
        elapsed = time.perf_counter() - t0
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        lat.sort()
        p99 = lat[int(len(lat) * 0.99)] if lat else 0.0
        out.put({"requests": done, "errors": errors, "seconds": elapsed, "p99": p99})
    except BaseException as e:  # report, never hang the parent
        ready.put(os.getpid())
        out.put({"error": f"{type(e).__name__}: {e}"})


def keepalive(
    t: Target, connections: int = 64, duration: float = 5.0, processes: int | None = None
) -> dict:
    """Keep-alive GETs over `connections` connections; returns requests, errors, seconds,
    rate (req/s) and p99 (s, worst process)."""
    processes = processes or os.cpu_count() or 2
    processes = max(1, min(processes, connections))
    mpc = mp.get_context("fork")
    ready, out, start = mpc.Queue(), mpc.Queue(), mpc.Event()
    per = [
        connections // processes + (1 if i < connections % processes else 0)
        for i in range(processes)
    ]
    procs = [
        mpc.Process(target=_worker, args=(t, n, ready, start, duration, out), daemon=True)
        for n in per
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start.set()
        results = [out.get(timeout=duration + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"load client failed: {failed[0]}")
    n = sum(r["requests"] for r in results)
    secs = max(r["seconds"] for r in results)
    return {
        "requests": n,
        "errors": sum(r["errors"] for r in results),
        "seconds": secs,
        "rate": n / secs if secs else 0.0,
        "p99": max(r["p99"] for r in results),
    }


def _hs_worker(t: Target, threads: int, ready, start, duration: float, out) -> None:
    ctx = _context(t)
    counts = [0] * threads
    errs = [0] * threads
    first_error: list[str] = []

    def loop(i: int) -> None:
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            try:
                s = open_conn(t, ctx, timeout=10)
                s.close()
                counts[i] += 1
            except (OSError, ConnectionError) as e:
                errs[i] += 1
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}")
                time.sleep(0.01)

    ready.put(os.getpid())
    start.wait()
    t0 = time.perf_counter()
    ths = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    out.put(
        {
            "handshakes": sum(counts),
            "errors": sum(errs),
            "seconds": time.perf_counter() - t0,
            "first_error": first_error[0] if first_error else None,
        }
    )


def handshakes(
    t: Target, concurrency: int = 16, duration: float = 3.0, processes: int | None = None
) -> dict:
    """New TLS connections (CONNECT + full handshake, then close) per second."""
    assert t.tls
    processes = processes or os.cpu_count() or 2
    mpc = mp.get_context("fork")
    ready, out, start = mpc.Queue(), mpc.Queue(), mpc.Event()
    per = max(1, concurrency // processes)
    procs = [
        mpc.Process(target=_hs_worker, args=(t, per, ready, start, duration, out), daemon=True)
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        start.set()
        results = [out.get(timeout=duration + 60) for _ in procs]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    n = sum(r["handshakes"] for r in results)
    secs = max(r["seconds"] for r in results)
    errors = sum(r["errors"] for r in results)
    first = next((r["first_error"] for r in results if r["first_error"]), None)
    return {
        "handshakes": n,
        "errors": errors,
        "seconds": secs,
        "rate": n / secs if secs else 0.0,
        "first_error": first,
    }
