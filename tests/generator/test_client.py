"""The model client on its own against the stand-in model (a real process): a streamed
reply read off the wire, and each way a stream can end."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator

import aiohttp
import httpx2
import openai
import pytest
from openai._vendor.httpx_aiohttp.transport import map_aiohttp_exceptions

from canvas_generator.client import ModelClient, _as_openai_error
from canvas_generator.errors import AttemptFailed, BadOutput, FailureKind, broke_off
from canvas_generator.prompt import build_messages
from tests.generator.conftest import API_KEY
from tests.support.fake_openai import FakeOpenAI
from tests.support.proxy import proxy
from tests.support.waiting import eventually

REQUEST = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")


@pytest.fixture
async def client(fake_openai: FakeOpenAI) -> AsyncIterator[ModelClient]:
    model = ModelClient(
        api_key=API_KEY, base_url=fake_openai.base_url, model="gpt-4o-mini", timeout_seconds=10
    )
    yield model
    await model.aclose()


async def test_a_streamed_reply_comes_piece_by_piece_and_reads_as_the_whole_one(
    fake_openai, client
):
    messages = build_messages("a flowchart of a login process")
    pieces: list[str] = []
    streamed = await client.complete(messages, on_text=pieces.append)
    whole_client = ModelClient(
        api_key=API_KEY,
        base_url=fake_openai.base_url,
        model="gpt-4o-mini",
        timeout_seconds=10,
        stream=False,
    )
    try:
        whole = await whole_client.complete(messages)
    finally:
        await whole_client.aclose()
    assert len(pieces) > 5
    assert streamed.text == "".join(pieces) == whole.text
    assert (streamed.model, streamed.finish_reason) == (
        "canvas-stand-in (asked: gpt-4o-mini)",
        "stop",
    )
    assert whole.model == streamed.model
    # The usage comes in the stream's last chunk, the same as the whole reply's.
    assert streamed.usage == whole.usage
    assert set(streamed.usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_a_streamed_call_sends_what_chat_completions_create_sends(fake_openai, client):
    messages = build_messages(f"a flow {uuid.uuid4().hex}")
    await client.complete(messages)
    (ours,) = [r for r in fake_openai.requests() if r["messages"] == messages]
    sdk = openai.AsyncOpenAI(api_key=API_KEY, base_url=fake_openai.base_url, max_retries=0)
    async with sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages,
            response_format={"type": "json_object"},
            stream=True,
            stream_options={"include_usage": True},
        )
        _ = [chunk async for chunk in stream]
    (_, theirs) = [r for r in fake_openai.requests() if r["messages"] == messages]
    assert ours == theirs
    assert ours["stream"] is True
    assert ours["stream_options"] == {"include_usage": True}


async def _broken_off(
    client: ModelClient, how: str, raises: type[AttemptFailed]
) -> tuple[AttemptFailed, str]:
    """What a streamed call whose reply breaks off midway (``how``: the stand-in's marker)
    raised, and the text handed on before the break (there must be some)."""
    pieces: list[str] = []
    with pytest.raises(raises) as caught:
        await client.complete(
            build_messages(f"a flow [[fake:objects=8,{how}]]"), on_text=pieces.append
        )
    assert pieces  # what came before the break was handed on
    return caught.value, "".join(pieces)


async def test_an_error_event_midway_fails_retryable_with_the_server_message(client):
    failure, _ = await _broken_off(client, "error_event", AttemptFailed)
    assert (failure.kind, failure.retryable) == (FailureKind.SERVER_ERROR, True)
    assert failure.message == (
        "OpenAI reported an error midway through its reply: "
        "The server had an error while processing your request (fake)."
    )


async def test_a_stream_that_ends_without_a_finish_reason_is_cut_off(client):
    failure, text = await _broken_off(client, "cut", BadOutput)
    assert (failure.kind, failure.retryable) == (FailureKind.BAD_OUTPUT, True)
    assert "cut off midway" in failure.message
    assert f"after {len(text)} characters" in failure.message


async def test_what_on_text_raises_reaches_the_caller_unchanged(client):
    class Full(Exception):
        pass

    def refuse(piece: str) -> None:
        raise Full(piece)

    with pytest.raises(Full):
        await client.complete(build_messages("a flow"), on_text=refuse)


async def test_a_connection_lost_midway_is_a_retryable_connection_failure():
    gate = uuid.uuid4().hex
    pieces: list[str] = []
    some = asyncio.Event()

    def on_text(piece: str) -> None:
        pieces.append(piece)
        some.set()

    with FakeOpenAI() as fake:
        model = ModelClient(
            api_key=API_KEY, base_url=fake.base_url, model="gpt-4o-mini", timeout_seconds=10
        )
        call = asyncio.create_task(
            model.complete(
                build_messages(f"a flow [[fake:objects=12,gate={gate}]]"), on_text=on_text
            )
        )
        await asyncio.wait_for(some.wait(), 10)
        fake.process.kill()  # kill -9 while the reply waits at its gate
        with pytest.raises(AttemptFailed) as caught:
            await call
        await model.aclose()
    failure = caught.value
    assert (failure.kind, failure.retryable) == (FailureKind.CONNECTION, True)
    cause = re.search(r"midway through its reply \((\w+)\)", failure.message)
    assert cause is not None, failure.message
    assert cause.group(1) in {"RemoteProtocolError", "ReadError"}
    assert f"after {len(''.join(pieces))} characters" in failure.message


def _mapped(error: aiohttp.ClientError) -> Exception:
    """``error`` as the openai client's aiohttp transport raises it."""
    try:
        with map_aiohttp_exceptions():
            raise error
    except Exception as exc:
        return exc
    raise AssertionError("not raised")


@pytest.mark.parametrize(
    ("error", "kind", "said"),
    [
        (httpx2.ReadTimeout("slow"), FailureKind.TIMEOUT, "did not finish its reply within 9 s"),
        (
            httpx2.RemoteProtocolError("peer closed"),
            FailureKind.CONNECTION,
            "(RemoteProtocolError)",
        ),
        (httpx2.ReadError("reset"), FailureKind.CONNECTION, "(ReadError)"),
        # The aiohttp transport maps a connection the server closed to a ConnectTimeout.
        (
            _mapped(aiohttp.ServerDisconnectedError()),
            FailureKind.CONNECTION,
            "broke off midway through its reply (ServerDisconnectedError)",
        ),
        (
            _mapped(aiohttp.SocketTimeoutError("slow")),
            FailureKind.TIMEOUT,
            "did not finish its reply within 9 s",
        ),
    ],
)
def test_a_read_that_breaks_classifies_as_the_openai_client_raised_it(error, kind, said):
    failure = broke_off(_as_openai_error(error, REQUEST), received_chars=7, timeout_seconds=9)
    assert (failure.kind, failure.retryable) == (kind, True)
    assert said in failure.message
    assert "after 7 characters" in failure.message


def test_an_error_that_is_not_a_broken_read_is_left_as_it_is():
    error = ValueError("not JSON")
    assert _as_openai_error(error, REQUEST) is error


async def test_a_stalled_stream_times_out_and_hangs_up(fake_openai):
    gate = uuid.uuid4().hex
    before = fake_openai.stats()
    model = ModelClient(
        api_key=API_KEY, base_url=fake_openai.base_url, model="gpt-4o-mini", timeout_seconds=1
    )
    try:
        with pytest.raises(AttemptFailed) as caught:
            await model.complete(build_messages(f"a flow [[fake:objects=12,gate={gate}]]"))
    finally:
        await model.aclose()
        fake_openai.open_gate(gate)
    assert (caught.value.kind, caught.value.retryable) == (FailureKind.TIMEOUT, True)
    assert "within 1 s" in caught.value.message
    await eventually(
        lambda: fake_openai.stats()["in_flight"] == before["in_flight"],
        what="the stand-in to see the call end",
    )
    assert fake_openai.stats()["abandoned"] == before["abandoned"] + 1


async def test_cancelling_the_call_midway_closes_its_connection(fake_openai, client):
    gate = uuid.uuid4().hex
    before = fake_openai.stats()
    some = asyncio.Event()
    call = asyncio.create_task(
        client.complete(
            build_messages(f"a flow [[fake:objects=12,gate={gate}]]"),
            on_text=lambda _: some.set(),
        )
    )
    await asyncio.wait_for(some.wait(), 10)
    call.cancel()  # as a job cancel does
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(
        lambda: fake_openai.stats()["in_flight"] == before["in_flight"],
        what="the stand-in to see the client go",
    )
    assert fake_openai.stats()["abandoned"] == before["abandoned"] + 1
    fake_openai.open_gate(gate)  # nobody waits there any more


async def test_streamed_calls_one_after_another_share_one_connection(fake_openai):
    # Reading past [DONE] to the end of the body gives the connection back to the pool;
    # leaving the end unread would close it and open a new one (a TLS handshake) per call.
    async with proxy(fake_openai.base_url) as between:
        client = ModelClient(
            api_key=API_KEY,
            base_url=between.url(fake_openai.base_url),
            model="gpt-4o-mini",
            timeout_seconds=10,
        )
        ends: list[str | None] = []
        try:
            for query in ("a flow", "a flow [[fake:cut]]", "a flow", "a flow"):
                try:
                    ends.append((await client.complete(build_messages(query))).finish_reason)
                except BadOutput:
                    ends.append(None)
        finally:
            await client.aclose()
    assert ends == ["stop", None, "stop", "stop"]
    assert between.accepted == 1
