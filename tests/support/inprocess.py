"""An in-process segproxy: ``ProxyThread`` runs ``segproxy.start_proxy_server(...)`` on an
asyncio loop in a background thread, so blocking clients (curl, Python ssl, raw sockets)
can run in the test thread while the engine's own threads serve.

Imports the ``segproxy`` package (unlike the rest of ``support``, which the benchmark
scripts import without it)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import segproxy

from .procs import LOOPBACK

TIMEOUT = 30.0


class ProxyThread:
    """`start_proxy_server(port=0, **options)` on its own loop thread; ``.port``, ``.url``,
    ``.server`` (the ProxyServer) and ``.call(coro)`` to run a coroutine on that loop."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: segproxy.ProxyServer | None = None

    def __enter__(self) -> ProxyThread:
        self.thread.start()
        try:
            self.server = self.call(segproxy.start_proxy_server(port=0, **self.options))
        except BaseException:
            self._stop_loop()
            raise
        return self

    def call(self, coro, timeout: float = TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __exit__(self, *exc) -> None:
        try:
            if self.server is not None:
                self.call(self.server.aclose(grace=1.0))
        finally:
            self._stop_loop()
