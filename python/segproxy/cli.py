"""The `segproxy` command line. Its option flags are made from the engine's table of options
(`segproxy.options`); the others (listening, rules and the default policy, the CA, logging)
are its own."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import select
import signal
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from . import _engine
from .options import LIST_KINDS, OPTIONS, OptionInfo
from .rules import STRATEGIES, Rules
from .tls import TLSStore, load_or_create_ca

T = TypeVar("T", int, float)

#: Engine log levels; SegmentedProxy's names (DEBUG, INFO, ...) are accepted in any case.
LOG_LEVELS = ["critical", "error", "warning", "warn", "info", "debug", "trace", "off"]
#: `--access-log` given without a file (SegmentedProxy's form): the lines go to stderr.
STDERR = "<stderr>"
#: Bytes of each body `--har` keeps when `--capture-bodies` does not say.
HAR_BODY_BYTES = 65536


def number(
    kind: type[T],
    low: float,
    high: float | None = None,
    what: str = "",
    above: bool = False,
    subject: str = "",
) -> Callable[[str], T]:
    """An argparse type: a number of `kind` within [low, high] (above `low` when `above`),
    with a message that says so."""

    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not {what or ('a whole number' if kind is int else 'a number')}: {text!r}"
            ) from None
        in_range = low < value if above else low <= value  # false for NaN too
        if not in_range or (high is not None and value > high):
            bound = (
                f"{low:g}..{high:g}"
                if high is not None
                else f"{'greater than' if above else 'at least'} {low:g}"
            )
            raise argparse.ArgumentTypeError(
                f"{subject + ' ' if subject else ''}must be {bound}: {text!r}"
            )
        return value

    return parse


positive_float = number(float, 0, above=True)
positive_int = number(int, 1)
non_negative_float = number(float, 0)
non_negative_int = number(int, 0)
port_number = number(int, 0, 65535, what="a port number", subject="port")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one ``segproxy: error: ...`` line first (for scripts
    that read it), then a one-line usage pointing at ``--help``; exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            2,
            f"{self.prog}: error: {' '.join(message.split())}\nusage: {self.prog} [OPTIONS] (see {self.prog} --help)\n",
        )


#: argparse value types by kind of option (the engine's table says each option's kind).
VALUE_TYPES: dict[str, Callable[[str], Any]] = {
    "seconds": positive_float,
    "seconds_or_zero": non_negative_float,
    "count": non_negative_int,
    "positive_count": positive_int,
    "port": port_number,
    "path": str,
    "ip_address": str,
    "strings": str,
    "paths": str,
    "credentials": str,
}

#: Argument groups, in --help's order, by the topic of the options in them.
GROUPS = {
    "listening": "listening",
    "client authentication": "client authentication",
    "timeouts and limits": "timeouts and limits",
    "rules and segmentation": "rules and segmentation (SegmentedProxy compatible)",
    "DNS and destinations": "DNS and destinations",
    "HTTPS interception": "HTTPS interception",
    "logging": "logging",
    "statistics": "statistics",
}


def option_help(option: OptionInfo) -> str:
    """An option's help on the command line: the table's, then how often and its default."""
    text = option["help"]
    if option["kind"] in LIST_KINDS:
        text += "; repeatable"
    default = option["default"]
    if default is not None and default is not False and default != ():
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        text += f" (default: {shown})"
    return text


def add_option_flag(group: argparse._ArgumentGroup, option: OptionInfo) -> None:
    """The flag of an option, from its row of the engine's table. Its value is None when
    the flag is not given: the engine's default applies (`engine_options`)."""
    flag = option["cli"]
    assert flag is not None
    kind = option["kind"]
    if kind == "bool":
        group.add_argument(
            flag, dest=option["name"], action="store_true", default=None, help=option_help(option)
        )
    elif kind == "choice":
        group.add_argument(
            flag, dest=option["name"], choices=option["choices"], help=option_help(option)
        )
    else:
        group.add_argument(
            flag,
            dest=option["name"],
            type=VALUE_TYPES[kind],
            action="append" if kind in LIST_KINDS else "store",
            metavar=option["metavar"],
            help=option_help(option),
        )


def option_flags() -> list[OptionInfo]:
    """The options whose flags are made from the table (not by hand)."""
    return [o for o in OPTIONS if o["cli"] is not None and not o["cli_by_hand"]]


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the command line gave (a flag not given leaves the engine's default)."""
    return {
        o["name"]: getattr(args, o["name"])
        for o in option_flags()
        if getattr(args, o["name"]) is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="segproxy",
        description="A programmable HTTP/HTTPS forward proxy for traffic experiments.",
    )
    parser.add_argument("--version", action="version", version=f"segproxy {_engine.__version__}")
    groups = {topic: parser.add_argument_group(title) for topic, title in GROUPS.items()}
    listen = groups["listening"]
    listen.add_argument(
        "--listen-host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    listen.add_argument(
        "--listen-port",
        type=port_number,
        default=8080,
        help="port to listen on, 0 for any free port (default: 8080)",
    )
    hooks = parser.add_argument_group("Python hooks")
    which = hooks.add_mutually_exclusive_group()
    which.add_argument(
        "-s",
        "--script",
        metavar="FILE",
        help="a Python file defining the handler class (a subclass of HTTPSProxyHandler or "
        "HTTPSForwardProxyHandler; `handler = Class` names it when the file defines several)",
    )
    which.add_argument(
        "--handler",
        metavar="MODULE:CLASS",
        help="the handler class to import, e.g. mypackage.hooks:AddHeader",
    )
    # Flags that are not options, and options the command line shapes by hand (the table
    # says which, and how).
    seg = groups["rules and segmentation"]
    seg.add_argument(
        "--segment-rule",
        action="append",
        default=[],
        metavar="RULE",
        help="a rule HOST_GLOB=MODE[,key=value...]; repeatable",
    )
    seg.add_argument(
        "--rules-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a file of rules, one a line, # comments; repeatable; read again on SIGHUP",
    )
    seg.add_argument(
        "--segmentation",
        choices=["direct", "segment_upstream"],
        default="direct",
        help="default mode when no rule matches (default: direct)",
    )
    seg.add_argument(
        "--segment-strategy",
        choices=STRATEGIES,
        default=None,
        help="default strategy (default: fixed when a chunk size or delay is given, random with a min or max size, else none)",
    )
    seg.add_argument(
        "--segment-chunk-size",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="default chunk size for the fixed strategy (default: 1024)",
    )
    seg.add_argument(
        "--segment-min-size",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="smallest chunk for the random strategy",
    )
    seg.add_argument(
        "--segment-max-size",
        type=positive_int,
        default=None,
        metavar="BYTES",
        help="largest chunk for the random strategy",
    )
    seg.add_argument(
        "--segment-delay-ms",
        type=non_negative_float,
        default=None,
        metavar="MS",
        help="default pause between chunks in milliseconds (default: 0)",
    )
    seg.add_argument(
        "--segment-direction",
        choices=["up", "down", "both"],
        default="up",
        help="default direction segmented: up = client to destination (default), down, both",
    )
    seg.add_argument(
        "--validate-rules",
        action="store_true",
        help="print the default policy and the numbered rules, then exit (non-zero on any error)",
    )
    tls = groups["HTTPS interception"]
    tls.add_argument(
        "--ca-dir",
        metavar="DIR",
        default=None,
        help="load the CA from DIR (ca-key.pem, ca-cert.pem) or create it there; turns interception on",
    )
    tls.add_argument(
        "--export-ca",
        metavar="FILE",
        default=None,
        help="with --ca-dir: write the CA certificate to FILE and exit",
    )
    tls.add_argument(
        "--print-ca",
        action="store_true",
        help="with --ca-dir: print the CA certificate (PEM) and exit",
    )
    output = groups["logging"]
    output.add_argument(
        "--log-level",
        type=str.lower,
        default="warning",
        choices=LOG_LEVELS,
        help="engine log level on stderr, any case (default: warning)",
    )
    access_log = next(o for o in OPTIONS if o["name"] == "access_log")
    output.add_argument(
        "--access-log",
        metavar="FILE",
        nargs="?",
        const=STDERR,
        default=None,
        help=f"{access_log['help']}; {access_log['cli_note']}",
    )
    output.add_argument(
        "--har",
        metavar="FILE",
        default=None,
        help="at exit, write the flows to FILE as HAR 1.2 (heads, bodies, timings): captures "
        f"every flow, bodies up to --capture-bodies (default here: {HAR_BODY_BYTES}) bytes, "
        "and keeps the last 1000 flows",
    )
    for option in option_flags():
        topic = option["topic"]
        if topic not in groups:
            groups[topic] = parser.add_argument_group(topic)
        add_option_flag(groups[topic], option)
    groups["client authentication"].add_argument(
        "--proxy-auth-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a file of USER:PASS lines (# comments, blank lines ignored) accepted as --proxy-auth; repeatable",
    )
    return parser


def access_log_path(value: str | None) -> str | None:
    """The file the engine appends access lines to: `--access-log` alone means stderr, `-`
    stdout (opened through /dev so the engine writes them like any file)."""
    if value == STDERR:
        return "/dev/stderr"
    if value == "-":
        return "/dev/stdout"
    return value


#: The flags that set the default policy, which only `--segmentation segment_upstream` uses.
DEFAULT_POLICY_FLAGS = (
    ("segment_strategy", "--segment-strategy"),
    ("segment_chunk_size", "--segment-chunk-size"),
    ("segment_min_size", "--segment-min-size"),
    ("segment_max_size", "--segment-max-size"),
    ("segment_delay_ms", "--segment-delay-ms"),
)


def default_policy_warning(args: argparse.Namespace) -> str | None:
    """The warning for default-policy flags given without ``--segmentation
    segment_upstream`` (they have no effect then, as in SegmentedProxy), or for a default
    strategy inferred from sizes (SegmentedProxy, which has no --segment-strategy, does not
    segment then)."""
    if args.segmentation == "segment_upstream":
        sizes = [flag for name, flag in DEFAULT_POLICY_FLAGS[1:] if getattr(args, name) is not None]
        if args.segment_strategy is None and sizes:
            return (
                f"{', '.join(sizes)} without --segment-strategy: the default policy segments "
                "(SegmentedProxy does not segment without a strategy)"
            )
        return None
    given = [flag for name, flag in DEFAULT_POLICY_FLAGS if getattr(args, name) is not None]
    if not given:
        return None
    return (
        f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
        "--segmentation segment_upstream: requests that no rule matches are not segmented"
    )


#: The flags of the default policy's parts, by the word the engine's messages name them with.
POLICY_PART_FLAGS = (
    ("chunk", "--segment-chunk-size"),
    ("min", "--segment-min-size"),
    ("max", "--segment-max-size"),
    ("delay", "--segment-delay-ms"),
)


def build_rules(args: argparse.Namespace) -> Rules:
    """The default policy from the flags, then --rules-file and --segment-rule rules."""
    strategy = args.segment_strategy
    if args.segmentation == "direct":
        strategy = "none"
    elif strategy is None:
        # As in a rule: a chunk size or delay without a strategy means fixed, a min or max
        # size random, and nothing at all no segmentation (SegmentedProxy's default).
        if args.segment_chunk_size is not None or args.segment_delay_ms is not None:
            strategy = "fixed"
        elif args.segment_min_size is not None or args.segment_max_size is not None:
            strategy = "random"
        else:
            strategy = "none"
    if args.segmentation == "direct":  # the default policy flags do nothing (see the warning)
        rules = Rules(direction=args.segment_direction, mode="direct")
    else:
        try:
            rules = Rules(
                strategy=strategy,
                chunk=args.segment_chunk_size or 1024,
                min=args.segment_min_size,
                max=args.segment_max_size,
                delay_ms=args.segment_delay_ms or 0.0,
                direction=args.segment_direction,
                mode=args.segmentation,
            )
        except ValueError as exc:  # the engine's reason, naming the flags it is about
            flags = [f for word, f in POLICY_PART_FLAGS if re.search(rf"\b{word}\b", str(exc))]
            if not flags:
                raise
            named = " and ".join([", ".join(flags[:-1]), flags[-1]] if len(flags) > 1 else flags)
            raise ValueError(f"{exc} ({named})") from None
    # Every file and rule is read, so that one run names every bad line.
    errors: list[str] = []
    for path in args.rules_file:
        try:
            rules.add_file(path)
        except ValueError as exc:
            errors.append(str(exc))
    for index, rule in enumerate(args.segment_rule, start=1):
        try:
            rules.add(rule, source=f"--segment-rule#{index}")
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        raise ValueError("\n".join(errors))
    return rules


def open_file_note() -> str:
    """The open-file limit the connection limit came from (the engine raised it at start)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return ""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f" (open-file limit {soft}; two descriptors a connection)"


def load_handler(args: argparse.Namespace) -> type | None:
    """The handler class named by `-s FILE` or `--handler MODULE:CLASS`, or None. Raises
    ValueError with what is wrong."""
    if args.script is None and args.handler is None:
        return None
    from .handlers import HTTPSProxyHandler

    def is_handler(value: object) -> bool:
        return isinstance(value, type) and issubclass(value, HTTPSProxyHandler)

    if args.handler is not None:
        module_name, sep, class_name = args.handler.partition(":")
        if not sep or not module_name or not class_name:
            raise ValueError(f"--handler needs MODULE:CLASS, got {args.handler!r}")
        import importlib

        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(
                f"--handler {args.handler}: cannot import {module_name}: {exc}"
            ) from exc
        found = getattr(module, class_name, None)
        if not is_handler(found):
            raise ValueError(
                f"--handler {args.handler}: {class_name} in {module_name} is not a handler class "
                "(a subclass of segproxy.HTTPSProxyHandler)"
            )
        return found

    import runpy

    path = args.script
    try:
        namespace = runpy.run_path(path, run_name="__segproxy_script__")
    except OSError as exc:
        raise ValueError(f"-s {path}: {describe_os_error(exc)}") from exc
    except Exception as exc:  # the script's own error: say which
        raise ValueError(f"-s {path}: the script raised {type(exc).__name__}: {exc}") from exc
    named = namespace.get("handler")
    if named is not None:
        if not is_handler(named):
            raise ValueError(f"-s {path}: `handler` is not a handler class")
        return named  # type: ignore[no-any-return]
    defined = [
        v for v in namespace.values() if is_handler(v) and v.__module__ == "__segproxy_script__"
    ]
    if len(defined) != 1:
        names = ", ".join(sorted(v.__name__ for v in defined)) or "none"
        raise ValueError(
            f"-s {path}: the file must define one handler class (a subclass of "
            f"segproxy.HTTPSProxyHandler), or name it with `handler = Class`; found {names}"
        )
    return defined[0]  # type: ignore[no-any-return]


def read_credentials(path: str) -> list[str]:
    """USER:PASS lines of a file; blank lines and # comments skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if ":" not in line or line.startswith(":"):
                raise ValueError(f"line {number} is not USER:PASS")
            out.append(line)
    return out


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (a name is resolved)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # the listen itself will report the name
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def error(message: str) -> None:
    """Each line of `message` as ``segproxy: error: LINE`` on stderr."""
    for line in str(message).splitlines() or [""]:
        print(f"segproxy: error: {line}", file=sys.stderr)


def describe_os_error(exc: BaseException) -> str:
    """One line for an error: an OSError's reason and file name, without Python's
    ``[Errno N]`` prefix."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return " ".join(str(exc).split()) or type(exc).__name__


def warn(message: str) -> None:
    print(f"segproxy: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the proxy until SIGINT/SIGTERM; exits the process (0, or 1 if it cannot listen)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with usage on a bad flag
    if args.dns_server is None:
        for given, flag in ((args.dns_port, "--dns-port"), (args.dns_transport, "--dns-transport")):
            if given is not None:
                parser.error(
                    f"{flag} needs --dns-server (the system resolver has no port or transport to set)"
                )
    credentials = list(args.proxy_auth or [])
    for path in args.proxy_auth_file:
        try:
            credentials += read_credentials(path)
        except (OSError, ValueError) as exc:
            parser.error(f"--proxy-auth-file {path}: {describe_os_error(exc)}")
    for pair in credentials:
        user, sep, _ = pair.partition(":")
        if not sep or not user:
            parser.error(
                f"--proxy-auth needs USER:PASS with a non-empty USER, got {user or '(empty)'!r}{':***' if sep else ''}"
            )
    args.credentials = credentials
    exits_early = args.validate_rules or args.print_ca or args.export_ca
    if (
        not credentials
        and not args.allow_open_proxy
        and not exits_early
        and not is_loopback(args.listen_host)
    ):
        parser.error(
            f"refusing to listen on {args.listen_host} without client authentication (an open relay): "
            "give --proxy-auth USER:PASS, or --allow-open-proxy if the network is trusted"
        )
    _engine.set_log_level(args.log_level)
    _engine.limit_malloc_arenas()  # the CLI owns its process: one arena per engine thread

    try:
        rules = build_rules(args)
    except ValueError as exc:
        error(str(exc))
        return 1
    # Lines SegmentedProxy accepts that do nothing or look wrong: said once, naming the line.
    for note in rules.warnings():
        warn(note)
    policy_warning = default_policy_warning(args)
    if policy_warning:
        warn(policy_warning)
    if args.ca_dir is None:
        for line in rules.describe().splitlines():
            if " intercept=yes " in line:
                source = line.split(" source=", 1)[1].split(" ", 1)[0]
                warn(
                    f"{source}: intercept=yes needs --ca-dir: without a CA the CONNECTs it matches are tunnelled"
                )
    if args.validate_rules:
        print(rules.describe(), end="")
        return 0
    if args.har is not None:
        try:  # a file that cannot be written fails now, not after the run
            with open(args.har, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            error(f"--har {args.har}: {describe_os_error(exc)}")
            return 1

    tls_store: TLSStore | None = None
    if args.ca_dir is not None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tls_store = load_or_create_ca(args.ca_dir)
        except (OSError, ValueError) as exc:
            error(f"--ca-dir {args.ca_dir}: {describe_os_error(exc)}")
            return 1
        for warning in caught:  # a command-line user wants the message, not a source line
            warn(str(warning.message))
    if args.print_ca or args.export_ca:
        if tls_store is None:
            parser.error("--print-ca and --export-ca need --ca-dir")
        if args.export_ca:
            try:
                with open(args.export_ca, "wb") as f:
                    f.write(tls_store.get_ca_pem())
            except OSError as exc:
                error(f"--export-ca {args.export_ca}: {describe_os_error(exc)}")
                return 1
        if args.print_ca:
            sys.stdout.write(tls_store.get_ca_pem().decode())
        return 0

    def ready(engine: _engine.EngineServer) -> None:
        host, port = engine.local_addr()
        print(f"segproxy listening on {host}:{port}", file=sys.stderr, flush=True)
        print(
            f"segproxy: up to {engine.max_connections} connections{open_file_note()}",
            file=sys.stderr,
            flush=True,
        )
        stats = engine.stats_addr()
        if stats is not None:
            shost, sport = stats
            url = f"http://[{shost}]:{sport}" if ":" in shost else f"http://{shost}:{sport}"
            print(f"segproxy: metrics at {url}/metrics", file=sys.stderr, flush=True)
        socks = engine.socks_addr()
        if socks is not None:
            shost, sport = socks
            where = f"[{shost}]:{sport}" if ":" in shost else f"{shost}:{sport}"
            print(f"segproxy: SOCKS5 on {where}", file=sys.stderr, flush=True)

    try:
        handler = load_handler(args)
    except ValueError as exc:
        parser.error(str(exc))
    if handler is None:
        code = _serve(args, rules, tls_store, ready)
    else:
        code = _serve_hooks(args, rules, tls_store, ready, handler)
    # Leave without finalizing the interpreter: an engine thread may still be handing its
    # last result to Python (pyo3-async-runtimes calls loop.call_soon_threadsafe, which
    # drops the GIL inside), and CPython 3.11 kills a thread that wants the GIL back during
    # finalization, crashing the process (SIGSEGV/SIGABRT at exit). The CLI owns the
    # process and has nothing left to clean up once its output is flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(
    args: argparse.Namespace,
    rules: Rules,
    tls_store: TLSStore | None,
    ready: Callable[[_engine.EngineServer], None],
) -> int:
    """Runs the engine until SIGINT/SIGTERM, then lets exchanges in flight finish for
    `--shutdown-timeout`. The command line runs no Python hooks, so no event loop: the main
    thread waits on the engine's stop signal and handles signals in between."""
    try:
        engine = _engine.start_server_blocking(
            args.listen_host,
            args.listen_port,
            rules=rules.engine_rules,
            ca=None if tls_store is None else tls_store.engine_ca,
            **server_options(args),
        )
    except (OSError, ValueError) as exc:
        error(describe_os_error(exc))
        return 1

    def stop(_signum: int, _frame: object) -> None:
        engine.begin_shutdown(engine.shutdown_timeout)

    def reload(_signum: int, _frame: object) -> None:
        reload_rules(args, lambda new: engine.set_rules(new.engine_rules))

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload)
    ready(engine)
    stopped = engine.stopped_fd()
    # The kernel may hand a signal to an engine thread rather than this one; Python then runs
    # the handler here only once this thread wakes. The wake-up socket makes it wake: the
    # C-level handler writes the signal's number to it from whichever thread took it.
    wake, wake_writer = socket.socketpair()
    wake.setblocking(False)
    wake_writer.setblocking(False)
    previous = signal.set_wakeup_fd(wake_writer.fileno(), warn_on_full_buffer=False)
    try:
        while not engine.is_stopped():
            # A signal runs its handler, then select goes on waiting (PEP 475).
            readable, _, _ = select.select([stopped, wake.fileno()], [], [])
            if wake.fileno() in readable:
                with contextlib.suppress(BlockingIOError):
                    wake.recv(64)
    finally:
        signal.set_wakeup_fd(previous)
        wake.close()
        wake_writer.close()
    return write_har(args, engine)


def write_har(args: argparse.Namespace, engine: _engine.EngineServer) -> int:
    """`--har FILE`: the flows of the stopped server as HAR; the exit code."""
    if args.har is None:
        return 0
    from .har import dump

    try:
        entries = dump(engine.flows(False), args.har)
    except OSError as exc:
        error(f"--har {args.har}: {describe_os_error(exc)}")
        return 1
    print(f"segproxy: {entries} HAR entries written to {args.har}", file=sys.stderr, flush=True)
    return 0


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the command line gives every server."""
    har: dict[str, Any] = {}
    if args.har is not None:
        har = {"record_flows": True}
        if args.capture_bodies is None:
            har["capture_bodies"] = HAR_BODY_BYTES
    return {
        **engine_options(args),
        **har,
        "access_log": access_log_path(args.access_log),
        "access_records": 0,  # nobody reads them in a CLI process: keep memory for traffic
        "proxy_auth": args.credentials,
    }


def reload_rules(args: argparse.Namespace, apply: Callable[[Rules], None]) -> None:
    """SIGHUP: the rules built again from --rules-file and the flags, and put in force; a file
    that does not parse leaves the rules as they were. Flows already decided keep theirs."""
    try:
        new = build_rules(args)
        apply(new)
    except (OSError, ValueError) as exc:
        error(f"SIGHUP: rules not reloaded, the old ones stay in force: {describe_os_error(exc)}")
        return
    for note in new.warnings():
        warn(note)
    files = ", ".join(args.rules_file) or "the command line"
    print(f"segproxy: rules reloaded from {files}", file=sys.stderr, flush=True)


def _serve_hooks(
    args: argparse.Namespace,
    rules: Rules,
    tls_store: TLSStore | None,
    ready: Callable[[_engine.EngineServer], None],
    handler: type,
) -> int:
    """As `_serve`, with the user's handler (-s / --handler): its hooks run on an asyncio
    loop in this thread."""
    import asyncio

    from ._server import start_proxy_server

    async def main() -> int:
        server = await start_proxy_server(
            handler,
            args.listen_host,
            args.listen_port,
            tls_store,
            rules=rules,
            **server_options(args),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.close)
        if hasattr(signal, "SIGHUP"):
            loop.add_signal_handler(signal.SIGHUP, reload_rules, args, server.set_rules)
        ready(server._engine)
        await server.serve_forever()
        return write_har(args, server._engine)

    try:
        return asyncio.run(main())
    except (OSError, ValueError) as exc:
        error(describe_os_error(exc))
        return 1
