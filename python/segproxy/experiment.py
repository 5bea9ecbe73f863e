"""One call for a policy experiment: run a workload under each policy, on one server, and get
a tidy table back.

    import segproxy.experiment

    table = await segproxy.experiment.sweep(
        {"no delay": "*=direct", "5 ms": "*=segment_upstream,chunk=512,delay=5,direction=down"},
        ["http://127.0.0.1:8000/page.html"],
        repeats=3,
    )
    table.groupby("policy")["duration"].median()

Policies are swapped live (`ProxyServer.set_rules`), so the workload meets each one on the
same server: no restart, no new port, and a flow already running keeps the policy it started
with. pandas and tqdm come with ``pip install segproxy[notebook]``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from importlib import import_module
from typing import TYPE_CHECKING, Any

from .rules import Rule, Rules

if TYPE_CHECKING:
    from ._server import FlowRecord, ProxyServer

__all__ = ["SWEEP_COLUMNS", "Policy", "Workload", "sweep"]

#: A policy: rule text, one `Rule`, or a `Rules` object (its default policy included).
Policy = str | Rule | Rules

#: A workload: URLs to GET through the proxy (with httpx), the flow records, a HAR (dict) or a
#: HAR file's path of an earlier run to replay (`segproxy.replay`), or an async function given
#: the proxy's URL.
Workload = (
    Sequence[str]
    | Sequence[Mapping[str, Any]]
    | Mapping[str, Any]
    | str
    | os.PathLike[str]
    | Callable[[str], Awaitable[object]]
)

#: Columns of `sweep`'s table, with their pandas dtypes.
SWEEP_COLUMNS: dict[str, str] = {
    "policy": "category",
    "repeat": "int64",
    "flow": "string",
    "kind": "category",
    "method": "category",
    "target": "string",
    "status": "int64",
    "outcome": "category",
    "bytes_up": "int64",
    "bytes_down": "int64",
    "bytes": "int64",
    "duration": "float64",
    "ttfb": "float64",
    "error": "string",
    "wall": "float64",
}


def _needs(package: str) -> Any:
    try:
        return import_module(package)
    except ImportError:
        raise ImportError(
            f"segproxy.experiment.sweep needs {package}: pip install segproxy[notebook]"
        ) from None


def _as_rules(policy: Policy) -> Rules:
    if isinstance(policy, Rules):
        return policy
    if isinstance(policy, Rule):
        return Rules.from_rules([policy])
    return Rules.parse(policy, source="<policy>")


def _label(policy: Policy) -> str:
    if isinstance(policy, Rule):
        return policy.text()
    if isinstance(policy, Rules):
        return policy.describe().strip().replace("\n", "; ")
    return policy.strip().replace("\n", "; ")


def ttfb(flow: FlowRecord) -> float:
    """Seconds from the flow's start to its first byte toward the client (the first "down"
    chunk); NaN when none was written."""
    for direction, _size, t in flow["chunks"]:
        if direction == "down":
            return t - flow["start"]
    return math.nan


def _row(label: str, repeat: int, flow: FlowRecord, wall: float) -> dict[str, Any]:
    end = flow.get("end")
    return {
        "policy": label,
        "repeat": repeat,
        "flow": flow["id"],
        "kind": flow["kind"],
        "method": flow["method"],
        "target": flow["target"],
        "status": flow["status"],
        "outcome": flow["outcome"],
        "bytes_up": flow["bytes_up"],
        "bytes_down": flow["bytes_down"],
        "bytes": flow["bytes_up"] + flow["bytes_down"],
        "duration": (end - flow["start"]) if end is not None else math.nan,
        "ttfb": ttfb(flow),
        "error": flow["error"],
        "wall": wall,
    }


async def _get_all(urls: Sequence[str], proxy: str, verify: Any) -> None:
    httpx = _needs("httpx")
    async with httpx.AsyncClient(proxy=proxy, verify=verify, timeout=60) as client:
        for url in urls:
            try:
                response = await client.get(url)
                await response.aread()
            except httpx.HTTPError:
                pass  # the flow record says what went wrong


async def _run(workload: Workload, proxy: str, verify: Any) -> None:
    if callable(workload):
        await workload(proxy)
    elif (
        isinstance(workload, str | os.PathLike)
        or isinstance(workload, Mapping)
        or (
            isinstance(workload, Sequence)
            and not isinstance(workload, str)
            and workload
            and isinstance(workload[0], Mapping)
        )
    ):
        replay = import_module(".replay", __package__).replay
        await replay(workload, proxy=proxy, verify=verify)
    else:
        await _get_all([str(url) for url in workload], proxy, verify)


async def sweep(
    policies: Mapping[Any, Policy] | Iterable[Policy],
    workload: Workload,
    repeats: int = 1,
    *,
    server: ProxyServer | None = None,
    progress: bool = True,
    verify: Any = True,
    **server_options: Any,
) -> Any:
    """Runs `workload` `repeats` times under each policy, on one server, and returns a
    DataFrame with one row a flow (columns in `SWEEP_COLUMNS`): the policy's label, the
    repeat (from 0), the flow's id, kind, method, target, status, outcome, bytes each way
    and in all, `duration` and `ttfb` (seconds, on the proxy's clock) and any error, plus
    `wall`, the seconds the whole repeat took as the workload saw it.

    `policies`: a mapping of labels (shown as text) to policies, or policies labelled by
    their text. A
    policy is rule text, a `Rule` or a `Rules` object. `workload`: a list of URLs (GET with
    httpx through the proxy), recorded flows, a HAR dict or a HAR file's path (replayed with
    `segproxy.replay`), or an async function that takes the proxy URL. `server`: a running server to use (its rules
    are restored afterwards); by default one is started on 127.0.0.1 with
    `record_flows=True` and `server_options`, and closed at the end. `verify` is passed to
    httpx (the CA file of an intercepting proxy). A progress bar (tqdm) shows each run.
    """
    pd = _needs("pandas")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    labelled = (
        [(str(label), _as_rules(p)) for label, p in policies.items()]
        if isinstance(policies, Mapping)
        else [(_label(p), _as_rules(p)) for p in policies]
    )
    if not labelled:
        raise ValueError("sweep needs at least one policy")
    owned = server is None
    if server is None:
        from ._server import start_proxy_server

        server = await start_proxy_server(
            host="127.0.0.1", port=0, **{"record_flows": True, **server_options}
        )
    previous = server.rules
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        tqdm = _needs("tqdm.auto").tqdm
        bar = tqdm(total=len(labelled) * repeats, desc="sweep", unit="run")
    try:
        for label, rules in labelled:
            server.set_rules(rules)
            for repeat in range(repeats):
                if bar is not None:
                    bar.set_postfix_str(f"{label[:40]} #{repeat}")
                server.flows(clear=True)
                started = time.monotonic()
                await _run(workload, server.url, verify)
                wall = time.monotonic() - started
                # The last flow's record is written just after its last byte: let it land.
                flows = await _settled_flows(server)
                rows.extend(_row(label, repeat, f, wall) for f in flows)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if owned:
            await server.aclose()
        else:
            server.set_rules(previous)
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS)).astype(SWEEP_COLUMNS)


async def _settled_flows(server: ProxyServer) -> list[FlowRecord]:
    """The server's flow records once no connection is open (at most 5 s)."""
    deadline = time.monotonic() + 5.0
    # The engine signals nothing when its last connection closes: look, briefly, a few times.
    while server.stats()["connections_open"] > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return server.flows()
