"""Packaging: the wheel is abi3 and works in a fresh virtual environment without Rust on
PATH (`segproxy --help`, a proxied request); the sdist carries what a source build needs and
builds; the version comes from one place."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import segproxy

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.skipif(shutil.which("maturin") is None, reason="maturin is needed to build"),
    pytest.mark.timeout(900),
]


def build(*args: str, out: Path) -> Path:
    # Reuse the checkout's build directory so the wheel costs a link, not a full compile.
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target"), "MATURIN_NO_INSTALL_RUST": "1"}
    subprocess.run(
        ["maturin", *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=840,
        capture_output=True,
    )
    (built,) = out.iterdir()
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("build", "--release", out=tmp_path_factory.mktemp("wheel"))


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_version_has_one_source() -> None:
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" in project.get("dynamic", []) and "version" not in project
    assert segproxy.__version__ == cargo


def test_wheel_is_abi3_and_works_in_a_fresh_venv_without_rust(
    wheel: Path, tmp_path: Path, origin: str
) -> None:
    assert "abi3" in wheel.name and wheel.suffix == ".whl", wheel.name
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = venv / "bin" / "pip"
    subprocess.run(
        [str(pip), "install", "--no-index", "--no-deps", "-q", str(wheel)], check=True, timeout=300
    )
    # PATH with the venv and the system tools only: no cargo, no rustc.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    assert (
        subprocess.run(["sh", "-c", "command -v cargo"], env=env, capture_output=True).returncode
        != 0
    )
    out = subprocess.run(
        [str(venv / "bin" / "segproxy"), "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--listen-port" in out.stdout
    port = free_port()
    proc = subprocess.Popen(
        [str(venv / "bin" / "python"), "-m", "segproxy", "--listen-port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"listening on 127.0.0.1:{port}" in line, line
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-x", f"http://127.0.0.1:{port}", origin],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0 and r.stdout == "hello", r
        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import segproxy; print(segproxy.__file__)"],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        ).stdout
        assert str(venv) in where
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sdist_carries_the_sources_and_builds(tmp_path: Path) -> None:
    sdist = build("sdist", out=tmp_path / "sdist")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "src", filter="data")
    for needed in (
        "Cargo.toml",
        "Cargo.lock",
        "pyproject.toml",
        "src/lib.rs",
        "src/engine/exchange.rs",
        "python/segproxy/__init__.py",
        "python/segproxy/py.typed",
        "python/segproxy/_engine.pyi",
    ):
        assert needed in names, f"{needed} missing from the sdist"
    (unpacked,) = (tmp_path / "src").iterdir()
    env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target"), "MATURIN_NO_INSTALL_RUST": "1"}
    started = time.monotonic()
    subprocess.run(
        ["maturin", "build", "--release", "--out", str(tmp_path / "from-sdist")],
        cwd=unpacked,
        env=env,
        check=True,
        timeout=840,
        capture_output=True,
    )
    (built,) = (tmp_path / "from-sdist").iterdir()
    assert "abi3" in built.name, (built.name, time.monotonic() - started)
