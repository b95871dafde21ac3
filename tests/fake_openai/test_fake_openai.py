"""The OpenAI-compatible stand-in: its drawings, directives and knobs, and the real
``openai`` client talking to it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from canvas_events.objects import validate_object
from canvas_fake_openai.server import (
    FakeConfig,
    FakeModel,
    FakeSettings,
    create_app,
    draw,
    parse_directives,
    reply_text,
)
from canvas_generator.parsing import ObjectStream, parse_reply
from tests.support.fake_openai import FakeOpenAI
from tests.support.processes import free_port
from tests.support.waiting import eventually


def test_same_prompt_gives_the_same_drawing():
    assert draw("a flowchart of a login process") == draw("a flowchart of a login process")
    assert draw("a flowchart of a login process") != draw("an org chart of a small company")


@pytest.mark.parametrize("topic", ["a flowchart of a login process", "", "日本語の図", "x" * 500])
def test_drawings_are_plausible_and_valid(topic):
    objects = draw(topic)
    assert 3 <= len(objects) <= 12
    assert all(validate_object(obj) is not None for obj in objects)
    assert objects[0]["type"] == "text"
    assert {obj["type"] for obj in objects} & {"rectangle", "sticky_note", "circle"}


@pytest.mark.parametrize("count", [0, 1, 2, 7, 40])
def test_objects_directive_gives_exactly_that_many(count):
    objects = draw("a pipeline", count)
    assert len(objects) == count
    assert all(validate_object(obj) is not None for obj in objects)


def test_directives_are_read_and_removed_from_the_topic():
    directives, topic = parse_directives(
        "a [[fake:status=429,retry_after=2]] flow [[fake:fence]] [[fake:bogus=1]][[fake:objects=x]]"
    )
    assert (directives.status, directives.retry_after, directives.fence) == (429, 2.0, True)
    assert directives.objects is None
    assert topic == "a flow"


def test_reply_directives_shape_what_the_parser_sees():
    def reply(directive):
        return reply_text("a flow", parse_directives(directive)[0])

    assert parse_reply(reply("[[fake:invalid=3,objects=4]]")).dropped == 3
    assert reply("[[fake:fence]]").startswith("```json\n")
    assert parse_reply(reply("[[fake:fence]]")).objects == draw("a flow")
    for broken in ("[[fake:empty]]", "[[fake:garbage]]"):
        with pytest.raises(ValueError):
            parse_reply(reply(broken))


def _client(model: FakeModel) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(model)), base_url="http://fake"
    )


def _chat_body(content: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}


async def test_wrong_key_gets_401_in_openai_error_shape():
    model = FakeModel(FakeConfig(require_key="sk-right-key-123456"))
    async with _client(model) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=_chat_body("x"),
            headers={"Authorization": "Bearer sk-wrong-key-654321"},
        )
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}
    assert "sk-wrong-key-654321" not in error["message"]
    assert model.stats.failures["401"] == 1


async def test_together_directive_holds_calls_until_enough_are_in_flight():
    model = FakeModel(FakeConfig())
    async with _client(model) as client:
        calls = [
            asyncio.create_task(
                client.post("/v1/chat/completions", json=_chat_body("x [[fake:together=3]]"))
            )
            for _ in range(2)
        ]
        await eventually(lambda: model.stats.in_flight == 2, what="2 calls held")
        assert not any(call.done() for call in calls)
        third = await client.post("/v1/chat/completions", json=_chat_body("x [[fake:together=3]]"))
        responses = [third, *await asyncio.gather(*calls)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert model.stats.max_in_flight == 3
    assert model.stats.in_flight == 0


async def test_failure_knobs_change_at_runtime_and_show_in_stats():
    model = FakeModel(FakeConfig())
    async with _client(model) as client:
        config = await client.put(
            "/_fake/config", json={"failure_rate": 1.0, "failure_modes": "503"}
        )
        assert config.json()["failure_modes"] == ["503"]
        failed = await client.post("/v1/chat/completions", json=_chat_body("x"))
        assert failed.status_code == 503
        assert failed.headers["retry-after"] == "1"
        await client.put("/_fake/config", json={"failure_rate": 0})
        assert (await client.post("/v1/chat/completions", json=_chat_body("x"))).is_success
        stats = (await client.get("/_fake/stats")).json()
    assert stats["calls"] == 2
    assert stats["failures"] == {"503": 1}


async def test_unknown_knob_or_failure_mode_is_refused():
    async with _client(FakeModel(FakeConfig())) as client:
        assert (await client.put("/_fake/config", json={"speed": 3})).status_code == 422
        bad_mode = await client.put("/_fake/config", json={"failure_modes": "explode"})
        assert bad_mode.status_code == 422


async def test_malformed_request_gets_400_in_openai_error_shape():
    async with _client(FakeModel(FakeConfig())) as client:
        response = await client.post("/v1/chat/completions", json={"messages": []})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def chat(client: openai.AsyncOpenAI, content: str, **options: Any) -> Any:
    """A chat call with one user message ``content`` (``stream=True``, ...)."""
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], **options
    )


async def calls_over(fake: FakeOpenAI, before: dict[str, Any], *, what: str) -> dict[str, Any]:
    """The stand-in's stats once it has no more calls in flight than ``before``."""

    def over() -> dict[str, Any] | None:
        stats = fake.stats()
        return stats if stats["in_flight"] == before["in_flight"] else None

    return await eventually(over, what=what)


async def test_openai_client_streams_from_the_stand_in(openai_client):
    stream = await chat(
        openai_client,
        "a flowchart of a login process",
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish_reasons = [], None, []
    progress = ObjectStream()
    seen = []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                seen.extend(progress.feed(choice.delta.content))
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    text = "".join(pieces)
    assert len(pieces) > 5
    assert finish_reasons == ["stop"]
    assert usage is not None
    assert usage.completion_tokens > 0
    assert parse_reply(text).objects == draw("a flowchart of a login process")
    assert [obj for _, obj in seen] == parse_reply(text).objects


async def test_cut_stream_ends_midway_without_a_finish(openai_client):
    stream = await chat(openai_client, "a flow [[fake:cut]]", stream=True)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert not any(c.choices and c.choices[0].finish_reason for c in chunks)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


async def test_error_event_makes_the_openai_client_raise_midway(openai_client):
    stream = await chat(openai_client, "a flow [[fake:error_event]]", stream=True)
    pieces: list[str] = []

    async def read() -> None:
        async for chunk in stream:
            pieces.extend(c.delta.content or "" for c in chunk.choices)

    with pytest.raises(openai.APIError) as caught:
        await read()
    # Not a status error: the answer began with 200, the error came inside it.
    assert type(caught.value) is openai.APIError
    assert caught.value.message == "The server had an error while processing your request (fake)."
    assert "".join(pieces)
    with pytest.raises(openai.InternalServerError):
        await chat(openai_client, "a flow [[fake:error_event]]")


async def test_openai_client_lists_the_stand_in_by_its_own_name(openai_client):
    models = [model.id async for model in openai_client.models.list()]
    assert models == ["canvas-stand-in"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_reply_names_the_stand_in_never_an_openai_model(openai_client, stream):
    async def model_of(asked: str) -> str:
        reply = await openai_client.chat.completions.create(
            model=asked, messages=[{"role": "user", "content": "a flow"}], stream=stream
        )
        if not stream:
            return str(reply.model)
        return str({chunk.model async for chunk in reply}.pop())

    # Any model is accepted, and said to be what was asked for, not what answered.
    assert await model_of("gpt-4o-mini") == "canvas-stand-in (asked: gpt-4o-mini)"
    assert await model_of("canvas-stand-in") == "canvas-stand-in"


@pytest.mark.parametrize("directive", ["delay_ms=60000", "together=99", "timeout"])
async def test_a_waiting_call_ends_when_its_client_hangs_up_and_counts_as_abandoned(
    fake_openai, openai_client, directive
):
    before = fake_openai.stats()
    call = asyncio.create_task(chat(openai_client, f"x [[fake:{directive}]]"))
    await eventually(
        lambda: fake_openai.stats()["in_flight"] == before["in_flight"] + 1,
        what="the call held",
    )
    call.cancel()  # closes the connection, as an aborted attempt does
    with pytest.raises(asyncio.CancelledError):
        await call
    after = await calls_over(fake_openai, before, what="the stand-in to let the call go")
    assert after["abandoned"] == before["abandoned"] + 1


def test_stream_pieces_are_small_enough_for_objects_to_complete_one_by_one():
    # Each object spans several chunks, so a reader sees them complete one at a time.
    text = reply_text("a flowchart of a login process", parse_directives("x")[0])
    pieces = _pieces(text)
    assert all(4 <= len(piece) <= 16 for piece in pieces[:-1])
    found_per_piece = [len(found) for found in map(ObjectStream().feed, pieces)]
    assert max(found_per_piece) == 1
    assert sum(found_per_piece) == len(draw("a flowchart of a login process"))


def _pieces(text: str) -> list[str]:
    """The content of each chunk the stand-in streams for ``text``."""

    async def collect() -> list[str]:
        from canvas_fake_openai.server import _stream

        chunks = _stream(
            text,
            completion_id="c",
            created=0,
            model_name="m",
            usage=None,
            chunk_delay=0,
            cut=False,
            gate=None,
            seed="s",
        )
        contents = []
        async for raw in chunks:
            payload = raw.decode().removeprefix("data: ").strip()
            if payload != "[DONE]":
                for choice in json.loads(payload)["choices"]:
                    if choice["delta"].get("content"):
                        contents.append(choice["delta"]["content"])
        return contents

    return asyncio.run(collect())


async def test_a_gated_stream_pauses_halfway_until_its_gate_opens(fake_openai, openai_client):
    gate = f"gate-{id(fake_openai)}-pause"
    stream = await chat(openai_client, f"a flow [[fake:objects=10,gate={gate}]]", stream=True)
    objects = ObjectStream()
    found: list[Any] = []
    rest: list[Any] = []
    chunks = aiter(stream)
    while len(found) < 1:
        chunk = await anext(chunks)
        found.extend(objects.feed(chunk.choices[0].delta.content or ""))
    # An object arrived before the gate opened: the reply streams up to its gate.
    fake_openai.open_gate(gate)
    for chunk in [c async for c in chunks]:
        if chunk.choices:
            found.extend(objects.feed(chunk.choices[0].delta.content or ""))
            rest.append(chunk)
    assert len(found) == 10
    assert rest[-1].choices[0].finish_reason == "stop"


async def test_a_stream_abandoned_midway_counts_as_abandoned(fake_openai, openai_client):
    gate = f"gate-{id(fake_openai)}-abandon"
    before = fake_openai.stats()
    stream = await chat(openai_client, f"a flow [[fake:objects=10,gate={gate}]]", stream=True)
    await anext(aiter(stream))
    await stream.close()  # hangs up while the reply waits at its gate
    after = await calls_over(fake_openai, before, what="the stand-in to let the stream go")
    assert after["abandoned"] == before["abandoned"] + 1


async def test_a_finished_stream_is_not_abandoned(fake_openai, openai_client):
    before = fake_openai.stats()
    for directive in ("objects=3", "cut"):
        stream = await chat(openai_client, f"a flow [[fake:{directive}]]", stream=True)
        _ = [chunk async for chunk in stream]
    after = await calls_over(fake_openai, before, what="the streams over")
    assert after["abandoned"] == before["abandoned"]


async def test_first_n_makes_only_the_first_calls_of_a_message_fail(openai_client):
    message = f"a flow {id(object())} [[fake:status=503,first=2]]"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await chat(openai_client, message)
    reply = await chat(openai_client, message)
    assert parse_reply(reply.choices[0].message.content or "").objects


# -- the drawing: every box is reached --------------------------------------------------


def _boxes(objects: list[dict[str, Any]]) -> list[tuple[float, float, float, float]]:
    """(left, top, right, bottom) of each node of the flowchart, in order."""
    boxes = []
    for obj in objects:
        if obj["type"] == "circle":
            x, y, r = obj["x"], obj["y"], obj["radius"]
            boxes.append((x - 100, y - r, x + 100, y + r))  # in its 200-wide cell
        elif obj["type"] in ("rectangle", "sticky_note"):
            boxes.append((obj["x"], obj["y"], obj["x"] + obj["width"], obj["y"] + obj["height"]))
    return boxes


def _unreached(objects: list[dict[str, Any]]) -> list[int]:
    """The nodes after the first that no arrow ends on (top edge or left side)."""
    ends = [tuple(obj["points"][-1]) for obj in objects if obj["type"] == "arrow"]
    unreached = []
    for index, (left, top, right, bottom) in enumerate(_boxes(objects)[1:], 1):
        if not any(
            (y == top and left <= x <= right) or (x == left and top <= y <= bottom) for x, y in ends
        ):
            unreached.append(index)
    return unreached


@pytest.mark.parametrize("count", [None, *range(1, 25)])
def test_every_box_after_the_first_has_an_arrow_to_it(count):
    for topic in ("checkout", "a flowchart of a login flow", "an order's way from cart to door"):
        objects = draw(topic, count)
        assert _unreached(objects) == [], (topic, objects)
        if count is not None:
            assert len(objects) == count


def test_the_readmes_prompt_draws_arrows_into_its_boxes():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [prompt] = set(re.findall(r'"query": "([^"]+)"', readme))
    objects = draw(prompt)
    assert len(_boxes(objects)) >= 2
    assert sum(obj["type"] == "arrow" for obj in objects) == len(_boxes(objects)) - 1
    assert _unreached(objects) == []


def test_the_unreached_check_sees_a_box_without_an_arrow():
    objects = draw("checkout", 4)  # title, two boxes and the arrow between them
    assert _unreached(objects[:3]) == [1]


# -- the command line ------------------------------------------------------------------

COMMAND = str(Path(sys.executable).parent / "canvas-fake-openai")


def test_help_documents_every_knob_and_starts_nothing():
    answer = subprocess.run(
        [COMMAND, "--help"], capture_output=True, text=True, timeout=20, check=False
    )
    assert answer.returncode == 0, answer.stderr
    for name in FakeSettings.model_fields:
        if not name.startswith("log_"):
            assert f"--{name.replace('_', '-')}" in answer.stdout
            assert f"FAKE_OPENAI_{name.upper()}" in answer.stdout
    assert "[[fake:delay_ms=" in answer.stdout  # how to make one job slow


def test_a_flag_wins_over_its_variable_and_a_bad_one_is_named():
    port = free_port()
    env = {**os.environ, "FAKE_OPENAI_DELAY_MS": "1", "FAKE_OPENAI_SEED": "7"}
    args = ["--port", str(port), "--delay-ms", "250", "--failure-rate", "0.5"]
    process = subprocess.Popen([COMMAND, *args, "--failure-modes", "timeout"], env=env)
    try:
        config = wait_for_config(f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(20)
    assert (config["delay_ms"], config["failure_rate"]) == (250, 0.5)
    assert config["failure_modes"] == ["timeout"]

    bad = subprocess.run(
        [COMMAND, "--failure-rate", "3"], capture_output=True, text=True, timeout=20, check=False
    )
    assert bad.returncode == 2
    assert "--failure-rate / FAKE_OPENAI_FAILURE_RATE" in bad.stderr


def wait_for_config(url: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        try:
            return dict(httpx.get(f"{url}/_fake/config", timeout=2).json())
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
