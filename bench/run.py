#!/usr/bin/env python3
"""segproxy proxy-path benchmark, loopback only.

Contenders: ``direct`` (no proxy), ``segproxy`` (``python -m segproxy``) and
``squid`` (Debian squid, no cache); optionally ``baseline``, an earlier build of
segproxy given by ``--baseline-cmd`` (installed in its own venv), so a change is
measured against the code before it in the same run. Contenders alternate round by round (the
order rotates every round) and every number reported is the median over the
rounds. Sections (each a function in SECTIONS, so new ones — interception,
hooks, rules — slot in the same way):

  tunnel     CONNECT tunnel bulk throughput, each way, + proxy CPU per GiB
             and peak RSS
  keepalive  wrk, keep-alive 1 KiB GETs from nginx: req/s, p99 latency,
             proxy CPU µs per request, proxy peak RSS; also ``floor``
             (bench/floor_relay.c: a relay that pairs each client with its own
             origin connection and parses nothing, the least CPU per request
             any proxy can cost on the machine; off with --no-floor)
  intercept  HTTPS interception: minting time, new-connection handshake rate,
             intercepted keep-alive GETs (segproxy, mitmproxy, proxy.py, each with
             its own CA that the client trusts) next to direct HTTPS and segproxy's
             plain HTTP forwarding, same client (bench/tlsload.py), CPU µs/request
  rules      segproxy only: tunnel throughput with no rules, with a
             ``*=segment_upstream,strategy=none`` rule (target: within 5 % of
             no rules) and with fixed 1 KiB chunks, no delay (both ways)
  decide     rule decision time with 1,000 rules: Python ``Rules.decide`` and
             the engine alone (``cargo test --release ... decide_timing``);
             target under 10 µs per decision

    python bench/run.py                 # full run (1 GiB transfers, 5 rounds)
    python bench/run.py --quick         # smoke run, seconds
    python bench/run.py --json out.json --rounds 7
    python bench/run.py --sections tunnel --contenders direct,segproxy,baseline \
        --baseline-cmd /tmp/before/bin/segproxy     # before/after in one run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import bulk  # noqa: E402
from support import (  # noqa: E402
    LOOPBACK,
    ManagedProcess,
    MissingBinary,
    NginxOrigin,
    Segproxy,
    Squid,
    find_binary,
    free_port,
    port_accepts,
)

MIB = 1 << 20
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# results


@dataclass
class Metric:
    """One row of the report: a value per contender per round."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    rounds: dict[str, list[float]] = field(default_factory=dict)
    table: str = "main"

    def add(self, contender: str, value: float) -> None:
        self.rounds.setdefault(contender, []).append(value)

    def median(self, contender: str) -> float | None:
        vals = self.rounds.get(contender)
        return statistics.median(vals) if vals else None


@dataclass
class Bench:
    args: argparse.Namespace
    contenders: list[str]
    skipped: dict[str, str]
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # more markdown, printed after the table

    def metric(
        self, key: str, label: str, unit: str, higher_is_better: bool, table: str = "main"
    ) -> Metric:
        if key not in self.metrics:
            self.metrics[key] = Metric(key, label, unit, higher_is_better, table=table)
        return self.metrics[key]

    def order(self, round_no: int, names: list[str]) -> list[str]:
        """Contenders in this round's order (rotated each round)."""
        k = round_no % len(names)
        return names[k:] + names[:k]

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# process accounting


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


# --------------------------------------------------------------------------
# contenders


def start_proxy(bench: Bench, name: str):
    """A started proxy service for ``name`` (a context manager), or None for direct."""
    if name == "direct":
        return None
    if name == "squid":
        return Squid().__enter__()
    if name in ("segproxy", "baseline"):
        cmd = bench.args.segproxy_cmd if name == "segproxy" else bench.args.baseline_cmd
        return Segproxy(bench.args.segproxy_arg, command=shlex.split(cmd)).__enter__()
    raise ValueError(name)


class Proxies:
    """Fresh proxy processes for one section (so peak RSS is per section)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.procs: dict[str, object] = {}

    def __enter__(self) -> Proxies:
        try:
            for name in self.bench.contenders:
                self.procs[name] = start_proxy(self.bench, name)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs.values():
            if p is not None:
                p.stop()

    def addr(self, name: str) -> tuple[str, int] | None:
        p = self.procs[name]
        return None if p is None else (LOOPBACK, p.port)

    def pid(self, name: str) -> int | None:
        p = self.procs[name]
        return None if p is None else p.pid


# --------------------------------------------------------------------------
# section: CONNECT tunnel bulk throughput


def section_tunnel(bench: Bench) -> None:
    a = bench.args
    nbytes = a.bulk_bytes
    bench.log(f"[tunnel] {nbytes / MIB:.0f} MiB each way, {a.rounds} rounds")
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="segproxy-bench-bulk-"))
    server = ManagedProcess(
        "bulk-server",
        [sys.executable, str(HERE / "bulk.py"), "serve", "--port", str(port)],
        workdir=tmp,
    )
    up = bench.metric("tunnel_up", "CONNECT tunnel upload", "MiB/s", True)
    down = bench.metric("tunnel_down", "CONNECT tunnel download", "MiB/s", True)
    cpu = bench.metric("tunnel_cpu", "tunnel proxy CPU", "s/GiB", False)
    rss = bench.metric("tunnel_rss", "peak RSS after tunnels", "MiB", False)
    try:
        with server, Proxies(bench) as proxies:
            server.wait_ready(lambda: port_accepts(port), what="listening")
            target = (LOOPBACK, port)
            # warm-up: one small transfer each way per contender
            for name in bench.contenders:
                for d in ("up", "down"):
                    bulk.transfer(d, 8 * MIB, target, proxies.addr(name))
            for r in range(a.rounds):
                for name in bench.order(r, bench.contenders):
                    pid = proxies.pid(name)
                    c0 = cpu_seconds(pid) if pid else 0.0
                    t_up = bulk.transfer("up", nbytes, target, proxies.addr(name))
                    t_down = bulk.transfer("down", nbytes, target, proxies.addr(name))
                    up.add(name, nbytes / MIB / t_up)
                    down.add(name, nbytes / MIB / t_down)
                    if pid:
                        cpu.add(name, (cpu_seconds(pid) - c0) / (2 * nbytes / GIB))
                    bench.log(
                        f"  round {r + 1} {name:9s} up {nbytes / MIB / t_up:8.0f} MiB/s"
                        f"  down {nbytes / MIB / t_down:8.0f} MiB/s"
                    )
            for name in bench.contenders:
                pid = proxies.pid(name)
                if pid:
                    rss.add(name, peak_rss_mib(pid))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# section: keep-alive small requests with wrk

WRK_LUA = r"""
-- Generated by bench/run.py. TARGET is the request-target: origin-form for
-- direct, absolute-form for a proxy.
local target = "{target}"
local host = "{host}"
local req = wrk.format("GET", target, {{ ["Host"] = host }})
request = function() return req end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d," ..
    "\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p99_us\":%d}}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(bench: Bench, url: str, target: str, host: str, duration: float, workdir: Path) -> dict:
    a = bench.args
    script = workdir / "bench.lua"
    script.write_text(WRK_LUA.format(target=target, host=host))
    cmd = [
        find_binary("wrk"),
        f"-t{a.wrk_threads}",
        f"-c{a.wrk_connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON ") :])
    raise RuntimeError(f"wrk gave no summary (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


def floor_relay(workdir: Path, origin_port: int) -> tuple[ManagedProcess, int]:
    """bench/floor_relay.c compiled into ``workdir``, as a process (not started) that
    will listen on the returned port in front of the origin, with one event loop per
    CPU as segproxy has one lane per CPU."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise MissingBinary("a C compiler (cc) for bench/floor_relay.c")
    binary = workdir / "floor_relay"
    subprocess.run(
        [cc, "-O2", "-pthread", "-o", str(binary), str(HERE / "floor_relay.c")],
        check=True,
        capture_output=True,
    )
    port = free_port()
    relay = ManagedProcess(
        "floor",
        [str(binary), str(port), str(origin_port), str(os.cpu_count() or 1)],
        workdir=workdir,
    )
    return relay, port


def section_keepalive(bench: Bench) -> None:
    a = bench.args
    bench.log(
        f"[keepalive] wrk -t{a.wrk_threads} -c{a.wrk_connections} -d{a.wrk_duration}s, "
        f"1 KiB from nginx, {a.rounds} rounds"
    )
    rate = bench.metric("ka_rate", "keep-alive 1 KiB GET", "req/s", True)
    p99 = bench.metric("ka_p99", "keep-alive p99 latency", "ms", False)
    cpu = bench.metric("ka_cpu", "proxy CPU per request", "µs/req", False)
    rss = bench.metric("ka_rss", "peak RSS under keep-alive load", "MiB", False)
    tmp = Path(tempfile.mkdtemp(prefix="segproxy-bench-wrk-"))
    try:
        with (
            NginxOrigin(large_size=MIB, worker_processes=a.nginx_workers) as origin,
            Proxies(bench) as proxies,
            contextlib.ExitStack() as stack,
        ):
            origin_hostport = f"{LOOPBACK}:{origin.http_port}"
            names = list(bench.contenders)
            floor: ManagedProcess | None = None
            floor_port = 0
            if a.floor:
                try:
                    relay, floor_port = floor_relay(tmp, origin.http_port)
                except MissingBinary as e:
                    bench.notes.append(f"keepalive floor not measured: {e}")
                else:
                    floor = stack.enter_context(relay)
                    floor.wait_ready(lambda: port_accepts(floor_port), what="listening")
                    names.append("floor")

            def one(name: str, duration: float) -> tuple[dict, float | None]:
                if name == "floor":
                    assert floor is not None
                    addr: tuple[str, int] | None = (LOOPBACK, floor_port)
                    pid: int | None = floor.pid
                else:
                    addr, pid = proxies.addr(name), proxies.pid(name)
                if addr is None:
                    url, target = origin.url("/1k.bin"), "/1k.bin"
                else:
                    url = f"http://{addr[0]}:{addr[1]}/"
                    target = f"http://{origin_hostport}/1k.bin"
                c0 = cpu_seconds(pid) if pid else 0.0
                res = run_wrk(bench, url, target, origin_hostport, duration, tmp)
                used = (cpu_seconds(pid) - c0) if pid else None
                return res, used

            for name in names:  # warm-up
                one(name, 1)
            for r in range(a.rounds):
                for name in bench.order(r, names):
                    res, used = one(name, a.wrk_duration)
                    n = res["requests"]
                    secs = res["duration_us"] / 1e6
                    errors = (
                        res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"]
                    )
                    if n == 0 or errors > 0.01 * n:
                        bench.notes.append(
                            f"keepalive {name} round {r + 1}: {errors} errors in {n} requests"
                        )
                    rate.add(name, n / secs)
                    p99.add(name, res["p99_us"] / 1000)
                    if used is not None and n:
                        cpu.add(name, used * 1e6 / n)
                    bench.log(
                        f"  round {r + 1} {name:9s} {n / secs:9.0f} req/s  p99 {res['p99_us'] / 1000:6.2f} ms"
                        f"  errors {errors}"
                    )
            for name in bench.contenders:
                pid = proxies.pid(name)
                if pid:
                    rss.add(name, peak_rss_mib(pid))
            if floor is not None:
                rss.add("floor", peak_rss_mib(floor.pid))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# section: HTTPS interception (minting, handshakes, intercepted keep-alive)

IC_CONTENDERS = [
    "direct-https",
    "segproxy",
    "baseline",
    "mitmproxy",
    "proxy.py",
    "segproxy-http",
    "direct-http",
]


def cpu_seconds_group(pgid: int) -> float:
    """utime + stime of every process in process group ``pgid`` (a ManagedProcess's children
    run in a session of their own, so this covers proxy.py's worker processes too)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


class InterceptingProxy:
    """One intercepting contender: started with its own CA, which `ca_file` names for clients."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        port: int,
        ca_file: Path,
        ready_file: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.port, self.ca_file = name, port, ca_file
        self.ready_file = ready_file
        self.process = ManagedProcess(name, argv, workdir=workdir, env=env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> InterceptingProxy:
        self.process.start()
        self.process.wait_ready(
            lambda: (
                port_accepts(self.port) and (self.ready_file is None or self.ready_file.exists())
            ),
            timeout=60,
            what="listening",
        )
        return self

    def stop(self) -> None:
        self.process.stop()


def start_interceptors(bench: Bench, origin: NginxOrigin, tmp: Path) -> dict[str, object]:
    """segproxy (its CLI with --ca-dir; also the baseline build if asked), mitmproxy
    (mitmdump) and proxy.py, each intercepting with its own CA and trusting the origin's test
    CA. Missing ones are noted and skipped."""
    a = bench.args
    out: dict[str, object] = {}
    origin_ca = str(origin.cert_path)
    for name, cmd in (("segproxy", a.segproxy_cmd), ("baseline", a.baseline_cmd)):
        if name in bench.contenders:
            ca_dir = tmp / f"{name}-ca"
            sp = Segproxy(
                ["--ca-dir", str(ca_dir), "--upstream-ca", origin_ca, *a.segproxy_arg],
                command=shlex.split(cmd),
            )
            sp.__enter__()
            sp.ca_file = ca_dir / "ca-cert.pem"
            out[name] = sp
    mitm = shutil.which(a.mitmdump_cmd) if a.mitmdump_cmd else None
    if mitm:
        conf = tmp / "mitm"
        port = free_port()
        out["mitmproxy"] = InterceptingProxy(
            "mitmproxy",
            [
                mitm,
                "-q",
                "--listen-host",
                LOOPBACK,
                "--listen-port",
                str(port),
                "--set",
                f"confdir={conf}",
                "--set",
                f"ssl_verify_upstream_trusted_ca={origin_ca}",
            ],
            tmp,
            port,
            conf / "mitmproxy-ca-cert.pem",
            ready_file=conf / "mitmproxy-ca-cert.pem",
        ).start()
    else:
        bench.notes.append(
            f"mitmproxy not measured: `{a.mitmdump_cmd}` not found (pip install mitmproxy; --mitmdump-cmd)"
        )
    proxypy = shutil.which(a.proxypy_cmd) if a.proxypy_cmd else None
    if proxypy:
        d = tmp / "proxypy"
        (d / "certs").mkdir(parents=True)
        ca_key, ca_cert, sign_key = d / "ca-key.pem", d / "ca-cert.pem", d / "ca-signing-key.pem"
        openssl = find_binary("openssl")
        subprocess.run(
            [openssl, "genrsa", "-out", str(ca_key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            [
                openssl,
                "req",
                "-new",
                "-x509",
                "-days",
                "30",
                "-key",
                str(ca_key),
                "-out",
                str(ca_cert),
                "-subj",
                "/CN=proxy.py bench CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [openssl, "genrsa", "-out", str(sign_key), "2048"], check=True, capture_output=True
        )
        port = free_port()
        out["proxy.py"] = InterceptingProxy(
            "proxy.py",
            [
                proxypy,
                "--hostname",
                LOOPBACK,
                "--port",
                str(port),
                "--log-level",
                "WARNING",
                "--ca-key-file",
                str(ca_key),
                "--ca-cert-file",
                str(ca_cert),
                "--ca-signing-key-file",
                str(sign_key),
                "--ca-cert-dir",
                str(d / "certs"),
                "--ca-file",
                origin_ca,
            ],
            tmp,
            port,
            ca_cert,
        ).start()
    else:
        bench.notes.append(
            f"proxy.py not measured: `{a.proxypy_cmd}` not found (pip install proxy.py; --proxypy-cmd)"
        )
    return out


def section_intercept(bench: Bench) -> None:
    import tlsload

    a = bench.args
    duration = a.wrk_duration
    conns = a.wrk_connections
    bench.log(
        f"[intercept] {conns} keep-alive connections, {duration:g} s runs, {a.rounds} rounds, "
        f"load client: bench/tlsload.py ({os.cpu_count()} processes)"
    )
    T = "intercept"
    mint = bench.metric("ic_mint", "mint a certificate for a new host", "ms", False, T)
    cached = bench.metric("ic_cached", "certificate lookup, cached host", "µs", False, T)
    hs = bench.metric(
        "ic_handshake",
        "new TLS connections (CONNECT + full handshake), cached host",
        "conn/s",
        True,
        T,
    )
    rate = bench.metric("ic_rate", "keep-alive 1 KiB GET over HTTPS", "req/s", True, T)
    p99 = bench.metric("ic_p99", "keep-alive p99 latency", "ms", False, T)
    cpu = bench.metric("ic_cpu", "proxy CPU per request", "µs/req", False, T)

    # Minting, in this process (the engine's CA; no network).
    try:
        import segproxy
        from segproxy import _engine

        ca = segproxy.TLSStore().engine_ca
        _engine.time_minting(ca, 20)  # warm-up
        for _ in range(a.rounds):
            m, c = _engine.time_minting(ca, 200)
            mint.add("segproxy", m * 1e3)
            cached.add("segproxy", c * 1e6)
    except ImportError as e:
        bench.notes.append(f"minting not measured: cannot import segproxy ({e})")

    tmp = Path(tempfile.mkdtemp(prefix="segproxy-bench-intercept-"))
    procs: dict[str, object] = {}
    try:
        with NginxOrigin(large_size=MIB, worker_processes=a.nginx_workers) as origin:
            procs = start_interceptors(bench, origin, tmp)
            origin_ca = str(origin.cert_path)

            def target(name: str) -> tlsload.Target | None:
                if name == "direct-https":
                    return tlsload.Target(
                        "localhost", origin.https_port, "/1k.bin", True, cafile=origin_ca
                    )
                if name == "direct-http":
                    return tlsload.Target(LOOPBACK, origin.http_port, "/1k.bin", False)
                if name == "segproxy-http":
                    p = procs.get("segproxy")
                    return (
                        None
                        if p is None
                        else tlsload.Target(
                            LOOPBACK, origin.http_port, "/1k.bin", False, proxy=(LOOPBACK, p.port)
                        )
                    )
                p = procs.get(name)
                if p is None:
                    return None
                return tlsload.Target(
                    "localhost",
                    origin.https_port,
                    "/1k.bin",
                    True,
                    cafile=str(p.ca_file),
                    proxy=(LOOPBACK, p.port),
                )

            def pid_of(name: str) -> int | None:
                p = procs.get("segproxy" if name == "segproxy-http" else name)
                return None if p is None else p.pid

            names = []
            for name in IC_CONTENDERS:  # warm-up: certificates minted, connections and caches warm
                if target(name) is None:
                    continue
                # A contender that fails its warm-up is left out with a note, not the section.
                try:
                    tlsload.keepalive(target(name), conns, 1.0)
                except RuntimeError as e:
                    bench.notes.append(f"intercept {name} not measured: warm-up failed ({e})")
                    continue
                names.append(name)
            tls_names = [n for n in names if target(n).tls]
            for r in range(a.rounds):
                for name in bench.order(r, names):
                    pid = pid_of(name)
                    c0 = cpu_seconds_group(pid) if pid else 0.0
                    res = tlsload.keepalive(target(name), conns, duration)
                    used = cpu_seconds_group(pid) - c0 if pid else None
                    n = res["requests"]
                    if n == 0 or res["errors"] > 0.01 * n:
                        bench.notes.append(
                            f"intercept {name} round {r + 1}: {res['errors']} errors in {n} requests"
                        )
                    rate.add(name, res["rate"])
                    p99.add(name, res["p99"] * 1e3)
                    if used is not None and n:
                        cpu.add(name, used * 1e6 / n)
                    bench.log(
                        f"  round {r + 1} {name:13s} {res['rate']:9.0f} req/s  p99 {res['p99'] * 1e3:6.2f} ms"
                        + (f"  cpu {used * 1e6 / n:6.1f} µs/req" if used is not None and n else "")
                    )
                for name in bench.order(r, tls_names):
                    res = tlsload.handshakes(target(name), 16, max(1.0, duration / 2))
                    if res["errors"]:
                        bench.notes.append(
                            f"handshakes {name} round {r + 1}: {res['errors']} errors "
                            f"(first: {res['first_error']})"
                        )
                    hs.add(name, res["rate"])
                    bench.log(f"  round {r + 1} {name:13s} {res['rate']:9.0f} handshakes/s")
    finally:
        for p in procs.values():
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# section: rules and segmentation cost on the tunnel path (segproxy variants)

RULE_VARIANTS: list[tuple[str, str, list[str]]] = [
    # (name, description, extra segproxy arguments)
    ("norules", "no rules", []),
    (
        "none",
        "rule `*=segment_upstream,strategy=none`",
        ["--segment-rule", "*=segment_upstream,strategy=none"],
    ),
    (
        "fixed1k",
        "rule fixed 1 KiB chunks, no delay, direction=both",
        ["--segment-rule", "*=segment_upstream,strategy=fixed,chunk=1024,delay=0,direction=both"],
    ),
]


def section_rules(bench: Bench) -> None:
    """Tunnel throughput of three segproxy processes that differ only in their rules."""
    a = bench.args
    if "segproxy" not in bench.contenders:
        bench.notes.append("section rules skipped: segproxy is not a contender")
        return
    nbytes = a.bulk_bytes
    bench.log(
        f"[rules] segproxy tunnel, {nbytes / MIB:.0f} MiB each way, {a.rounds} rounds, variants "
        + ", ".join(v[0] for v in RULE_VARIANTS)
    )
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="segproxy-bench-rules-"))
    server = ManagedProcess(
        "bulk-server",
        [sys.executable, str(HERE / "bulk.py"), "serve", "--port", str(port)],
        workdir=tmp,
    )
    up = {
        n: bench.metric(f"rules_{n}_up", f"tunnel upload, {d}", "MiB/s", True)
        for n, d, _ in RULE_VARIANTS
    }
    down = {
        n: bench.metric(f"rules_{n}_down", f"tunnel download, {d}", "MiB/s", True)
        for n, d, _ in RULE_VARIANTS
    }
    cpu = {
        n: bench.metric(f"rules_{n}_cpu", f"tunnel proxy CPU, {d}", "s/GiB", False)
        for n, d, _ in RULE_VARIANTS
    }
    procs: dict[str, Segproxy] = {}
    try:
        with server:
            for name, _, extra in RULE_VARIANTS:
                procs[name] = Segproxy(
                    [*bench.args.segproxy_arg, *extra], command=shlex.split(bench.args.segproxy_cmd)
                ).__enter__()
            server.wait_ready(lambda: port_accepts(port), what="listening")
            target = (LOOPBACK, port)
            names = [v[0] for v in RULE_VARIANTS]
            for name in names:  # warm-up
                for d in ("up", "down"):
                    bulk.transfer(d, 8 * MIB, target, (LOOPBACK, procs[name].port))
            for r in range(a.rounds):
                for name in bench.order(r, names):
                    proxy = (LOOPBACK, procs[name].port)
                    pid = procs[name].pid
                    c0 = cpu_seconds(pid)
                    t_up = bulk.transfer("up", nbytes, target, proxy)
                    t_down = bulk.transfer("down", nbytes, target, proxy)
                    up[name].add("segproxy", nbytes / MIB / t_up)
                    down[name].add("segproxy", nbytes / MIB / t_down)
                    cpu[name].add("segproxy", (cpu_seconds(pid) - c0) / (2 * nbytes / GIB))
                    bench.log(
                        f"  round {r + 1} {name:8s} up {nbytes / MIB / t_up:8.0f} MiB/s"
                        f"  down {nbytes / MIB / t_down:8.0f} MiB/s"
                    )
    finally:
        for p in procs.values():
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    base_up, base_down = up["norules"].median("segproxy"), down["norules"].median("segproxy")
    rows = [
        "| segproxy tunnel | upload MiB/s | download MiB/s | CPU s/GiB | upload vs no rules | download vs no rules |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, desc, _ in RULE_VARIANTS:
        u, d, c = (
            up[name].median("segproxy"),
            down[name].median("segproxy"),
            cpu[name].median("segproxy"),
        )
        rows.append(
            f"| {desc} | {fmt(u)} | {fmt(d)} | {fmt(c)} | {ratio(u, base_up)} | {ratio(d, base_down)} |"
        )
    bench.extra.append("\n".join(rows))

    def paired(metric: dict[str, Metric], name: str) -> float | None:
        # Variants run back to back within a round: the median of per-round ratios cancels
        # most of the machine's drift between rounds. (CPU can read 0 on tiny runs.)
        a_vals, b_vals = (
            metric[name].rounds.get("segproxy", []),
            metric["norules"].rounds.get("segproxy", []),
        )
        ratios = [x / y for x, y in zip(a_vals, b_vals, strict=False) if y > 0]
        return statistics.median(ratios) if ratios else None

    def show(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}×"

    u_ratio, d_ratio, c_ratio = paired(up, "none"), paired(down, "none"), paired(cpu, "none")
    verdict = (
        "meets"
        if u_ratio is not None and d_ratio is not None and min(u_ratio, d_ratio) >= 0.95
        else "MISSES"
    )
    bench.extra.append(
        f"strategy=none rule vs no rules (median of per-round ratios): upload {show(u_ratio)}, download "
        f"{show(d_ratio)} — {verdict} the target (within 5 %); proxy CPU per GiB {show(c_ratio)} "
        f"(load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)."
    )


# --------------------------------------------------------------------------
# section: rule decision time with 1,000 rules


def thousand_rules_text(count: int = 1000) -> tuple[str, list[str]]:
    """The same rule mix and hosts as the engine's ``bench_decide`` (src/engine/rules.rs):
    60 % exact hosts with a fixed policy, 30 % ``*.suffix`` with a method condition, 10 %
    other globs that block, then ``*``; hosts cycle through exact, suffix, glob and no match."""
    lines = []
    for i in range(count):
        k = i % 10
        if k <= 5:
            lines.append(f"host{i}.example.com=segment_upstream,chunk={100 + i},delay=1")
        elif k <= 8:
            lines.append(f"*.zone{i}.example.net=direct,method=GET")
        else:
            lines.append(f"api{i}-*.example.org=direct,action=block,reason=r{i}")
    lines.append("*=direct")
    hosts = []
    for i in range(max(count, 1)):
        hosts.append(
            [
                f"host{i}.example.com",
                f"a.b.zone{i // 10 * 10 + 6}.example.net",
                f"api{i // 10 * 10 + 9}-x.example.org",
                f"nomatch{i}.test",
            ][i % 4]
        )
    return "\n".join(lines) + "\n", hosts


CARGO_DECIDE_RE = r"decide\(\) with 1,000 rules: ([0-9.]+)(ns|µs|us|ms|s) per call"


def engine_decide_us(bench: Bench) -> float | None:
    """Runs the engine's own timing test (release build); µs per decision, or None."""
    import re

    cargo = shutil.which("cargo")
    if cargo is None:
        bench.notes.append("engine decide timing skipped: cargo not found")
        return None
    cmd = [
        cargo,
        "test",
        "--release",
        "--no-default-features",
        "--lib",
        "--",
        "--ignored",
        "--nocapture",
        "decide_timing",
    ]
    bench.log(f"  running {' '.join(cmd)} (compiles the test binary the first time)")
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        bench.notes.append("engine decide timing: cargo test timed out")
        return None
    m = re.search(CARGO_DECIDE_RE, out.stdout + out.stderr)
    if out.returncode != 0 or m is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        bench.notes.append(
            f"engine decide timing failed (exit {out.returncode}): {' / '.join(tail)}"
        )
        return None
    value, unit = float(m.group(1)), m.group(2)
    return value * {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}[unit]


def section_decide(bench: Bench) -> None:
    a = bench.args
    try:
        from segproxy import Rules
    except ImportError as e:
        bench.notes.append(f"section decide skipped: cannot import segproxy ({e})")
        return
    text, hosts = thousand_rules_text(1000)
    rules = Rules.parse(text, source="<bench>")
    iterations = 20_000 if a.quick else 200_000
    bench.log(
        f"[decide] {len(rules)} rules, {iterations} decisions per round through Python Rules.decide"
    )
    py = bench.metric("decide_py", "rule decision, 1,000 rules, Python Rules.decide", "µs", False)
    decide = rules.decide
    for h in hosts[:1000]:  # warm-up
        decide("GET", "https", h, 443, "/")
    n_hosts = len(hosts)
    for r in range(a.rounds):
        t0 = time.perf_counter()
        for i in range(iterations):
            decide("GET", "https", hosts[i % n_hosts], 443, "/")
        per = (time.perf_counter() - t0) / iterations * 1e6
        py.add("segproxy", per)
        bench.log(f"  round {r + 1} Python Rules.decide {per:.2f} µs/decision")
    if a.engine_decide:
        eng = bench.metric("decide_engine", "rule decision, 1,000 rules, engine alone", "µs", False)
        for r in range(a.rounds if not a.quick else 1):
            us = engine_decide_us(bench)
            if us is None:
                break
            eng.add("segproxy", us)
            bench.log(f"  round {r + 1} engine decide {us:.3f} µs/decision")
    rows = ["| rule decision, 1,000 rules | µs per decision | target |", "|---|---:|---|"]
    for key, label in (
        ("decide_py", "Python `Rules.decide` (binding + Decision object)"),
        ("decide_engine", "engine `RuleSet::decide` (Rust only)"),
    ):
        m = bench.metrics.get(key)
        v = m.median("segproxy") if m else None
        rows.append(
            f"| {label} | {fmt(v) if v is None or v >= 0.1 else f'{v:.3f}'} | "
            f"{'–' if v is None else ('< 10 µs: met' if v < 10 else '< 10 µs: MISSED')} |"
        )
    bench.extra.append("\n".join(rows))


SECTIONS: dict[str, Callable[[Bench], None]] = {
    "tunnel": section_tunnel,
    "keepalive": section_keepalive,
    "intercept": section_intercept,
    "rules": section_rules,
    "decide": section_decide,
}


# --------------------------------------------------------------------------
# report


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


TABLES = {
    # table: (columns, ratios as (numerator, denominator))
    "main": (
        ["direct", "segproxy", "squid", "floor", "baseline"],
        [
            ("segproxy", "direct"),
            ("segproxy", "squid"),
            ("segproxy", "floor"),
            ("baseline", "direct"),
            ("segproxy", "baseline"),
        ],
    ),
    "intercept": (
        IC_CONTENDERS,
        [
            ("segproxy", "proxy.py"),
            ("segproxy", "mitmproxy"),
            ("segproxy", "segproxy-http"),
            ("segproxy", "baseline"),
        ],
    ),
}


# Columns shown only when the run has them.
OPTIONAL_COLUMNS = {"baseline"}


def report(bench: Bench, table: str = "main") -> str:
    cols, ratios = TABLES[table]
    metrics = [m for m in bench.metrics.values() if m.table == table]
    if not metrics:
        return ""
    absent = OPTIONAL_COLUMNS - set(bench.contenders)
    cols = [c for c in cols if c not in absent]
    ratios = [(a, b) for a, b in ratios if a not in absent and b not in absent]
    lines = [
        "| metric | unit | better | "
        + " | ".join(cols)
        + " | "
        + " | ".join(f"{a}/{b}" for a, b in ratios)
        + " |",
        "|---|---|---|" + "---:|" * (len(cols) + len(ratios)),
    ]
    for m in metrics:
        med = {c: m.median(c) for c in cols}
        lines.append(
            f"| {m.label} | {m.unit} | {'higher' if m.higher_is_better else 'lower'} | "
            + " | ".join(fmt(med[c]) for c in cols)
            + " | "
            + " | ".join(ratio(med[a], med[b]) for a, b in ratios)
            + " |"
        )
    return "\n".join(lines)


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].split(" Copyright")[0].strip() if text else "?"


def meta(bench: Bench) -> dict:
    a = bench.args
    return {
        "command": " ".join(shlex.quote(x) for x in sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "squid": tool_version(["squid", "-v"]),
        "nginx": tool_version(["nginx", "-v"]),
        "wrk_version": tool_version(["wrk", "-v"]),
        "rounds": a.rounds,
        "bulk_bytes": a.bulk_bytes,
        "wrk_args": f"-t{a.wrk_threads} -c{a.wrk_connections} -d{a.wrk_duration}s",
        "contenders": bench.contenders,
        "skipped": bench.skipped,
    }


# --------------------------------------------------------------------------
# main


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def segproxy_available(cmd: str) -> str | None:
    """None if the segproxy command runs, else the reason it does not."""
    try:
        out = subprocess.run(
            shlex.split(cmd) + ["--help"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return f"`{cmd} --help` exited {out.returncode}: {tail[0]}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 3 rounds, 32 MiB, 1 s wrk runs"
    )
    ap.add_argument("--rounds", type=int, help="rounds per measurement (default 5, 3 with --quick)")
    ap.add_argument(
        "--bulk-size", help="bytes each way per tunnel transfer (default 1GiB, 32MiB with --quick)"
    )
    ap.add_argument(
        "--wrk-duration", type=float, help="seconds per wrk run (default 10, 1 with --quick)"
    )
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--wrk-connections", type=int, default=64)
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keepalive section: also measure bench/floor_relay.c, a relay that parses nothing, "
        "as the floor of proxy CPU per request on this machine (default: on)",
    )
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    ap.add_argument("--contenders", default="direct,segproxy,squid")
    ap.add_argument("--segproxy-cmd", default=f"{shlex.quote(sys.executable)} -m segproxy")
    ap.add_argument(
        "--baseline-cmd",
        help="an earlier segproxy build's command, run as the `baseline` contender "
        "(add baseline to --contenders)",
    )
    ap.add_argument(
        "--segproxy-arg",
        action="append",
        default=[],
        help="extra segproxy CLI argument (repeatable)",
    )
    ap.add_argument(
        "--mitmdump-cmd", default="mitmdump", help="mitmproxy's mitmdump (intercept section)"
    )
    ap.add_argument(
        "--proxypy-cmd", default="proxy", help="proxy.py's `proxy` command (intercept section)"
    )
    ap.add_argument("--json", type=Path, help="also write every round and the medians here")
    ap.add_argument(
        "--engine-decide",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decide section: also time the engine alone with cargo test (default: on, off with --quick)",
    )
    a = ap.parse_args(argv)

    a.rounds = a.rounds or (3 if a.quick else 5)
    a.bulk_bytes = parse_size(a.bulk_size) if a.bulk_size else (32 * MIB if a.quick else GIB)
    a.wrk_duration = a.wrk_duration or (1.0 if a.quick else 10.0)
    if a.engine_decide is None:
        a.engine_decide = not a.quick

    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    skipped: dict[str, str] = {}
    if "segproxy" in contenders:
        why = segproxy_available(a.segproxy_cmd)
        if why:
            skipped["segproxy"] = why
    if "baseline" in contenders:
        if not a.baseline_cmd:
            ap.error("the baseline contender needs --baseline-cmd")
        why = segproxy_available(a.baseline_cmd)
        if why:
            skipped["baseline"] = why
    if "squid" in contenders:
        try:
            find_binary("squid")
        except MissingBinary as e:
            skipped["squid"] = str(e)
    contenders = [c for c in contenders if c not in skipped]
    bench = Bench(a, contenders, skipped)
    for name, why in skipped.items():
        bench.log(f"skipping {name}: {why}")

    for name in [s.strip() for s in a.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}")
        try:
            SECTIONS[name](bench)
        except MissingBinary as e:
            bench.notes.append(f"section {name} skipped: {e}")
            bench.log(f"section {name} skipped: {e}")

    m = meta(bench)
    print(f"\n## segproxy benchmark ({m['date']})\n")
    print(
        f"`{m['command']}` — {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}, "
        f"{m['squid']}, {m['nginx']}, {m['wrk_version']}"
    )
    print(
        f"medians of {a.rounds} rounds; tunnel {a.bulk_bytes / MIB:.0f} MiB each way; "
        f"wrk -t{a.wrk_threads} -c{a.wrk_connections} -d{a.wrk_duration:g}s\n"
    )
    if report(bench):
        print(report(bench))
    for table in TABLES:
        if table != "main" and report(bench, table):
            print(f"\n### {table}\n")
            print(report(bench, table))
    for block in bench.extra:
        print(f"\n{block}")
    for name, why in skipped.items():
        print(f"\n- {name} not measured: {why}")
    for note in bench.notes:
        print(f"- note: {note}")

    if a.json:
        data = {
            "meta": m,
            "metrics": {
                k: {
                    "label": v.label,
                    "unit": v.unit,
                    "higher_is_better": v.higher_is_better,
                    "rounds": v.rounds,
                    "median": {c: v.median(c) for c in v.rounds},
                    "table": v.table,
                }
                for k, v in bench.metrics.items()
            },
            "notes": bench.notes,
            "extra": bench.extra,
        }
        a.json.write_text(json.dumps(data, indent=2) + "\n")
        bench.log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
