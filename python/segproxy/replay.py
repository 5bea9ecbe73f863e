"""Sending recorded requests again, through a proxy or directly: one workload, many policies.

``await segproxy.replay(har_or_flows, proxy=server, concurrency=8)`` re-sends every request
of a HAR (a dict, or the path of a file) or of a list of flow records (``server.flows()``,
or ``flows_file`` lines read with ``json.loads``): the same method, URL, headers (hop-by-hop
fields, ``Host`` and ``Content-Length`` left out: the client sets them again) and body, at
most `concurrency` at a time, with httpx. Flow records that captured no request (see
``capture=``) are re-sent with their method and URL only; CONNECT flows are skipped. A body
that was captured cut short (``body_truncated``) is sent as captured.

What comes back:

- when `proxy` is a `ProxyServer` (or the URL of one of this process's servers) that keeps
  flow records, the flows it recorded for the replayed requests, one per request in the
  order given (found by method and URL among the flows that are new since the replay
  began; a request the proxy recorded no flow for is left out, with a warning);
- otherwise (no proxy, another proxy, a server without flow records), one `ReplayResult`
  per request, in the order given.

Responses are not followed (a redirect is a response like any other). HTTPS through an
intercepting proxy needs httpx to trust the proxy's CA: pass ``verify=`` a path to its
certificate or an ``ssl.SSLContext``. Needs httpx (``pip install segproxy[notebook]``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import sys
import time
import types
import warnings
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ._server import FlowRecord, ProxyServer

__all__ = ["ReplayResult", "replay"]

#: Header fields that belong to one connection, or that the client sets itself.
NOT_REPLAYED = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
#: Fields httpx adds on its own; left out unless the recorded request had them.
CLIENT_DEFAULTS = ("user-agent", "accept", "accept-encoding")


class ReplayResult(TypedDict):
    """One replayed request as the client saw it (when no flow records are at hand)."""

    method: str
    url: str
    status: int | None
    """The response's status; None when none came (see `error`)."""
    bytes: int
    """Response body bytes received (as sent, before any content decoding)."""
    duration: float
    """Seconds from sending the request to the end of its response."""
    error: str | None


@dataclass(frozen=True)
class _Request:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


async def replay(
    har_or_flows: Mapping[str, Any] | str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    proxy: ProxyServer | str | None = None,
    concurrency: int = 8,
    *,
    verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
    request_timeout: float = 30.0,
    record_timeout: float = 10.0,
) -> list[FlowRecord] | list[ReplayResult]:
    """Re-sends the requests of `har_or_flows` through `proxy` (a `ProxyServer`, a proxy
    URL, or None: directly), `concurrency` at a time; returns the proxy's new flow records
    or a `ReplayResult` per request (see the module's documentation). `request_timeout`
    bounds each request (seconds); `record_timeout` the wait for the proxy's records."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    try:
        import httpx
    except ImportError:
        raise ImportError("replay() needs httpx: pip install segproxy[notebook]") from None
    requests = _requests(har_or_flows)
    server = _server_of(proxy)
    recording = server is not None and server._engine.recording_flows()
    before = {f["id"] for f in server.flows()} if server is not None and recording else set()
    proxy_url = proxy if isinstance(proxy, str) or proxy is None else proxy.url
    if isinstance(verify, str | os.PathLike):
        verify = ssl.create_default_context(cafile=os.fspath(verify))
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        proxy=proxy_url,
        verify=verify,
        timeout=request_timeout,
        follow_redirects=False,
        trust_env=False,
    ) as client:

        async def send(r: _Request) -> ReplayResult:
            async with limit:
                return await _send(client, r)

        results = list(await asyncio.gather(*(send(r) for r in requests)))
    if server is None or not recording:
        return results
    return await _recorded(server, before, requests, results, record_timeout)


async def _send(client: Any, r: _Request) -> ReplayResult:
    import httpx

    # The recorded fields replace the client's own; repeated fields keep their order.
    request = client.build_request(r.method, r.url, headers=r.headers, content=r.body or None)
    recorded = {name.lower() for name, _ in r.headers}
    for name in CLIENT_DEFAULTS:
        if name not in recorded and name in request.headers:
            del request.headers[name]
    began = time.perf_counter()
    try:
        response = await client.send(request)
        await response.aread()
    except httpx.HTTPError as exc:
        return ReplayResult(
            method=r.method,
            url=r.url,
            status=None,
            bytes=0,
            duration=time.perf_counter() - began,
            error=f"{type(exc).__name__}: {exc}",
        )
    return ReplayResult(
        method=r.method,
        url=r.url,
        status=response.status_code,
        bytes=response.num_bytes_downloaded,
        duration=time.perf_counter() - began,
        error=None,
    )


def _server_of(proxy: ProxyServer | str | None) -> ProxyServer | None:
    """The segproxy server `proxy` names: itself, or the running server with that URL."""
    from ._server import ProxyServer, servers

    if isinstance(proxy, ProxyServer):
        return proxy
    if isinstance(proxy, str):
        wanted = proxy.rstrip("/")
        return next((s for s in servers() if s.url == wanted), None)
    return None


async def _recorded(
    server: ProxyServer,
    before: set[str],
    requests: list[_Request],
    results: list[ReplayResult],
    record_timeout: float,
) -> list[FlowRecord]:
    """The flows `server` recorded for `requests`, in their order. A flow is recorded as its
    exchange ends, which may be just after the client read the response: wait for those of
    the requests that got one (bounded by `record_timeout`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + record_timeout
    answered = [res["status"] is not None for res in results]
    while True:
        new = [f for f in server.flows() if f["id"] not in before and f["method"] != "CONNECT"]
        found = _match(requests, new)
        if all(f is not None or not a for f, a in zip(found, answered, strict=True)):
            break
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.01)
    missing = [r.url for r, f in zip(requests, found, strict=True) if f is None]
    if missing:
        warnings.warn(
            f"replay: the proxy recorded no flow for {len(missing)} of {len(requests)} "
            f"requests (first: {missing[0]}); they are left out",
            RuntimeWarning,
            stacklevel=3,
        )
    return [f for f in found if f is not None]


def _key(method: str, url: str) -> tuple[str, str, str, int | None, str]:
    """A request's identity for matching: method, scheme, host, port (default filled in),
    path and query."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (method.upper(), scheme, (parts.hostname or "").lower(), port, target)


def _match(requests: list[_Request], flows: list[FlowRecord]) -> list[FlowRecord | None]:
    """For each request in order, the earliest new flow of the same method and URL not
    already taken."""
    pending = sorted(flows, key=lambda f: f["start"])
    taken: set[str] = set()
    found: list[FlowRecord | None] = []
    for r in requests:
        key = _key(r.method, r.url)
        match = next(
            (f for f in pending if f["id"] not in taken and _key(f["method"], f["target"]) == key),
            None,
        )
        if match is not None:
            taken.add(match["id"])
        found.append(match)
    return found


def _requests(
    source: Mapping[str, Any] | str | os.PathLike[str] | Iterable[Mapping[str, Any]],
) -> list[_Request]:
    """The requests of a HAR (dict or path) or of flow records."""
    if isinstance(source, str | os.PathLike):
        with open(source, encoding="utf-8") as f:
            loaded: Any = json.load(f)
        return _requests(loaded)
    if isinstance(source, Mapping):
        if "log" not in source:
            raise ValueError("not a HAR: no 'log' (give a HAR dict, its path, or flow records)")
        return [_from_har(e["request"]) for e in source["log"].get("entries", [])]
    requests = []
    for flow in source:
        if "log" in flow:
            raise ValueError("give a HAR itself, not a list of HARs")
        if "request" in flow and "method" not in flow:  # a HAR entry
            requests.append(_from_har(flow["request"]))
        elif flow.get("method") not in (None, "", "-", "CONNECT") and str(
            flow.get("target", "")
        ).startswith(("http://", "https://")):
            requests.append(_from_flow(flow))
    return requests


def _kept(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v) for n, v in pairs if n.lower() not in NOT_REPLAYED]


def _from_har(request: Mapping[str, Any]) -> _Request:
    body = b""
    post = request.get("postData")
    if post and post.get("text"):
        text = post["text"]
        body = base64.b64decode(text) if post.get("encoding") == "base64" else text.encode()
    headers = _kept((h["name"], h["value"]) for h in request.get("headers", []))
    return _Request(request["method"], request["url"], headers, body)


def _from_flow(flow: Mapping[str, Any]) -> _Request:
    captured = flow.get("request")
    if not captured:
        return _Request(flow["method"], flow["target"], [], b"")
    from .har import _body_bytes

    return _Request(
        captured["method"],
        captured["url"],
        _kept((str(n), str(v)) for n, v in captured["headers"]),
        _body_bytes(captured["body"]),
    )


class _CallableModule(types.ModuleType):
    """This module, callable as `replay`: importing ``segproxy.replay`` (the module) makes
    it the package's ``replay`` attribute, and ``segproxy.replay(...)`` must still work."""

    def __call__(
        self, *args: Any, **kwargs: Any
    ) -> Coroutine[Any, Any, list[FlowRecord] | list[ReplayResult]]:
        return replay(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
