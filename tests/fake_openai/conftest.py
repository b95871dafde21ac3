"""Fixtures of the stand-in model's tests: one ``canvas-fake-openai`` process for the
session, requiring API_KEY, and the real ``openai`` client talking to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from tests.support.fake_openai import FakeOpenAI

API_KEY = "sk-fake-openai-tests-0123456789abcdef"


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    """The stand-in model as a real process, requiring API_KEY."""
    with FakeOpenAI(require_key=API_KEY) as fake:
        yield fake


@pytest.fixture
async def openai_client(fake_openai: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    """The real ``openai`` client on the stand-in, with no retries of its own (a test
    counts every call), waiting up to 120 s for an answer (a held call takes long)."""
    async with openai.AsyncOpenAI(
        api_key=API_KEY, base_url=fake_openai.base_url, max_retries=0, timeout=120
    ) as client:
        yield client
