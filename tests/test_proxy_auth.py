"""Proxy client authentication (`--proxy-auth`, `proxy_auth=`): Basic credentials on
Proxy-Authorization, 407 with a challenge when missing or wrong, the header never forwarded;
and the refusal to listen beyond loopback without authentication (`--allow-open-proxy`)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import segproxy
from support import Segproxy, free_port, port_accepts, wait_for
from support.clients import Conn, curl
from support.loopback import basic
from support.origins import RecordingOrigin

pytestmark = pytest.mark.timeout(60)

MODULE = [sys.executable, "-m", "segproxy"]
CHALLENGE = 'Basic realm="segproxy"'


@pytest.fixture
async def authed(make_proxy):
    """A proxy accepting alice:s3cret and bob:pa:ss (a password may hold colons)."""
    return await make_proxy(proxy_auth=[("alice", "s3cret"), "bob:pa:ss"], header_timeout=5)


def get(port: int, url: str, extra: str = "") -> tuple[Conn, object]:
    c = Conn(port)
    host = url.split("/")[2]
    c.send(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    return c, c.read_response()


@pytest.mark.parametrize(
    "extra",
    [
        "",
        f"Proxy-Authorization: {basic('alice', 'wrong')}\r\n",
        f"Proxy-Authorization: {basic('mallory', 's3cret')}\r\n",
        "Proxy-Authorization: Basic !!!\r\n",
        "Proxy-Authorization: Bearer s3cret\r\n",
    ],
    ids=["missing", "wrong-password", "wrong-user", "not-base64", "other-scheme"],
)
async def test_missing_or_wrong_credentials_get_407(authed, origin, extra):
    c, r = get(authed.port, origin.url("/secret"), extra)
    with c:
        assert (r.status, r.reason) == (407, "Proxy Authentication Required")
        assert r.header("proxy-authenticate") == CHALLENGE
        assert r.body.startswith(b"segproxy: ")
    assert origin.connections == 0
    [rec] = authed.access_records()
    assert rec["status"] == 407


async def test_right_credentials_are_served_and_never_forwarded(authed, origin):
    for user, password in (("alice", "s3cret"), ("bob", "pa:ss")):
        c, r = get(
            authed.port,
            origin.url(f"/ok-{user}"),
            f"Proxy-Authorization: {basic(user, password)}\r\n",
        )
        c.close()
        assert r.status == 200
    assert [q.target for q in origin.requests] == ["/ok-alice", "/ok-bob"]
    for q in origin.requests:
        assert q.header("proxy-authorization") is None, q.headers


async def test_a_407_keeps_the_connection_for_the_retry(authed, origin):
    c, r = get(authed.port, origin.url("/first"))
    with c:
        assert r.status == 407 and r.header("connection") == "keep-alive"
        c.send(
            f"GET {origin.url('/retry')} HTTP/1.1\r\nHost: {origin.authority}\r\n"
            f"Proxy-Authorization: {basic('alice', 's3cret')}\r\n\r\n".encode()
        )
        assert c.read_response().status == 200
    assert [q.target for q in origin.requests] == ["/retry"]


async def test_a_407_for_a_request_with_a_body_closes(authed, origin):
    with Conn(authed.port) as c:
        c.send(
            f"POST {origin.url('/up')} HTTP/1.1\r\nHost: {origin.authority}\r\nContent-Length: 5\r\n\r\nhello".encode()
        )
        r = c.read_response()
        assert r.status == 407 and r.header("connection") == "close"
        assert c.at_eof()
    assert origin.connections == 0


async def test_connect_needs_credentials_too(authed, origin):
    with Conn(authed.port) as c:
        c.send(f"CONNECT {origin.authority} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode())
        r = c.read_response(method="CONNECT")
        assert r.status == 407 and r.header("proxy-authenticate") == CHALLENGE
    assert origin.connections == 0
    with Conn(authed.port) as c:
        c.send(
            f"CONNECT {origin.authority} HTTP/1.1\r\nHost: {origin.authority}\r\n"
            f"Proxy-Authorization: {basic('alice', 's3cret')}\r\n\r\n".encode()
        )
        assert c.read_response(method="HEAD").status == 200  # head only: the tunnel follows
        c.send(f"GET /tunnelled HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode())
        assert c.read_response().status == 200
    [q] = origin.requests
    assert q.target == "/tunnelled" and q.header("proxy-authorization") is None


async def test_curl_with_and_without_credentials(authed, origin):
    proxy = f"127.0.0.1:{authed.port}"
    code = ["-o", "/dev/null", "-w", "%{http_code}"]
    r = await curl(*code, "-x", f"http://alice:s3cret@{proxy}", origin.url("/curl-plain"))
    assert r.stdout.decode() == "200", r.stderr
    r = await curl(*code, "-x", f"http://alice:nope@{proxy}", origin.url("/curl-wrong"))
    assert r.stdout.decode() == "407", r.stderr
    r = await curl(*code, "-x", f"http://{proxy}", origin.url("/curl-none"))
    assert r.stdout.decode() == "407", r.stderr
    # Through a CONNECT tunnel (-p): curl sends the credentials on the CONNECT.
    r = await curl(*code, "-p", "-x", f"http://bob:pa:ss@{proxy}", origin.url("/curl-tunnel"))
    assert r.stdout.decode() == "200", r.stderr
    r = await curl(*code, "-p", "-x", f"http://bob:wrong@{proxy}", origin.url("/curl-tunnel-wrong"))
    assert r.returncode != 0 or r.stdout.decode() == "407"
    assert [q.target for q in origin.requests] == ["/curl-plain", "/curl-tunnel"]
    assert all(q.header("proxy-authorization") is None for q in origin.requests)


async def test_bad_proxy_auth_values_are_refused():
    for bad in (["nocolon"], [":pass"], [("us:er", "p")]):
        with pytest.raises(ValueError):
            await segproxy.start_proxy_server(port=0, proxy_auth=bad)
    with pytest.raises(TypeError):
        await segproxy.start_proxy_server(port=0, proxy_auth=[42])


# --- no open relay ---------------------------------------------------------------------------


async def test_python_refuses_an_open_relay(make_proxy):
    with pytest.raises(ValueError) as e:
        await segproxy.start_proxy_server(host="0.0.0.0", port=0)
    assert "--proxy-auth" in str(e.value) and "--allow-open-proxy" in str(e.value)
    # Loopback needs nothing; beyond it, credentials or the explicit opt-out.
    for options in ({"proxy_auth": ["u:p"]}, {"allow_open_proxy": True}):
        server = await segproxy.start_proxy_server(host="0.0.0.0", port=0, **options)
        try:
            assert port_accepts(server.port)
        finally:
            await server.aclose(grace=1.0)


def run(argv, timeout=30):
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_cli_refuses_an_open_relay(host):
    r = run(MODULE + ["--listen-host", host, "--listen-port", str(free_port())])
    assert r.returncode == 2, r.stderr
    first, usage = r.stderr.splitlines()
    assert first.startswith("segproxy: error: refusing to listen on ") and usage.startswith(
        "usage: segproxy "
    ), r.stderr
    assert "--proxy-auth" in first and "--allow-open-proxy" in first


def test_cli_bad_credentials_are_usage_errors(tmp_path):
    r = run(MODULE + ["--proxy-auth", "nocolon"])
    assert r.returncode == 2 and r.stderr.startswith(
        "segproxy: error: --proxy-auth needs USER:PASS"
    ), r.stderr
    missing = tmp_path / "missing.txt"
    r = run(MODULE + ["--proxy-auth-file", str(missing)])
    assert r.returncode == 2 and "--proxy-auth-file" in r.stderr.splitlines()[0], r.stderr


def test_cli_starts_with_allow_open_proxy():
    with (
        RecordingOrigin() as origin,
        Segproxy(["--listen-host", "0.0.0.0", "--allow-open-proxy"]) as sp,
    ):
        with Conn(sp.port) as c:
            c.send(
                f"GET {origin.url('/open')} HTTP/1.1\r\nHost: {origin.authority}\r\n\r\n".encode()
            )
            assert c.read_response().status == 200


def test_cli_proxy_auth_file_beyond_loopback(tmp_path):
    creds = tmp_path / "users.txt"
    creds.write_text("# users\nalice:s3cret\n\ncarol:c0:l0n\n")
    port = free_port()
    proc = subprocess.Popen(
        MODULE
        + [
            "--listen-host",
            "0.0.0.0",
            "--listen-port",
            str(port),
            "--proxy-auth-file",
            str(creds),
            "--proxy-auth",
            "dave:d",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert wait_for(lambda: port_accepts(port), timeout=15)
        with RecordingOrigin() as origin:
            for creds_header, status in (
                ("", 407),
                (basic("carol", "c0:l0n"), 200),
                (basic("dave", "d"), 200),
                (basic("alice", "s3cret"), 200),
                (basic("alice", "x"), 407),
            ):
                extra = f"Proxy-Authorization: {creds_header}\r\n" if creds_header else ""
                with Conn(port) as c:
                    c.send(
                        f"GET {origin.url('/f')} HTTP/1.1\r\nHost: {origin.authority}\r\n{extra}\r\n".encode()
                    )
                    assert c.read_response().status == status, creds_header
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "s3cret" not in out + err


# --- on_authenticate: a handler's own scheme ---------------------------------------------------


class TokenAuth(segproxy.HTTPSForwardProxyHandler):
    seen: list[tuple[str, str]] = []

    async def on_authenticate(self, scheme: str, credentials: str) -> bool:
        TokenAuth.seen.append((scheme, credentials))
        if credentials == "boom":
            raise RuntimeError("token store down")
        return scheme == "Bearer" and credentials == "tok-1"


def test_on_authenticate_judges_other_schemes(origin):
    """Hooks run on the server's loop: the proxy runs on its own loop thread (ProxyThread) so
    this test's blocking clients do not stop them."""
    from support.inprocess import ProxyThread

    TokenAuth.seen = []
    with ProxyThread(handler_builder=TokenAuth, proxy_auth=["alice:s3cret"], header_timeout=5) as p:
        cases = [
            ("", 407),
            ("Proxy-Authorization: Bearer tok-1\r\n", 200),
            ("Proxy-Authorization: Bearer tok-2\r\n", 407),
            ("Proxy-Authorization: Bearer boom\r\n", 407),
            (f"Proxy-Authorization: {basic('alice', 's3cret')}\r\n", 200),  # settled by proxy_auth
            (
                f"Proxy-Authorization: {basic('alice', 'nope')}\r\n",
                407,
            ),  # Basic wrong: no hook call
        ]
        for extra, status in cases:
            c, r = get(p.port, origin.url("/h"), extra)
            c.close()
            assert r.status == status, (extra, r.raw_head)
    assert TokenAuth.seen == [("Bearer", "tok-1"), ("Bearer", "tok-2"), ("Bearer", "boom")]
    assert len(origin.requests) == 2
    assert all(q.header("proxy-authorization") is None for q in origin.requests)


def test_on_authenticate_alone_turns_auth_on_and_counts_beyond_loopback(origin):
    from support.inprocess import ProxyThread

    TokenAuth.seen = []
    with pytest.raises(ValueError):
        with ProxyThread(host="0.0.0.0"):
            pass
    with ProxyThread(handler_builder=TokenAuth, host="0.0.0.0") as p:
        c, r = get(p.port, origin.url("/x"))
        c.close()
        assert r.status == 407 and r.header("proxy-authenticate") == CHALLENGE
        c, r = get(p.port, origin.url("/x"), f"Proxy-Authorization: {basic('any', 'one')}\r\n")
        c.close()
        assert r.status == 407
        c, r = get(p.port, origin.url("/x"), "Proxy-Authorization: Bearer tok-1\r\n")
        c.close()
        assert r.status == 200
    assert TokenAuth.seen == [("Basic", basic("any", "one").split()[1]), ("Bearer", "tok-1")]
