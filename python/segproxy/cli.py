"""The `segproxy` command line. Every flag maps to a `start_proxy_server` option."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from . import _engine
from ._server import ProxyServer, run
from .rules import Rules
from .tls import TLSStore, load_or_create_ca

T = TypeVar("T", int, float)

#: Engine log levels; SegmentedProxy's names (DEBUG, INFO, ...) are accepted in any case.
LOG_LEVELS = ["critical", "error", "warning", "warn", "info", "debug", "trace", "off"]
#: `--access-log` given without a file (SegmentedProxy's form): the lines go to stderr.
STDERR = "<stderr>"


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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="segproxy",
        description="A programmable HTTP/HTTPS forward proxy for traffic experiments.",
    )
    parser.add_argument("--version", action="version", version=f"segproxy {_engine.__version__}")
    listen = parser.add_argument_group("listening")
    listen.add_argument(
        "--listen-host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    listen.add_argument(
        "--listen-port",
        type=port_number,
        default=8080,
        help="port to listen on, 0 for any free port (default: 8080)",
    )
    auth = parser.add_argument_group("client authentication")
    auth.add_argument(
        "--proxy-auth",
        action="append",
        default=[],
        metavar="USER:PASS",
        help="require these Basic credentials on Proxy-Authorization (407 otherwise); repeatable",
    )
    auth.add_argument(
        "--proxy-auth-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a file of USER:PASS lines (# comments, blank lines ignored) accepted as --proxy-auth; repeatable",
    )
    auth.add_argument(
        "--allow-open-proxy",
        action="store_true",
        help="listen on an address other than loopback without --proxy-auth (anyone who reaches it can relay through it)",
    )
    limits = parser.add_argument_group("timeouts and limits")
    limits.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="TCP connect timeout to destinations and upstreams (default: 10)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="close client connections and tunnels idle this long (default: 60)",
    )
    limits.add_argument(
        "--header-timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="drop clients that take longer to send a request head (default: 30)",
    )
    limits.add_argument(
        "--response-timeout",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="answer 504 when the destination sends no response head in time (default: 60)",
    )
    limits.add_argument(
        "--shutdown-timeout",
        type=non_negative_float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl-C, seconds that exchanges in flight get to finish before they are cut (default: 5)",
    )
    limits.add_argument(
        "--max-connections",
        type=positive_int,
        default=None,
        metavar="N",
        help="most concurrent client connections; more get 503 (default: from the open-file limit, "
        "raised to its hard limit: two descriptors a connection plus headroom)",
    )
    seg = parser.add_argument_group("rules and segmentation (SegmentedProxy compatible)")
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
        help="a file of rules, one a line, # comments; repeatable",
    )
    seg.add_argument(
        "--segmentation",
        choices=["direct", "segment_upstream"],
        default="direct",
        help="default mode when no rule matches (default: direct)",
    )
    seg.add_argument(
        "--segment-strategy",
        choices=["none", "fixed", "random"],
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
    seg.add_argument(
        "--record-flows",
        metavar="FILE",
        default=None,
        help="write one JSON line per flow with its decision and per-chunk sizes and times",
    )
    net = parser.add_argument_group("DNS and destinations")
    net.add_argument(
        "--dns-server",
        metavar="IP",
        default=None,
        help="resolve with this DNS server instead of the system resolver",
    )
    net.add_argument(
        "--dns-port", type=port_number, default=None, help="port of --dns-server (default: 53)"
    )
    net.add_argument(
        "--dns-transport",
        choices=["udp", "tcp"],
        default=None,
        help="with --dns-server: udp (falls back to tcp) or tcp (default: udp)",
    )
    net.add_argument(
        "--dns-cache-size",
        type=non_negative_int,
        default=1024,
        metavar="N",
        help="TTL-respecting cache entries, 0 turns it off (default: 1024)",
    )
    net.add_argument(
        "--allow-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="only these destinations (.example.com includes subdomains); repeatable",
    )
    net.add_argument(
        "--deny-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="refuse these destinations with 403; repeatable",
    )
    net.add_argument(
        "--deny-private",
        action="store_true",
        help="refuse destinations resolving to private, loopback, link-local or reserved addresses",
    )
    tls = parser.add_argument_group("HTTPS interception")
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
    tls.add_argument(
        "--upstream-ca",
        action="append",
        default=[],
        metavar="FILE",
        help="also trust the CAs in FILE when verifying origins; repeatable",
    )
    tls.add_argument(
        "--upstream-insecure",
        action="store_true",
        help="do not verify origin certificates of intercepted flows",
    )
    output = parser.add_argument_group("logging")
    output.add_argument(
        "--log-level",
        type=str.lower,
        default="warning",
        choices=LOG_LEVELS,
        help="engine log level on stderr, any case (default: warning)",
    )
    output.add_argument(
        "--access-log",
        metavar="FILE",
        nargs="?",
        const=STDERR,
        default=None,
        help="one line per request or tunnel (SegmentedProxy's ACCESS rid=... line), appended to FILE; with no FILE to stderr (as SegmentedProxy's flag), - for stdout",
    )
    output.add_argument(
        "--access-log-format",
        choices=["text", "json"],
        default="text",
        help="text: SegmentedProxy's ACCESS line, our fields after its fields (default); json: one JSON object a line with the fields of server.access_records()",
    )
    stats = parser.add_argument_group("statistics")
    stats.add_argument(
        "--stats-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="serve counters (connections, tunnels, requests, bytes, errors by outcome) at "
        "http://LISTEN-HOST:PORT/metrics in Prometheus text format; 0 for any free port",
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
    if strategy == "random" and (args.segment_min_size is None or args.segment_max_size is None):
        # SegmentedProxy's reason, naming our flags.
        raise ValueError(
            "random strategy requires both min and max (--segment-min-size and --segment-max-size)"
        )
    if args.segmentation == "direct":  # the default policy flags do nothing (see the warning)
        rules = Rules(direction=args.segment_direction, mode="direct")
    else:
        rules = Rules(
            strategy=strategy,
            chunk=args.segment_chunk_size or 1024,
            min=args.segment_min_size,
            max=args.segment_max_size,
            delay_ms=args.segment_delay_ms or 0.0,
            direction=args.segment_direction,
            mode=args.segmentation,
        )
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
    credentials = list(args.proxy_auth)
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
    _engine.limit_malloc_arenas(1)  # the CLI owns its process: keep memory per thread low

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

    def ready(server: ProxyServer) -> None:
        print(f"segproxy listening on {server.host}:{server.port}", file=sys.stderr, flush=True)
        print(
            f"segproxy: up to {server.max_connections} connections{open_file_note()}",
            file=sys.stderr,
            flush=True,
        )
        if server.metrics_url is not None:
            print(f"segproxy: metrics at {server.metrics_url}", file=sys.stderr, flush=True)

    code = _serve(args, rules, tls_store, ready)
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
    ready: Callable[[ProxyServer], None],
) -> int:
    try:
        run(
            host=args.listen_host,
            port=args.listen_port,
            tls_store=tls_store,
            on_ready=ready,
            connect_timeout=args.connect_timeout,
            idle_timeout=args.idle_timeout,
            header_timeout=args.header_timeout,
            response_timeout=args.response_timeout,
            max_connections=args.max_connections,
            shutdown_timeout=args.shutdown_timeout,
            access_log=access_log_path(args.access_log),
            access_log_format=args.access_log_format,
            access_records=0,  # nobody reads them in a CLI process: keep memory for traffic
            rules=rules,
            dns_server=args.dns_server,
            dns_port=args.dns_port or 53,
            dns_transport=args.dns_transport or "udp",
            dns_cache_size=args.dns_cache_size,
            allow_domains=args.allow_domain,
            deny_domains=args.deny_domain,
            deny_private=args.deny_private,
            upstream_ca=args.upstream_ca,
            upstream_insecure=args.upstream_insecure,
            flows_file=args.record_flows,
            proxy_auth=args.credentials,
            allow_open_proxy=args.allow_open_proxy,
            stats_port=args.stats_port,
        )
    except (OSError, ValueError) as exc:
        error(describe_os_error(exc))
        return 1
    return 0
