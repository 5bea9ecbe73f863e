"""A minimal DNS client (A queries over UDP or TCP) for checking DNS peers."""

from __future__ import annotations

import random
import socket
import struct

RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def _encode_query(name: str, qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD set
    qname = (
        b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split(".")) + b"\0"
    )
    return header + qname + struct.pack("!HH", 1, 1)  # A, IN


def _skip_name(msg: bytes, i: int) -> int:
    while True:
        n = msg[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += 1 + n


def _decode(msg: bytes, qid: int) -> tuple[str, list[str]]:
    rid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", msg[:12])
    if rid != qid:
        raise ValueError("DNS answer id mismatch")
    rcode = RCODES.get(flags & 0xF, str(flags & 0xF))
    i = 12
    for _ in range(qd):
        i = _skip_name(msg, i) + 4
    addrs = []
    for _ in range(an):
        i = _skip_name(msg, i)
        rtype, _, _, rdlen = struct.unpack("!HHIH", msg[i : i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(msg[i : i + 4]))
        i += rdlen
    return rcode, addrs


def query_a(
    name: str, port: int, server: str = "127.0.0.1", tcp: bool = False, timeout: float = 3.0
) -> tuple[str, list[str]]:
    """Ask ``server:port`` for the A records of ``name``; returns
    ``(rcode_name, [ipv4, ...])``, e.g. ``("NOERROR", ["127.0.0.1"])``."""
    qid = random.randrange(1 << 16)
    q = _encode_query(name, qid)
    if tcp:
        with socket.create_connection((server, port), timeout=timeout) as s:
            s.sendall(struct.pack("!H", len(q)) + q)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("DNS server closed the TCP connection")
                buf += chunk
            return _decode(buf[2:], qid)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (server, port))
        msg, _ = s.recvfrom(4096)
        return _decode(msg, qid)
