"""Shared fixtures: real peers on loopback (see tests/support/).

The peer fixtures are session-scoped (each daemon starts once per run) and skip
the requesting test if the program is not installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import segproxy

sys.path.insert(0, os.path.dirname(__file__))

from support import (
    Dnsmasq,
    MissingBinary,
    NghttpdOrigin,
    NginxOrigin,
    Squid,
    Tinyproxy,
)


def _start(factory):
    try:
        service = factory()
    except MissingBinary as e:
        pytest.skip(str(e))
    return service.__enter__()


@pytest.fixture(scope="session")
def nginx_origin():
    """nginx on 127.0.0.1: ``.url("/1k.bin")``, ``.url("/large.bin")``,
    ``.url(path, tls=True)`` with ``.cert_path`` to trust."""
    origin = _start(NginxOrigin)
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def nghttpd_origin():
    """nghttpd on 127.0.0.1: an HTTP/2-only TLS origin, ``.url(path)``, ``.cert_path``."""
    origin = _start(NghttpdOrigin)
    yield origin
    origin.stop()


@pytest.fixture(scope="session")
def squid_proxy():
    """squid forward proxy: ``.proxy_url``, ``.port``, ``.access_log``."""
    squid = _start(Squid)
    yield squid
    squid.stop()


@pytest.fixture(scope="session")
def tinyproxy_proxy():
    """tinyproxy forward proxy: ``.proxy_url``, ``.port``."""
    tp = _start(Tinyproxy)
    yield tp
    tp.stop()


@pytest.fixture(scope="session")
def dnsmasq_server():
    """dnsmasq on 127.0.0.1:``.port``: ``*.test.zone`` -> 127.0.0.1,
    ``*.bad.zone`` NXDOMAIN, everything else REFUSED."""
    dns = _start(Dnsmasq)
    yield dns
    dns.stop()


def pytest_report_header(config):
    try:
        import segproxy
    except ImportError as e:  # reported, and the tests that need it fail loudly
        return f"segproxy: not importable ({e})"
    return f"segproxy: {segproxy.__file__}"


@pytest.fixture
def origin():
    """A fresh RecordingOrigin (tests/support/origins.py) on its own thread."""
    from support.origins import RecordingOrigin

    with RecordingOrigin() as o:
        yield o


@pytest.fixture
async def proxy():
    """segproxy in this process on a free port, short timeouts; closed after the test."""
    import segproxy

    server = await segproxy.start_proxy_server(
        port=0, connect_timeout=5, idle_timeout=20, header_timeout=5, response_timeout=20
    )
    try:
        yield server
    finally:
        await server.aclose(grace=1.0)


@pytest.fixture
async def make_proxy():
    """Factory: ``await make_proxy(response_timeout=1, ...)`` starts an in-process segproxy
    with those options; every one started is closed after the test."""
    import segproxy

    started = []

    async def make(**options):
        server = await segproxy.start_proxy_server(port=0, **options)
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            await server.aclose(grace=1.0)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    """A CA directory (ca-key.pem, ca-cert.pem) shared by a module's intercepting proxies."""
    d = tmp_path_factory.mktemp("ca")
    segproxy.load_or_create_ca(d)
    return d


@pytest.fixture(scope="module")
def ca_path(ca_dir) -> Path:
    """The CA certificate for clients to trust."""
    return ca_dir / "ca-cert.pem"


@pytest.fixture(scope="module")
def tls_store(ca_dir) -> segproxy.TLSStore:
    """A TLSStore on the module's CA."""
    return segproxy.TLSStore.load_ca_from_disk(ca_dir / "ca-key.pem", ca_dir / "ca-cert.pem")
