"""Every script in examples/ runs: started as a user would, driven with curl against a local
origin, its output and the origin's view checked, then stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_browser import make_origin_pki

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


class EchoHandler(BaseHTTPRequestHandler):
    """Answers with the request's path and headers as JSON, and a Server header."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def tls_origin(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    import ssl

    ca, cert, key = make_origin_pki(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://localhost:{server.server_address[1]}", ca
    server.shutdown()
    server.server_close()


class Example:
    """An example script running in its own process group, with its output collected."""

    def __init__(self, script: str, *args: str, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(EXAMPLES / script), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.proxy = "http://" + self.wait_for("segproxy listening on ").rsplit(" ", 1)[1]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not printed; output: {self.lines}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(timeout=5)
        return self.proc.returncode


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30
    )


def test_forward_proxy(origin: str) -> None:
    example = Example("forward_proxy.py")
    try:
        r = curl("-x", example.proxy, f"{origin}/plain?x=1")
        assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/plain?x=1"
        line = example.wait_for("target=http://127.0.0.1")
        assert line.startswith("ACCESS rid=") and " method=GET " in line and " status=200 " in line
    finally:
        assert example.stop() == 0


def test_log_requests_http_and_https(
    origin: str, tls_origin: tuple[str, Path], tmp_path: Path
) -> None:
    tls_url, _origin_ca = tls_origin
    example = Example("log_requests.py")
    try:
        r = curl("-x", example.proxy, f"{origin}/logged")
        assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/logged"
        example.wait_for(f"request: GET {origin}/logged")
        example.wait_for("response: 200")
        example.wait_for("response complete")
        # HTTPS is intercepted with the script's fresh CA, which curl does not trust.
        r = curl("-x", example.proxy, f"{tls_url}/secret")
        assert r.returncode == 60, r
    finally:
        assert example.stop() == 0


def test_modify_headers(origin: str) -> None:
    example = Example("modify_headers.py")
    try:
        r = curl("-i", "-x", example.proxy, "-H", "Cookie: a=b", f"{origin}/h")
        assert r.returncode == 0, r.stderr
        head, body = r.stdout.split("\n\n", 1)  # text mode folded CRLF
        seen = json.loads(body)["headers"]
        assert seen.get("X-Proxied-By") == "segproxy" and "Cookie" not in seen
        assert "x-rewritten: yes" in head.lower() and "\nserver:" not in head.lower()
    finally:
        assert example.stop() == 0


def test_persistent_ca(tls_origin: tuple[str, Path], tmp_path: Path) -> None:
    tls_url, origin_ca = tls_origin
    ca_dir = tmp_path / "ca"
    example = Example("persistent_ca.py", "--ca-dir", str(ca_dir), "--upstream-ca", str(origin_ca))
    try:
        example.wait_for("created CA in")
        r = curl("--cacert", str(ca_dir / "ca-cert.pem"), "-x", example.proxy, f"{tls_url}/via-ca")
        assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/via-ca"
    finally:
        assert example.stop() == 0
    first_cert = (ca_dir / "ca-cert.pem").read_bytes()
    again = Example("persistent_ca.py", "--ca-dir", str(ca_dir), "--upstream-ca", str(origin_ca))
    try:
        again.wait_for("loading CA from")
        r = curl("--cacert", str(ca_dir / "ca-cert.pem"), "-x", again.proxy, f"{tls_url}/again")
        assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/again"
    finally:
        assert again.stop() == 0
    assert (ca_dir / "ca-cert.pem").read_bytes() == first_cert


def test_mock_response(origin: str) -> None:
    example = Example("mock_response.py")
    try:
        r = curl("-x", example.proxy, "http://nowhere.invalid/mock/hello")
        assert r.returncode == 0 and json.loads(r.stdout) == {"mocked": "/mock/hello"}
        r = curl("-x", example.proxy, f"{origin}/real")
        assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/real"
    finally:
        assert example.stop() == 0


def test_segmentation_experiment() -> None:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "segmentation_experiment.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rows = {line[:20].strip(): line[20:].split() for line in r.stdout.splitlines()[1:]}
    assert set(rows) == {"none", "fixed 1 KiB", "random 512-4096", "fixed 8 KiB, 1 ms"}
    assert int(rows["fixed 1 KiB"][0]) >= 512  # 512 KiB in 1 KiB chunks (+ the head)
    assert int(rows["none"][0]) < int(rows["fixed 1 KiB"][0])
