"""The canvas objects a model may draw (docs/api.md, "Canvas route").

A model's reply is ``{"objects": [...]}``; each object is validated on its own and the
invalid ones are dropped and counted, so one bad object never costs the whole drawing.
Unknown keys are ignored (models like to add ``id`` or ``label``); known keys are strict.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
# Coordinates beyond this are a model going astray, not a drawing.
_LIMIT = 100_000.0

Coordinate = Annotated[float, Field(ge=-_LIMIT, le=_LIMIT, allow_inf_nan=False)]
Size = Annotated[float, Field(gt=0, le=_LIMIT, allow_inf_nan=False)]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    fill: str | None = None
    stroke: str | None = None
    stroke_width: Annotated[float, Field(ge=0, le=1_000)] | None = None
    text: Annotated[str, Field(max_length=2_000)] | None = None
    rotation: Annotated[float, Field(ge=-360, le=360)] | None = None

    @field_validator("fill", "stroke")
    @classmethod
    def _hex_color(cls, value: str | None) -> str | None:
        if value is not None and not _COLOR.match(value):
            raise ValueError("colour must be #rrggbb")
        return value


class Box(_Shape):
    """A rectangle or a sticky note: top-left corner, width and height."""

    type: Literal["rectangle", "sticky_note"]
    x: Coordinate
    y: Coordinate
    width: Size
    height: Size


class Circle(_Shape):
    """A circle: centre and radius."""

    type: Literal["circle"]
    x: Coordinate
    y: Coordinate
    radius: Size


class Text(_Shape):
    """A text label anchored at its top-left corner."""

    type: Literal["text"]
    x: Coordinate
    y: Coordinate
    text: Annotated[str, Field(min_length=1, max_length=2_000)]
    font_size: Annotated[float, Field(gt=0, le=1_000)] | None = None


class Path(_Shape):
    """A line or an arrow through two or more points; an arrow points at its last one."""

    type: Literal["line", "arrow"]
    points: Annotated[list[tuple[Coordinate, Coordinate]], Field(min_length=2, max_length=1_000)]


CanvasObject = Annotated[Box | Circle | Text | Path, Field(discriminator="type")]
_adapter: TypeAdapter[Box | Circle | Text | Path] = TypeAdapter(CanvasObject)


def validate_object(raw: Any) -> dict[str, Any] | None:
    """Return the object as a clean dict (unknown keys and unset options left out), or None."""
    try:
        obj = _adapter.validate_python(raw)
    except ValidationError:
        return None
    clean = obj.model_dump(exclude_none=True)
    if "points" in clean:
        clean["points"] = [list(point) for point in clean["points"]]
    return clean


def validate_objects(raw: list[Any]) -> tuple[list[dict[str, Any]], int]:
    """Validate each object of a reply: the valid ones, in order, and how many were dropped."""
    valid = [clean for item in raw if (clean := validate_object(item)) is not None]
    return valid, len(raw) - len(valid)
