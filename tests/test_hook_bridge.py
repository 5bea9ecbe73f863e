"""The hook bridge alone (no engine): doorbell wake-ups, batching, contexts, failures."""

from __future__ import annotations

import asyncio
import contextvars
import statistics

import pytest
from segproxy import _engine
from segproxy.handlers import (
    HookRunner,
    HTTPSForwardProxyHandler,
    HTTPSProxyHandler,
    overridden_hooks,
)

SEEN: contextvars.ContextVar[int] = contextvars.ContextVar("seen", default=0)


class Echo(HTTPSForwardProxyHandler):
    instances: list[Echo] = []

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[int] = []
        Echo.instances.append(self)

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        SEEN.set(SEEN.get() + 1)
        self.counts.append(SEEN.get())
        return chunk


class Sleepy(HTTPSForwardProxyHandler):
    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        await asyncio.sleep(0.001)
        return chunk


class Broken(HTTPSForwardProxyHandler):
    errors: list[BaseException] = []

    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        raise ValueError("boom")

    async def on_error(self, error: Exception) -> None:
        Broken.errors.append(error)


class WrongType(HTTPSForwardProxyHandler):
    async def on_response_chunk(self, chunk: bytes) -> bytes | None:
        return "text"  # type: ignore[return-value]


def test_overridden_hooks() -> None:
    assert overridden_hooks(HTTPSForwardProxyHandler) == []
    assert overridden_hooks(HTTPSProxyHandler) == ["request"]
    assert overridden_hooks(Echo) == ["response", "response_complete", "error", "response_chunk"]

    class Req(HTTPSForwardProxyHandler):
        async def on_request_received(self) -> None:
            await self.forward_http_request()

    class Tun(HTTPSForwardProxyHandler):
        async def on_tunnel_close(self, host: str, port: int, up: int, down: int) -> None:
            pass

        async def on_connect(self, host: str, port: int) -> None:
            return None

    class Done(HTTPSForwardProxyHandler):
        async def on_response_complete(self) -> None:
            pass

    assert overridden_hooks(Req) == ["request"]
    assert overridden_hooks(Tun) == ["connect", "tunnel"]
    # on_response_complete runs when forwarding fails too: Python forwards these requests.
    assert overridden_hooks(Done) == ["request", "response", "response_complete", "error"]


async def test_roundtrip_sequential_and_context() -> None:
    Echo.instances.clear()
    runner = HookRunner(Echo, asyncio.get_running_loop())
    try:
        times = await _engine.hook_roundtrip(runner.bridge, 1, 200)
        assert len(times) == 200
        # one handler per connection; its context saw every call of that connection in order
        assert [e.counts for e in Echo.instances] == [list(range(1, 201))]
    finally:
        runner.close()


async def test_many_tiny_concurrent_hooks_lose_no_wakeup() -> None:
    Echo.instances.clear()
    runner = HookRunner(Echo, asyncio.get_running_loop())
    try:
        times = await asyncio.wait_for(_engine.hook_roundtrip(runner.bridge, 256, 40), 60)
        assert len(times) == 256 * 40
        wakeups, items = runner.bridge.stats()
        assert items >= 256 * 40
        assert wakeups < items  # batched
        assert sorted(len(e.counts) for e in Echo.instances) == [40] * 256
        assert all(e.counts == list(range(1, 41)) for e in Echo.instances)
    finally:
        runner.close()


async def test_slow_hooks_concurrent() -> None:
    runner = HookRunner(Sleepy, asyncio.get_running_loop())
    try:
        times = await asyncio.wait_for(_engine.hook_roundtrip(runner.bridge, 64, 5), 60)
        assert len(times) == 64 * 5
    finally:
        runner.close()


async def test_exception_reaches_on_error_and_engine() -> None:
    Broken.errors.clear()
    runner = HookRunner(Broken, asyncio.get_running_loop())
    try:
        with pytest.raises(RuntimeError, match="ValueError: boom"):
            await _engine.hook_roundtrip(runner.bridge, 1, 1)
        assert [str(e) for e in Broken.errors] == ["boom"]
    finally:
        runner.close()


async def test_wrong_return_type_is_an_error() -> None:
    runner = HookRunner(WrongType, asyncio.get_running_loop())
    try:
        with pytest.raises(RuntimeError, match="expected bytes, got str"):
            await _engine.hook_roundtrip(runner.bridge, 1, 1)
    finally:
        runner.close()


async def test_builder_failure_is_an_error() -> None:
    calls = 0

    def builder() -> Echo:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError("no more")
        return Echo()

    runner = HookRunner(builder, asyncio.get_running_loop())
    try:
        await _engine.hook_roundtrip(runner.bridge, 1, 1)  # the probe instance serves it
        with pytest.raises(RuntimeError, match="handler_builder failed: OSError: no more"):
            await _engine.hook_roundtrip(runner.bridge, 1, 1)
    finally:
        runner.close()


async def test_closed_bridge_fails_fast() -> None:
    runner = HookRunner(Echo, asyncio.get_running_loop())
    runner.close()
    with pytest.raises(RuntimeError, match="dropped"):
        await asyncio.wait_for(_engine.hook_roundtrip(runner.bridge, 4, 1), 10)


async def test_call_soon_threadsafe_fallback() -> None:
    loop = asyncio.get_running_loop()

    class NoReader:
        """The running loop without add_reader, as on Windows' Proactor."""

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(loop, name)

        def add_reader(self, *a: object) -> None:
            raise NotImplementedError

    Echo.instances.clear()
    runner = HookRunner(Echo, NoReader())  # type: ignore[arg-type]
    try:
        times = await asyncio.wait_for(_engine.hook_roundtrip(runner.bridge, 32, 20), 60)
        assert len(times) == 32 * 20
    finally:
        runner.close()


async def test_roundtrip_cost_is_reported() -> None:
    runner = HookRunner(Echo, asyncio.get_running_loop())
    try:
        await _engine.hook_roundtrip(runner.bridge, 1, 50)
        seq = statistics.median(await _engine.hook_roundtrip(runner.bridge, 1, 500))
        conc = await _engine.hook_roundtrip(runner.bridge, 64, 50)
        print(
            f"hook round trip: sequential {seq:.1f} µs; 64 flows {statistics.median(conc):.1f} µs/call latency"
        )
    finally:
        runner.close()
