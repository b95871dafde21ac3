"""Server-sent events split out of a byte stream, however its reads fall."""

from __future__ import annotations

import json

import pytest

from canvas_generator.sse import EventStream


def events_of(*reads: bytes) -> list[bytes]:
    stream = EventStream()
    return [data for read in reads for data in stream.feed(read)]


def test_each_event_gives_its_data_without_the_space_after_the_colon():
    body = b'data: {"a": 1}\n\ndata:{"b": 2}\n\ndata: [DONE]\n\n'
    assert events_of(body) == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]


def test_events_split_anywhere_between_reads_come_out_whole_and_in_order():
    body = b'data: {"a": 1}\n\n: keep-alive\n\ndata: {"b": "x y"}\r\n\r\ndata: [DONE]\r\r'
    expected = [b'{"a": 1}', b'{"b": "x y"}', b"[DONE]"]
    assert events_of(*(body[i : i + 1] for i in range(len(body)))) == expected
    for cut in range(len(body) + 1):
        assert events_of(body[:cut], body[cut:]) == expected, cut


def test_a_crlf_split_between_reads_ends_one_line_only():
    # Were the LF taken for a second line end, the event would end after "a".
    assert events_of(b"data: a\r", b"\ndata: b\r\n\r\n") == [b"a\nb"]


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_lines_may_end_with_lf_crlf_or_cr(end):
    assert events_of(b"data: one" + end + end + b"data: two" + end + end) == [b"one", b"two"]


def test_the_data_lines_of_one_event_are_joined_by_a_newline():
    assert events_of(b"data: first\ndata:\ndata:  third\n\n") == [b"first\n\n third"]


def test_comments_and_other_fields_are_skipped():
    body = b": ping\nevent: message\nid: 7\nretry: 100\ndata: x\ndata2: y\n\nevent: only\n\n"
    assert events_of(body) == [b"x"]


def test_an_event_not_closed_by_a_blank_line_is_not_given():
    stream = EventStream()
    assert stream.feed(b"data: complete\n\ndata: cut off") == [b"complete"]
    assert stream.feed(b" here\n") == []


def test_unicode_line_separators_inside_json_do_not_end_a_line():
    text = "a\u2028b\u0085c\u2029d"
    payload = json.dumps({"content": text}, ensure_ascii=False).encode()
    (data,) = events_of(b"data: " + payload + b"\n\n")
    assert json.loads(data)["content"] == text
