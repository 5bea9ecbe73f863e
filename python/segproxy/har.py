"""Flow records as HAR 1.2: one entry a request, with its heads, bodies and timings.

`build` makes the HAR as a dict and `dump` writes it as JSON. Both take any list of flow
records: ``server.flows()``, or the lines of a ``flows_file`` read with ``json.loads``
(captured bodies are bytes in the first, base64 text in the second).

What an entry holds depends on whether its flow was captured (``capture=yes`` on its rule,
or the server's ``capture_bodies`` option):

- captured: the request head as it went to the origin, the response head as the client got
  it, both bodies up to the capture's limit (``_bodyTruncated`` says when cut), the address
  connected to, and the timings from the engine's own clock;
- not captured: method, URL and status from the record, no headers, and the whole duration
  as ``wait``.

Timings, in milliseconds, come from the phase times of the capture (see
`segproxy.PhaseTimes`): ``blocked`` from the flow's start (request hooks and the decision)
to a new connection (or to sending on a pooled one), ``dns``, ``connect`` (TCP, plus TLS to
the origin, which ``ssl`` repeats as HAR asks), ``send``, ``wait`` (to the response's first
byte) and ``receive`` (to its last byte sent to the client). -1 marks a phase that did not
happen (``dns`` and ``connect`` on a pooled connection, ``ssl`` for plain HTTP). ``time`` is
the sum of the others but ``ssl``.

CONNECT flows (tunnels, and the CONNECT that opened an interception) are not requests of
their own and are left out; the requests inside an interception are entries. Custom fields
(allowed by HAR, named with ``_``) keep the record's id, rule, policy and outcome.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ._engine import __version__

__all__ = ["build", "dump", "entry"]


def build(flows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The HAR 1.2 document of `flows` (requests only: CONNECTs are left out), entries in
    the order of the flows' start."""
    entries = [entry(f) for f in flows if _is_request(f)]
    entries.sort(key=lambda e: e["_start"] or 0.0)
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "segproxy", "version": __version__},
            "entries": entries,
        }
    }


def dump(flows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Writes the HAR of `flows` to `path` (UTF-8 JSON); returns how many entries it has."""
    har = build(flows)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(har, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return len(har["log"]["entries"])


def _is_request(flow: Mapping[str, Any]) -> bool:
    method = flow.get("method", "")
    target = flow.get("target", "")
    return (
        method not in ("", "-", "CONNECT")
        and isinstance(target, str)
        and target.startswith(("http://", "https://"))
    )


def entry(flow: Mapping[str, Any]) -> dict[str, Any]:
    """One flow record as a HAR entry."""
    request = flow.get("request")
    response = flow.get("response")
    timings, total = _timings(flow)
    started = datetime.fromtimestamp(float(flow.get("started") or 0.0), tz=UTC)
    out: dict[str, Any] = {
        "startedDateTime": started.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "time": total,
        "request": _request(flow, request),
        "response": _response(flow, response),
        "cache": {},
        "timings": timings,
        "connection": str(flow.get("id", "")).split(".", 1)[0],
        "_id": flow.get("id"),
        "_start": flow.get("start"),
        "_kind": flow.get("kind"),
        "_rule": flow.get("rule"),
        "_policy": flow.get("policy"),
        "_outcome": flow.get("outcome"),
    }
    server = flow.get("server_address")
    if server:
        out["serverIPAddress"] = _host_of(server)
    if flow.get("error"):
        out["_error"] = flow["error"]
    return out


def _host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def _ms(later: float | None, earlier: float | None) -> float:
    """Milliseconds between two phase times, -1 if either is unknown (never negative)."""
    if later is None or earlier is None:
        return -1
    return round(max(later - earlier, 0.0) * 1000.0, 3)


def _timings(flow: Mapping[str, Any]) -> tuple[dict[str, float], float]:
    """HAR timings and their total from a flow's phase times (or its duration alone)."""
    start = flow.get("start")
    end = flow.get("end")
    marks = flow.get("timings")
    if not marks or start is None:
        wait = max(_ms(end, start), 0)
        bare: dict[str, float] = {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1}
        bare.update(send=0, wait=wait, receive=0)
        return bare, wait
    connect_start = marks.get("connect_start")
    dns_end = marks.get("dns_end")
    connect_end = marks.get("connect_end")
    tls_end = marks.get("tls_end")
    send_start = marks.get("send_start")
    sent = marks.get("sent")
    first_byte = marks.get("first_byte")
    done = marks.get("done") or (end if first_byte is not None else None)
    began = connect_start if connect_start is not None else send_start
    connected = tls_end if tls_end is not None else connect_end
    timings: dict[str, float] = {
        "blocked": _ms(began, start),
        "dns": _ms(dns_end, connect_start),
        "connect": _ms(connected, dns_end if dns_end is not None else connect_start),
        "ssl": _ms(tls_end, connect_end),
        # A request that did not get through has no send, wait or receive: 0, not -1.
        "send": max(_ms(sent, connected if connected is not None else send_start), 0),
        "wait": max(_ms(first_byte, sent), 0),
        "receive": max(_ms(done, first_byte), 0),
    }
    total = sum(v for k, v in timings.items() if k != "ssl" and v > 0)
    return timings, round(total, 3)


def _headers(pairs: Iterable[Any] | None) -> list[dict[str, str]]:
    return [{"name": str(n), "value": str(v)} for n, v in (pairs or [])]


def _header(pairs: Iterable[Any] | None, name: str) -> str | None:
    for n, v in pairs or []:
        if str(n).lower() == name:
            return str(v)
    return None


def _body_bytes(body: Any) -> bytes:
    """A captured body: bytes from `flows()`, base64 text from a flows file."""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return body.encode()
    return b""


def _as_text(data: bytes) -> dict[str, str]:
    """HAR's text: the body as is when it is UTF-8, else base64 with ``encoding``."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"text": base64.b64encode(data).decode("ascii"), "encoding": "base64"}


def _cookies(header: str | None) -> list[dict[str, str]]:
    """The ``name=value`` pairs of a Cookie header."""
    cookies = []
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            cookies.append({"name": name, "value": value})
    return cookies


def _set_cookies(pairs: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Each Set-Cookie header's name and value (attributes left out but HttpOnly/Secure)."""
    cookies = []
    for n, v in pairs or []:
        if str(n).lower() != "set-cookie":
            continue
        first, *attributes = str(v).split(";")
        name, sep, value = first.strip().partition("=")
        if not sep or not name:
            continue
        cookie: dict[str, Any] = {"name": name, "value": value}
        flags = {a.strip().lower() for a in attributes}
        if "httponly" in flags:
            cookie["httpOnly"] = True
        if "secure" in flags:
            cookie["secure"] = True
        cookies.append(cookie)
    return cookies


def _request(flow: Mapping[str, Any], captured: Mapping[str, Any] | None) -> dict[str, Any]:
    url = str(captured["url"] if captured else flow["target"])
    headers = captured["headers"] if captured else []
    query = [{"name": n, "value": v} for n, v in parse_qsl(urlsplit(url).query, True)]
    out: dict[str, Any] = {
        "method": captured["method"] if captured else flow["method"],
        "url": url,
        "httpVersion": captured["http_version"] if captured else "HTTP/1.1",
        "cookies": _cookies(_header(headers, "cookie")),
        "headers": _headers(headers),
        "queryString": query,
        "headersSize": -1,
        "bodySize": int(captured["body_size"] if captured else flow.get("bytes_up", 0)),
    }
    if captured and captured["body_size"]:
        post: dict[str, Any] = {"mimeType": _header(headers, "content-type") or ""}
        post.update(_as_text(_body_bytes(captured["body"])))
        if captured["body_truncated"]:
            post["_bodyTruncated"] = True
        out["postData"] = post
    return out


def _decoded(data: bytes, coding: str | None) -> bytes | None:
    """A whole body decoded from gzip or deflate (None when it cannot be)."""
    coding = (coding or "").strip().lower()
    try:
        if coding in ("gzip", "x-gzip"):
            return zlib.decompress(data, 16 + zlib.MAX_WBITS)
        if coding == "deflate":
            try:
                return zlib.decompress(data)
            except zlib.error:
                return zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error:
        return None
    return None


def _response(flow: Mapping[str, Any], captured: Mapping[str, Any] | None) -> dict[str, Any]:
    if not captured:
        return {
            "status": int(flow.get("status", 0)),
            "statusText": "",
            "httpVersion": "HTTP/1.1" if flow.get("status") else "",
            "cookies": [],
            "headers": [],
            "content": {"size": int(flow.get("bytes_down", 0)), "mimeType": "x-unknown"},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": int(flow.get("bytes_down", 0)) if flow.get("status") else -1,
        }
    headers = captured["headers"]
    data = _body_bytes(captured["body"])
    size = int(captured["body_size"])
    content: dict[str, Any] = {
        "size": size,
        "mimeType": _header(headers, "content-type") or "x-unknown",
    }
    # HAR's content is the body decoded: a whole gzip or deflate body is inflated.
    decoded = (
        None if captured["body_truncated"] else _decoded(data, _header(headers, "content-encoding"))
    )
    if decoded is not None:
        content["size"] = len(decoded)
        content["compression"] = len(decoded) - size
        data = decoded
    if data or size == 0:
        content.update(_as_text(data))
    if captured["body_truncated"]:
        content["_bodyTruncated"] = True
    return {
        "status": int(captured["status"]),
        "statusText": captured["reason"],
        "httpVersion": captured["http_version"],
        "cookies": _set_cookies(headers),
        "headers": _headers(headers),
        "content": content,
        "redirectURL": _header(headers, "location") or "",
        "headersSize": -1,
        "bodySize": size,
    }
