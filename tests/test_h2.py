"""HTTP/2 on intercepted connections: real HTTP/2 clients (curl --http2, httpx with
http2=True, a raw frame client for the abuse guards) through segproxy to HTTP/1.1 origins on
loopback (nginx, and a small Python origin that echoes what it received)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
pytest.importorskip("h2")
import segproxy
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame
from segproxy import HTTPSForwardProxyHandler
from support import wait_for
from support.clients import run_curl as curl
from support.h2_raw import CANCEL, ENHANCE_YOUR_CALM, REFUSED_STREAM, RawH2
from support.inprocess import ProxyThread
from support.origins import HttpsEchoOrigin

ONE_K = bytes(range(256)) * 4
# The engine's rapid reset guard (h2_server::RAPID_RESET_BUDGET).
RAPID_RESET_BUDGET = 200
STREAM_ID = re.compile(r"^(\d+)\.h2-(\d+)$")


@pytest.fixture(scope="module")
def echo_origin(nginx_origin):
    with HttpsEchoOrigin(nginx_origin.leaf_path, nginx_origin.dir / "origin.key") as o:
        yield o


def intercepting_proxy(tls_store, origin_ca: Path) -> ProxyThread:
    """An in-process proxy intercepting with `tls_store`, trusting `origin_ca`, recording flows."""
    return ProxyThread(tls_store=tls_store, upstream_ca=[origin_ca], record_flows=True)


@pytest.fixture
def proxy(tls_store, nginx_origin):
    with intercepting_proxy(tls_store, nginx_origin.cert_path) as p:
        yield p


def trusting(ca_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_path))


def stream_flows(proxy: ProxyThread) -> list[dict]:
    assert proxy.server is not None
    return [f for f in proxy.server.flows() if STREAM_ID.match(f["id"])]


# --- real clients ----------------------------------------------------------------------------


def test_curl_http2_through_interception(proxy, ca_path, nginx_origin, tmp_path):
    port = nginx_origin.https_port
    paths = ["/1k.bin", "/conn", "/1k.bin"]
    args: list[str] = []
    for i, path in enumerate(paths):
        args += [f"https://localhost:{port}{path}", "-o", str(tmp_path / f"out{i}")]
    r = curl(
        "--http2",
        "-x",
        proxy.url,
        "--cacert",
        str(ca_path),
        "-w",
        "%{http_code} %{http_version} %{num_connects}\n",
        *args,
    )
    assert r.returncode == 0, r.stderr.decode()
    lines = [line.split() for line in r.stdout.decode().splitlines()]
    # HTTP/2 to the client, all three on one connection.
    assert lines == [["200", "2", "1"], ["200", "2", "0"], ["200", "2", "0"]], lines
    assert (tmp_path / "out0").read_bytes() == ONE_K
    assert (tmp_path / "out2").read_bytes() == ONE_K
    # The origin (HTTP/1.1 nginx) answered /conn: its connection serial and request count.
    assert re.fullmatch(rb"\d+ \d+\n", (tmp_path / "out1").read_bytes())


def test_httpx_http2_concurrent_streams_and_their_flows(proxy, ca_path, echo_origin):
    httpx = pytest.importorskip("httpx")
    url = f"https://localhost:{echo_origin.port}"

    async def main():
        async with httpx.AsyncClient(
            proxy=proxy.url, verify=trusting(ca_path), http2=True, timeout=30
        ) as client:
            # The first request opens the connection; the others share it, concurrently
            # (started together, httpx would open a connection for each before ALPN said h2).
            first = await client.get(f"{url}/chunked?n=20&size=3000")
            gets = [client.get(f"{url}/chunked?n=20&size=3000") for _ in range(7)]
            body = bytes(range(256)) * 1000
            post = client.post(f"{url}/sha256", content=body)
            return [first, *await asyncio.gather(*gets, post)], body

    responses, body = asyncio.run(asyncio.wait_for(main(), 60))
    assert {r.http_version for r in responses} == {"HTTP/2"}
    expected = b"".join(bytes([i]) * 3000 for i in range(20))
    for r in responses[:-1]:
        assert r.status_code == 200 and r.content == expected
    assert responses[-1].text == f"{hashlib.sha256(body).hexdigest()} {len(body)}"
    # One record per stream, named CONNECTION.h2-STREAM: one connection, nine streams. A
    # stream's record is written just after its response went out.
    assert wait_for(lambda: len(stream_flows(proxy)) == 9), [f["id"] for f in stream_flows(proxy)]
    flows = stream_flows(proxy)
    names = [STREAM_ID.match(f["id"]) for f in flows]
    assert len(flows) == 9, [f["id"] for f in flows]
    assert len({m.group(1) for m in names if m}) == 1
    assert len({m.group(2) for m in names if m}) == 9
    assert {f["status"] for f in flows} == {200}


class VersionAndHeader(HTTPSForwardProxyHandler):
    versions: list[str] = []

    async def on_request_received(self) -> None:
        VersionAndHeader.versions.append(self.request.version)
        self.request.headers.add("X-Added", "by-hook")
        await self.forward_http_request()


def test_hook_sees_http2_and_changes_a_header(tls_store, nginx_origin, ca_path, echo_origin):
    httpx = pytest.importorskip("httpx")
    VersionAndHeader.versions.clear()
    with ProxyThread(
        handler_builder=VersionAndHeader, tls_store=tls_store, upstream_ca=[nginx_origin.cert_path]
    ) as proxy:

        async def main():
            async with httpx.AsyncClient(
                proxy=proxy.url, verify=trusting(ca_path), http2=True, timeout=30
            ) as client:
                url = f"https://localhost:{echo_origin.port}/headers"
                first = await client.get(url)
                return [first, *await asyncio.gather(*[client.get(url) for _ in range(2)])]

        responses = asyncio.run(asyncio.wait_for(main(), 60))
    for r in responses:
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        lines = r.text.splitlines()
        # The origin speaks HTTP/1.1 and received the hook's header.
        assert lines[0] == "HTTP/1.1"
        assert "x-added: by-hook" in lines
    # Each stream had its own handler, and each saw HTTP/2.
    assert VersionAndHeader.versions == ["HTTP/2"] * 3


def test_a_reset_stream_leaves_the_others_working(proxy, ca_path, echo_origin):
    with RawH2(proxy.port, f"localhost:{echo_origin.port}", ca_path) as h2:
        assert h2.alpn == "h2"
        h2.until_settings()
        # Stream 1: a large answer, reset by the client as soon as it is asked for.
        h2.send(h2.headers(1, "/chunked?n=200&size=16000"), h2.rst(1, CANCEL))
        # Stream 3 and 5 on the same connection still get their whole answers.
        h2.send(h2.headers(3, "/conn"))
        fields, body, reset = h2.response(3)
        assert (fields[":status"], reset) == ("200", None)
        assert re.fullmatch(rb"\d+ \d+\n", body)
        h2.send(h2.headers(5, "/chunked?n=3&size=10"))
        fields, body, reset = h2.response(5)
        assert (fields[":status"], body, reset) == (
            "200",
            b"\0" * 10 + b"\1" * 10 + b"\2" * 10,
            None,
        )


class ErrorsPerStream(HTTPSForwardProxyHandler):
    errors: dict[str, list[str]] = {}

    async def on_request_received(self) -> None:
        self.path = self.request.path
        ErrorsPerStream.errors.setdefault(self.path, [])
        await self.forward_http_request()

    async def on_error(self, error: Exception) -> None:
        ErrorsPerStream.errors[self.path].append(str(error))


def test_a_reset_stream_is_on_error_for_that_stream_only(
    tls_store, nginx_origin, ca_path, echo_origin
):
    ErrorsPerStream.errors.clear()
    big = "/chunked?n=2000&size=16000"
    with ProxyThread(
        handler_builder=ErrorsPerStream,
        tls_store=tls_store,
        upstream_ca=[nginx_origin.cert_path],
    ) as proxy:
        with RawH2(proxy.port, f"localhost:{echo_origin.port}", ca_path) as h2:
            # Stream 1 is answered and then held by flow control; stream 3 completes.
            h2.send(h2.headers(1, big))
            started = next(f for f in h2.frames() if f.stream_id == 1)
            assert isinstance(started, HeadersFrame)
            h2.send(h2.rst(1, CANCEL), h2.headers(3, "/conn"))
            fields, _, reset = h2.response(3)
            assert (fields[":status"], reset) == ("200", None)
            assert wait_for(lambda: ErrorsPerStream.errors.get(big), timeout=20)
    assert len(ErrorsPerStream.errors[big]) == 1, ErrorsPerStream.errors
    assert ErrorsPerStream.errors["/conn"] == []


# --- limits against abuse ----------------------------------------------------------------------


def test_more_streams_than_allowed_are_refused(proxy, ca_path, echo_origin):
    with RawH2(proxy.port, f"localhost:{echo_origin.port}", ca_path) as h2:
        settings = h2.until_settings()
        allowed = settings[SettingsFrame.MAX_CONCURRENT_STREAMS]
        assert allowed == 100
        # Each stream stays open: a POST whose body never ends.
        ids = [1 + 2 * i for i in range(allowed + 1)]
        h2.send(*[h2.headers(i, "/sha256", "POST", end_stream=False) for i in ids])
        refused = None
        for frame in h2.frames(limit=10_000):
            if isinstance(frame, RstStreamFrame):
                refused = (frame.stream_id, frame.error_code)
                break
        assert refused == (ids[-1], REFUSED_STREAM)


def test_rapid_reset_ends_the_connection_with_goaway(proxy, ca_path, echo_origin):
    with RawH2(proxy.port, f"localhost:{echo_origin.port}", ca_path) as h2:
        h2.until_settings()
        burst = []
        for i in range(1000):
            stream = 1 + 2 * i
            burst += [h2.headers(stream, "/conn"), h2.rst(stream, CANCEL)]
        try:
            h2.send(*burst)
        except OSError:
            pass  # the server may close before it has read the whole burst
        goaway = next((f for f in h2.frames() if isinstance(f, GoAwayFrame)), None)
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    # The proxy goes on serving.
    with RawH2(proxy.port, f"localhost:{echo_origin.port}", ca_path) as h2:
        h2.send(h2.headers(1, "/conn"))
        fields, _, reset = h2.response(1)
        assert (fields[":status"], reset) == ("200", None)


def test_streams_reset_after_they_started_end_the_connection(proxy, ca_path, echo_origin):
    # Each stream is accepted and answered before the client resets it: the crate's guard
    # (resets of streams not yet accepted) does not see these; ours (client resets
    # outnumbering finished streams, past a budget) ends the connection.
    big = "/chunked?n=2000&size=16000"
    with RawH2(proxy.port, f"localhost:{echo_origin.port}", ca_path) as h2:
        h2.until_settings()
        goaway = None
        resets = 0
        for i in range(RAPID_RESET_BUDGET + 50):
            stream = 1 + 2 * i
            try:
                h2.send(h2.headers(stream, big))
            except OSError:  # closed as the guard ended it: its GOAWAY is still readable
                goaway = next((f for f in h2.frames() if isinstance(f, GoAwayFrame)), None)
                break
            answer = next(
                (
                    f
                    for f in h2.frames()
                    if isinstance(f, GoAwayFrame)
                    or (isinstance(f, HeadersFrame) and f.stream_id == stream)
                ),
                None,
            )
            if not isinstance(answer, HeadersFrame):
                goaway = answer
                break
            resets += 1
            try:
                h2.send(h2.rst(stream, CANCEL))
            except OSError:
                goaway = next((f for f in h2.frames() if isinstance(f, GoAwayFrame)), None)
                break
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
        # Not before the budget was spent: the first resets are a client's right.
        assert resets > RAPID_RESET_BUDGET, resets


def test_an_oversized_header_list_is_refused(proxy, ca_path, echo_origin):
    with RawH2(proxy.port, f"localhost:{echo_origin.port}", ca_path) as h2:
        settings = h2.until_settings()
        assert settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == 64 * 1024
        block = h2.request_block("/conn", extra=[("x-big", "a" * 70_000)])
        pieces = [block[i : i + 16_000] for i in range(0, len(block), 16_000)]
        frames = [HeadersFrame(1, pieces[0])]
        frames += [
            h2.continuation(1, p, last=i == len(pieces) - 2) for i, p in enumerate(pieces[1:])
        ]
        h2.send(*frames)
        fields, _, reset = h2.response(1)
        # Refused without reaching the origin: a 431 answer or a reset of the stream.
        assert fields.get(":status") == "431" or reset is not None, (fields, reset)
    assert all(
        f["target"] != f"https://localhost:{echo_origin.port}/conn" for f in stream_flows(proxy)
    )


def test_a_continuation_flood_ends_the_connection(proxy, ca_path, echo_origin):
    with RawH2(proxy.port, f"localhost:{echo_origin.port}", ca_path) as h2:
        h2.until_settings()
        # A header block that never ends: a HEADERS frame, then CONTINUATION frames of the
        # same field again and again, far past the header list limit.
        field = h2.encoder.encode([("x-flood", "b" * 1000)])
        flood = [HeadersFrame(1, h2.request_block("/conn"))]
        flood += [h2.continuation(1, field, last=False) for _ in range(2000)]
        ended = False
        try:
            h2.send(*flood)
        except OSError:
            ended = True  # closed while we were still flooding
        frames = list(h2.frames(limit=1000))
        goaway = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
        # GOAWAY ENHANCE_YOUR_CALM (the crate counts CONTINUATION frames), maybe read only
        # after the server closed on the rest of the flood.
        assert goaway == [ENHANCE_YOUR_CALM] or (ended and not goaway), frames
        # Nothing of the flood became a request.
        assert not any(
            f.stream_id == 1 and not isinstance(f, (GoAwayFrame, RstStreamFrame)) for f in frames
        ), frames


# --- HTTP/2 to origins ---------------------------------------------------------------------------


@pytest.fixture
def h2_origin_proxy(tls_store, nghttpd_origin):
    with intercepting_proxy(tls_store, nghttpd_origin.cert_path) as p:
        yield p


def test_http1_client_reaches_an_h2_only_origin(h2_origin_proxy, ca_path, nghttpd_origin, tmp_path):
    # nghttpd speaks only HTTP/2: an answer means the proxy spoke HTTP/2 to it.
    upload = tmp_path / "upload"
    upload.write_bytes(bytes(range(256)) * 400)
    r = curl(
        "--http1.1",
        "-x",
        h2_origin_proxy.url,
        "--cacert",
        str(ca_path),
        "-w",
        "%{http_code} %{http_version}\n",
        nghttpd_origin.url("/1k.bin"),
        "-o",
        str(tmp_path / "got"),
        "--next",
        "-x",
        h2_origin_proxy.url,
        "--cacert",
        str(ca_path),
        "-w",
        "%{http_code} %{http_version}\n",
        "--data-binary",
        f"@{upload}",
        nghttpd_origin.url("/echo"),
        "-o",
        str(tmp_path / "echoed"),
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split("\n")[:2] == ["200 1.1", "200 1.1"], r.stdout
    assert (tmp_path / "got").read_bytes() == ONE_K
    assert (tmp_path / "echoed").read_bytes() == upload.read_bytes()


def test_h2_client_reaches_an_h2_only_origin_on_one_connection(
    h2_origin_proxy, ca_path, nghttpd_origin
):
    httpx = pytest.importorskip("httpx")
    body = bytes(range(256)) * 2000

    async def main():
        async with httpx.AsyncClient(
            proxy=h2_origin_proxy.url, verify=trusting(ca_path), http2=True, timeout=30
        ) as client:
            first = await client.get(nghttpd_origin.url("/1k.bin"))
            gets = [client.get(nghttpd_origin.url("/1k.bin")) for _ in range(6)]
            post = client.post(nghttpd_origin.url("/echo"), content=body)
            return [first, *await asyncio.gather(*gets, post)]

    responses = asyncio.run(asyncio.wait_for(main(), 60))
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.content == ONE_K for r in responses[:-1])
    assert responses[-1].content == body
    assert h2_origin_proxy.server is not None
    server = h2_origin_proxy.server

    def stream_records() -> list[dict]:
        return [r for r in server.access_records() if STREAM_ID.match(r["id"])]

    # A stream's records are written just after its response went out.
    assert wait_for(lambda: len(stream_flows(h2_origin_proxy)) == len(stream_records()) == 8)
    flows = stream_flows(h2_origin_proxy)
    assert len(flows) == 8 and {f["status"] for f in flows} == {200}
    # One TCP connection to the origin (only the exchange that opened it resolved the name):
    # the concurrent streams shared it.
    records = stream_records()
    assert len(records) == 8
    assert len([r for r in records if r["dns"]]) == 1, [r["dns"] for r in records]


def test_origin_trailers_reach_http2_and_http1_clients(
    h2_origin_proxy, ca_path, nghttpd_origin, tmp_path
):
    # nghttpd ends every response with the trailer x-origin-trailer: h2.
    authority = f"localhost:{nghttpd_origin.port}"
    with RawH2(h2_origin_proxy.port, authority, ca_path) as h2:
        h2.send(h2.headers(1, "/1k.bin"))
        fields, body, reset = h2.response(1)
    assert (fields[":status"], body, reset) == ("200", ONE_K, None)
    assert fields.get("x-origin-trailer") == "h2", fields
    # An HTTP/1.1 client gets them in the chunked framing (curl lists them with the headers).
    r = curl(
        "--http1.1",
        "-x",
        h2_origin_proxy.url,
        "--cacert",
        str(ca_path),
        "-D",
        str(tmp_path / "headers"),
        nghttpd_origin.url("/1k.bin"),
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == ONE_K
    assert "x-origin-trailer: h2" in (tmp_path / "headers").read_text().lower()


def test_h2c_rule_sends_plain_http_as_cleartext_http2():
    # nghttpd --no-tls speaks only HTTP/2 with prior knowledge: HTTP/1.1 gets no answer.
    from support import NghttpdOrigin

    with NghttpdOrigin(tls=False) as origin:
        url = origin.url("/1k.bin", host="127.0.0.1")
        rules = segproxy.Rules()
        rules.add(segproxy.Rule("127.0.0.1", port=origin.port, h2c=True))
        with ProxyThread(rules=rules) as proxy:
            r = curl("-x", proxy.url, "-w", "\n%{http_code}", url)
            assert r.returncode == 0, r.stderr.decode()
            assert r.stdout == ONE_K + b"\n200"
            # Several at once share the origin's HTTP/2 connection.
            args = []
            for _ in range(4):
                args += [url, "-o", "/dev/null"]
            r = curl("-x", proxy.url, "-Z", "-w", "%{http_code}\n", *args)
            assert r.stdout.decode().split() == ["200"] * 4, r
        with ProxyThread() as proxy:
            r = curl("-x", proxy.url, "-w", "\n%{http_code}", url)
            # Without the rule: HTTP/1.1 to an h2c-only origin fails.
            assert not r.stdout.endswith(b"\n200"), r


def test_segmentation_applies_below_http2_on_both_sides(tls_store, ca_path, nghttpd_origin):
    # HTTP/2 with the client and with the origin; the rule segments the TLS bytes both ways.
    rules = "localhost=segment_upstream,strategy=fixed,chunk=100,direction=both"
    with ProxyThread(
        tls_store=tls_store,
        upstream_ca=[nghttpd_origin.cert_path],
        record_flows=True,
        rules=rules,
    ) as proxy:
        with RawH2(proxy.port, f"localhost:{nghttpd_origin.port}", ca_path) as h2:
            # A POST of 1 KiB, echoed back: 1 KiB each way.
            h2.send(
                h2.headers(1, "/echo", "POST", end_stream=False),
                DataFrame(1, ONE_K, flags=["END_STREAM"]),
            )
            fields, body, reset = h2.response(1)
        assert (fields[":status"], body, reset) == ("200", ONE_K, None)
        assert proxy.server is not None
        assert wait_for(lambda: any(f["method"] == "CONNECT" for f in proxy.server.flows()))
        flows = proxy.server.flows()
    connect = [f for f in flows if f["method"] == "CONNECT"]
    down = [size for f in connect for d, size, _ in f["chunks"] if d == "down"]
    up = [size for f in flows for d, size, _ in f["chunks"] if d == "up"]
    # Toward the client (the CONNECT's TLS bytes) and toward the origin (the origin
    # connection's TLS bytes, recorded on the stream that opened it), in chunks of 100.
    assert sum(down) > len(ONE_K) and max(down) == 100, down
    assert sum(up) > len(ONE_K) and max(up) == 100, up
    assert [f["id"] for f in flows if STREAM_ID.match(f["id"])], flows


def test_an_origin_goaway_retires_its_connection(tls_store, ca_path, nginx_origin):
    from support.origins import H2GoawayOrigin

    with H2GoawayOrigin(nginx_origin.leaf_path, nginx_origin.dir / "origin.key") as origin:
        with ProxyThread(tls_store=tls_store, upstream_ca=[nginx_origin.cert_path]) as proxy:
            url = f"https://localhost:{origin.port}/"
            bodies = []
            for _ in range(3):
                r = curl("-x", proxy.url, "--cacert", str(ca_path), url)
                assert r.returncode == 0, r.stderr.decode()
                bodies.append(r.stdout)
    # Each request found the previous connection retired by its GOAWAY and opened another.
    assert bodies == [b"1\n", b"2\n", b"3\n"]
    assert origin.goaways == 3
