"""The command line runs Python handlers too: `segproxy -s script.py` loads the handler class
a script defines, `--handler module:Class` imports one; the origin and the client see what
its hooks did. Mistakes in naming the handler print usage and exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from support import Segproxy, wait_for
from support.loopback import TIMEOUT, HttpOrigin, header, proxy_request

pytestmark = pytest.mark.timeout(120)

HANDLER = textwrap.dedent(
    """
    import segproxy


    class Tag(segproxy.HTTPSForwardProxyHandler):
        async def on_request_received(self) -> None:
            if self.request.path == "/private":
                self.write_response(b"HTTP/1.1 403 Forbidden\\r\\nContent-Length: 3\\r\\n\\r\\nno\\n")
                return
            self.request.headers.set("X-Tagged", "by-script")
            await self.forward_http_request()

        async def on_response_received(self) -> None:
            self.response.headers.set("X-Seen-By", "segproxy-script")
    """
)


def check_handler_runs(proxy: Segproxy, origin: HttpOrigin) -> None:
    addr = ("127.0.0.1", proxy.port)
    r = proxy_request(addr, "GET", origin.url("/x"))
    assert r.status == 200 and r.body == b"origin ok /x\n"
    assert header(r.headers, "X-Seen-By") == "segproxy-script"
    (_line, sent) = origin.requests[-1]
    assert header(sent, "X-Tagged") == "by-script"
    r = proxy_request(addr, "GET", origin.url("/private"))
    assert r.status == 403 and r.body == b"no\n"
    assert [line.split()[1] for line, _ in origin.requests] == ["/x"]


def test_script_handler(tmp_path) -> None:
    script = tmp_path / "hooks.py"
    script.write_text(HANDLER)
    with HttpOrigin() as origin, Segproxy(["-s", str(script)]) as proxy:
        check_handler_runs(proxy, origin)


def test_module_handler_and_sighup_with_hooks(tmp_path) -> None:
    (tmp_path / "myhooks.py").write_text(HANDLER)
    rules = tmp_path / "rules.txt"
    rules.write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with (
        HttpOrigin() as origin,
        Segproxy(["--handler", "myhooks:Tag", "--rules-file", str(rules)], env=env) as proxy,
    ):
        check_handler_runs(proxy, origin)
        # The rules swap works on the asyncio side too.
        rules.write_text(f"127.0.0.1=direct,action=block,reason=not now,port={origin.port}\n")
        proxy.process.proc.send_signal(signal.SIGHUP)
        assert wait_for(
            lambda: "rules reloaded" in proxy.process.log_tail(10000), timeout=TIMEOUT
        ), proxy.process.log_tail(50)
        r = proxy_request(("127.0.0.1", proxy.port), "GET", origin.url("/y"))
        assert r.status == 403 and b"not now" in r.body


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--handler", "nocolon"], "--handler needs MODULE:CLASS"),
        (["--handler", "no_such_module_here:X"], "cannot import no_such_module_here"),
        (["--handler", "json:dumps"], "is not a handler class"),
        (["-s", "/nonexistent/hooks.py"], "-s /nonexistent/hooks.py"),
    ],
)
def test_naming_a_handler_wrongly_exits_2(args, message) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "segproxy", "--listen-port", "0", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 2, r
    assert "usage:" in r.stderr and message in r.stderr, r.stderr


def test_a_script_without_one_handler_class_exits_2(tmp_path) -> None:
    script = tmp_path / "two.py"
    script.write_text(
        "import segproxy\n"
        "class A(segproxy.HTTPSProxyHandler): pass\n"
        "class B(segproxy.HTTPSProxyHandler): pass\n"
    )
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('oops')\n")
    for path, message in ((script, "found A, B"), (broken, "the script raised RuntimeError: oops")):
        r = subprocess.run(
            [sys.executable, "-m", "segproxy", "--listen-port", "0", "-s", str(path)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert r.returncode == 2 and message in r.stderr, r.stderr
