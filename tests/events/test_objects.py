from __future__ import annotations

import pytest

from canvas_events.objects import validate_object, validate_objects


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "rectangle", "x": 0, "y": 0, "width": 100, "height": 50, "fill": "#ffcc00"},
        {"type": "sticky_note", "x": 10, "y": 10, "width": 80, "height": 80, "text": "todo"},
        {"type": "circle", "x": 5, "y": 5, "radius": 3, "stroke": "#000000", "stroke_width": 2},
        {"type": "text", "x": 1, "y": 2, "text": "Login", "font_size": 18},
        {"type": "line", "points": [[0, 0], [10, 10]]},
        {"type": "arrow", "points": [[0, 0], [10, 10], [20, 0]], "rotation": 45},
    ],
)
def test_every_object_type_of_the_contract_validates(raw: dict[str, object]) -> None:
    clean = validate_object(raw)
    assert clean is not None
    assert clean["type"] == raw["type"]


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "hexagon", "x": 0, "y": 0},
        {"type": "rectangle", "x": 0, "y": 0, "width": -1, "height": 5},
        {"type": "circle", "x": 0, "y": 0},
        {"type": "text", "x": 0, "y": 0, "text": ""},
        {"type": "line", "points": [[0, 0]]},
        {"type": "rectangle", "x": 0, "y": 0, "width": 1, "height": 1, "fill": "red"},
        {"type": "circle", "x": "far", "y": 0, "radius": 1},
        "not an object",
    ],
)
def test_invalid_objects_are_rejected(raw: object) -> None:
    assert validate_object(raw) is None


def test_unknown_keys_are_dropped_and_unset_options_left_out() -> None:
    clean = validate_object({"type": "circle", "x": 1, "y": 2, "radius": 3, "id": "model-id"})
    assert clean == {"type": "circle", "x": 1.0, "y": 2.0, "radius": 3.0}


def test_validate_objects_keeps_order_and_counts_dropped() -> None:
    valid, dropped = validate_objects(
        [
            {"type": "text", "x": 0, "y": 0, "text": "a"},
            {"type": "nope"},
            {"type": "text", "x": 0, "y": 0, "text": "b"},
        ]
    )
    assert [obj["text"] for obj in valid] == ["a", "b"]
    assert dropped == 1
