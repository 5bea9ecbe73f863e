"""The `segproxy` command line. Every flag maps to a `start_proxy_server` option."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from . import _engine
from ._server import ProxyServer, run


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segproxy",
        description="A programmable HTTP/HTTPS forward proxy for traffic experiments.",
    )
    parser.add_argument("--version", action="version", version=f"segproxy {_engine.__version__}")
    listen = parser.add_argument_group("listening")
    listen.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    listen.add_argument("--listen-port", type=port_number, default=8080, help="port to listen on, 0 for any free port (default: 8080)")
    limits = parser.add_argument_group("timeouts and limits")
    limits.add_argument("--connect-timeout", type=positive_float, default=10.0, metavar="SECONDS", help="TCP connect timeout to destinations and upstreams (default: 10)")
    limits.add_argument("--idle-timeout", type=positive_float, default=60.0, metavar="SECONDS", help="close client connections and tunnels idle this long (default: 60)")
    limits.add_argument("--header-timeout", type=positive_float, default=30.0, metavar="SECONDS", help="drop clients that take longer to send a request head (default: 30)")
    limits.add_argument("--response-timeout", type=positive_float, default=60.0, metavar="SECONDS", help="answer 504 when the destination sends no response head in time (default: 60)")
    limits.add_argument("--max-connections", type=positive_int, default=1024, metavar="N", help="most concurrent client connections; more get 503 (default: 1024)")
    output = parser.add_argument_group("logging")
    output.add_argument("--log-level", default="warning", choices=["error", "warning", "info", "debug", "trace", "off"], help="engine log level on stderr (default: warning)")
    output.add_argument("--access-log", metavar="FILE", default=None, help="append one line per request or tunnel to FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the proxy until SIGINT/SIGTERM; exits the process (0, or 1 if it cannot listen)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with usage on a bad flag
    _engine.set_log_level(args.log_level)

    def ready(server: ProxyServer) -> None:
        print(f"segproxy listening on {server.host}:{server.port}", file=sys.stderr, flush=True)

    code = _serve(args, ready)
    # Leave without finalizing the interpreter: an engine thread may still be handing its
    # last result to Python (pyo3-async-runtimes calls loop.call_soon_threadsafe, which
    # drops the GIL inside), and CPython 3.11 kills a thread that wants the GIL back during
    # finalization, crashing the process (SIGSEGV/SIGABRT at exit). The CLI owns the
    # process and has nothing left to clean up once its output is flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(args: argparse.Namespace, ready: Callable[[ProxyServer], None]) -> int:
    try:
        run(
            host=args.listen_host,
            port=args.listen_port,
            on_ready=ready,
            connect_timeout=args.connect_timeout,
            idle_timeout=args.idle_timeout,
            header_timeout=args.header_timeout,
            response_timeout=args.response_timeout,
            max_connections=args.max_connections,
            access_log=args.access_log,
        )
    except OSError as exc:
        print(f"segproxy: {exc}", file=sys.stderr)
        return 1
    return 0
