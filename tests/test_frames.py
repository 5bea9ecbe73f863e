"""`server.flows_frame()` and `server.chunks_frame()`: the flow records of real traffic as
pandas DataFrames, one row a flow / a chunk, with the sizes the receiver actually got."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from segproxy import Rules, start_proxy_server
from segproxy.frames import CHUNK_COLUMNS, FLOW_COLUMNS, chunks_frame, flows_frame
from support import wait_for
from support.loopback import (
    TIMEOUT,
    HttpOrigin,
    SinkOrigin,
    blob,
    proxy_connect,
    proxy_request,
    recv_exact,
    sha,
)

pd = pytest.importorskip("pandas")
pytestmark = pytest.mark.timeout(120)


async def test_frames_of_a_segmented_tunnel_and_a_request() -> None:
    size = 5_000
    data = blob(3, size)
    rules = Rules.parse("127.0.0.1=segment_upstream,strategy=fixed,chunk=500,direction=up")
    with SinkOrigin(size) as sink, HttpOrigin() as origin:
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
        try:

            def run() -> bytes:
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{sink.port}")
                assert r.status == 200
                with s:
                    s.sendall(data)
                    digest = recv_exact(s, 32)
                r = proxy_request(("127.0.0.1", server.port), "GET", origin.url("/f"))
                assert r.status == 200
                return digest

            assert (await asyncio.to_thread(run)).hex() == sha(data)
            assert wait_for(lambda: len(server.flows()) == 2, timeout=TIMEOUT), server.flows()

            flows = server.flows_frame()
            assert list(flows.columns) == list(FLOW_COLUMNS)
            assert {c: str(t) for c, t in flows.dtypes.items()} == FLOW_COLUMNS
            tunnel = flows[flows["method"] == "CONNECT"].iloc[0]
            assert tunnel["kind"] == "tunnel" and tunnel["status"] == 200
            assert tunnel["bytes_up"] == size and tunnel["outcome"] == "ok"
            assert tunnel["duration"] >= 0
            get = flows[flows["method"] == "GET"].iloc[0]
            assert get["status"] == 200 and get["bytes_down"] == len(b"origin ok /f\n")

            chunks = server.chunks_frame()
            assert list(chunks.columns) == list(CHUNK_COLUMNS)
            up = chunks[(chunks["id"] == tunnel["id"]) & (chunks["direction"] == "up")]
            assert up["size"].sum() == size
            # Every chunk the asked size, but those the engine marks short (and says why).
            assert set(up[up["short"].isna()]["size"]) == {500}, "every chunk the asked size"
            assert set(up[up["short"].notna()]["short"]) <= {"idle", "end", "flush"}
            assert (up["t"] >= 0).all() and up["gap"].iloc[1:].ge(0).all()
            assert up["gap"].isna().iloc[0]
            # The same frames from the flows file's JSON lines.
            again = flows_frame(json.loads(json.dumps(f)) for f in server.flows())
            assert again["id"].tolist() == flows["id"].tolist()
            assert len(chunks_frame(server.flows())) == len(chunks)
        finally:
            await server.aclose()


def test_a_clear_message_without_pandas(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install segproxy\[notebook\]"):
        flows_frame([])
