"""`WebSocketMessage`: one WebSocket message as `on_websocket_message` sees it.

The names are mitmproxy's: `from_client`, `is_text`, `content` (assign to replace it), `text`,
`drop()` and `dropped`.
"""

from __future__ import annotations

__all__ = ["WebSocketMessage"]


class WebSocketMessage:
    """One whole message (its frames put together, decompressed if it came compressed).

    Assigning `content` (bytes, or str for a text message) replaces what is sent on; `drop()`
    sends nothing. A message left as it came goes on in its original frames, still
    compressed if it was."""

    __slots__ = ("_content", "_dropped", "_original", "from_client", "is_text")

    def __init__(self, from_client: bool, is_text: bool, content: bytes) -> None:
        self.from_client = from_client
        """True for a message from the client to the server, False for one to the client."""
        self.is_text = is_text
        """A text message (UTF-8), or a binary one."""
        self._original = content
        self._content = content
        self._dropped = False

    @property
    def content(self) -> bytes:
        """The message's payload (a text message's as UTF-8 bytes)."""
        return self._content

    @content.setter
    def content(self, value: bytes | bytearray | memoryview | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        if self.is_text:
            try:
                data.decode()
            except UnicodeDecodeError as e:
                raise ValueError(f"a text message's content must be UTF-8: {e}") from None
        self._content = data

    @property
    def text(self) -> str:
        """The content as text (UTF-8); assigning it sets `content`."""
        return self._content.decode()

    @text.setter
    def text(self, value: str) -> None:
        self.content = value

    def drop(self) -> None:
        """Sends nothing on: the receiver never sees this message."""
        self._dropped = True

    @property
    def dropped(self) -> bool:
        return self._dropped

    def _verdict(self) -> bytes | str | None:
        """The engine's answer: None (as it came), "drop", or the new content."""
        if self._dropped:
            return "drop"
        if self._content is self._original or self._content == self._original:
            return None
        return self._content

    def __repr__(self) -> str:
        way = "client -> server" if self.from_client else "server -> client"
        kind = "text" if self.is_text else "binary"
        return f"<WebSocketMessage {way} {kind} {len(self._content)} bytes>"
