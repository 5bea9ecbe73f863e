"""SOCKS5 (RFC 1928, username/password by RFC 1929): served on the proxy port (told apart by
the first byte) and on ``--socks-port``, with the rules, segmentation, interception and flow
records of a CONNECT; and ``upstream=socks5://...`` as a rule's upstream. Real clients (curl
``--socks5-hostname``, httpx with socksio, a handshake written by hand for exact reply codes),
real origins and a second segproxy as the SOCKS upstream, all on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess

import httpx
import pytest
import segproxy
from segproxy import Rules, start_proxy_server
from support import Segproxy, wait_for
from support.clients import SocksAnswer, curl, socks5_request
from support.loopback import FramedOrigin, blob, framed_exchange, sha
from support.origins import RecordingOrigin, refused_port

pytest.importorskip("socksio")
pytestmark = pytest.mark.timeout(120)

GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08


async def socks(port: int, host: str, dest_port: int, **kw) -> SocksAnswer:
    answer = await asyncio.to_thread(socks5_request, port, host, dest_port, **kw)
    if answer.sock is not None:
        answer.sock.close()
    return answer


async def records(server, n: int) -> list[dict]:
    assert await asyncio.to_thread(wait_for, lambda: len(server.access_records()) >= n, 20)
    return server.access_records()


@pytest.fixture
def origin():
    with RecordingOrigin() as o:
        yield o


# --- the listener ---------------------------------------------------------------------------


async def test_curl_socks5_hostname_on_the_proxy_port(origin):
    server = await start_proxy_server(port=0)
    try:
        r = await curl(
            "--socks5-hostname", f"127.0.0.1:{server.port}", origin.url("/via-socks", "localhost")
        )
        assert r.returncode == 0, r.stderr
        assert [q.target for q in origin.requests] == ["/via-socks"]
        [rec] = await records(server, 1)
        # The proxy got the name (curl resolved nothing) and recorded a SOCKS5 tunnel.
        assert rec["method"] == "SOCKS5" and rec["target"] == f"localhost:{origin.port}", rec
        assert rec["kind"] == "tunnel" and rec["status"] == 200, rec
        # The same port still serves HTTP.
        async with httpx.AsyncClient(proxy=server.url, timeout=20) as client:
            assert (await client.get(origin.url("/plain"))).status_code == 200
    finally:
        await server.aclose()


async def test_httpx_through_the_proxy_port_and_the_socks_port(origin):
    server = await start_proxy_server(port=0, socks_port=0)
    try:
        assert server.socks_port not in (None, 0, server.port)
        for port in (server.port, server.socks_port):
            async with httpx.AsyncClient(proxy=f"socks5://127.0.0.1:{port}", timeout=20) as c:
                r = await c.post(origin.url(f"/p{port}", "localhost"), content=b"x" * 5000)
            assert r.status_code == 200, r.text
        got = [(q.target, q.body_len) for q in origin.requests]
        assert got == [(f"/p{server.port}", 5000), (f"/p{server.socks_port}", 5000)], got
        recs = await records(server, 2)
        assert [r["method"] for r in recs] == ["SOCKS5", "SOCKS5"], recs
    finally:
        await server.aclose()
    assert server.socks_port is not None


SOCKS_LINE = re.compile(r"segproxy: SOCKS5 on 127\.0\.0\.1:(\d+)")


async def test_cli_socks_port(origin):
    with Segproxy(["--socks-port", "0"], with_access_log=True) as sp:
        assert await asyncio.to_thread(wait_for, lambda: SOCKS_LINE.search(sp.output()), 10), (
            sp.output()
        )
        port = int(SOCKS_LINE.search(sp.output()).group(1))
        assert port != sp.port
        r = await curl("--socks5-hostname", f"127.0.0.1:{port}", origin.url("/cli", "localhost"))
        assert r.returncode == 0, r.stderr
        assert await asyncio.to_thread(wait_for, lambda: "SOCKS5" in sp.access_log.read_text())
    assert [q.target for q in origin.requests] == ["/cli"]


async def test_the_socks_port_shares_the_connection_limit_and_shutdown():
    server = await start_proxy_server(port=0, socks_port=0, max_connections=1)
    socks_port = server.socks_port
    assert socks_port is not None
    try:
        with FramedOrigin() as framed:
            held = await asyncio.to_thread(socks5_request, socks_port, "127.0.0.1", framed.port)
            assert held.reply == 0 and held.sock is not None, held
            with held.sock:
                # Over the limit: the SOCKS port closes without a reply, the proxy port says 503.
                over = await asyncio.to_thread(socks5_request, socks_port, "127.0.0.1", framed.port)
                assert over.method is None, over

                def http_503() -> bytes:
                    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
                        s.sendall(b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n\r\n")
                        return s.recv(100)

                assert (await asyncio.to_thread(http_503)).startswith(b"HTTP/1.1 503")
            assert await asyncio.to_thread(
                wait_for, lambda: server.stats()["connections_open"] == 0, 20
            )
            again = await socks(socks_port, "127.0.0.1", framed.port)
            assert again.reply == 0, again
    finally:
        await server.aclose()
    # Shut down with the server: nothing listens on the SOCKS port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", socks_port), timeout=20).close()


async def test_the_socks_port_speaks_only_socks(origin):
    server = await start_proxy_server(port=0, socks_port=0)
    try:
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{server.socks_port}") as c:
            with pytest.raises(httpx.HTTPError):
                await c.get(origin.url("/http-on-socks-port"), timeout=20)
        assert origin.requests == []
        [rec] = await records(server, 1)
        assert "SOCKS5" in rec["error"], rec
    finally:
        await server.aclose()


async def test_username_password_success_and_failure(origin):
    server = await start_proxy_server(port=0, socks_port=0, proxy_auth=["alice:s3cret"])
    try:
        ok = f"socks5h://alice:s3cret@127.0.0.1:{server.socks_port}"
        r = await curl("-x", ok, origin.url("/authed", "localhost"))
        assert r.returncode == 0, r.stderr
        async with httpx.AsyncClient(
            proxy=f"socks5://alice:s3cret@127.0.0.1:{server.port}", timeout=20
        ) as c:
            assert (await c.get(origin.url("/authed-httpx"))).status_code == 200
        bad = f"socks5h://alice:wrong@127.0.0.1:{server.socks_port}"
        r = await curl("-x", bad, origin.url("/wrong", "localhost"))
        assert r.returncode != 0
        # No credentials offered: no acceptable method.
        r = await curl("--socks5-hostname", f"127.0.0.1:{server.port}", origin.url("/none"))
        assert r.returncode != 0
        answer = await socks(server.port, "localhost", origin.port, credentials=("alice", "x"))
        assert (answer.method, answer.auth_status, answer.reply) == (2, 1, None), answer
        answer = await socks(server.port, "localhost", origin.port)
        assert answer.method == 0xFF, answer
        assert [q.target for q in origin.requests] == ["/authed", "/authed-httpx"]
        recs = await records(server, 6)
        refused = [r for r in recs if r["kind"] == "error"]
        assert len(refused) == 4, recs
        assert sum("credentials not accepted" in r["error"] for r in refused) == 2, refused
        assert all("s3cret" not in str(r) and "wrong" not in str(r) for r in recs)
    finally:
        await server.aclose()


async def test_reply_codes_for_unsupported_commands_and_address_types(origin):
    server = await start_proxy_server(port=0, header_timeout=120)
    try:
        bind = await socks(server.port, "localhost", origin.port, command=2)
        assert bind.reply == COMMAND_NOT_SUPPORTED, bind
        udp = await socks(server.port, "localhost", origin.port, command=3)
        assert udp.reply == COMMAND_NOT_SUPPORTED, udp
        odd = await socks(server.port, "127.0.0.1", origin.port, atyp=0x05)
        assert odd.reply == ADDRESS_TYPE_NOT_SUPPORTED, odd
        recs = await records(server, 3)
        assert "BIND" in recs[0]["error"] and "UDP ASSOCIATE" in recs[1]["error"], recs
        assert "address type" in recs[2]["error"], recs
        # Refused destinations: nothing listens there.
        dead = await socks(server.port, "127.0.0.1", refused_port())
        assert dead.reply == 0x05, dead
        assert origin.requests == []
    finally:
        await server.aclose()


# --- rules, destination filter, segmentation ------------------------------------------------


async def test_rules_see_names_and_block_with_not_allowed(origin):
    rules = Rules.parse(
        "blocked.localhost=direct,action=block,reason=no socks here\n"
        "localhost=direct,port=1,action=block,reason=never\n"
    )
    server = await start_proxy_server(port=0, rules=rules)
    try:
        answer = await socks(server.port, "blocked.localhost", origin.port)
        assert answer.reply == NOT_ALLOWED, answer
        r = await curl("--socks5-hostname", f"127.0.0.1:{server.port}", "http://blocked.localhost/")
        assert r.returncode != 0
        ok = await socks(server.port, "localhost", origin.port)
        assert ok.reply == 0, ok
        recs = await records(server, 3)
        blocked = [r for r in recs if r["status"] == 403]
        assert len(blocked) == 2 and all("no socks here" in r["error"] for r in blocked), recs
        assert all(r["host"] == "blocked.localhost" for r in blocked), blocked
    finally:
        await server.aclose()


async def test_deny_private_as_for_connect(origin):
    server = await start_proxy_server(port=0, deny_private=True)
    try:
        for host in ("127.0.0.1", "localhost"):
            answer = await socks(server.port, host, origin.port)
            assert answer.reply == NOT_ALLOWED, (host, answer)
        recs = await records(server, 2)
        assert all(r["status"] == 403 and "denied" in r["error"] for r in recs), recs
    finally:
        await server.aclose()
    assert origin.requests == []


async def test_segmentation_on_a_socks_tunnel_shows_in_flow_records():
    rules = Rules.parse("*=segment_upstream,strategy=fixed,chunk=100,direction=both")
    server = await start_proxy_server(port=0, socks_port=0, rules=rules, record_flows=True)
    up = blob(7, 1000)
    try:
        with FramedOrigin() as framed:

            def run() -> tuple[bytes, bytes]:
                answer = socks5_request(server.socks_port, "127.0.0.1", framed.port)
                assert answer.reply == 0 and answer.sock is not None, answer
                with answer.sock as s:
                    digest, down = framed_exchange(s, up, 700, 3)
                return digest, down

            digest, down = await asyncio.to_thread(run)
        assert digest.hex() == sha(up)
        assert sha(down) == sha(blob(3, 700))
        assert await asyncio.to_thread(wait_for, lambda: len(server.flows()) >= 1, 20)
        [flow] = server.flows()
        assert flow["method"] == "SOCKS5" and flow["kind"] == "tunnel", flow
        ups = [n for d, n, _ in flow["chunks"] if d == "up"]
        downs = [n for d, n, _ in flow["chunks"] if d == "down"]
        assert sum(ups) == 24 + len(up) and sum(downs) == 32 + 700, flow["chunks"]
        assert max(ups) == 100 and max(downs) == 100, flow["chunks"]
        assert "fixed" in flow["policy"], flow
    finally:
        await server.aclose()


# --- interception ---------------------------------------------------------------------------


async def test_tls_after_the_socks_handshake_is_intercepted(ca_dir, nginx_origin, origin):
    store = segproxy.TLSStore.load_ca_from_disk(ca_dir / "ca-key.pem", ca_dir / "ca-cert.pem")
    server = await start_proxy_server(
        port=0, tls_store=store, upstream_ca=[nginx_origin.cert_path], record_flows=True
    )
    try:
        url = f"https://localhost:{nginx_origin.https_port}/1k.bin"
        r = await curl(
            "--socks5-hostname",
            f"127.0.0.1:{server.port}",
            "--cacert",
            str(ca_dir / "ca-cert.pem"),
            url,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == bytes(range(256)) * 4
        # The same server tunnels a client that does not start with TLS (plain HTTP).
        r = await curl(
            "--socks5-hostname", f"127.0.0.1:{server.port}", origin.url("/plain", "localhost")
        )
        assert r.returncode == 0, r.stderr
        assert [q.target for q in origin.requests] == ["/plain"]
        recs = await records(server, 3)
        socks_recs = [r for r in recs if r["method"] == "SOCKS5"]
        assert sorted(r["kind"] for r in socks_recs) == ["intercept", "tunnel"], recs
        inner = [r for r in recs if r["method"] == "GET"]
        assert inner and inner[0]["status"] == 200 and "/1k.bin" in inner[0]["target"], recs
        # Without trusting our CA the client refuses the minted certificate.
        r = await curl("--socks5-hostname", f"127.0.0.1:{server.port}", url)
        assert r.returncode != 0
    finally:
        await server.aclose()


# --- socks5:// upstreams --------------------------------------------------------------------


async def test_chain_through_a_socks_upstream(origin):
    """segproxy A (HTTP proxy) -> segproxy B (SOCKS5 with credentials) -> origin, for plain
    HTTP forwarding and for a CONNECT tunnel."""
    upstream = await start_proxy_server(port=0, socks_port=0, proxy_auth=["bob:pw"])
    rule = f"*=direct,action=upstream,upstream=socks5://bob:pw@127.0.0.1:{upstream.socks_port}"
    front = await start_proxy_server(port=0, rules=Rules.parse(rule))
    try:
        async with httpx.AsyncClient(proxy=front.url, timeout=20) as c:
            r = await c.get(origin.url("/chained", "localhost"))
        assert r.status_code == 200, r.text
        with FramedOrigin() as framed:

            def tunnel() -> bytes:
                from support.loopback import proxy_connect

                s, resp = proxy_connect(("127.0.0.1", front.port), f"localhost:{framed.port}")
                assert resp.status == 200, resp
                with s:
                    digest, _ = framed_exchange(s, b"through two proxies", 10, 1)
                return digest

            digest = await asyncio.to_thread(tunnel)
        assert digest.hex() == sha(b"through two proxies")
        assert [q.target for q in origin.requests] == ["/chained"]
        front_recs = await records(front, 2)
        assert [r["method"] for r in front_recs] == ["GET", "CONNECT"], front_recs
        assert all(
            r["action"] == f"upstream:socks5://127.0.0.1:{upstream.socks_port}" for r in front_recs
        ), front_recs
        # A tunnel's record is written when it closes: the front's pooled connection (the
        # GET's SOCKS tunnel) closes with the front.
        await front.aclose()
        up_recs = await records(upstream, 2)
        # Each record is written when its tunnel closes: in either order.
        assert sorted((r["method"], r["target"]) for r in up_recs) == sorted(
            [("SOCKS5", f"localhost:{origin.port}"), ("SOCKS5", f"localhost:{framed.port}")]
        ), up_recs
        assert "pw" not in str(front_recs)
    finally:
        await front.aclose()
        await upstream.aclose()


async def test_a_dead_socks_upstream_gives_502_naming_the_hop(origin):
    dead = refused_port()
    rule = f"*=direct,action=upstream,upstream=socks5://127.0.0.1:{dead}"
    front = await start_proxy_server(port=0, socks_port=0, rules=Rules.parse(rule))
    try:
        async with httpx.AsyncClient(proxy=front.url, timeout=20) as c:
            r = await c.get(origin.url("/nowhere"))
        assert r.status_code == 502
        assert f"upstream SOCKS5 proxy 127.0.0.1:{dead}" in r.text, r.text
        # A SOCKS client of the front proxy gets a failure reply, not a success.
        answer = await socks(front.socks_port, "localhost", origin.port)
        assert answer.reply == GENERAL_FAILURE, answer
        assert origin.requests == []
    finally:
        await front.aclose()


def test_rule_and_validate_rules_accept_the_scheme(tmp_path):
    rule = segproxy.Rule("*.test", action="upstream", upstream="socks5://u:p@127.0.0.1:1080")
    rules = Rules.from_rules([rule])
    decision = rules.decide("GET", "http", "a.test", 80, "/")
    assert decision.action == "upstream", decision
    assert decision.upstream == "socks5://u:***@127.0.0.1:1080", decision
    path = tmp_path / "rules.txt"
    path.write_text("*.test=direct,action=upstream,upstream=socks5://u:p@[::1]:1080\n")
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "segproxy", "--rules-file", str(path), "--validate-rules"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "upstream=socks5://u:***@[::1]:1080" in out.stdout, out.stdout
    assert ":p@" not in out.stdout
