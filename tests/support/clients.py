"""Client-side helpers for proxy tests: a raw HTTP/1.x response reader over a plain
socket (to see exactly what the proxy sent), and curl run as a bounded subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import subprocess
from dataclasses import dataclass

import pytest

from .loopback import header, parse_headers
from .procs import LOOPBACK


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    body_len: int = 0
    body_sha256: str = ""
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        return header(self.headers, name)

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def open_conn(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=timeout)
    s.settimeout(timeout)
    return s


class Conn:
    """A client connection to the proxy with a buffered reader: send raw bytes, read responses."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = open_conn(port, timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(1024 * 1024)
        if not data:
            return False
        self.buf += data
        return True

    def _read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before {sep!r}; got {self.buf[:200]!r}")
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _read_exact(self, n: int, sink) -> None:
        while n:
            if not self.buf and not self._fill():
                raise EOFError(f"connection closed with {n} body bytes missing")
            take = self.buf[:n]
            self.buf = self.buf[len(take) :]
            n -= len(take)
            sink(take)

    def read_response(self, method: str = "GET", keep_body: int = 16 * 1024 * 1024) -> RawResponse:
        raw = self._read_until(b"\r\n\r\n")
        status_line, headers = parse_headers(raw[:-4])
        version, status, *reason = status_line.split(" ", 2)
        r = RawResponse(version, int(status), reason[0] if reason else "", headers, raw_head=raw)
        h = hashlib.sha256()
        kept: list[bytes] = []

        def sink(piece: bytes) -> None:
            h.update(piece)
            r.body_len += len(piece)
            if r.body_len <= keep_body:
                kept.append(piece)

        te = (r.header("transfer-encoding") or "").lower()
        if method == "HEAD" or r.status in (204, 304) or 100 <= r.status < 200:
            pass
        elif "chunked" in te:
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0].strip(), 16)
                if size == 0:
                    while self._read_until(b"\r\n") != b"\r\n":
                        pass
                    break
                self._read_exact(size, sink)
                assert self._read_until(b"\r\n") == b"\r\n"
        elif r.header("content-length") is not None:
            self._read_exact(int(r.header("content-length")), sink)
        else:
            while True:
                if self.buf:
                    piece, self.buf = self.buf, b""
                    sink(piece)
                if not self._fill():
                    break
        r.body = b"".join(kept)
        r.body_sha256 = h.hexdigest()
        return r

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True if the proxy closed the connection (within ``timeout``) with nothing more sent."""
        self.sock.settimeout(timeout)
        try:
            return not self.buf and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request(port: int, raw: bytes, method: str = "GET", timeout: float = 10.0) -> RawResponse:
    """One raw request on a fresh connection; returns the parsed response."""
    with Conn(port, timeout) as c:
        c.send(raw)
        return c.read_response(method)


def get_via(port: int, url: str, headers: str = "", timeout: float = 10.0) -> RawResponse:
    host = url.split("/")[2]
    return request(
        port, f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode(), timeout=timeout
    )


async def curl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Runs curl (silent, errors shown) with a hard timeout; the child is killed by pid on expiry."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return subprocess.CompletedProcess(["curl", *args], proc.returncode, out, err)


@dataclass
class SocksAnswer:
    """What a SOCKS5 proxy answered, step by step (None: the step was not reached)."""

    method: int | None = None
    """The method chosen (0 none, 2 username/password, 0xff no acceptable method)."""
    auth_status: int | None = None
    reply: int | None = None
    """The reply code to the request (0 success, 2 not allowed, 7 command not supported...)."""
    sock: socket.socket | None = None
    """After a success, the open connection (the caller closes it)."""


def socks5_request(
    port: int,
    host: str,
    dest_port: int,
    credentials: tuple[str, str] | None = None,
    command: int = 1,
    atyp: int | None = None,
    timeout: float = 20.0,
) -> SocksAnswer:
    """A SOCKS5 handshake by hand (RFC 1928 / 1929), to see the proxy's exact answers.
    `host` goes as a domain name unless it is an IPv4 literal; `atyp` forces the byte."""

    def recv_exact(s: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            piece = s.recv(n - len(data))
            if not piece:
                return None
            data += piece
        return data

    answer = SocksAnswer()
    s = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        methods = b"\x00\x02" if credentials else b"\x00"
        s.sendall(b"\x05" + bytes([len(methods)]) + methods)
        choice = recv_exact(s, 2)
        if choice is None:
            return answer
        answer.method = choice[1]
        if answer.method == 0xFF:
            return answer
        if answer.method == 2:
            user, password = (x.encode() for x in credentials or ("", ""))
            s.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            status = recv_exact(s, 2)
            if status is None:
                return answer
            answer.auth_status = status[1]
            if answer.auth_status != 0:
                return answer
        try:
            address = b"\x01" + socket.inet_aton(host)
            if host.count(".") != 3:
                raise OSError
        except OSError:
            address = b"\x03" + bytes([len(host)]) + host.encode()
        if atyp is not None:
            address = bytes([atyp]) + address[1:]
        s.sendall(b"\x05" + bytes([command, 0]) + address + dest_port.to_bytes(2, "big"))
        head = recv_exact(s, 4)
        if head is None:
            return answer
        answer.reply = head[1]
        rest = {1: 6, 4: 18}.get(head[3])
        if rest is None:
            (n,) = recv_exact(s, 1) or b"\x00"
            rest = n + 2
        recv_exact(s, rest)
        if answer.reply == 0:
            answer.sock, s = s, None  # type: ignore[assignment]
        return answer
    finally:
        if s is not None:
            s.close()


def run_curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """`curl` for tests without a loop: curl -sS with a time limit (the test is skipped where
    curl is not installed)."""
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed")
    return subprocess.run(
        [exe, "-sS", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        timeout=timeout + 10,
    )
