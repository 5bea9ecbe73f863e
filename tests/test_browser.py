"""A real browser through segproxy: headless Chromium loads a local HTTPS page through a
CONNECT tunnel, then through interception with our CA trusted in its NSS database, and
refuses the page when our CA is not trusted."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import segproxy
from support.certs import make_origin_certs

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None or shutil.which("certutil") is None,
    reason="chromium and certutil (Debian chromium, libnss3-tools) are needed",
)

PAGE = b"""<!doctype html><html><head><title>segproxy test page</title></head>
<body><p id="static">static content</p><p id="dynamic">waiting</p>
<script>fetch('/data.json').then(r => r.json()).then(d => {
  document.getElementById('dynamic').textContent = 'dynamic ' + d.word; });</script>
</body></html>"""


def make_origin_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a localhost leaf it signed: (ca, leaf, key) paths."""
    return make_origin_certs(directory)


class Origin:
    """An HTTPS origin on loopback that records the paths it served."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.paths: list[str] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.paths.append(path)
                if path == "/page.html":
                    body, kind = PAGE, b"text/html"
                elif path == "/data.json":
                    body, kind = b'{"word": "fetched"}', b"application/json"
                else:
                    body, kind = b"not found", b"text/plain"
                status = b"200 OK" if body != b"not found" else b"404 Not Found"
                writer.write(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Type: "
                    + kind
                    + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def nss_home(directory: Path, trusted: list[tuple[str, Path]]) -> Path:
    """A fresh HOME whose NSS database trusts exactly the given CA files."""
    home = directory / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(
        ["certutil", "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, timeout=60
    )
    for name, path in trusted:
        subprocess.run(
            ["certutil", "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", name, "-i", str(path)],
            check=True,
            timeout=60,
        )
    return home


async def dump_dom(home: Path, proxy_url: str, url: str) -> str:
    """The page's DOM after its scripts ran, as headless Chromium printed it."""
    args = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={home / 'profile'}",
        f"--proxy-server={proxy_url}",
        "--proxy-bypass-list=<-loopback>",
        "--virtual-time-budget=3000",
        "--dump-dom",
        url,
    ]
    env = {**os.environ, "HOME": str(home)}
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return out.decode(errors="replace")


@pytest.fixture
async def origin_setup(tmp_path: Path) -> AsyncIterator[tuple[Origin, int, Path]]:
    ca_path, cert, key = make_origin_pki(tmp_path)
    origin = Origin(cert, key)
    port = await origin.start()
    yield origin, port, ca_path
    await origin.stop()


async def test_page_loads_through_a_tunnel(
    tmp_path: Path, origin_setup: tuple[Origin, int, Path]
) -> None:
    origin, port, origin_ca = origin_setup
    home = nss_home(tmp_path, [("origin", origin_ca)])
    async with await segproxy.start_proxy_server(port=0) as server:
        dom = await dump_dom(home, server.url, f"https://localhost:{port}/page.html")
    # Read once the server has stopped: a tunnel's record is written when it closes.
    records = server.access_records()
    assert "static content" in dom and "dynamic fetched" in dom
    assert origin.paths.count("/page.html") == 1 and "/data.json" in origin.paths
    tunnels = [
        r for r in records if r["method"] == "CONNECT" and r["target"] == f"localhost:{port}"
    ]
    assert tunnels and all(r["kind"] == "tunnel" and r["status"] == 200 for r in tunnels)


async def test_page_loads_through_interception_when_our_ca_is_trusted(
    tmp_path: Path, origin_setup: tuple[Origin, int, Path]
) -> None:
    _origin, port, origin_ca = origin_setup
    store = segproxy.TLSStore.generate_ca(common_name="segproxy browser test CA")
    ca_file = tmp_path / "segproxy-ca.pem"
    ca_file.write_bytes(store.get_ca_pem())
    home = nss_home(
        tmp_path, [("segproxy", ca_file)]
    )  # only our CA: the origin's is unknown to the browser
    seen_by_handler: list[str] = []
    versions: dict[str, str] = {}

    class Recorder(segproxy.HTTPSForwardProxyHandler):
        async def on_request_received(self) -> None:
            seen_by_handler.append(self.request.url())
            versions[self.request.url()] = self.request.version
            await self.forward_http_request()

    async with await segproxy.start_proxy_server(
        Recorder, port=0, tls_store=store, upstream_ca=[origin_ca]
    ) as server:
        dom = await dump_dom(home, server.url, f"https://localhost:{port}/page.html")
    records = server.access_records()  # the server has stopped: every record is written
    assert "static content" in dom and "dynamic fetched" in dom
    assert f"https://localhost:{port}/page.html" in seen_by_handler
    assert f"https://localhost:{port}/data.json" in seen_by_handler
    seen = {r["target"] for r in records if r["kind"] == "intercept" and r["method"] == "GET"}
    assert f"https://localhost:{port}/page.html" in seen
    assert f"https://localhost:{port}/data.json" in seen
    assert store.minted >= 1
    # Offered h2 in the intercepted handshake, Chromium speaks HTTP/2 to the proxy.
    page = f"https://localhost:{port}/"
    assert {v for url, v in versions.items() if url.startswith(page)} == {"HTTP/2"}, versions


async def test_browser_refuses_interception_without_trust(
    tmp_path: Path, origin_setup: tuple[Origin, int, Path]
) -> None:
    origin, port, origin_ca = origin_setup
    home = nss_home(tmp_path, [("origin", origin_ca)])  # trusts the origin, not our CA
    store = segproxy.TLSStore.generate_ca(common_name="untrusted segproxy CA")
    async with await segproxy.start_proxy_server(
        port=0, tls_store=store, upstream_ca=[origin_ca]
    ) as server:
        dom = await dump_dom(home, server.url, f"https://localhost:{port}/page.html")
    records = server.access_records()  # the server has stopped: every record is written
    assert "static content" not in dom
    assert "/page.html" not in origin.paths
    failed = [r for r in records if r["method"] == "CONNECT" and r["error"]]
    assert failed, records
