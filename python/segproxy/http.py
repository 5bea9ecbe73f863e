"""HTTP message heads as handlers see them: `HTTPHeader`, `HTTPRequest`, `HTTPResponse`.

Same names and attributes as asyncio-https-proxy, so its handler scripts run unchanged. Header
values are `str`; bytes that are not UTF-8 survive the round trip (they travel as Latin-1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from urllib.parse import urlsplit

__all__ = ["HTTPHeader", "HTTPRequest", "HTTPResponse"]


class HTTPHeader:
    """Ordered header fields: duplicates kept, names looked up case-insensitively.

    Iterating yields ``(name, value)`` pairs in order, names in their original case::

        for name, value in request.headers: ...
        request.headers.first("content-type")
        request.headers.set("X-Seen", "1")      # replaces every X-Seen
        request.headers.add("Via", "segproxy")  # appends, keeps others
        request.headers.remove("Cookie")
    """

    __slots__ = ("_fields",)

    def __init__(
        self, source: bytes | Iterable[tuple[str, str]] | Mapping[str, str] | None = None
    ) -> None:
        self._fields: list[tuple[str, str]] = []
        if source is None:
            return
        if isinstance(source, (bytes, bytearray)):
            self._parse(bytes(source))
        elif isinstance(source, HTTPHeader):
            self._fields = list(source._fields)
        elif isinstance(source, Mapping):
            self._fields = [(str(k), str(v)) for k, v in source.items()]
        else:
            self._fields = [(str(k), str(v)) for k, v in source]

    @classmethod
    def _wrap(cls, fields: list[tuple[str, str]]) -> HTTPHeader:
        """Adopts a list of (name, value) str pairs as is (the engine's fast path)."""
        h = cls.__new__(cls)
        h._fields = fields
        return h

    def _parse(self, raw: bytes) -> None:
        for line in raw.decode("latin-1").split("\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"header line without a colon: {line!r}")
            self._fields.append((name.strip(), value.strip()))

    # --- reading -------------------------------------------------------------------------
    def first(self, name: str) -> str | None:
        """The first value of `name`, or None."""
        lname = name.lower()
        for k, v in self._fields:
            if k.lower() == lname:
                return v
        return None

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.first(name)
        return default if value is None else value

    def get_all(self, name: str) -> list[str]:
        """Every value of `name`, in order."""
        lname = name.lower()
        return [v for k, v in self._fields if k.lower() == lname]

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The fields themselves, a list of ``(name, value)`` pairs: changing the list changes
        the head (asyncio-https-proxy scripts append to it)."""
        return self._fields

    def to_dict(self) -> dict[str, str]:
        """A dict of name -> value; of a repeated name only the last value is kept, as in
        asyncio-https-proxy (`get_all` gives every value)."""
        return dict(self._fields)

    def to_raw(self) -> bytes:
        """The fields as they go on the wire, ending with the blank line that ends a head:
        ``Name: value\r\n`` each, in order, then ``\r\n`` (as asyncio-https-proxy: no
        fields give ``\r\n\r\n``)."""
        return b"\r\n".join(_wire(f"{k}: {v}") for k, v in self._fields) + b"\r\n\r\n"

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._fields))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.first(name) is not None

    def __len__(self) -> int:
        return len(self._fields)

    def __getitem__(self, name: str) -> str:
        value = self.first(name)
        if value is None:
            raise KeyError(name)
        return value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HTTPHeader) and self._fields == other._fields

    def __repr__(self) -> str:
        return f"HTTPHeader({self._fields!r})"

    # --- changing ------------------------------------------------------------------------
    def add(self, name: str, value: str) -> None:
        """Appends a field, keeping existing ones with the same name."""
        self._fields.append((name, str(value)))

    def set(self, name: str, value: str) -> None:
        """Sets `name` to one value: replaces the first field in place, removes the others."""
        lname = name.lower()
        out: list[tuple[str, str]] = []
        placed = False
        for k, v in self._fields:
            if k.lower() == lname:
                if not placed:
                    out.append((k, str(value)))
                    placed = True
            else:
                out.append((k, v))
        if not placed:
            out.append((name, str(value)))
        self._fields[:] = out  # in place: a list obtained from `headers` stays the head's

    def remove(self, name: str) -> None:
        """Removes every field called `name` (absent is fine)."""
        lname = name.lower()
        self._fields[:] = [(k, v) for k, v in self._fields if k.lower() != lname]

    def __setitem__(self, name: str, value: str) -> None:
        self.set(name, value)

    def __delitem__(self, name: str) -> None:
        self.remove(name)


def _wire(text: str) -> bytes:
    """Header text as bytes, as the engine sends it: Latin-1 when it fits, else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


class HTTPRequest:
    """A request head. Change any attribute before forwarding to change what is sent.

    `body`, if set to bytes, replaces the client's body (Content-Length follows).
    """

    __slots__ = ("body", "headers", "host", "method", "path", "port", "scheme", "version")

    def __init__(
        self,
        method: str = "GET",
        scheme: str = "http",
        host: str = "",
        port: int = 80,
        path: str = "/",
        version: str = "HTTP/1.1",
        headers: HTTPHeader | Iterable[tuple[str, str]] | None = None,
        body: bytes | None = None,
    ) -> None:
        self.method = method
        self.scheme = scheme
        self.host = host
        self.port = port
        self.path = path
        self.version = version
        self.headers = headers if isinstance(headers, HTTPHeader) else HTTPHeader(headers)
        self.body = body

    def parse_request_line(self, request_line: bytes) -> None:
        """Set method, version, scheme, host, port and path from a request line, e.g.
        ``b"GET http://example.com:8080/a HTTP/1.1"`` or ``b"CONNECT example.com:443 HTTP/1.1"``
        (asyncio-https-proxy's parser: ValueError for a line that is not three words)."""
        parts = request_line.decode("latin-1").strip().split(" ")
        if len(parts) != 3:
            raise ValueError(f"Invalid request line: {request_line!r}")
        self.method, target, self.version = parts
        if self.method == "CONNECT":
            if ":" not in target:
                raise ValueError(f"Invalid CONNECT request line: {request_line!r}")
            self.scheme = "https"
            host, port = target.rsplit(":", 1)
            self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            self.port = int(port)
            self.path = ""
            return
        uri = urlsplit(target)
        self.scheme = "https" if uri.scheme == "https" else "http"
        self.host = uri.hostname or ""
        self.port = uri.port or (443 if self.scheme == "https" else 80)
        self.path = (
            (uri.path or "/") + (f"?{uri.query}" if uri.query else "") if uri.netloc else target
        )

    def parse_headers(self, raw_headers: bytes) -> None:
        """Set `headers` from raw header lines (``Name: value\r\n`` each)."""
        self.headers = HTTPHeader(raw_headers)

    def parse_host(self) -> None:
        """Set `host` and `port` from the Host header (for an origin-form request, such as
        one read inside a TLS tunnel); without a port in it, the scheme's default. ValueError
        if there is no Host header or its port is not a number."""
        value = self.headers.first("Host")
        if not value:
            raise ValueError("Host header is missing")
        value = value.strip()
        default = 443 if self.scheme == "https" else 80
        if value.startswith("["):
            host, _, rest = value[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        elif value.count(":") == 1:
            host, port = value.split(":")
        else:
            host, port = value, ""
        self.host = host
        self.port = int(port) if port else default

    def url(self) -> str:
        """The absolute URL, e.g. ``http://example.com:8080/a?b=1`` (default ports left out)."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if self.port == default else f"{host}:{self.port}"
        return f"{self.scheme}://{authority}{self.path}"

    def __repr__(self) -> str:
        return f"HTTPRequest(host={self.host}, port={self.port})"  # as asyncio-https-proxy


class HTTPResponse:
    """A response head. Change it in `on_response_received` to change what the client gets.

    ``HTTPResponse()`` is asyncio-https-proxy's blank response, to be filled by
    `parse_status_line` and `parse_headers`: version ``""``, status 0, reason ``""`` and
    headers None. Given a version, status or reason, headers default to an empty
    `HTTPHeader`; every response the proxy hands to a hook has its headers.
    """

    __slots__ = ("headers", "reason_phrase", "status_code", "version")

    # Typed as set: responses the proxy gives hooks always have headers; only a blank
    # `HTTPResponse()` starts with None, as in asyncio-https-proxy.
    headers: HTTPHeader

    def __init__(
        self,
        version: str = "",
        status_code: int = 0,
        reason_phrase: str = "",
        headers: HTTPHeader | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.version = version
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        if isinstance(headers, HTTPHeader):
            self.headers = headers
        elif headers is not None or version or status_code or reason_phrase:
            self.headers = HTTPHeader(headers)
        else:
            self.headers = None  # type: ignore[assignment]

    def parse_status_line(self, status_line: bytes) -> None:
        """Set version, status_code and reason_phrase from a status line such as
        ``b"HTTP/1.1 404 Not Found"`` (the reason may be absent; ValueError if the line has no
        status code)."""
        parts = status_line.decode("latin-1").strip().split(" ", 2)
        if len(parts) < 2:
            raise ValueError(f"Invalid status line: {status_line!r}")
        self.version = parts[0]
        self.status_code = int(parts[1])
        self.reason_phrase = parts[2] if len(parts) > 2 else ""

    def parse_headers(self, raw_headers: bytes) -> None:
        """Set `headers` from raw header lines (``Name: value\r\n`` each)."""
        self.headers = HTTPHeader(raw_headers)

    def __repr__(self) -> str:
        return f"HTTPResponse(status_code={self.status_code}, reason_phrase={self.reason_phrase})"
