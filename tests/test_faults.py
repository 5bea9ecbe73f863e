"""Faults on purpose (`fault=reset@N`, `close@N`, `stall@N:MS`, `fault_rate=`, `seed=`) and
the delay line (`latency=`, `jitter=`): on tunnels, plain HTTP (both directions) and
intercepted TLS, with what the client and the origin saw.

Tolerances a loaded 2-core machine holds: a pause or latency is never shorter than asked
(at least 95 % of it); a delay line is told from a pause between chunks by a bound ten
times looser than the difference between the two (see each test)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

import pytest
from segproxy import Rule, Rules, start_proxy_server
from support import wait_for
from support.inprocess import ProxyThread
from support.loopback import (
    HttpOrigin,
    SourceOrigin,
    ThreadedServer,
    blob,
    proxy_connect,
    read_head,
    recv_exact,
    sha,
)
from support.tls_clients import connect_tunnel, trusting_context

pytestmark = pytest.mark.timeout(120)


def recv_until_end(sock: socket.socket, limit: int) -> tuple[bytes, BaseException | None]:
    """Every byte until EOF or an error (returned, not raised), at most ``limit``."""
    data = bytearray()
    while len(data) < limit:
        try:
            piece = sock.recv(65536)
        except OSError as e:
            return bytes(data), e
        if not piece:
            return bytes(data), None
        data += piece
    return bytes(data), None


async def tunnel_through(rule: str, size: int, seed: int = 5) -> tuple[bytes, object, dict]:
    """A tunnel to an origin that sends ``blob(seed, size)`` at once, under ``rule`` (its
    port filled in); returns what the client got, how it ended, and the flow record."""
    with SourceOrigin(size, seed=seed) as origin:
        rules = Rules.parse(f"127.0.0.1=direct,{rule},port={origin.port}")
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
        try:

            def run() -> tuple[bytes, BaseException | None]:
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{origin.port}")
                assert r.status == 200
                with s:
                    data, ended = recv_until_end(s, size - len(r.body))
                    return r.body + data, ended

            data, ended = await asyncio.to_thread(run)
        finally:
            await server.aclose()
    (flow,) = server.flows()
    return data, ended, flow


async def test_a_tunnel_reset_after_n_bytes() -> None:
    data, ended, flow = await tunnel_through("direction=down,fault=reset@5000", 100_000)
    assert data == blob(5, 100_000)[:5000], "exactly the first 5000 bytes, unchanged"
    assert isinstance(ended, ConnectionResetError), f"a TCP reset, not {ended!r}"
    assert flow["outcome"] == "fault" and "reset@5000" in flow["error"], flow
    assert [(d, f) for d, f, _ in flow["faults"]] == [("down", "reset@5000")]
    assert "fault=reset@5000" in flow["policy"]


async def test_a_tunnel_closed_cleanly_after_n_bytes() -> None:
    data, ended, flow = await tunnel_through("direction=down,fault=close@7000", 50_000)
    assert data == blob(5, 50_000)[:7000]
    assert ended is None, f"a clean end of stream, not {ended!r}"
    assert flow["outcome"] == "fault" and [f for _, f, _ in flow["faults"]] == ["close@7000"]


async def test_a_tunnel_stalls_then_carries_on() -> None:
    size, pause_ms = 60_000, 300
    with SourceOrigin(size, seed=2) as origin:
        rules = Rules.parse(
            f"127.0.0.1=direct,direction=down,fault=stall@4000:{pause_ms},port={origin.port}"
        )
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
        try:

            def run() -> bytes:
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{origin.port}")
                with s:
                    return r.body + recv_exact(s, size - len(r.body))

            data = await asyncio.to_thread(run)
        finally:
            await server.aclose()
    assert data == blob(2, size), "content unchanged by a stall"
    (flow,) = server.flows()
    assert flow["outcome"] == "ok"
    ((_, what, struck),) = flow["faults"]
    assert what == f"stall@4000:{pause_ms}"
    # The chunk after the stall started no earlier than the pause after it struck.
    after = [t for d, _, t in flow["chunks"] if d == "down" and t >= struck]
    assert after and min(after) - struck >= 0.95 * pause_ms / 1000, (struck, after[:3])


def test_a_plain_response_reset_after_n_bytes() -> None:
    """`direction=down`: the client sees a reset after N bytes of the response (head and
    body as sent), and the next client is served as usual."""
    with (
        HttpOrigin() as origin,
        ProxyThread(
            rules=Rules.parse("127.0.0.1=direct,direction=down,fault=reset@1000"),
            record_flows=True,
        ) as proxy,
    ):
        url = origin.url("/blob?n=50000&seed=3")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data, ended = recv_until_end(s, 100_000)
        assert len(data) == 1000 and data.startswith(b"HTTP/1.1 200"), data[:100]
        assert blob(3, 50_000).startswith(data.split(b"\r\n\r\n", 1)[1])
        assert isinstance(ended, ConnectionResetError), repr(ended)
        server = proxy.server
        # The record is written once the proxy has closed its side, just after the reset.
        assert wait_for(lambda: len(server.flows()) == 1, timeout=20), server.flows()
        (flow,) = server.flows()
        assert flow["outcome"] == "fault", flow
        assert flow["faults"][0][:2] == ("down", "reset@1000")


class UploadOrigin(ThreadedServer):
    """Reads one request's bytes until EOF or an error; records both (``received``,
    ``ended``) and sets ``done``."""

    def __init__(self) -> None:
        self.received = b""
        self.ended: BaseException | None = None
        self.done = threading.Event()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.received, self.ended = recv_until_end(conn, 10_000_000)
        self.done.set()


def test_an_upload_reset_toward_the_origin() -> None:
    """`direction=up`: the origin sees a reset after N bytes of the request; the client
    gets an error answer or a closed connection, never a hang."""
    body = blob(8, 200_000)
    with (
        UploadOrigin() as origin,
        ProxyThread(
            rules=Rules.from_rules([Rule("127.0.0.1", direction="up", fault="reset@30000")]),
            record_flows=True,
        ) as proxy,
    ):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
            s.sendall(
                f"POST http://127.0.0.1:{origin.port}/up HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            try:
                s.sendall(body)
            except OSError:
                pass  # the proxy may stop reading once the fault struck
            answer, _ = recv_until_end(s, 100_000)
        assert origin.done.wait(20)
        assert len(origin.received) == 30000, len(origin.received)
        head, sent = origin.received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"POST /up HTTP/1.1") and body.startswith(sent)
        assert isinstance(origin.ended, ConnectionResetError), repr(origin.ended)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 502"), answer[:200]
        server = proxy.server
        assert wait_for(lambda: len(server.flows()) == 1, timeout=20), server.flows()
        (flow,) = server.flows()
        assert flow["outcome"] == "fault" and flow["faults"][0][:2] == ("up", "reset@30000")


async def test_draws_follow_the_flows_of_one_rule_set() -> None:
    """Flow k of a rule set gets draw k: two servers with the same seeded rules cut the
    same flows of a sequence; a different seed cuts a different set."""

    async def cuts(seed: int) -> list[bool]:
        with SourceOrigin(3000, seed=1) as origin:
            rules = Rules.parse(
                f"127.0.0.1=direct,direction=down,fault=close@100,fault_rate=0.5,"
                f"seed={seed},port={origin.port}"
            )
            server = await start_proxy_server(
                host="127.0.0.1", port=0, rules=rules, record_flows=True
            )
            try:

                def run() -> list[int]:
                    got = []
                    for _ in range(16):
                        s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{origin.port}")
                        with s:
                            data, _ = recv_until_end(s, 3000 - len(r.body))
                        got.append(len(r.body) + len(data))
                    return got

                sizes = await asyncio.to_thread(run)
            finally:
                await server.aclose()
        assert set(sizes) <= {100, 3000}, sizes
        return [n == 100 for n in sizes]

    a, b, c = await cuts(7), await cuts(7), await cuts(8)
    assert a == b, "same seed, same flows cut"
    assert 0 < sum(a) < 16, a
    assert a != c, "another seed draws other flows"


async def test_latency_is_a_delay_line_that_keeps_throughput() -> None:
    """`latency=100` down: the first byte comes at least 95 ms after the origin sent it,
    and 2 MB arrive whole in well under what a 100 ms pause per read would take (160
    reads of 16 KiB or fewer: at least 16 s; the bound here is 6 s)."""
    size = 2_000_000
    with SourceOrigin(size, seed=4) as origin:
        rules = Rules.parse(f"127.0.0.1=direct,direction=down,latency=100,port={origin.port}")
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
        try:

            def run() -> tuple[bytes, float, float]:
                t0 = time.monotonic()
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{origin.port}")
                with s:
                    first = r.body or s.recv(65536)
                    t_first = time.monotonic() - t0
                    rest = recv_exact(s, size - len(first))
                    return first + rest, t_first, time.monotonic() - t0

            data, t_first, total = await asyncio.to_thread(run)
        finally:
            await server.aclose()
    assert sha(data) == sha(blob(4, size)), "content unchanged"
    assert t_first >= 0.095, t_first
    assert total < 6.0, f"{total:.2f} s: the latency was paid per read, not once"
    (flow,) = server.flows()
    assert "latency=100ms" in flow["policy"] and flow["outcome"] == "ok"


def test_latency_both_ways_on_plain_http() -> None:
    """`direction=both,latency=150`: the request waits 150 ms on its way up and the
    response 150 ms on its way down, so the exchange takes at least 285 ms; bodies whole."""
    body = blob(6, 300_000)
    with (
        HttpOrigin() as origin,
        ProxyThread(
            rules=Rules.from_rules([Rule("127.0.0.1", direction="both", latency=150)]),
        ) as proxy,
    ):
        url = origin.url("/upload?n=100000&seed=6")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
            t0 = time.monotonic()
            s.sendall(
                f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head, rest = read_head(s)
            n = 100_000
            got = rest + recv_exact(s, n - len(rest))
            elapsed = time.monotonic() - t0
        assert head.startswith(b"HTTP/1.1 200")
        assert f"X-Body-Sha256: {sha(body)}".encode() in head, "the upload arrived whole"
        assert got == blob(6, n)
        assert elapsed >= 0.285, elapsed


async def test_jitter_keeps_every_byte_in_order() -> None:
    """`latency=20,jitter=15` with random chunks: writes leave at different delays but
    never overtake each other; the content is identical."""
    data, ended, flow = await tunnel_through(
        "direction=down,latency=20,jitter=15,seed=3,strategy=random,min=100,max=3000",
        300_000,
        seed=9,
    )
    assert ended is None or isinstance(ended, OSError)
    assert sha(data) == sha(blob(9, 300_000))
    assert "jitter=15ms" in flow["policy"]


@pytest.mark.parametrize(
    "policy",
    [
        "strategy=fixed,chunk=700,delay=1,latency=5",
        "strategy=random,min=1,max=5000,latency=3,jitter=3,seed=1",
        "rate=2M,latency=10",
        "fault=stall@0:50,strategy=fixed,chunk=4096",
        "fault=stall@99999:20,latency=1,jitter=1",
        "ttfb=30,latency=5,fault=stall@10:10",
    ],
)
async def test_content_is_identical_when_no_fault_cuts_it(policy: str) -> None:
    """The property: whatever combination of segmentation and shaping, if nothing cuts the
    stream, the client gets exactly the origin's bytes."""
    size = 200_000
    data, _, flow = await tunnel_through(f"direction=down,{policy}", size, seed=11)
    assert sha(data) == sha(blob(11, size)), policy
    assert flow["outcome"] == "ok", flow


def test_intercepted_tls_reset_and_latency(tls_store, ca_path, nginx_origin) -> None:
    """On an intercepted CONNECT the policy acts on the TLS bytes toward the client: a
    reset after N bytes cuts the TLS session mid-response; latency delays the answer."""
    ctx = trusting_context(ca_path)
    target = f"localhost:{nginx_origin.https_port}"
    rules = Rules.parse("localhost=direct,direction=down,fault=reset@20000")
    with ProxyThread(
        tls_store=tls_store, upstream_ca=[nginx_origin.cert_path], rules=rules, record_flows=True
    ) as proxy:
        sock = connect_tunnel(proxy.port, target)
        with pytest.raises((ConnectionResetError, ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(b"GET /large.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
                got = 0
                while got < 10_000_000:
                    piece = tls.recv(65536)
                    if not piece:
                        raise ConnectionError(f"clean end after {got} bytes")
                    got += len(piece)
        server = proxy.server

        def connects() -> list[dict]:
            return [f for f in server.flows() if f["method"] == "CONNECT"]

        # The CONNECT's record is written once the proxy has closed its side.
        assert wait_for(connects, timeout=20), "no CONNECT record"
        assert connects()[-1]["outcome"] == "fault", connects()[-1]
        assert connects()[-1]["faults"][0][:2] == ("down", "reset@20000")

    with ProxyThread(
        tls_store=tls_store,
        upstream_ca=[nginx_origin.cert_path],
        rules=Rules.parse("localhost=direct,direction=down,latency=120"),
    ) as proxy:
        sock = connect_tunnel(proxy.port, target)
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            t0 = time.monotonic()
            tls.sendall(b"GET /1k.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
            f = tls.makefile("rb")
            status = f.readline()
            elapsed = time.monotonic() - t0
        assert status.startswith(b"HTTP/1.1 200")
        assert elapsed >= 0.114, elapsed


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a.test=direct,fault=boom@5", "unknown fault 'boom'"),
        ("a.test=direct,fault=reset", "invalid fault 'reset'"),
        ("a.test=direct,fault=stall@5", "stall needs a pause"),
        ("a.test=direct,fault_rate=0.5", "fault_rate needs a fault="),
        ("a.test=direct,fault=close@1,fault_rate=2", "fault_rate must be between 0 and 1"),
        ("a.test=direct,latency=-3", "latency must be 0..3600000 ms"),
        ("a.test=direct,jitter=soon", "invalid jitter 'soon'"),
        ("a.test=direct,seed=-1", "invalid seed '-1'"),
    ],
)
def test_bad_shaping_keys_name_the_line(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"r\.txt:2: ") as e:
        Rules.parse("ok.test=direct\n" + line, source="r.txt")
    assert message in str(e.value)


def test_rule_objects_carry_the_shaping_keys() -> None:
    rule = Rule("a.test", latency=50, jitter=5, fault="reset@100", fault_rate=0.25, seed=9)
    assert rule.text() == (
        "a.test=direct,latency=50,jitter=5,fault=reset@100,fault_rate=0.25,seed=9"
    )
    rules = Rules.from_rules([rule])
    decision = rules.decide("GET", "http", "a.test", 80)
    for words in ("latency=50ms", "jitter=5ms", "fault=reset@100", "fault_rate=0.25", "seed=9"):
        assert words in decision.policy, decision.policy
