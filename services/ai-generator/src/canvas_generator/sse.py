"""Server-sent events out of a streamed HTTP body, without I/O: :class:`EventStream` is
fed the body's bytes as they arrive and gives back the data of each complete event.

Only what a chat completion stream needs is kept: the ``data`` field (several ``data``
lines of one event joined by a newline, as the SSE spec says). ``event``, ``id``,
``retry`` and comments are skipped. Lines end with LF, CRLF or CR, also when a CRLF is
split between two reads. Bytes are split, never decoded: no byte of a multi-byte UTF-8
character is a CR or LF, so the payloads go to the JSON parser as they came, and a
U+2028 or U+0085 inside a JSON string does not end a line (it would with
``str.splitlines``).

At the end of the body an event not closed by a blank line is dropped, as the spec says:
a stream cut in the middle of an event did not send it.
"""

from __future__ import annotations


class EventStream:
    """The data of the events in a byte stream fed piece by piece."""

    def __init__(self) -> None:
        self._rest = b""  # the start of a line whose end has not arrived yet
        self._data: list[bytes] = []  # the data lines of the event being read
        # The last piece ended with CR: an LF opening the next one belongs to that CR.
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """Take the next bytes of the body; return the data of each event they completed."""
        if self._after_cr and chunk:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        text = self._rest + chunk if self._rest else chunk
        if b"\r" in text:
            self._after_cr = text.endswith(b"\r")
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        self._rest = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:  # a blank line ends the event
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self._data = []
            elif line.startswith(b"data"):
                name, _, value = line.partition(b":")
                if name == b"data":
                    data.append(value[1:] if value.startswith(b" ") else value)
        return events
