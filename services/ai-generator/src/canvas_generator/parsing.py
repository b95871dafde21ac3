"""From the model's reply text to validated canvas objects (docs/api.md, "Canvas route").

:func:`parse_reply` reads a finished reply. :class:`ObjectStream` finds the objects of
a reply while it is still being streamed, so that each can be shown as soon as the
model has written it; the finished text still goes through :func:`parse_reply`, which
has the last word on what the drawing holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from canvas_events.objects import validate_object, validate_objects
from canvas_generator.errors import NO_VALID_OBJECT_MESSAGE, BadOutput

# ``` or ```json (any info string) up to the closing fence, or the end when cut off.
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+\-]*[ \t]*\n?(?P<body>.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ParsedReply:
    """The valid objects of a reply, in the model's order, and how many were dropped."""

    objects: list[dict[str, Any]]
    dropped: int


def strip_fence(text: str) -> str:
    """The content of the first markdown code fence in ``text``, or ``text`` itself."""
    match = _FENCE.search(text)
    return (match.group("body") if match else text).strip()


def _loads(text: str) -> Any:
    """JSON out of a reply: as is, else inside a code fence, else between the first
    opening and the last closing bracket (models like to say "Here is the drawing:")."""
    candidates = [text, strip_fence(text)]
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    end = max(text.rfind("}"), text.rfind("]"))
    if starts and end > min(starts):
        candidates.append(text[min(starts) : end + 1])
    for candidate in candidates:
        try:
            return orjson.loads(candidate)
        except orjson.JSONDecodeError:
            continue
    raise BadOutput("model output was not valid JSON")


def parse_reply(text: str) -> ParsedReply:
    """The objects of a finished reply: ``{"objects": [...]}`` or a bare list, possibly
    wrapped in a code fence. Raises :class:`BadOutput` (retryable) when it holds no valid
    object."""
    data = _loads(text)
    raw = data.get("objects") if isinstance(data, dict) else data
    if not isinstance(raw, list):
        raise BadOutput('model output had no "objects" list')
    objects, dropped = validate_objects(raw)
    if not objects:
        raise BadOutput(NO_VALID_OBJECT_MESSAGE)
    return ParsedReply(objects, dropped)


class ObjectStream:
    """Finds each complete object of the ``objects`` list (or of a bare top-level list)
    in a reply fed piece by piece, and validates it.

    A small scanner of JSON structure, not a parser: it tracks strings and bracket depth
    so that it knows when an item of the list is closed, then parses that item alone.
    Text before the first bracket (a code fence, a sentence) is ignored.
    """

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0
        self._stack: list[str] = []
        self._in_string = False
        self._escaped = False
        self._string_start = 0
        self._last_string: str | None = None
        self._list_depth: int | None = None
        self._item_start: int | None = None
        self._finished = False
        self.valid = 0
        self.dropped = 0

    def feed(self, chunk: str) -> list[tuple[int, dict[str, Any]]]:
        """Take the next piece of the reply; return the (index, object) pairs it completed,
        index counting valid objects only (as in :func:`parse_reply`'s list)."""
        self._text += chunk
        found: list[tuple[int, dict[str, Any]]] = []
        text, stack = self._text, self._stack
        position = self._pos
        while position < len(text) and not self._finished:
            char = text[position]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    if len(stack) == 1:
                        self._last_string = text[self._string_start + 1 : position]
            elif char == '"':
                if stack:
                    self._in_string = True
                    self._string_start = position
            elif char in "{[":
                if self._list_depth is None and char == "[":
                    if not stack:
                        self._list_depth = 1
                    elif len(stack) == 1 and stack[0] == "{" and self._last_string == "objects":
                        self._list_depth = 2
                stack.append(char)
                if self._list_depth is not None and len(stack) == self._list_depth + 1:
                    self._item_start = position
            elif char in "}]" and stack:
                stack.pop()
                depth = len(stack)
                if self._list_depth is not None and depth == self._list_depth:
                    if self._item_start is not None:
                        found.extend(self._item(text[self._item_start : position + 1]))
                        self._item_start = None
                elif self._list_depth is not None and depth < self._list_depth:
                    self._finished = True
                if not stack:
                    self._finished = True
            position += 1
        self._pos = position
        return found

    def _item(self, raw: str) -> list[tuple[int, dict[str, Any]]]:
        try:
            clean = validate_object(orjson.loads(raw))
        except orjson.JSONDecodeError:
            clean = None
        if clean is None:
            self.dropped += 1
            return []
        self.valid += 1
        return [(self.valid - 1, clean)]
