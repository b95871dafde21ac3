"""What the model is asked: a fixed system prompt and the user's cleaned query.

The query travels only in the user message and is never formatted into the system
prompt, so nothing a user types can rewrite the instructions or the output format.
"""

from __future__ import annotations

import re
import unicodedata

from openai.types.chat import ChatCompletionMessageParam

from canvas_events.events import MAX_QUERY_LENGTH
from canvas_generator.errors import AttemptFailed, FailureKind

EMPTY_QUERY_MESSAGE = "the query is empty once control characters are removed"

SYSTEM_PROMPT = """\
You draw diagrams on a collaborative whiteboard. The user describes what to draw; you \
answer with one JSON object and nothing else:

{"objects": [ ...objects... ]}

Each object is one of these shapes (coordinates and sizes are pixels; x grows to the \
right, y grows downwards; the canvas origin is the top-left corner):

- {"type": "rectangle", "x": 100, "y": 80, "width": 200, "height": 60}
- {"type": "sticky_note", "x": 400, "y": 80, "width": 160, "height": 160}
  (x, y is the top-left corner; width and height are greater than 0)
- {"type": "circle", "x": 200, "y": 300, "radius": 40}  (x, y is the centre)
- {"type": "text", "x": 100, "y": 20, "text": "Title", "font_size": 24}
  (x, y is the top-left corner; text is required; font_size is optional)
- {"type": "line", "points": [[100, 140], [100, 200]]}
- {"type": "arrow", "points": [[200, 140], [200, 200]]}
  (two or more [x, y] points; an arrow points at its last point)

Every object may also have:
- "fill" and "stroke": colours written "#rrggbb", for example "#ffd966"
- "stroke_width": a number of pixels
- "text": a label shown inside a rectangle, sticky note or circle
- "rotation": degrees, between -360 and 360

Rules:
- Answer with the JSON object only: no prose, no markdown, no code fence.
- Use only the keys listed above; numbers are plain JSON numbers.
- Keep coordinates between 0 and 2000 and lay the drawing out so that shapes do not \
overlap and arrows connect the shapes they link.
- Draw between 3 and 40 objects; label shapes with short texts.
- If the request is unclear, draw your best reasonable interpretation of it.
"""

# Control characters hide text from people reading logs and confuse models; newlines and
# tabs carry meaning in a query ("1. ...\n2. ..."). Bidirectional overrides are format
# characters, not controls, but they make a query read differently than it is.
_KEEP = {"\n", "\t"}
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_query(query: str, max_length: int = MAX_QUERY_LENGTH) -> str:
    """The query without control characters, with normalised whitespace, at most
    ``max_length`` characters long (cut at a word boundary when there is one near)."""
    text = query.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
    text = text.replace("\u2029", "\n\n")
    text = "".join(
        char
        for char in text
        if char in _KEEP or (char not in _BIDI and unicodedata.category(char) not in ("Cc", "Cs"))
    )
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
    if len(text) > max_length:
        cut = text[:max_length]
        space = cut.rfind(" ")
        # Cutting a word in two is better than losing a long tail of the query.
        text = (cut[:space] if space > max_length * 0.8 else cut).rstrip()
    return text


def build_messages(query: str) -> list[ChatCompletionMessageParam]:
    """The chat messages for one attempt: the system prompt, then the cleaned query.

    Raises a permanent :class:`~canvas_generator.errors.AttemptFailed` when nothing is
    left of the query: no model call can draw it, however often it is retried.
    """
    cleaned = clean_query(query)
    if not cleaned:
        raise AttemptFailed(FailureKind.BAD_REQUEST, EMPTY_QUERY_MESSAGE, retryable=False)
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": cleaned},
    ]
