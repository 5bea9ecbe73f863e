"""Capture and HAR: `capture=` / `capture_bodies=N` keep heads, bodies (cut at N) and phase
times in flow records, for plain and intercepted HTTP; `server.export_har()`,
`segproxy.har.dump()` and the CLI's `--har FILE` write HAR 1.2 that haralyzer loads and
that has every field HAR 1.2 requires (what Chromium's HAR import reads), with what the
client and the origin actually saw."""

from __future__ import annotations

import base64
import json
import ssl
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import segproxy
from segproxy import har
from support import Segproxy, wait_for
from support.origins import RecordingOrigin, TlsRecordingOrigin

pytestmark = pytest.mark.timeout(120)

haralyzer = pytest.importorskip("haralyzer")

PHASES = ("connect_start", "dns_end", "connect_end", "send_start", "sent", "first_byte", "done")
TIMINGS = ("blocked", "dns", "connect", "ssl", "send", "wait", "receive")


def body_of(n: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(n))


async def recorded(server: segproxy.ProxyServer, count: int) -> list[segproxy.FlowRecord]:
    """The server's flows once `count` are recorded: a flow is recorded as its exchange
    ends, which can be just after the client read the response."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(flows := server.flows()) < count and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return flows


def check_phase_order(flow: segproxy.FlowRecord, new_connection: bool, tls: bool) -> None:
    times = flow["timings"]
    assert times is not None
    order = [flow["start"]]
    for phase in PHASES:
        t = times[phase]
        if phase in ("connect_start", "dns_end", "connect_end") and not new_connection:
            assert t is None, (phase, times)
            continue
        assert t is not None, (phase, times)
        order.append(t)
    assert order == sorted(order), times
    assert (times["tls_end"] is not None) == (tls and new_connection), times
    assert flow["end"] is not None and times["done"] <= flow["end"]


# --- HAR 1.2's required fields: what Chromium's importer and other readers rely on -------

NUMBER = (int, float)


def check_har_1_2(doc: dict[str, Any]) -> None:
    """Every field HAR 1.2 requires, with its type (Chromium's DevTools HAR import cannot be
    driven headless, so the file is held to the specification it implements)."""
    log = doc["log"]
    assert log["version"] == "1.2"
    assert isinstance(log["creator"]["name"], str) and isinstance(log["creator"]["version"], str)
    assert isinstance(log["entries"], list)
    for e in log["entries"]:
        assert isinstance(e["startedDateTime"], str) and e["startedDateTime"].endswith("Z")
        from datetime import datetime

        datetime.fromisoformat(e["startedDateTime"].replace("Z", "+00:00"))
        assert isinstance(e["time"], NUMBER) and e["time"] >= 0
        req, resp = e["request"], e["response"]
        for key, kind in (
            ("method", str),
            ("url", str),
            ("httpVersion", str),
            ("cookies", list),
            ("headers", list),
            ("queryString", list),
            ("headersSize", int),
            ("bodySize", int),
        ):
            assert isinstance(req[key], kind), (key, req)
        for key, kind in (
            ("status", int),
            ("statusText", str),
            ("httpVersion", str),
            ("cookies", list),
            ("headers", list),
            ("content", dict),
            ("redirectURL", str),
            ("headersSize", int),
            ("bodySize", int),
        ):
            assert isinstance(resp[key], kind), (key, resp)
        for h in req["headers"] + resp["headers"] + req["queryString"]:
            assert isinstance(h["name"], str) and isinstance(h["value"], str)
        for c in req["cookies"] + resp["cookies"]:
            assert isinstance(c["name"], str) and isinstance(c["value"], str)
        if "postData" in req:
            assert isinstance(req["postData"]["mimeType"], str)
            assert isinstance(req["postData"]["text"], str)
        content = resp["content"]
        assert isinstance(content["size"], int) and isinstance(content["mimeType"], str)
        if "text" in content:
            assert isinstance(content["text"], str)
        assert e["cache"] == {}
        timings = e["timings"]
        for key in TIMINGS:
            assert isinstance(timings[key], NUMBER), (key, timings)
            assert timings[key] >= 0 or timings[key] == -1, (key, timings)
        for key in ("send", "wait", "receive"):
            assert timings[key] >= 0, timings
        total = sum(timings[k] for k in TIMINGS if k != "ssl" and timings[k] > 0)
        assert abs(total - e["time"]) < 0.01, (total, e["time"])
        if timings["ssl"] != -1:
            assert timings["connect"] >= timings["ssl"], timings
        if "serverIPAddress" in e:
            assert isinstance(e["serverIPAddress"], str)
        assert isinstance(e["connection"], str) and e["connection"].isdigit()


def load_with_haralyzer(path: Path) -> list[Any]:
    """The file through haralyzer: every entry's request, response and timings read."""
    from haralyzer import HarEntry, HarParser

    parser = HarParser.from_file(path)
    assert parser.version == "1.2" and parser.creator["name"] == "segproxy"
    entries = [HarEntry(raw) for raw in parser.har_data["entries"]]
    for e in entries:
        _ = (e.request.method, e.request.url, e.request.headers, e.request.bodySize)
        _ = (e.request.queryString, e.request.cookies, e.request.httpVersion)
        _ = (e.response.status, e.response.statusText, e.response.headers)
        _ = (e.response.mimeType, e.response.bodySize, e.response.redirectURL)
        _ = (e.timings, e.time, e.startTime, e.cache, e.port)
    assert parser.pages is not None
    return entries


# --- plain HTTP ---------------------------------------------------------------------------


async def test_capture_bodies_keeps_heads_and_cuts_bodies_at_n(origin: RecordingOrigin) -> None:
    server = await segproxy.start_proxy_server(port=0, capture_bodies=100)
    try:
        sent = body_of(300)
        async with httpx.AsyncClient(proxy=server.url, trust_env=False) as client:
            echo = await client.post(
                origin.url("/echo?a=1&b=two"),
                content=sent,
                headers={"X-Test": "yes", "Content-Type": "application/x-test"},
            )
            small = await client.get(origin.url("/gen/50"))
        assert echo.content == sent and small.status_code == 200
        flows = await recorded(server, 2)
    finally:
        await server.aclose()
    # The relay streamed everything: the origin got the whole body.
    (got,) = origin.requests_for("/echo")
    assert got.body == sent and got.header("X-Test") == "yes"

    post, get = flows
    request = post["request"]
    assert request is not None
    assert request["method"] == "POST" and request["url"] == origin.url("/echo?a=1&b=two")
    assert ("X-Test", "yes") in request["headers"]
    assert dict(request["headers"])["Host"] == origin.authority
    assert request["body"] == sent[:100]
    assert request["body_size"] == 300 and request["body_truncated"]
    response = post["response"]
    assert response is not None
    assert response["status"] == 200 and response["reason"] == "OK"
    assert ("Server", "recording-origin") in response["headers"]
    assert response["body"] == sent[:100] and response["body_size"] == 300
    assert response["body_truncated"]
    assert post["server_address"] == origin.authority
    check_phase_order(post, new_connection=True, tls=False)

    # Under the limit: whole, not truncated; on the pooled connection, no connect phases.
    assert get["response"] is not None
    assert get["response"]["body"] == small.content and len(small.content) == 50
    assert not get["response"]["body_truncated"]
    assert get["request"] is not None and get["request"]["body"] == b""
    check_phase_order(get, new_connection=False, tls=False)
    assert get["server_address"] == origin.authority


async def test_without_capture_records_carry_none(origin: RecordingOrigin) -> None:
    server = await segproxy.start_proxy_server(port=0, record_flows=True)
    try:
        async with httpx.AsyncClient(proxy=server.url, trust_env=False) as client:
            assert (await client.get(origin.url("/gen/10"))).status_code == 200
        (flow,) = await recorded(server, 1)
    finally:
        await server.aclose()
    assert flow["request"] is None and flow["response"] is None and flow["timings"] is None
    assert flow["server_address"] is None and flow["started"] > 0


async def test_rule_capture_turns_it_on_and_off_per_rule(origin: RecordingOrigin) -> None:
    rules = "127.0.0.1=direct,path_prefix=/echo,capture=yes"
    server = await segproxy.start_proxy_server(port=0, record_flows=True, rules=rules)
    try:
        big = body_of(70_000)
        async with httpx.AsyncClient(proxy=server.url, trust_env=False) as client:
            assert (await client.post(origin.url("/echo"), content=big)).content == big
            assert (await client.get(origin.url("/gen/10"))).status_code == 200
        echo, gen = await recorded(server, 2)
    finally:
        await server.aclose()
    assert echo["request"] is not None and echo["response"] is not None
    # No server limit: the default, 64 KiB.
    assert echo["request"]["body"] == big[: 64 * 1024] and echo["request"]["body_truncated"]
    assert echo["response"]["body_size"] == 70_000
    assert gen["request"] is None and gen["timings"] is None

    # capture=no leaves a rule's flows out of capture_bodies' capture of everything.
    rules = segproxy.Rules.from_rules(
        [segproxy.Rule("127.0.0.1", path_prefix="/gen", capture=False)]
    )
    server = await segproxy.start_proxy_server(port=0, capture_bodies=10, rules=rules)
    try:
        async with httpx.AsyncClient(proxy=server.url, trust_env=False) as client:
            assert (await client.get(origin.url("/gen/10"))).status_code == 200
            assert (await client.get(origin.url("/status/404"))).status_code == 404
        gen, missing = await recorded(server, 2)
    finally:
        await server.aclose()
    assert gen["request"] is None
    assert missing["response"] is not None and missing["response"]["status"] == 404
    assert missing["response"]["body"] == b"status 404"


def test_capture_is_a_rule_key() -> None:
    rules = segproxy.Rules.parse("a.test=direct,capture=true\nb.test=direct,capture=0")
    assert rules.decide("GET", "http", "a.test", 80).capture is True
    assert rules.decide("GET", "http", "b.test", 80).capture is False
    assert rules.decide("GET", "http", "c.test", 80).capture is None
    assert " capture=yes " in rules.describe() and " capture=no " in rules.describe()
    assert segproxy.Rule("a.test", capture=True).text() == "a.test=direct,capture=yes"
    with pytest.raises(ValueError, match="invalid capture 'maybe'"):
        segproxy.Rules.parse("a.test=direct,capture=maybe")


# --- intercepted HTTPS, and the HAR of both ------------------------------------------------


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory):
    with TlsRecordingOrigin(tmp_path_factory.mktemp("origin")) as o:
        yield o


def trusting(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


async def test_intercepted_capture_and_har(
    tmp_path: Path, ca_dir: Path, tls_origin: TlsRecordingOrigin, origin: RecordingOrigin
) -> None:
    store = segproxy.TLSStore.load_ca_from_disk(ca_dir / "ca-key.pem", ca_dir / "ca-cert.pem")
    server = await segproxy.start_proxy_server(
        port=0,
        tls_store=store,
        upstream_ca=[tls_origin.ca_path],
        rules="127.0.0.1=direct,intercept=yes",
        capture_bodies=1000,
    )
    posted = body_of(5000)
    try:
        async with httpx.AsyncClient(
            proxy=server.url, verify=trusting(ca_dir / "ca-cert.pem"), trust_env=False
        ) as client:
            r = await client.get(
                tls_origin.url("/gen/2000"), headers={"Cookie": "session=abc; theme=dark"}
            )
            assert r.status_code == 200 and len(r.content) == 2000
            echo = await client.post(
                tls_origin.url("/echo"), content=posted, headers={"Content-Type": "text/plain"}
            )
            assert echo.content == posted
        async with httpx.AsyncClient(proxy=server.url, trust_env=False) as client:
            assert (await client.get(origin.url("/status/204"))).status_code == 204
        flows = await recorded(server, 4)
        path = tmp_path / "flows.har"
        entries_written = server.export_har(path)
    finally:
        await server.aclose()

    by_target = {f["target"]: f for f in flows if f["method"] != "CONNECT"}
    get = by_target[tls_origin.url("/gen/2000")]
    assert get["kind"] == "intercept" and get["request"] is not None
    assert get["request"]["url"].startswith("https://")
    assert get["response"] is not None and get["response"]["body_size"] == 2000
    assert get["response"]["body"] == r.content[:1000] and get["response"]["body_truncated"]
    check_phase_order(get, new_connection=True, tls=True)
    post = by_target[tls_origin.url("/echo")]
    assert post["request"] is not None and post["request"]["body"] == posted[:1000]
    (got,) = tls_origin.requests_for("/echo")
    assert got.body == posted

    # The HAR: the three requests (not the CONNECT), as the client and the origin saw them.
    assert entries_written == 3
    doc = json.loads(path.read_text())
    check_har_1_2(doc)
    entries = load_with_haralyzer(path)
    assert [(e.request.method, e.request.url) for e in entries] == [
        ("GET", tls_origin.url("/gen/2000")),
        ("POST", tls_origin.url("/echo")),
        ("GET", origin.url("/status/204")),
    ]
    har_get, har_post, har_204 = doc["log"]["entries"]
    assert har_get["request"]["cookies"] == [
        {"name": "session", "value": "abc"},
        {"name": "theme", "value": "dark"},
    ]
    assert har_get["response"]["content"]["encoding"] == "base64"
    assert base64.b64decode(har_get["response"]["content"]["text"]) == r.content[:1000]
    assert har_get["response"]["content"]["size"] == 2000
    assert har_get["timings"]["ssl"] >= 0 and har_get["timings"]["dns"] >= 0
    assert har_get["serverIPAddress"] == "127.0.0.1"
    # Not UTF-8: base64, as HAR allows.
    assert har_post["request"]["postData"] == {
        "mimeType": "text/plain",
        "text": base64.b64encode(posted[:1000]).decode(),
        "encoding": "base64",
        "_bodyTruncated": True,
    }
    assert har_post["request"]["bodySize"] == 5000
    assert har_204["response"]["status"] == 204 and har_204["timings"]["ssl"] == -1
    assert har_204["response"]["content"] == {
        "size": 0,
        "mimeType": "x-unknown",
        "text": "",
    }
    # Timings are the flow's: their sum is within the flow's duration.
    for e, f in ((har_get, get), (har_post, post)):
        assert f["end"] is not None
        assert e["time"] <= (f["end"] - f["start"]) * 1000 + 0.01


def test_har_of_flows_file_lines_and_of_uncaptured_flows() -> None:
    """`dump` takes flows file lines too (bodies as base64 text), and flows without a
    capture (their duration as `wait`)."""
    line = {
        "id": "3.1",
        "kind": "forward",
        "method": "POST",
        "target": "http://a.test/x?q=1",
        "rule": "default",
        "policy": "none",
        "status": 201,
        "outcome": "ok",
        "error": None,
        "bytes_up": 3,
        "bytes_down": 0,
        "start": 1.0,
        "end": 1.5,
        "started": 1_700_000_000.25,
        "request": {
            "method": "POST",
            "url": "http://a.test/x?q=1",
            "http_version": "HTTP/1.1",
            "headers": [["Content-Type", "application/octet-stream"]],
            "body": base64.b64encode(b"\xff\x00\x01").decode(),
            "body_size": 3,
            "body_truncated": False,
        },
        "response": None,
        "timings": {
            "connect_start": None,
            "dns_end": None,
            "connect_end": None,
            "tls_end": None,
            "send_start": 1.1,
            "sent": 1.2,
            "first_byte": 1.4,
            "done": 1.45,
        },
        "server_address": None,
    }
    bare = dict(line, id="3.2", request=None, timings=None, status=0, error="cut")
    connect = dict(line, id="2.1", method="CONNECT", target="a.test:443")
    doc = har.build([line, bare, connect])
    check_har_1_2(doc)
    one, two = doc["log"]["entries"]
    assert one["request"]["postData"] == {
        "mimeType": "application/octet-stream",
        "text": base64.b64encode(b"\xff\x00\x01").decode(),
        "encoding": "base64",
    }
    assert one["request"]["queryString"] == [{"name": "q", "value": "1"}]
    assert one["timings"] == {
        "blocked": 100.0,
        "dns": -1,
        "connect": -1,
        "ssl": -1,
        "send": 100.0,
        "wait": 200.0,
        "receive": 50.0,
    }
    assert one["time"] == 450.0 and one["startedDateTime"] == "2023-11-14T22:13:20.250000Z"
    assert two["timings"]["wait"] == 500.0 and two["time"] == 500.0
    assert two["_error"] == "cut" and two["response"]["status"] == 0


async def test_export_har_needs_flow_records() -> None:
    server = await segproxy.start_proxy_server(port=0)
    try:
        with pytest.raises(ValueError, match="capture_bodies"):
            server.export_har("/nonexistent/never-written.har")
    finally:
        await server.aclose()


# --- the command line --------------------------------------------------------------------

HANDLER = textwrap.dedent(
    """
    import segproxy


    class Mark(segproxy.HTTPSForwardProxyHandler):
        async def on_request_received(self) -> None:
            self.request.headers.set("X-Hooked", "1")
            await self.forward_http_request()
    """
)


@pytest.mark.parametrize("hooks", [False, True], ids=["no-hooks", "hooks"])
def test_cli_writes_har_at_exit(tmp_path: Path, origin: RecordingOrigin, hooks: bool) -> None:
    path = tmp_path / "run.har"
    args = ["--har", str(path), "--capture-bodies", "20"]
    if hooks:
        script = tmp_path / "hooks.py"
        script.write_text(HANDLER)
        args += ["-s", str(script)]
    body = body_of(50)
    with Segproxy(args) as proxy:
        with httpx.Client(proxy=proxy.proxy_url, trust_env=False) as client:
            assert client.post(origin.url("/echo"), content=body).content == body
            assert client.get(origin.url("/gen/5")).status_code == 200
        # Both flows are recorded before the proxy is told to stop.
        assert wait_for(lambda: len(origin.requests) == 2)
        assert proxy.process is not None
        proxy.process.stop()  # SIGTERM, as a user's Ctrl-C; the logs stay until the exit
        out = proxy.output()
    assert "2 HAR entries written" in out, out
    doc = json.loads(path.read_text())
    check_har_1_2(doc)
    load_with_haralyzer(path)
    post, get = doc["log"]["entries"]
    assert post["request"]["method"] == "POST" and post["request"]["bodySize"] == 50
    assert post["response"]["content"]["size"] == 50
    assert post["response"]["content"]["_bodyTruncated"] is True
    names = {h["name"] for h in post["request"]["headers"]}
    assert ("X-Hooked" in names) == hooks
    assert get["response"]["status"] == 200 and get["response"]["bodySize"] == 5
    assert origin.requests[0].body == body


def test_cli_har_path_checked_at_start(tmp_path: Path) -> None:
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "segproxy", "--listen-port", "0", "--har", str(tmp_path / "no/x")],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 1 and "--har" in r.stderr, r.stderr


def test_validate_rules_checks_capture() -> None:
    import subprocess

    def validate(rule: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "segproxy", "--segment-rule", rule, "--validate-rules"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    good = validate("a.test=direct,capture=on")
    assert good.returncode == 0 and " capture=yes " in good.stdout, good.stdout + good.stderr
    bad = validate("a.test=direct,capture=maybe")
    assert bad.returncode != 0 and "invalid capture 'maybe'" in bad.stderr, bad.stderr


async def test_flows_file_lines_carry_captures_as_base64(
    tmp_path: Path, origin: RecordingOrigin
) -> None:
    import gzip

    lines_path = tmp_path / "flows.jsonl"
    server = await segproxy.start_proxy_server(port=0, capture_bodies=4096, flows_file=lines_path)
    text = "grüße " * 100
    try:
        # The flows file only: capture_bodies keeps no flows in memory then.
        assert server.flows() == []
        with pytest.raises(ValueError, match="in memory"):
            server.export_har(tmp_path / "never.har")
        async with httpx.AsyncClient(proxy=server.url, trust_env=False) as client:
            zipped = gzip.compress(text.encode())
            r = await client.post(
                origin.url("/echo"),
                content=zipped,
                headers={"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": "gzip"},
            )
            assert r.content == zipped
    finally:
        await server.aclose()
    (line,) = [json.loads(x) for x in lines_path.read_text().splitlines()]
    assert base64.b64decode(line["request"]["body"]) == zipped
    assert base64.b64decode(line["response"]["body"]) == zipped
    # The echo answers with the request's Content-Type but no Content-Encoding: the body is
    # kept as is (base64, not UTF-8). With the coding named, HAR gets the body inflated.
    line["response"]["headers"].append(["Content-Encoding", "gzip"])
    doc = har.build([line])
    check_har_1_2(doc)
    content = doc["log"]["entries"][0]["response"]["content"]
    assert content["text"] == text and "encoding" not in content
    assert content["size"] == len(text.encode())
    assert content["compression"] == len(text.encode()) - len(zipped)
