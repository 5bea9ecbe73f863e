"""A raw HTTP/2 client over TLS (hyperframe frames, hpack headers, both from the ``h2`` pip
package's dependencies): it sends exactly the frames a test asks for, including the ones a
well-behaved client library refuses to send (more streams than allowed, floods), and reads
back the frames the server sent."""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from .tls_clients import TIMEOUT, connect_tunnel

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Error codes (RFC 9113 section 7).
NO_ERROR = 0x0
CANCEL = 0x8
REFUSED_STREAM = 0x7
ENHANCE_YOUR_CALM = 0xB


class RawH2:
    """HTTP/2 inside ``CONNECT authority`` through the proxy on ``proxy_port``, trusting
    ``ca_path``. ``.frames()`` yields what the server sends (SETTINGS are acknowledged,
    header blocks decoded into ``.fields[stream_id]``)."""

    def __init__(self, proxy_port: int, authority: str, ca_path: Path | str) -> None:
        self.authority = authority
        sock = connect_tunnel(proxy_port, authority)
        ctx = ssl.create_default_context(cafile=str(ca_path))
        ctx.set_alpn_protocols(["h2"])
        self.tls = ctx.wrap_socket(sock, server_hostname=authority.rsplit(":", 1)[0])
        self.tls.settimeout(TIMEOUT)
        self.alpn = self.tls.selected_alpn_protocol()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.server_settings: dict[int, int] = {}
        # The fields of the last header block of each stream.
        self.fields: dict[int, dict[str, str]] = {}
        # A connection window no test runs out of (each stream keeps the default 64 KiB):
        # a stream held by flow control then never holds the others back.
        window = WindowUpdateFrame(0, window_increment=1 << 30)
        self.tls.sendall(PREFACE + SettingsFrame(0).serialize() + window.serialize())

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.tls.close()
        except OSError:
            pass

    def request_block(self, path: str, method: str = "GET", extra: Iterable = ()) -> bytes:
        """An encoded header block for a request."""
        fields = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self.authority),
            (":path", path),
            *extra,
        ]
        return self.encoder.encode(fields)

    def headers(
        self, stream_id: int, path: str, method: str = "GET", end_stream: bool = True
    ) -> HeadersFrame:
        flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
        return HeadersFrame(stream_id, self.request_block(path, method), flags=flags)

    def send(self, *frames: Frame) -> None:
        self.tls.sendall(b"".join(f.serialize() for f in frames))

    def send_bytes(self, data: bytes) -> None:
        self.tls.sendall(data)

    def frames(self, limit: int = 100_000) -> Iterator[Frame]:
        """The server's frames until it closes (or ``limit`` frames); SETTINGS acknowledged."""
        for _ in range(limit):
            while len(self.buf) < 9 or len(self.buf) < 9 + int.from_bytes(self.buf[:3], "big"):
                try:
                    data = self.tls.recv(65536)
                except (TimeoutError, ConnectionError, ssl.SSLError):
                    return
                if not data:
                    return
                self.buf += data
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            frame.parse_body(memoryview(self.buf[9 : 9 + length]))
            self.buf = self.buf[9 + length :]
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                self.server_settings.update(frame.settings)
                self.send(SettingsFrame(0, flags=["ACK"]))
            # Every header block goes through the decoder (its table follows the server's).
            if isinstance(frame, (HeadersFrame, ContinuationFrame)):
                self.fields[frame.stream_id] = dict(self.decoder.decode(frame.data, raw=False))
            yield frame

    def until_settings(self) -> dict[int, int]:
        """Reads up to the server's first SETTINGS frame and acknowledges it."""
        for frame in self.frames(limit=100):
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                return self.server_settings
        raise ConnectionError("no SETTINGS from the server")

    def response(self, stream_id: int) -> tuple[dict[str, str], bytes, int | None]:
        """Reads until ``stream_id`` ends: (its headers, its body, the RST_STREAM code or
        None); other streams' frames are skipped."""
        fields: dict[str, str] = {}
        body = b""
        for frame in self.frames():
            if frame.stream_id != stream_id:
                if isinstance(frame, GoAwayFrame):
                    raise ConnectionError(f"GOAWAY {frame.error_code}")
                continue
            if isinstance(frame, (HeadersFrame, ContinuationFrame)):
                fields.update(self.fields[stream_id])
            elif isinstance(frame, DataFrame):
                body += frame.data
            elif isinstance(frame, RstStreamFrame):
                return fields, body, frame.error_code
            if "END_STREAM" in frame.flags:
                return fields, body, None
        raise ConnectionError(f"connection ended before stream {stream_id} did")

    def rst(self, stream_id: int, code: int = CANCEL) -> RstStreamFrame:
        return RstStreamFrame(stream_id, error_code=code)

    def continuation(self, stream_id: int, data: bytes, last: bool) -> ContinuationFrame:
        return ContinuationFrame(stream_id, data, flags=["END_HEADERS"] if last else [])
