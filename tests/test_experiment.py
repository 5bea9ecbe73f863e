"""`segproxy.experiment.sweep`: a workload under each policy on one server, as a table.

Lower bounds only (a rate or a held first byte is never shorter than asked); the origin
and the client are real (HttpOrigin on loopback, httpx)."""

from __future__ import annotations

import httpx
import pytest
import segproxy
import segproxy.experiment
from segproxy import Rule, Rules, start_proxy_server
from support.loopback import HttpOrigin

pytestmark = pytest.mark.timeout(120)


async def test_a_sweep_of_urls_under_three_policies() -> None:
    sizes = [20_000, 30_000]
    with HttpOrigin() as origin:
        urls = [origin.url(f"/blob?n={n}&seed={i}") for i, n in enumerate(sizes)]
        table = await segproxy.experiment.sweep(
            {
                "plain": "127.0.0.1=direct",
                "slow": "127.0.0.1=direct,direction=down,rate=100k",
                "late": Rule("127.0.0.1", ttfb=200),
            },
            urls,
            repeats=2,
            progress=False,
        )
    assert list(table.columns) == list(segproxy.experiment.SWEEP_COLUMNS)
    assert len(table) == 3 * 2 * len(urls), table
    assert set(table["policy"]) == {"plain", "slow", "late"}
    assert sorted(set(table["repeat"])) == [0, 1]
    assert (table["status"] == 200).all() and (table["outcome"] == "ok").all()
    # Every body came whole: the origin's bytes, per URL, per run.
    for (_, _), runs in table.groupby(["policy", "repeat"], observed=True):
        assert sorted(runs["bytes_down"]) == sorted(sizes)
    slow = table[table["policy"] == "slow"]
    assert (slow["duration"] >= 0.95 * (20_000 / 100_000)).all(), slow["duration"]
    late = table[table["policy"] == "late"]
    assert (late["ttfb"] >= 0.19).all(), late["ttfb"]


async def test_a_fault_shows_in_the_table_and_an_async_workload() -> None:
    seen: list[str] = []

    async def workload(proxy: str) -> None:
        seen.append(proxy)
        async with httpx.AsyncClient(proxy=proxy) as client:
            for i in range(3):
                try:
                    await client.get(origin.url(f"/blob?n=50000&seed={i}"))
                except httpx.HTTPError:
                    pass

    with HttpOrigin() as origin:
        table = await segproxy.experiment.sweep(
            ["127.0.0.1=direct", "127.0.0.1=direct,direction=down,fault=reset@2000"],
            workload,
            progress=False,
        )
    assert len(set(seen)) == 1, "one server for every policy"
    by_policy = dict(tuple(table.groupby("policy", observed=True)))
    cut = by_policy["127.0.0.1=direct,direction=down,fault=reset@2000"]
    assert (cut["outcome"] == "fault").all() and cut["error"].str.contains("reset@2000").all()
    whole = by_policy["127.0.0.1=direct"]
    assert (whole["outcome"] == "ok").all() and (whole["bytes_down"] == 50_000).all()


async def test_a_given_server_gets_its_rules_back() -> None:
    with HttpOrigin() as origin:
        server = await start_proxy_server(
            host="127.0.0.1", port=0, rules=Rules.parse("keep.test=direct"), record_flows=True
        )
        try:
            table = await segproxy.experiment.sweep(
                [Rules.parse("127.0.0.1=direct,direction=down,rate=1M")],
                [origin.url("/a")],
                server=server,
                progress=False,
            )
            assert len(table) == 1 and table["status"].iloc[0] == 200
            assert "keep.test" in server.rules.describe(), "the server's own rules are back"
        finally:
            await server.aclose()


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        await segproxy.experiment.sweep(["*=direct"], ["http://x.test/"], repeats=0)
    with pytest.raises(ValueError, match="at least one policy"):
        await segproxy.experiment.sweep([], ["http://x.test/"], progress=False)
    with pytest.raises(ValueError, match=r"<policy>:1"):
        await segproxy.experiment.sweep(["a.test=direct,colour=red"], ["http://x.test/"])


async def test_a_sweep_replays_a_har_file(tmp_path) -> None:
    """A workload recorded once (captured, exported as HAR) is replayed under each policy."""
    import segproxy.har

    with HttpOrigin() as origin:
        server = await start_proxy_server(
            host="127.0.0.1", port=0, record_flows=True, capture_bodies=1024
        )
        try:
            async with httpx.AsyncClient(proxy=server.url) as client:
                for path in ("/one", "/two"):
                    assert (await client.get(origin.url(path))).status_code == 200
        finally:
            await server.aclose()
        har = tmp_path / "run.har"
        segproxy.har.dump(server.flows(), har)
        table = await segproxy.experiment.sweep(
            {"plain": "127.0.0.1=direct", "late": "127.0.0.1=direct,ttfb=100"},
            har,
            progress=False,
        )
    assert sorted(table["target"].str.rsplit("/", n=1).str[-1]) == ["one", "one", "two", "two"]
    assert (table["status"] == 200).all()
    assert (table[table["policy"] == "late"]["ttfb"] >= 0.095).all()
