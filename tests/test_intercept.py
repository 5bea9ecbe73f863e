"""HTTPS interception end to end: real clients (curl, httpx, Python ssl) through segproxy to
real HTTPS origins on loopback (nginx, and a small Python origin for chunked bodies)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

cryptography = pytest.importorskip("cryptography")
import segproxy  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402
from support import LOOPBACK, Segproxy  # noqa: E402
from support.clients import run_curl as curl  # noqa: E402
from support.inprocess import ProxyThread  # noqa: E402
from support.origins import HttpsEchoOrigin  # noqa: E402
from support.tls_clients import (  # noqa: E402
    connect_tunnel,
    get,
    read_response_from_file,
    trusting_context,
)

MIB = 1024 * 1024
ONE_K = bytes(range(256)) * 4


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_proxy(ca_dir, nginx_origin):
    """The segproxy CLI intercepting with our CA, trusting the test origins' CA."""
    with Segproxy(["--ca-dir", str(ca_dir), "--upstream-ca", str(nginx_origin.cert_path)]) as p:
        yield p


@pytest.fixture(scope="module")
def proxy(tls_store, nginx_origin):
    """An in-process segproxy (its TLSStore visible to the test) intercepting with `tls_store`."""
    with ProxyThread(
        tls_store=tls_store, upstream_ca=[nginx_origin.cert_path], record_flows=True
    ) as p:
        yield p


@pytest.fixture(scope="module")
def echo_origin(nginx_origin):
    with HttpsEchoOrigin(nginx_origin.leaf_path, nginx_origin.dir / "origin.key") as o:
        yield o


def conn_ids(bodies: list[bytes]) -> list[tuple[int, int]]:
    out = []
    for b in bodies:
        conn, served = b.split()
        out.append((int(conn), int(served)))
    return out


def assert_reused(pairs: list[tuple[int, int]]) -> None:
    """The origin served all these on one connection, one after another."""
    assert len({c for c, _ in pairs}) == 1, f"origin saw several connections: {pairs}"
    served = [s for _, s in pairs]
    assert served == list(range(served[0], served[0] + len(served))), pairs


# --- clients that trust the CA --------------------------------------------------------------


def test_curl_trusting_the_ca_keeps_alive(cli_proxy, ca_path, nginx_origin, tmp_path):
    port = nginx_origin.https_port
    paths = ["/conn", "/conn", "/conn", "/1k.bin", "/conn"]
    args = []
    for i, path in enumerate(paths):
        args += [f"https://localhost:{port}{path}", "-o", str(tmp_path / f"out{i}")]
    r = curl(
        "-x",
        cli_proxy.proxy_url,
        "--cacert",
        str(ca_path),
        "-w",
        "%{http_code} %{num_connects}\n",
        *args,
    )
    assert r.returncode == 0, r.stderr.decode()
    lines = [line.split() for line in r.stdout.decode().splitlines()]
    assert [code for code, _ in lines] == ["200"] * 5, lines
    # One client connection for all five: the first transfer connects, the others reuse it.
    assert [int(n) for _, n in lines] == [1, 0, 0, 0, 0], lines
    bodies = [(tmp_path / f"out{i}").read_bytes() for i in range(5)]
    assert bodies[3] == ONE_K
    # And one origin connection: nginx counts requests 1..5 on one connection.
    pairs = conn_ids([bodies[i] for i in (0, 1, 2, 4)])
    assert len({c for c, _ in pairs}) == 1, pairs
    assert [s for _, s in pairs] == [pairs[0][1] + k for k in (0, 1, 2, 4)], pairs


def test_curl_ip_literal_target(cli_proxy, ca_path, nginx_origin):
    # curl sends no SNI for an IP literal: the proxy mints for the CONNECT target (IP SAN).
    r = curl(
        "-x", cli_proxy.proxy_url, "--cacert", str(ca_path), nginx_origin.url("/1k.bin", tls=True)
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == ONE_K


def test_httpx_trusting_the_ca(proxy, ca_path, nginx_origin):
    httpx = pytest.importorskip("httpx")

    async def main():
        ctx = trusting_context(ca_path)
        async with httpx.AsyncClient(proxy=proxy.url, verify=ctx, timeout=30) as client:
            bodies = []
            for _ in range(5):
                r = await client.get(f"https://localhost:{nginx_origin.https_port}/conn")
                assert r.status_code == 200
                bodies.append(r.content)
            r = await client.get(f"https://localhost:{nginx_origin.https_port}/index.html")
            assert r.status_code == 200 and "origin ok" in r.text
            return bodies

    bodies = asyncio.run(asyncio.wait_for(main(), 60))
    assert_reused(conn_ids(bodies))


def test_python_ssl_over_raw_connect_keeps_alive(proxy, ca_path, nginx_origin):
    ctx = trusting_context(ca_path)
    sock = connect_tunnel(proxy.port, f"localhost:{nginx_origin.https_port}")
    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"
        f = tls.makefile("rb")
        bodies = []
        for i in range(10):
            path = "/1k.bin" if i % 2 else "/conn"
            status, _, body = get(tls, "localhost", path, f)
            assert status == 200
            if path == "/1k.bin":
                assert body == ONE_K
            else:
                bodies.append(body)
    pairs = conn_ids(bodies)
    assert len({c for c, _ in pairs}) == 1, pairs
    assert [s for _, s in pairs] == [pairs[0][1] + 2 * i for i in range(5)], pairs


# --- clients that do not trust it -----------------------------------------------------------


def test_untrusting_clients_fail_and_the_proxy_carries_on(proxy, ca_path, nginx_origin):
    url = f"https://localhost:{nginx_origin.https_port}/1k.bin"
    # curl with only the origin's own CA: our minted certificate is not trusted.
    r = curl("-x", proxy.url, "--cacert", str(nginx_origin.cert_path), url)
    assert r.returncode == 60, (r.returncode, r.stderr)
    # Python ssl with the system roots.
    sock = connect_tunnel(proxy.port, f"localhost:{nginx_origin.https_port}")
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(sock, server_hostname="localhost")
    sock.close()
    # The proxy keeps serving trusting clients.
    for _ in range(3):
        r = curl("-x", proxy.url, "--cacert", str(ca_path), url)
        assert r.returncode == 0 and r.stdout == ONE_K, r.stderr
    errors = [
        rec for rec in proxy.server.access_records() if rec["kind"] == "intercept" and rec["error"]
    ]
    assert errors, "the rejected handshakes were not recorded"


# --- certificate fields ---------------------------------------------------------------------


def peer_cert(proxy_port: int, target: str, cafile: Path, sni: str | None) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(cafile))
    if sni is None:
        ctx.check_hostname = False  # still verifies the chain
    sock = connect_tunnel(proxy_port, target)
    with ctx.wrap_socket(sock, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def check_leaf(cert: x509.Certificate, ca: x509.Certificate) -> x509.SubjectAlternativeName:
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)  # issuer name and signature
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime < datetime.timedelta(days=398), lifetime
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_certificate_fields_for_a_name(proxy, ca_path, nginx_origin):
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = peer_cert(proxy.port, f"localhost:{nginx_origin.https_port}", ca_path, "localhost")
    san = check_leaf(cert, ca)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == []


def test_certificate_fields_for_an_ip_literal_without_sni(proxy, ca_path, nginx_origin):
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = peer_cert(proxy.port, f"127.0.0.1:{nginx_origin.https_port}", ca_path, None)
    san = check_leaf(cert, ca)
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == []
    # And Python's hostname check against the IP literal passes.
    ctx = ssl.create_default_context(cafile=str(ca_path))
    sock = connect_tunnel(proxy.port, f"127.0.0.1:{nginx_origin.https_port}")
    with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        status, _, body = get(tls, f"127.0.0.1:{nginx_origin.https_port}", "/1k.bin")
    assert status == 200 and body == ONE_K


# --- minting under load ---------------------------------------------------------------------


async def _tls_get(proxy_port, target, ctx, sni, path, host_header):
    reader, writer = await asyncio.open_connection(LOOPBACK, proxy_port)
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await writer.start_tls(ctx, server_hostname=sni)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(ln.split(b":")[1])
            for ln in head.split(b"\r\n")
            if ln.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        return status, body, der
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def test_200_concurrent_first_contacts_mint_once(proxy, tls_store, ca_path, nginx_origin):
    host = f"once-{time.monotonic_ns()}.test"
    before = tls_store.minted
    ctx = trusting_context(ca_path)
    target = f"127.0.0.1:{nginx_origin.https_port}"

    async def main():
        return await asyncio.gather(
            *[_tls_get(proxy.port, target, ctx, host, "/1k.bin", host) for _ in range(200)]
        )

    results = asyncio.run(asyncio.wait_for(main(), 120))
    assert all(status == 200 and body == ONE_K for status, body, _ in results)
    assert len({der for _, _, der in results}) == 1, "several certificates were served"
    assert tls_store.minted - before == 1


def test_1000_hosts_through_sni(proxy, tls_store, ca_path, nginx_origin):
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    tag = time.monotonic_ns()
    names = [f"h{i}.t{tag}.test" for i in range(1000)]
    before = tls_store.minted
    ctx = trusting_context(ca_path)  # check_hostname: each certificate must name its host
    target = f"127.0.0.1:{nginx_origin.https_port}"
    sem = asyncio.Semaphore(32)

    async def one(name):
        async with sem:
            return await _tls_get(proxy.port, target, ctx, name, "/1k.bin", name)

    async def main():
        return await asyncio.gather(*[one(n) for n in names])

    results = asyncio.run(asyncio.wait_for(main(), 300))
    for name, (status, body, der) in zip(names, results, strict=False):
        assert status == 200 and body == ONE_K, name
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        assert cert.issuer == ca.subject
    assert tls_store.minted - before == 1000


# --- intercept or tunnel by rule ------------------------------------------------------------


def test_intercept_no_rule_tunnels_while_others_are_intercepted(ca_dir, ca_path, nginx_origin):
    rule = "localhost=direct,intercept=no"
    with Segproxy(
        [
            "--ca-dir",
            str(ca_dir),
            "--upstream-ca",
            str(nginx_origin.cert_path),
            "--segment-rule",
            rule,
        ]
    ) as p:
        port = nginx_origin.https_port
        # Tunnelled: the origin's own certificate reaches the client.
        r = curl(
            "-x",
            p.proxy_url,
            "--cacert",
            str(nginx_origin.cert_path),
            f"https://localhost:{port}/1k.bin",
        )
        assert r.returncode == 0 and r.stdout == ONE_K, r.stderr
        r = curl("-x", p.proxy_url, "--cacert", str(ca_path), f"https://localhost:{port}/1k.bin")
        assert r.returncode == 60, r.stderr
        # Intercepted: 127.0.0.1 matches no rule, so it gets a minted certificate.
        r = curl(
            "-x",
            p.proxy_url,
            "--cacert",
            str(nginx_origin.cert_path),
            f"https://127.0.0.1:{port}/1k.bin",
        )
        assert r.returncode == 60, r.stderr
        r = curl("-x", p.proxy_url, "--cacert", str(ca_path), f"https://127.0.0.1:{port}/1k.bin")
        assert r.returncode == 0 and r.stdout == ONE_K, r.stderr


def test_without_a_ca_everything_tunnels(nginx_origin):
    with Segproxy([]) as p:
        r = curl(
            "-x",
            p.proxy_url,
            "--cacert",
            str(nginx_origin.cert_path),
            nginx_origin.url("/1k.bin", tls=True),
        )
        assert r.returncode == 0 and r.stdout == ONE_K, r.stderr


def test_intercept_yes_without_a_ca_is_a_configuration_error(tmp_path):
    async def start():
        return await segproxy.start_proxy_server(port=0, rules="*.test=direct,intercept=yes")

    with pytest.raises(ValueError, match=r"intercept=yes.*no CA"):
        asyncio.run(start())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "segproxy",
            "--listen-port",
            "0",
            "--segment-rule",
            "*.test=direct,intercept=yes",
        ],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert b"intercept=yes" in r.stderr and b"no CA" in r.stderr, r.stderr


# --- verifying origins ----------------------------------------------------------------------


def test_origin_not_trusted_by_default_is_a_502_naming_the_reason(ca_dir, ca_path, nginx_origin):
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    with Segproxy(["--ca-dir", str(ca_dir)], env=env) as p:
        r = curl(
            "-x",
            p.proxy_url,
            "--cacert",
            str(ca_path),
            "-w",
            "\n%{http_code}",
            f"https://localhost:{nginx_origin.https_port}/1k.bin",
        )
        assert r.returncode == 0, r.stderr
        body, _, code = r.stdout.rpartition(b"\n")
        assert code == b"502"
        text = body.decode(errors="replace").lower()
        assert "certificate" in text and ("unknownissuer" in text or "unknown issuer" in text), text


def test_upstream_insecure_skips_verification(ca_dir, ca_path, nginx_origin):
    with Segproxy(["--ca-dir", str(ca_dir), "--upstream-insecure"]) as p:
        r = curl(
            "-x",
            p.proxy_url,
            "--cacert",
            str(ca_path),
            f"https://localhost:{nginx_origin.https_port}/1k.bin",
        )
        assert r.returncode == 0 and r.stdout == ONE_K, r.stderr


def test_upstream_trust_options_from_python(tls_store, ca_path, nginx_origin):
    """`upstream_ca` as one path (not only a list) and `upstream_insecure=True`, from Python."""
    url = f"https://localhost:{nginx_origin.https_port}/1k.bin"
    env_free = {k: os.environ.pop(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if k in os.environ}
    try:
        for options, expected in (
            ({"upstream_ca": str(nginx_origin.cert_path)}, b"200"),
            ({"upstream_ca": nginx_origin.cert_path}, b"200"),
            ({"upstream_insecure": True}, b"200"),
            ({}, b"502"),
        ):
            with ProxyThread(tls_store=tls_store, **options) as p:
                r = curl(
                    "-x",
                    p.url,
                    "--cacert",
                    str(ca_path),
                    "-w",
                    "%{http_code}",
                    "-o",
                    "/dev/null",
                    url,
                )
                assert r.stdout == expected, (options, r.stdout, r.stderr)
    finally:
        os.environ.update(env_free)


def test_ssl_cert_file_is_honoured(ca_dir, ca_path, nginx_origin):
    env = dict(os.environ, SSL_CERT_FILE=str(nginx_origin.cert_path))
    with Segproxy(["--ca-dir", str(ca_dir)], env=env) as p:
        r = curl(
            "-x",
            p.proxy_url,
            "--cacert",
            str(ca_path),
            f"https://localhost:{nginx_origin.https_port}/1k.bin",
        )
        assert r.returncode == 0 and r.stdout == ONE_K, r.stderr


def test_upstream_ca_option_trusts_the_origin(cli_proxy, ca_path, nginx_origin):
    # cli_proxy runs with --upstream-ca; the default-trust case above answered 502.
    r = curl(
        "-x",
        cli_proxy.proxy_url,
        "--cacert",
        str(ca_path),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        f"https://localhost:{nginx_origin.https_port}/index.html",
    )
    assert r.stdout == b"200", (r.stdout, r.stderr)


# --- segmentation of intercepted flows ------------------------------------------------------


def test_segmentation_applies_to_encrypted_bytes_toward_the_origin(
    tls_store, ca_path, echo_origin, nginx_origin
):
    chunk = 100
    rules = f"*=segment_upstream,strategy=fixed,chunk={chunk}"
    with ProxyThread(
        tls_store=tls_store, upstream_ca=[nginx_origin.cert_path], record_flows=True, rules=rules
    ) as p:
        body = os.urandom(5000)
        sock = connect_tunnel(p.port, f"localhost:{echo_origin.port}")
        with trusting_context(ca_path).wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(
                f"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status, _, reply = read_response_from_file(tls.makefile("rb"))
        assert status == 200
        assert reply.decode() == f"{hashlib.sha256(body).hexdigest()} {len(body)}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            flows = p.server.flows()
            if any(f["kind"] == "intercept" and f["end"] is not None for f in flows):
                break
            time.sleep(0.05)
        flows = p.server.flows()
    intercept_flows = [f for f in flows if f["kind"] == "intercept"]
    assert intercept_flows, flows
    up = [size for f in flows for d, size, _ in f["chunks"] if d == "up"]
    # The encrypted bytes toward the origin (TLS handshake + records carrying the 5000-byte
    # body) went out in chunks of the rule's size, the last of a write maybe shorter.
    assert sum(up) > len(body), up
    assert max(up) == chunk, up  # no plaintext-sized (5000) writes recorded: the wire bytes are
    assert sum(1 for s in up if s == chunk) >= len(body) // chunk, up


# --- bodies ---------------------------------------------------------------------------------


def test_chunked_bodies_through_interception(proxy, ca_path, echo_origin):
    ctx = trusting_context(ca_path)
    sock = connect_tunnel(proxy.port, f"localhost:{echo_origin.port}")
    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        f = tls.makefile("rb")
        # A chunked response.
        status, _headers, body = get(tls, "localhost", "/chunked?n=50&size=3000", f)
        assert status == 200
        assert body == b"".join(bytes([i]) * 3000 for i in range(50))
        # A chunked request body, on the same connection.
        pieces = [os.urandom(n) for n in (1, 10, 4096, 70000, 3)]
        tls.sendall(
            b"POST /sha256 HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for piece in pieces:
            tls.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        tls.sendall(b"0\r\n\r\n")
        status, _, reply = read_response_from_file(f)
        whole = b"".join(pieces)
        assert (
            status == 200 and reply.decode() == f"{hashlib.sha256(whole).hexdigest()} {len(whole)}"
        )
        # And the connection still serves.
        status, _, body = get(tls, "localhost", "/chunked?n=2&size=5", f)
        assert status == 200 and body == b"\0" * 5 + b"\1" * 5


def test_50_mib_download_and_upload_through_interception(proxy, ca_path, nginx_origin, echo_origin):
    big = nginx_origin.www / "50m.bin"
    if not big.exists():
        with open(big, "wb") as out:
            for _ in range(50):
                out.write(os.urandom(MIB))
        big.chmod(0o644)
    expected = hashlib.sha256(big.read_bytes()).hexdigest()
    # Download with curl, hash compared.
    r = curl(
        "-x",
        proxy.url,
        "--cacert",
        str(ca_path),
        f"https://localhost:{nginx_origin.https_port}/50m.bin",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 50 * MIB and hashlib.sha256(r.stdout).hexdigest() == expected
    # Upload 50 MiB chunked (curl streams a file read from stdin as chunked), hash compared.
    r = curl(
        "-x",
        proxy.url,
        "--cacert",
        str(ca_path),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{big}",
        f"https://localhost:{echo_origin.port}/sha256",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == f"{expected} {50 * MIB}"
