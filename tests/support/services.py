"""Real peers on loopback: nginx origin, squid, tinyproxy, dnsmasq, segproxy.

Each is a context manager that starts the program in the foreground with a
config file written to its own temp dir, on free ports, waits (bounded) until
it accepts, and stops it by pid on exit::

    with NginxOrigin() as origin, Squid() as squid:
        url = origin.url("/1k.bin")            # http://127.0.0.1:PORT/1k.bin
        proxy = squid.proxy_url                # http://127.0.0.1:PORT

Constructors raise ``MissingBinary`` if the program is not installed.
"""

from __future__ import annotations

import os
import pwd
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .certs import make_origin_certs
from .procs import (
    LOOPBACK,
    ManagedProcess,
    Service,
    find_binary,
    free_port,
    port_accepts,
)

KIB = 1024
MIB = 1024 * 1024


class NginxOrigin(Service):
    """nginx serving static files over HTTP and HTTPS (a leaf signed by a test CA:
    trust ``cert_path``).

    Files: ``/1k.bin`` (1 KiB), ``/large.bin`` (``large_size`` bytes, 16 MiB by
    default), ``/index.html`` (small HTML page), ``/conn`` (nginx's connection serial number and
    requests served on it so far: shows connection reuse). Any other file can be dropped
    into ``www`` before or after start. Keep-alive is on with no request limit.
    """

    name = "nginx"

    def __init__(self, large_size: int = 16 * MIB, worker_processes: int = 1) -> None:
        self.binary = find_binary("nginx")
        super().__init__()
        self.large_size = large_size
        self.worker_processes = worker_processes
        self.http_port = free_port()
        self.https_port = free_port()
        self.www = self.dir / "www"
        # What clients trust: the test CA that signed the origin's leaf certificate.
        self.cert_path: Path = self.dir / "origin-ca.crt"
        self.leaf_path: Path = self.dir / "origin.crt"

    def url(self, path: str = "/", tls: bool = False, host: str = LOOPBACK) -> str:
        if tls:
            return f"https://{host}:{self.https_port}{path}"
        return f"http://{host}:{self.http_port}{path}"

    def _write_files(self) -> None:
        self.www.mkdir()
        (self.www / "1k.bin").write_bytes(bytes(range(256)) * 4)
        chunk = os.urandom(MIB)
        with open(self.www / "large.bin", "wb") as f:
            left = self.large_size
            while left > 0:
                f.write(chunk[: min(left, MIB)])
                left -= MIB
        (self.www / "index.html").write_text(
            "<!doctype html><html><head><title>segproxy origin</title></head>"
            "<body><h1>origin ok</h1></body></html>\n"
        )
        for p in [self.www, *self.www.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)

    def start(self) -> NginxOrigin:
        self._write_files()
        self.cert_path, self.leaf_path, key_path = make_origin_certs(self.dir)
        d = self.dir
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"""
daemon off;
master_process on;
worker_processes {self.worker_processes};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    types {{ text/html html; application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
    server {{
        listen {LOOPBACK}:{self.http_port};
        listen {LOOPBACK}:{self.https_port} ssl;
        ssl_certificate {self.leaf_path};
        ssl_certificate_key {key_path};
        root {self.www};
        location = /status {{ return 200 "ok\\n"; }}
        location = /conn {{ return 200 "$connection $connection_requests\\n"; }}
    }}
}}
"""
        )
        self.process = ManagedProcess(
            "nginx", [self.binary, "-p", str(d), "-c", str(conf), "-e", f"{d}/error.log"], workdir=d
        )
        self.process.start()
        self.process.wait_ready(
            lambda: port_accepts(self.http_port) and port_accepts(self.https_port),
            what="listening",
        )
        return self


class NghttpdOrigin(Service):
    """nghttpd (nghttp2's HTTP/2 server) over TLS on 127.0.0.1 (a leaf signed by a test CA:
    trust ``cert_path``). It speaks HTTP/2 only (ALPN ``h2``): any answer from it went over
    HTTP/2. Serves ``www`` (``/1k.bin``); a POST's body comes back (``--echo-upload``); every
    response ends with the trailer ``x-origin-trailer: h2``. With ``tls=False`` it speaks
    HTTP/2 over cleartext with prior knowledge (h2c) only."""

    name = "nghttpd"

    def __init__(self, tls: bool = True) -> None:
        self.binary = find_binary("nghttpd")
        super().__init__()
        self.tls = tls
        self.port = free_port()
        self.www = self.dir / "www"
        self.cert_path: Path = self.dir / "origin-ca.crt"

    def url(self, path: str = "/", host: str = "localhost") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def start(self) -> NghttpdOrigin:
        self.www.mkdir()
        (self.www / "1k.bin").write_bytes(bytes(range(256)) * 4)
        self.cert_path, leaf_path, key_path = make_origin_certs(self.dir)
        args = [
            self.binary,
            "-a",
            LOOPBACK,
            "-d",
            str(self.www),
            "--echo-upload",
            "--trailer=x-origin-trailer: h2",
            str(self.port),
        ]
        args += [str(key_path), str(leaf_path)] if self.tls else ["--no-tls"]
        self.process = ManagedProcess("nghttpd", args, workdir=self.dir)
        self.process.start()
        self.process.wait_ready(lambda: port_accepts(self.port), what="listening")
        return self


class Squid(Service):
    """squid as a forward proxy: allows 127.0.0.1 only, CONNECT to any port,
    no cache, logs in its temp dir. ``access_log`` is the access log path."""

    name = "squid"

    def __init__(self, extra_config: str = "") -> None:
        self.binary = find_binary("squid")
        super().__init__()
        self.port = free_port()
        self.extra_config = extra_config
        self.access_log = self.dir / "access.log"

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Squid:
        d = self.dir
        conf = d / "squid.conf"
        conf.write_text(
            f"""
http_port {LOOPBACK}:{self.port}
visible_hostname segproxy-test-squid
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log stdio:{self.access_log}
cache_store_log none
coredump_dir {d}
cache deny all
cache_mem 8 MB
pinger_enable off
shutdown_lifetime 0 seconds
dns_nameservers 127.0.0.1
forwarded_for delete
strip_query_terms off
buffered_logs off
via off
acl local_client src 127.0.0.1/32 ::1
http_access allow local_client
http_access deny all
{self.extra_config}
"""
        )
        self.process = ManagedProcess("squid", [self.binary, "-N", "-f", str(conf)], workdir=d)
        self.process.start()
        self.process.wait_ready(lambda: port_accepts(self.port), timeout=30, what="listening")
        return self


class Tinyproxy(Service):
    """tinyproxy in the foreground: Allow 127.0.0.1, CONNECT to any port (no
    ConnectPort line means every port is allowed). It closes the client
    connection after each response."""

    name = "tinyproxy"

    def __init__(self, extra_config: str = "") -> None:
        self.binary = find_binary("tinyproxy")
        super().__init__()
        self.port = free_port()
        self.extra_config = extra_config
        self.log = self.dir / "tinyproxy.log"

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Tinyproxy:
        conf = self.dir / "tinyproxy.conf"
        user = "" if os.getuid() != 0 else "User nobody\nGroup nogroup\n"
        conf.write_text(
            f"""{user}Port {self.port}
Listen {LOOPBACK}
Timeout 600
MaxClients 200
LogFile "{self.log}"
LogLevel Info
Allow 127.0.0.1
DisableViaHeader Yes
{self.extra_config}
"""
        )
        self.process = ManagedProcess(
            "tinyproxy", [self.binary, "-d", "-c", str(conf)], workdir=self.dir
        )
        self.process.start()
        self.process.wait_ready(lambda: port_accepts(self.port), what="listening")
        return self


class Dnsmasq(Service):
    """A DNS server on 127.0.0.1 (UDP and TCP, same port).

    ``zones`` maps a domain to the address every name under it resolves to;
    ``nxdomain`` lists domains answered NXDOMAIN; anything else is REFUSED
    (``--no-resolv``: no upstream). ``ttl`` is the TTL of those answers.
    """

    name = "dnsmasq"

    def __init__(
        self,
        zones: dict[str, str] | None = None,
        nxdomain: Sequence[str] = ("bad.zone",),
        ttl: int = 60,
    ) -> None:
        self.binary = find_binary("dnsmasq")
        super().__init__()
        self.port = free_port(udp_too=True)
        self.zones = dict(zones or {"test.zone": "127.0.0.1"})
        self.nxdomain = list(nxdomain)
        self.ttl = ttl
        self.log = self.dir / "dnsmasq.log"

    def start(self) -> Dnsmasq:
        argv = [
            self.binary,
            f"--port={self.port}",
            f"--listen-address={LOOPBACK}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            f"--local-ttl={self.ttl}",
            "--keep-in-foreground",
            f"--user={pwd.getpwuid(os.getuid()).pw_name}",
            "--pid-file=",
            f"--log-facility={self.log}",
            "--log-queries",
        ]
        argv += [f"--address=/{zone}/{ip}" for zone, ip in self.zones.items()]
        argv += [f"--address=/{zone}/" for zone in self.nxdomain]
        self.process = ManagedProcess("dnsmasq", argv, workdir=self.dir)
        self.process.start()
        self.process.wait_ready(lambda: port_accepts(self.port), what="listening")
        return self

    def query_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


READY_RE = re.compile(r"segproxy listening on (\S+):(\d+)")


class Segproxy(Service):
    """The segproxy CLI (``python -m segproxy``) as a child process.

    Waits for ``segproxy listening on HOST:PORT`` on its stderr. ``args`` are
    extra CLI arguments; ``command`` replaces ``[python, -m, segproxy]``.
    ``access_log`` (if ``with_access_log``) is passed as ``--access-log``.
    """

    name = "segproxy"

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        command: Sequence[str] | None = None,
        with_access_log: bool = False,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__()
        self.command = list(command) if command else [sys.executable, "-m", "segproxy"]
        self.args = list(args)
        self.port = port or free_port()
        self.access_log = self.dir / "access.log" if with_access_log else None
        self.env = env

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Segproxy:
        argv = self.command + ["--listen-host", LOOPBACK, "--listen-port", str(self.port)]
        if self.access_log is not None:
            argv += ["--access-log", str(self.access_log)]
        argv += self.args
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.process = ManagedProcess("segproxy", argv, workdir=self.dir, env=env)
        self.process.start()
        self.process.wait_ready(
            lambda: bool(READY_RE.search(self.process.log_tail(200))) and port_accepts(self.port),
            timeout=30,
            what="ready (no 'segproxy listening on' line)",
        )
        return self

    def output(self) -> str:
        """Everything the process wrote to stdout/stderr so far."""
        assert self.process is not None
        return self.process.log_path.read_text(errors="replace")


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)
