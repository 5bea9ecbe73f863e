"""Limits that follow the machine: the open-file limit is raised to the hard limit at start
and the default connection limit derives from it; running out of descriptors never stops
the accept loop.

The proxy runs as the CLI in a child process whose open-file limit the test sets (a low soft
limit, or a low hard one), so nothing here depends on this process's own limit.
"""

from __future__ import annotations

import re
import resource
import selectors
import socket
import sys
import threading

import pytest
import segproxy
from support import Segproxy, wait_for
from support.loopback import TIMEOUT, HttpOrigin, proxy_request, read_head

pytestmark = pytest.mark.timeout(120)


class HoldingOrigin:
    """Accepts connections on 127.0.0.1 and keeps them open (one thread, selectors)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        while not self.stop.is_set():
            for _ in sel.select(timeout=0.1):
                while True:
                    try:
                        conn, _ = self.listener.accept()
                    except (BlockingIOError, OSError):
                        break
                    self.held.append(conn)
        sel.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for c in self.held:
            c.close()
        self.listener.close()


def with_nofile(soft: int, hard: int) -> list[str]:
    """The CLI under an open-file limit of its own (util-linux prlimit execs it: same pid)."""
    return ["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-m", "segproxy"]


def open_files(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file line")


def connect_tunnel(port: int, origin_port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.sendall(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer, _ = read_head(s)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    return s


def test_soft_limit_raised_and_connection_limit_derived_from_it():
    """A soft limit of 1,024 under a hard one of 8,192: the proxy raises it and serves
    1,500 idle tunnels (1,024 files would allow about 500)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 8192)
    if hard < 4096:
        pytest.skip(f"hard open-file limit {hard} too low for this test")
    origin = HoldingOrigin()
    proxy = Segproxy(command=with_nofile(1024, hard))
    socks: list[socket.socket] = []
    try:
        with proxy:
            assert open_files(proxy.pid) == (hard, hard)
            expected = segproxy_limit(hard)
            assert wait_for(
                lambda: f"up to {expected} connections" in proxy.output(), timeout=TIMEOUT
            ), proxy.output()
            for _ in range(1500):
                socks.append(connect_tunnel(proxy.port, origin.port))
            # Still serving new requests with all of them open.
            with HttpOrigin() as web:
                assert proxy_request(("127.0.0.1", proxy.port), "GET", web.url("/x")).status == 200
    finally:
        for s in socks:
            s.close()
        origin.close()


def segproxy_limit(open_files: int) -> int:
    """The engine's rule (src/engine/limits.rs): two descriptors a connection after a
    reserve of 128 plus a tenth of the limit."""
    return (open_files - (128 + open_files // 10)) // 2


async def test_max_connections_still_overrides_and_default_is_derived():
    async with await segproxy.start_proxy_server(port=0, max_connections=7) as server:
        assert server.max_connections == 7
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with await segproxy.start_proxy_server(port=0) as server:
        # This process's soft limit is now the hard one (the engine raised it).
        assert server.max_connections == segproxy_limit(
            resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        )
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft


def test_running_out_of_descriptors_never_stops_the_accept_loop():
    """With a hard limit of 200 files and room for 1,000 connections, 300 idle clients use up
    the descriptors: accepts fail (EMFILE), the loop backs off and says so at most about
    once a second, and once the clients go, requests are served again."""
    proxy = Segproxy(
        ["--max-connections", "1000", "--idle-timeout", "60"], command=with_nofile(200, 200)
    )
    idle: list[socket.socket] = []
    with HttpOrigin() as web, proxy:
        try:
            for _ in range(300):
                idle.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT))
            assert wait_for(lambda: "out of file descriptors" in proxy.output(), timeout=TIMEOUT), (
                proxy.output()
            )
        finally:
            for s in idle:
                s.close()
        # The backlog drains as descriptors come back; then a request is served.
        assert wait_for(
            lambda: (
                proxy_request(("127.0.0.1", proxy.port), "GET", web.url("/after")).status == 200
            ),
            timeout=TIMEOUT,
        )
        output = proxy.output()
    failures = re.findall(r"accept failed (\d+) time", output)
    assert failures, output
    # Logged once a second at most, however many accepts failed.
    assert len(failures) <= 30, output
