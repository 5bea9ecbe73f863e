"""The policy changed while the server runs: `set_rules` and `set_domain_filter` swap what
decides new flows, on new connections and on kept-alive ones; a flow already decided keeps
its policy; nothing is dropped. The command line re-reads --rules-file on SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest
from segproxy import Rules, start_proxy_server
from support import Segproxy, wait_for
from support.loopback import (
    TIMEOUT,
    HttpOrigin,
    SinkOrigin,
    blob,
    proxy_connect,
    proxy_request,
    read_response,
    recv_exact,
    sha,
)

pytestmark = pytest.mark.timeout(120)


def get_on(sock: socket.socket, url: str) -> tuple[int, bytes]:
    """One keep-alive GET on an open proxy connection."""
    host = url.split("/")[2]
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    r = read_response(sock)
    return r.status, r.body


def full_chunks(flow: dict) -> list[int]:
    """Sizes of the flow's "up" chunks that are not marked short."""
    short = {index for index, _why in flow["short_chunks"]}
    return [size for i, (d, size, _t) in enumerate(flow["chunks"]) if d == "up" and i not in short]


def block_rule(port: int) -> str:
    return f"127.0.0.1=direct,action=block,reason=closed for now,port={port}"


async def test_set_rules_decides_the_next_request_on_a_kept_alive_connection() -> None:
    with HttpOrigin() as origin:
        server = await start_proxy_server(host="127.0.0.1", port=0)
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            with sock:
                status, body = await asyncio.to_thread(get_on, sock, origin.url("/a"))
                assert (status, body) == (200, b"origin ok /a\n")
                server.set_rules(block_rule(origin.port))
                assert "closed for now" in server.rules.describe()
                # Same connection, next request: the new rules decide it.
                status, body = await asyncio.to_thread(get_on, sock, origin.url("/b"))
                assert status == 403 and b"closed for now" in body
                server.set_rules(Rules())
                status, body = await asyncio.to_thread(get_on, sock, origin.url("/c"))
                assert (status, body) == (200, b"origin ok /c\n")
            # The origin saw /a and /c only; the records name the rule that decided each.
            paths = [line.split()[1] for line, _ in origin.requests]
            assert paths == ["/a", "/c"]
            # A record is written just after its response is sent: wait for the last one.
            assert wait_for(lambda: len(server.access_records()) == 3, timeout=10)
            records = server.access_records()
            assert [r["status"] for r in records] == [200, 403, 200]
            assert records[1]["action"] == "block" and records[2]["rule"] == "default"
        finally:
            await server.aclose()


async def test_a_tunnel_segmenting_keeps_its_policy_when_the_rules_change() -> None:
    size = 20_000
    data = blob(7, size)
    with SinkOrigin(size) as sink:
        rules = Rules.parse("127.0.0.1=segment_upstream,strategy=fixed,chunk=100,direction=up")
        server = await start_proxy_server(host="127.0.0.1", port=0, rules=rules, record_flows=True)
        try:

            def run() -> bytes:
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{sink.port}")
                assert r.status == 200, r
                with s:
                    s.sendall(data[: size // 2])
                    # Swapped in the middle of the tunnel: to chunks of 1000.
                    server.set_rules(
                        "127.0.0.1=segment_upstream,strategy=fixed,chunk=1000,direction=up"
                    )
                    s.sendall(data[size // 2 :])
                    return recv_exact(s, 32)

            digest = await asyncio.to_thread(run)
            assert digest.hex() == sha(data), "content unchanged"
            await asyncio.sleep(0)
            assert wait_for(lambda: server.flows(), timeout=TIMEOUT)
            (flow,) = server.flows()
            assert sum(size for d, size, _ in flow["chunks"] if d == "up") == size
            # Chunks the engine marks short (the source idle mid-chunk, the stream's end) aside,
            # every chunk has the size the tunnel started with.
            assert set(full_chunks(flow)) == {100}, "the tunnel kept the policy it started with"

            # A tunnel opened after the swap gets the new policy.
            def second() -> None:
                s, r = proxy_connect(("127.0.0.1", server.port), f"127.0.0.1:{sink.port}")
                assert r.status == 200
                with s:
                    s.sendall(data)
                    recv_exact(s, 32)

            server.flows(clear=True)
            await asyncio.to_thread(second)
            assert wait_for(lambda: server.flows(), timeout=TIMEOUT)
            (flow,) = server.flows()
            assert set(full_chunks(flow)) == {1000}
        finally:
            await server.aclose()


async def test_bad_rules_change_nothing() -> None:
    server = await start_proxy_server(host="127.0.0.1", port=0)
    try:
        before = server.rules
        with pytest.raises(ValueError, match="intercept=yes"):
            server.set_rules("*.test=direct,intercept=yes")  # no CA on this server
        with pytest.raises(TypeError):
            server.set_rules(42)  # type: ignore[arg-type]
        assert server.rules is before
    finally:
        await server.aclose()


async def test_set_domain_filter_applies_to_new_requests() -> None:
    with HttpOrigin() as origin:
        server = await start_proxy_server(host="127.0.0.1", port=0)
        try:
            addr = ("127.0.0.1", server.port)
            r = await asyncio.to_thread(proxy_request, addr, "GET", origin.url("/ok"))
            assert r.status == 200
            server.set_domain_filter(deny_domains=["127.0.0.1"])
            r = await asyncio.to_thread(proxy_request, addr, "GET", origin.url("/no"))
            assert r.status == 403 and b"denied" in r.body
            server.set_domain_filter()
            r = await asyncio.to_thread(proxy_request, addr, "GET", origin.url("/again"))
            assert r.status == 200
            assert [line.split()[1] for line, _ in origin.requests] == ["/ok", "/again"]
        finally:
            await server.aclose()


def test_cli_sighup_rereads_the_rules_file(tmp_path) -> None:
    rules_file = tmp_path / "rules.txt"
    rules_file.write_text("# nothing blocked yet\n")
    with HttpOrigin() as origin, Segproxy(["--rules-file", str(rules_file)]) as proxy:
        addr = ("127.0.0.1", proxy.port)
        assert proxy_request(addr, "GET", origin.url("/before")).status == 200

        rules_file.write_text(block_rule(origin.port) + "\n")
        proxy.process.proc.send_signal(signal.SIGHUP)
        assert wait_for(
            lambda: "rules reloaded" in proxy.process.log_tail(10000), timeout=TIMEOUT
        ), proxy.process.log_tail(10000)
        r = proxy_request(addr, "GET", origin.url("/after"))
        assert r.status == 403 and b"closed for now" in r.body

        # A file that does not parse is reported; the rules in force stay.
        rules_file.write_text("127.0.0.1=direct,strategy=zigzag\n")
        proxy.process.proc.send_signal(signal.SIGHUP)
        assert wait_for(
            lambda: "rules not reloaded" in proxy.process.log_tail(10000), timeout=TIMEOUT
        ), proxy.process.log_tail(10000)
        r = proxy_request(addr, "GET", origin.url("/still"))
        assert r.status == 403
        assert [line.split()[1] for line, _ in origin.requests] == ["/before"]
