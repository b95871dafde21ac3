"""The OpenAI-compatible stand-in: its drawings, directives and knobs, and the real
``openai`` client talking to it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from canvas_events.objects import validate_object
from canvas_fake_openai.server import (
    FakeConfig,
    FakeModel,
    create_app,
    draw,
    parse_directives,
    reply_text,
)
from canvas_generator.parsing import ObjectStream, parse_reply
from tests.support.fake_openai import FakeOpenAI
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


async def test_openai_client_lists_the_stand_in_models(openai_client):
    models = [model.id async for model in openai_client.models.list()]
    assert "gpt-4o-mini" in models


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
