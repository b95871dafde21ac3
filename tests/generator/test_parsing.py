import json

import pytest

from canvas_generator.errors import BadOutput, FailureKind
from canvas_generator.parsing import ObjectStream, parse_reply, strip_fence

BOX = {"type": "rectangle", "x": 10, "y": 20, "width": 100, "height": 50}
CIRCLE = {"type": "circle", "x": 5, "y": 5, "radius": 3, "fill": "#ff0000"}
ARROW = {"type": "arrow", "points": [[0, 0], [10, 10]]}
BAD = [
    {"type": "hexagon", "x": 1, "y": 1},
    {"type": "circle", "x": 1, "y": 1, "radius": -1},
    {"type": "rectangle", "x": 1, "y": 1, "width": 1, "height": 1, "fill": "red"},
    "not an object",
]


def test_objects_of_a_plain_reply_are_parsed_in_order():
    parsed = parse_reply(json.dumps({"objects": [BOX, CIRCLE, ARROW]}))
    assert [o["type"] for o in parsed.objects] == ["rectangle", "circle", "arrow"]
    assert parsed.dropped == 0


@pytest.mark.parametrize(
    "template",
    ["```json\n{}\n```", "```\n{}\n```", "Here is your drawing:\n```json\n{}\n```\nEnjoy!"],
)
def test_reply_in_a_markdown_fence_is_accepted(template):
    parsed = parse_reply(template.replace("{}", json.dumps({"objects": [BOX]})))
    assert parsed.objects == [BOX]


def test_reply_with_prose_around_the_json_is_accepted():
    parsed = parse_reply("Sure! " + json.dumps({"objects": [BOX]}) + " Hope it helps.")
    assert parsed.objects == [BOX]


def test_bare_list_is_accepted():
    assert parse_reply(json.dumps([BOX, CIRCLE])).objects[1]["type"] == "circle"


def test_invalid_objects_are_dropped_and_counted():
    parsed = parse_reply(json.dumps({"objects": [BAD[0], BOX, *BAD[1:], ARROW]}))
    assert [o["type"] for o in parsed.objects] == ["rectangle", "arrow"]
    assert parsed.dropped == 4


def test_unknown_keys_are_left_out_of_valid_objects():
    parsed = parse_reply(json.dumps({"objects": [{**BOX, "id": "b1", "label": "x"}]}))
    assert parsed.objects == [BOX]


@pytest.mark.parametrize(
    "reply",
    [json.dumps({"objects": []}), json.dumps({"objects": BAD}), json.dumps([])],
)
def test_reply_with_no_valid_object_is_a_retryable_error(reply):
    with pytest.raises(BadOutput) as caught:
        parse_reply(reply)
    assert caught.value.retryable
    assert caught.value.kind is FailureKind.BAD_OUTPUT
    assert caught.value.message == "model output had no valid object"


@pytest.mark.parametrize("reply", ["", "I cannot draw that.", '{"objects": [', "```json\n{"])
def test_reply_that_is_not_json_is_a_retryable_error(reply):
    with pytest.raises(BadOutput) as caught:
        parse_reply(reply)
    assert caught.value.retryable
    assert "not valid JSON" in caught.value.message


def test_json_without_an_objects_list_is_a_retryable_error():
    with pytest.raises(BadOutput, match="objects"):
        parse_reply(json.dumps({"shapes": [BOX]}))


def test_strip_fence_leaves_text_without_a_fence_alone():
    assert strip_fence('  {"a": 1} ') == '{"a": 1}'


def test_strip_fence_takes_a_fence_cut_off_before_its_end():
    assert strip_fence('```json\n{"a": 1}') == '{"a": 1}'


def _feed_in_pieces(text, size):
    stream = ObjectStream()
    found = []
    for start in range(0, len(text), size):
        found.extend(stream.feed(text[start : start + size]))
    return stream, found


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_object_stream_finds_each_object_as_it_completes(size):
    text = "```json\n" + json.dumps({"note": "objects", "objects": [BOX, BAD[0], ARROW]}) + "\n```"
    stream, found = _feed_in_pieces(text, size)
    assert found == [(0, BOX), (1, ARROW)]
    assert stream.dropped == 1
    assert [obj for _, obj in found] == parse_reply(text).objects


def test_object_stream_ignores_brackets_inside_strings():
    tricky = {"type": "text", "x": 1, "y": 2, "text": 'a "quoted" } ] { [ \\ text'}
    _, found = _feed_in_pieces(json.dumps({"objects": [tricky, BOX]}), 2)
    assert found == [(0, tricky), (1, BOX)]


def test_object_stream_reads_a_bare_list():
    _, found = _feed_in_pieces(json.dumps([CIRCLE, BOX]), 5)
    assert [index for index, _ in found] == [0, 1]


def test_object_stream_reports_nothing_for_a_cut_off_object():
    text = json.dumps({"objects": [BOX, CIRCLE]})
    _, found = _feed_in_pieces(text[: len(text) - 10], 4)
    assert found == [(0, BOX)]
