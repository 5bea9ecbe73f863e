"""The command line: `python -m segproxy` and the `segproxy` console script, run as real
processes (stopped by pid), and the access log file they write."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import Segproxy, free_port, port_accepts, wait_for
from support.clients import Conn, get_via
from support.origins import RecordingOrigin, SinkThenReplyOrigin

pytestmark = pytest.mark.timeout(60)

MODULE = [sys.executable, "-m", "segproxy"]
FLAGS = [
    "--listen-host",
    "--listen-port",
    "--connect-timeout",
    "--idle-timeout",
    "--header-timeout",
    "--response-timeout",
    "--max-connections",
    "--log-level",
    "--access-log",
]


def run(argv, timeout=30):
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def test_help_lists_every_flag():
    r = run(MODULE + ["--help"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: segproxy")
    for flag in FLAGS:
        assert flag in r.stdout


def test_version():
    import segproxy

    r = run(MODULE + ["--version"])
    assert r.returncode == 0 and r.stdout.strip() == f"segproxy {segproxy.__version__}"


@pytest.mark.parametrize(
    "args,complaint",
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--listen-port", "70000"], "port must be 0..65535"),
        (["--listen-port", "http"], "not a port number"),
        (["--connect-timeout", "0"], "must be greater than 0"),
        (["--idle-timeout", "soon"], "not a number"),
        (["--max-connections", "0"], "must be at least 1"),
        (["--log-level", "loud"], "invalid choice"),
        (["--dns-port", "5353"], "--dns-port needs --dns-server"),
        (["--dns-transport", "tcp"], "--dns-transport needs --dns-server"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, complaint):
    r = run(MODULE + args)
    assert r.returncode == 2
    # The error on one line, then a one-line usage.
    first, usage = r.stderr.splitlines()
    assert first.startswith("segproxy: error: ") and usage.startswith("usage: segproxy "), r.stderr
    assert complaint in r.stderr
    assert r.stdout == ""


def test_busy_port_exits_1_with_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run(MODULE + ["--listen-port", str(port)])
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr


def test_exit_status_is_clean_every_time():
    """Exits after the engine ran must not crash (it once died with SIGSEGV/SIGABRT in
    about one exit in ten: an engine thread touched Python during finalization)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        codes = [run(MODULE + ["--listen-port", str(port)]).returncode for _ in range(25)]
    assert codes == [1] * 25
    for _ in range(5):
        with Segproxy() as sp:
            proc = sp.process.proc
            os.kill(sp.pid, signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


def test_a_signal_taken_by_an_engine_thread_still_stops_the_proxy():
    """The kernel hands a process's signal to any thread that does not block it. Python runs
    its handler on the main thread only, so one landing on an engine thread must still wake
    the main thread's wait (it once hung until a second signal, about one stop in forty)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with Segproxy() as sp:
        engine_threads = [
            int(t.name) for t in Path(f"/proc/{sp.pid}/task").iterdir() if int(t.name) != sp.pid
        ]
        assert engine_threads
        # tgkill: the signal goes to that one thread, not to the process as a whole.
        assert libc.tgkill(sp.pid, engine_threads[0], signal.SIGTERM) == 0
        assert sp.process.proc.wait(timeout=10) == 0


def test_console_script_is_the_module():
    """The `segproxy` entry point in pyproject.toml runs the same main() as `python -m segproxy`."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["segproxy"] == "segproxy.cli:main"
    via_entry = run(
        [
            sys.executable,
            "-c",
            "import sys; from segproxy.cli import main; sys.exit(main())",
            "--help",
        ]
    )
    assert via_entry.returncode == 0 and via_entry.stdout == run(MODULE + ["--help"]).stdout


@pytest.mark.skipif(
    shutil.which("segproxy") is None, reason="console script `segproxy` not installed"
)
def test_installed_console_script_matches_module():
    script = shutil.which("segproxy")
    assert run([script, "--help"]).stdout == run(MODULE + ["--help"]).stdout
    r = run([script, "--bogus"])
    assert r.returncode == 2 and r.stderr == run(MODULE + ["--bogus"]).stderr
    with RecordingOrigin() as origin, Segproxy(command=[script]) as sp:
        assert get_via(sp.port, origin.url("/via-script")).status == 200


def test_listening_line_and_sigterm_exit():
    with RecordingOrigin() as origin, Segproxy() as sp:
        assert f"segproxy listening on 127.0.0.1:{sp.port}" in sp.output()
        assert get_via(sp.port, origin.url("/x")).status == 200
        proc = sp.process.proc
        os.kill(sp.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not port_accepts(sp.port)


def test_options_reach_the_engine():
    """--max-connections and --response-timeout given on the command line take effect."""
    with (
        RecordingOrigin() as origin,
        Segproxy(["--max-connections", "1", "--response-timeout", "1"]) as sp,
    ):
        time.sleep(0.3)  # the helper's readiness probes (connect, close) are gone by now
        with Conn(sp.port) as held:
            held.send(f"GET {origin.url('/first')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert held.read_response().status == 200
            held.send(f"GET {origin.url('/never')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            time.sleep(0.2)
            with Conn(sp.port) as extra:
                extra.send(f"GET {origin.url('/')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert extra.read_response().status == 503
            assert held.read_response().status == 504


# SegmentedProxy's access line (time, level, ACCESS and its fields in its order), then ours.
LINE_RE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ACCESS rid=(?P<id>\d+\.\d+) method=(?P<method>\S+) "
    r"host=(?P<host>\S+) port=(?P<port>\d+) scheme=(?P<scheme>\S+) action=(?P<action>\S+) mode=(?P<mode>\S+) "
    r"strategy=(?P<strategy>\S+) dur_ms=(?P<ms>\d+)(?: dns=\S+ cache=\S+ transport=\S+ fallback=\S+)? "
    r"bytes_up=(?P<up>\d+) bytes_down=(?P<down>\d+) status=(?P<status>\d{3}) client=(?P<client>\S+) "
    r"target=(?P<target>\S+) kind=(?P<kind>\S+) rule=(?P<rule>\S+)"
)


def test_access_log_has_one_line_per_request_and_tunnel():
    with (
        RecordingOrigin() as origin,
        SinkThenReplyOrigin() as sink,
        Segproxy(with_access_log=True) as sp,
    ):
        with Conn(sp.port) as c:  # two requests on one connection
            c.send(f"GET {origin.url('/gen/1000')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert c.read_response().body_len == 1000
            c.send(
                f"POST {origin.url('/echo')} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".encode()
            )
            assert c.read_response().body == b"hello"
        with Conn(sp.port) as c:  # a tunnel
            c.send(f"CONNECT {sink.authority} HTTP/1.1\r\n\r\n".encode())
            assert c._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 200")
            c.send(b"x" * 300)
            c.sock.shutdown(socket.SHUT_WR)
            while c._fill():
                pass
            tunnel_down = len(c.buf)
        assert get_via(sp.port, f"http://127.0.0.1:{origin.port}/status/404").status == 404
        with Conn(sp.port) as c:  # refused: not a proxy request
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.read_response().status == 400

        assert wait_for(lambda: len(sp.access_log.read_text().splitlines()) >= 5, timeout=5)
        time.sleep(0.2)
        lines = sp.access_log.read_text().splitlines()
    assert len(lines) == 5, lines
    parsed = [LINE_RE.match(line) for line in lines]
    assert all(parsed), lines
    by = {(m["method"], m["status"]): m for m in parsed}
    get, post, tunnel, nf, bad = (
        by[k]
        for k in [
            ("GET", "200"),
            ("POST", "200"),
            ("CONNECT", "200"),
            ("GET", "404"),
            ("GET", "400"),
        ]
    )
    assert get["target"] == origin.url("/gen/1000") and (get["up"], get["down"]) == ("0", "1000")
    assert (post["up"], post["down"]) == ("5", "5")
    assert get["id"].split(".")[0] == post["id"].split(".")[0] and get["id"] != post["id"]
    assert get["client"] == post["client"]
    assert tunnel["target"] == sink.authority and tunnel["kind"] == "tunnel"
    assert (int(tunnel["up"]), int(tunnel["down"])) == (300, tunnel_down)
    assert nf["kind"] == "forward"
    assert "not a proxy request" in bad.string
    assert all(float(m["ms"]) >= 0 for m in parsed)


def test_segmentedproxy_command_line_runs_unchanged():
    """SegmentedProxy's documented invocation: upper-case --log-level and --access-log as a
    plain flag (the lines then go to stderr); `--access-log -` sends them to stdout."""
    with RecordingOrigin() as origin:
        with Segproxy(["--log-level", "DEBUG", "--access-log"]) as sp:
            assert get_via(sp.port, origin.url("/sp-compat")).status == 200
            assert wait_for(lambda: origin.url("/sp-compat") in sp.output(), timeout=5), sp.output()
            line = next(ln for ln in sp.output().splitlines() if LINE_RE.match(ln))
            assert LINE_RE.match(line)["target"] == origin.url("/sp-compat")
        port = free_port()
        proc = subprocess.Popen(
            MODULE + ["--listen-port", str(port), "--access-log", "-", "--log-level", "Error"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert wait_for(lambda: port_accepts(port), timeout=15)
            assert get_via(port, origin.url("/to-stdout")).status == 200
            time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        lines = [ln for ln in out.splitlines() if LINE_RE.match(ln)]
        assert len(lines) == 1 and origin.url("/to-stdout") in lines[0], (out, err)
        assert "/to-stdout" not in err
    r = run(MODULE + ["--segmentation", "segment_upstream", "--validate-rules"])
    # A bare segment_upstream default, as SegmentedProxy: nothing to segment with.
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(
        "Default policy: mode=segment_upstream strategy=none "
    ), r.stdout
