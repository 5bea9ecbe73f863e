"""Test helpers: real processes on loopback, started on free ports, stopped by pid.

Import from tests as ``from support import NginxOrigin, Squid, ...`` (tests/ is
on sys.path through tests/conftest.py); the benchmark imports the same module.
"""

from .certs import make_origin_certs, make_self_signed
from .dnsclient import query_a
from .procs import (
    LOOPBACK,
    ManagedProcess,
    MissingBinary,
    find_binary,
    free_port,
    port_accepts,
)
from .services import Dnsmasq, NginxOrigin, Segproxy, Squid, Tinyproxy, wait_for

__all__ = [
    "LOOPBACK",
    "Dnsmasq",
    "ManagedProcess",
    "MissingBinary",
    "NginxOrigin",
    "Segproxy",
    "Squid",
    "Tinyproxy",
    "find_binary",
    "free_port",
    "make_origin_certs",
    "make_self_signed",
    "port_accepts",
    "query_a",
    "wait_for",
]
