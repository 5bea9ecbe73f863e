"""`segproxy.replay`: recorded requests (flow records or a HAR) sent again through a proxy or
directly; the origin sees the same method, path, headers and body, under another policy;
the proxy's new flow records (or one result per request) come back."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx
import pytest
import segproxy
from support.origins import RecordingOrigin, TlsRecordingOrigin

pytestmark = pytest.mark.timeout(120)


def body_of(n: int) -> bytes:
    return bytes((i * 13 + 5) % 256 for i in range(n))


async def recorded(server: segproxy.ProxyServer, count: int) -> list[segproxy.FlowRecord]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(flows := server.flows()) < count and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return flows


def seen(origin: RecordingOrigin) -> list[tuple[str, str, bytes, str | None]]:
    """What the origin got: method, target, body and the test's own header, in order."""
    return sorted((r.method, r.target, r.body, r.header("X-Run")) for r in origin.requests)


async def workload(server: segproxy.ProxyServer, origin: RecordingOrigin) -> None:
    async with httpx.AsyncClient(proxy=server.url, trust_env=False) as client:
        r = await client.get(origin.url("/gen/3000?x=1"), headers={"X-Run": "a"})
        assert r.status_code == 200
        r = await client.post(origin.url("/echo"), content=body_of(5000), headers={"X-Run": "b"})
        assert r.content == body_of(5000)
        r = await client.put(origin.url("/status/201"), content=b"{}", headers={"X-Run": "c"})
        assert r.status_code == 201


async def test_replay_through_the_proxy_under_another_policy(origin: RecordingOrigin) -> None:
    server = await segproxy.start_proxy_server(port=0, capture_bodies=65536)
    try:
        await workload(server, origin)
        flows = await recorded(server, 3)
        first = seen(origin)
        origin.requests.clear()

        server.set_rules("127.0.0.1=segment_upstream,strategy=fixed,chunk=100,direction=both")
        again = await segproxy.replay(flows, proxy=server, concurrency=2)
    finally:
        await server.aclose()
    # The origin got the same requests again: method, target, body, the client's header.
    assert seen(origin) == first and len(first) == 3
    # The flows the proxy recorded for them, in the order given, under the new policy.
    assert [(f["method"], f["target"]) for f in again] == [
        (f["method"], f["target"]) for f in flows
    ]
    assert {f["id"] for f in again}.isdisjoint({f["id"] for f in flows})
    for f in again:
        assert f["policy"].startswith("fixed chunk=100"), f["policy"]
        assert f["status"] in (200, 201) and f["outcome"] == "ok"
    post = again[1]
    assert post["bytes_up"] == 5000
    # Segmented at 100 bytes: the body went up in 100-byte chunks (the head's chunks first).
    sizes = [size for direction, size, _ in post["chunks"] if direction == "up"]
    assert sum(sizes) > 5000 and max(sizes) == 100


async def test_replay_of_a_har_file_directly(tmp_path: Path, origin: RecordingOrigin) -> None:
    server = await segproxy.start_proxy_server(port=0, capture_bodies=65536)
    try:
        await workload(server, origin)
        await recorded(server, 3)
        path = tmp_path / "run.har"
        assert server.export_har(path) == 3
    finally:
        await server.aclose()
    first = seen(origin)
    origin.requests.clear()

    results = await segproxy.replay(path, proxy=None, concurrency=3)
    assert seen(origin) == first
    assert [(r["method"], r["status"], r["error"]) for r in results] == [
        ("GET", 200, None),
        ("POST", 200, None),
        ("PUT", 201, None),
    ]
    assert results[0]["bytes"] == 3000 and results[1]["bytes"] == 5000
    assert all(r["duration"] > 0 for r in results)
    # The recorded fields went out as recorded (the client sets Content-Length again).
    got = {r.method: r for r in origin.requests}
    assert got["GET"].header("User-Agent") == "python-httpx/" + httpx.__version__
    assert got["PUT"].header("Content-Length") == "2"


async def test_replay_through_a_proxy_without_records_and_a_failing_request(
    origin: RecordingOrigin,
) -> None:
    flows = [
        {
            "id": "1.1",
            "method": "GET",
            "target": origin.url("/gen/10"),
            "request": None,
        },
        {"id": "1.2", "method": "CONNECT", "target": "127.0.0.1:443", "request": None},
        {"id": "1.3", "method": "GET", "target": "http://127.0.0.1:1/refused", "request": None},
    ]
    server = await segproxy.start_proxy_server(port=0)
    try:
        results = await segproxy.replay(flows, proxy=server.url, concurrency=1)
    finally:
        await server.aclose()
    assert [(r["url"], r["status"]) for r in results] == [
        (origin.url("/gen/10"), 200),
        ("http://127.0.0.1:1/refused", 502),
    ]
    assert [r.target for r in origin.requests] == ["/gen/10"]


async def test_replay_through_an_intercepting_proxy(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    store = segproxy.load_or_create_ca(ca_dir)
    with TlsRecordingOrigin(tmp_path / "origin") as origin:
        server = await segproxy.start_proxy_server(
            port=0,
            tls_store=store,
            upstream_ca=[origin.ca_path],
            rules="127.0.0.1=direct,intercept=yes",
            capture_bodies=65536,
        )
        try:
            trust = ssl.create_default_context(cafile=str(ca_dir / "ca-cert.pem"))
            async with httpx.AsyncClient(proxy=server.url, verify=trust, trust_env=False) as c:
                r = await c.post(origin.url("/echo"), content=b"secret", headers={"X-Run": "s"})
                assert r.content == b"secret"
            flows = [f for f in await recorded(server, 2) if f["method"] != "CONNECT"]
            first = seen(origin)
            origin.requests.clear()
            again = await segproxy.replay(
                flows, proxy=server.url, verify=ca_dir / "ca-cert.pem", concurrency=1
            )
        finally:
            await server.aclose()
        assert seen(origin) == first
    (flow,) = again
    assert flow["kind"] == "intercept" and flow["target"] == origin.url("/echo")
    assert flow["request"] is not None and flow["request"]["body"] == b"secret"


async def test_replay_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="not a HAR"):
        await segproxy.replay({"entries": []})
    with pytest.raises(ValueError, match="concurrency"):
        await segproxy.replay([], concurrency=0)
