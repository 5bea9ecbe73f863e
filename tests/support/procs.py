"""Start real processes on loopback and stop them by pid.

Every helper here starts one child with ``subprocess.Popen`` in its own
session (so the child and anything it forks share a process group whose id is
the child's pid), waits with a bounded timeout until its port accepts, and in
``stop()`` signals exactly that pid / that group: never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


class MissingBinary(RuntimeError):
    """The program a helper needs is not installed (tests skip on this)."""


def find_binary(name: str) -> str:
    """Absolute path of ``name`` (also looking in the sbin directories, which
    are not on a normal user's PATH), or raise MissingBinary."""
    path = shutil.which(name) or shutil.which(
        name, path="/usr/sbin:/sbin:/usr/local/sbin:/usr/bin:/bin"
    )
    if path is None:
        raise MissingBinary(f"{name} is not installed (see scripts/install-test-deps.sh)")
    return path


def free_port(udp_too: bool = False) -> int:
    """A port free on 127.0.0.1 right now (TCP, and UDP too if asked)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = s.getsockname()[1]
            if not udp_too:
                return port
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((LOOPBACK, port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port found")


def port_accepts(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class ManagedProcess:
    """One child process with a log file; a context manager.

    ``ready`` is called repeatedly until it returns True (or the timeout /
    the child's exit raises RuntimeError with the log's tail).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        workdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.env = env
        self.log_path = workdir / f"{name}.out.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, ready, timeout: float = 15.0, what: str = "ready") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before {what}:\n"
                    f"{' '.join(self.argv)}\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} not {what} after {timeout}s:\n{self.log_tail()}")

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pid = proc.pid
        if proc.poll() is None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=grace)
        # Children it forked (nginx workers, squid helpers) are in the group
        # whose id is our child's pid; make sure none outlives it.
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class TempDir:
    """A temporary directory readable by unprivileged daemons (nginx workers
    and squid drop privileges to nobody / proxy when started as root)."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"segproxy-{prefix}-"))
        os.chmod(self.path, 0o777)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class Service:
    """Base class for the daemons: owns a temp dir and one ManagedProcess."""

    name = "service"
    keep_dir = False  # set SEGPROXY_KEEP_TMP=1 to keep logs for debugging

    def __init__(self) -> None:
        self.tmp = TempDir(self.name)
        self.dir = self.tmp.path
        self.process: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:
        try:
            if self.process is not None:
                self.process.stop()
        finally:
            if not (self.keep_dir or os.environ.get("SEGPROXY_KEEP_TMP")):
                self.tmp.cleanup()

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
