"""Bad input gets a clear answer at once, and nothing else breaks: bytes that are not HTTP on
the proxy port (a TLS ClientHello, SOCKS greetings, binary), status lines with their standard
reason phrases, a handler_builder that returns no handler, an on_connect "intercept" without a
CA, a replaced body counted in the access record, CLI failures as one line.

Real sockets on loopback; real clients (Python ssl, raw sockets, httpx, the CLI).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys

import pytest
import segproxy
from segproxy import HTTPSForwardProxyHandler, HTTPSProxyHandler, start_proxy_server
from support import wait_for
from support.origins import RecordingOrigin

pytestmark = pytest.mark.timeout(60)


def recv_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return out


async def exchange(port: int, data: bytes) -> bytes:
    """Sends `data` to the proxy port and reads until the proxy closes."""

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(data)
            return recv_all(s)

    return await asyncio.to_thread(run)


@pytest.fixture
async def server():
    # A long header timeout: answers that come at once cannot be the timeout's.
    server = await start_proxy_server(port=0, header_timeout=120)
    yield server
    await server.aclose()


async def test_tls_client_hello_is_recognised_at_once(server):
    """A client set to use an HTTPS proxy starts with a TLS ClientHello: the proxy closes at
    once (the client cannot read plain text) and records why."""

    def handshake() -> str:
        ctx = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="proxy.test"):
                    return "handshake completed"
            except (ssl.SSLError, OSError) as exc:
                return type(exc).__name__

    outcome = await asyncio.wait_for(asyncio.to_thread(handshake), 30)
    assert outcome != "handshake completed"
    assert await asyncio.to_thread(wait_for, lambda: len(server.access_records()) == 1)
    [rec] = server.access_records()
    assert "HTTPS proxy" in rec["error"] and f"http://127.0.0.1:{server.port}" in rec["error"], rec
    assert rec["kind"] == "error"


@pytest.mark.parametrize(
    "greeting, reply, name",
    [
        # SOCKS5 is served on this port; a greeting offering only GSSAPI (0x01) is refused.
        (b"\x05\x01\x01", b"\x05\xff", "SOCKS5"),
        (
            b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00",
            b"\x00\x5b\x00\x00\x00\x00\x00\x00",
            "SOCKS4",
        ),
    ],
)
async def test_socks_greeting_gets_a_socks_refusal(server, greeting, reply, name):
    answer = await exchange(server.port, greeting)
    assert answer == reply
    assert await asyncio.to_thread(wait_for, lambda: len(server.access_records()) == 1)
    assert name in server.access_records()[0]["error"]


@pytest.mark.parametrize(
    "target",
    [b"ftp://a.test/file", b"http://user:pw@a.test/", b"http://a.test:0/", b"http://a.test:99999/"],
)
async def test_a_bad_target_is_recorded_as_sent(server, target):
    """A request whose target cannot be parsed gets a 400 and, as it asked with `Connection:
    close`, a closed connection (`exchange` reads until the proxy closes); its record keeps
    the target as the client sent it (a parsed one is recorded as a URL)."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    answer = await exchange(server.port, request)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    # The record is written before the error answer goes out.
    [rec] = server.access_records()
    assert (rec["method"], rec["target"], rec["status"]) == ("GET", target.decode(), 400), rec


async def test_binary_gets_a_400_that_names_the_proxy_url(server):
    answer = await exchange(server.port, b"\x00\x01\x02\x03")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert (
        b"this is an HTTP proxy; set the client's proxy to "
        + f"http://127.0.0.1:{server.port}".encode()
        in body
    )
    # The server carries on.
    with RecordingOrigin() as origin:
        import httpx

        async with httpx.AsyncClient(proxy=server.url, timeout=20) as client:
            assert (await client.get(origin.url("/still-ok"))).status_code == 200


async def test_request_timeout_has_its_reason_phrase():
    server = await start_proxy_server(port=0, header_timeout=0.5)
    try:
        answer = await exchange(server.port, b"GET http://a.test/ HTTP/1.1\r\nHost: a")
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    finally:
        await server.aclose()


async def test_empty_reason_from_a_hook_gets_the_standard_phrase():
    class Teapot(HTTPSForwardProxyHandler):
        async def on_response_received(self) -> None:
            self.response.status_code = 404
            self.response.reason_phrase = ""

    with RecordingOrigin() as origin:
        server = await start_proxy_server(Teapot, port=0)
        try:
            answer = await exchange(
                server.port,
                f"GET {origin.url('/x')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
            )
            assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), answer
        finally:
            await server.aclose()


# --------------------------------------------------------------------------------------
# handlers


async def test_handler_builder_returning_a_non_handler_is_refused_at_start():
    with pytest.raises(TypeError, match="handler_builder returned int, not an HTTPSProxyHandler"):
        await start_proxy_server(lambda: 42, port=0)
    with pytest.raises(TypeError, match="handler_builder returned NoneType"):
        await start_proxy_server(lambda: None, port=0)


async def test_replaced_body_is_counted_as_sent():
    class Replace(HTTPSForwardProxyHandler):
        async def on_request_received(self) -> None:
            self.request.body = b"r" * 123
            await self.forward_http_request()

    import httpx

    with RecordingOrigin() as origin:
        server = await start_proxy_server(Replace, port=0)
        try:
            async with httpx.AsyncClient(proxy=server.url, timeout=20) as client:
                r = await client.post(origin.url("/echo"), content=b"original")
            assert r.status_code == 200 and r.content == b"r" * 123
            assert await asyncio.to_thread(wait_for, lambda: len(server.access_records()) == 1)
            assert server.access_records()[0]["bytes_up"] == 123
        finally:
            await server.aclose()


async def test_intercept_without_tls_store_is_an_error_not_a_tunnel():
    errors: list[Exception] = []
    reported = asyncio.Event()

    class WantsIntercept(HTTPSProxyHandler):
        async def on_connect(self, host: str, port: int):
            return "intercept"

        async def on_error(self, error: Exception) -> None:
            errors.append(error)
            reported.set()

    server = await start_proxy_server(WantsIntercept, port=0)
    try:
        answer = await exchange(
            server.port, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), answer
        assert b"tls_store" in answer
        await asyncio.wait_for(reported.wait(), 20)
        assert "tls_store" in str(errors[0])
    finally:
        await server.aclose()


# --------------------------------------------------------------------------------------
# the command line: one line, exit 1 or 2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segproxy", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--ca-dir", "{file}/sub", "--listen-port", "0"], 1, "Not a directory"),
        (
            ["--ca-dir", "/proc/segproxy-test/ca", "--listen-port", "0"],
            1,
            "--ca-dir /proc/segproxy-test/ca",
        ),
        (["--listen-port", "70000"], 2, "port must be 0..65535"),
        (["--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
        (["--print-ca"], 2, "--print-ca and --export-ca need --ca-dir"),
        (["--dns-port", "53"], 2, "--dns-port needs --dns-server"),
        (["--rules-file", "{file}/nope"], 1, "cannot read rules file"),
        (["--listen-port", "{busy}"], 1, "cannot listen on"),
    ],
)
def test_cli_failures_are_one_line(tmp_path, args, code, needle):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = [a.format(file=a_file, busy=busy.getsockname()[1]) for a in args]
        out = run_cli(*argv)
    assert out.returncode == code, out
    lines = out.stderr.strip().splitlines()
    # One error line; a usage mistake (exit 2) adds a one-line usage after it.
    assert len(lines) == (2 if code == 2 else 1) and lines[0].startswith("segproxy: error: "), (
        out.stderr
    )
    assert code == 1 or lines[1].startswith("usage: segproxy "), out.stderr
    assert needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------
# lifecycle: a dropped server frees its port, servers(), async with, Rules snapshots


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def a_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_server_dropped_without_aclose_frees_its_port():
    import gc

    port = a_free_port()
    server = await start_proxy_server(port=port)
    assert server in segproxy.servers()
    # A notebook cell run again while the first server still runs: the error says which
    # server holds the port and how to close it.
    with pytest.raises(OSError, match=r"segproxy\.servers\(\)"):
        await start_proxy_server(port=port)
    del server

    def collected_and_free() -> bool:
        gc.collect()
        return port_is_free(port)

    assert await asyncio.to_thread(wait_for, collected_and_free, 20)
    again = await start_proxy_server(port=port)
    try:
        assert again.port == port and again.is_serving()
        assert segproxy.servers()[-1] is again
    finally:
        await again.aclose()
    assert again not in segproxy.servers()


async def test_proxy_server_is_an_async_context_manager():
    async with await start_proxy_server(port=0) as server:
        assert server.is_serving() and server in segproxy.servers()
    assert not server.is_serving() and server not in segproxy.servers()


async def test_rules_are_a_snapshot_taken_at_start():
    rules = segproxy.Rules.parse("other.test=direct")
    assert "snapshot" in repr(rules)
    with RecordingOrigin() as origin:
        server = await start_proxy_server(port=0, rules=rules)
        try:
            rules.add("127.0.0.1=direct,action=block")
            assert len(rules) == 2
            import httpx

            async with httpx.AsyncClient(proxy=server.url, timeout=20) as client:
                # The running server still uses the rules it started with.
                assert (await client.get(origin.url("/snap"))).status_code == 200
        finally:
            await server.aclose()
        server = await start_proxy_server(port=0, rules=rules)
        try:
            async with httpx.AsyncClient(proxy=server.url, timeout=20) as client:
                assert (await client.get(origin.url("/snap"))).status_code == 403
        finally:
            await server.aclose()
