"""One running system (real processes) shared by the end-to-end tests of a module,
started with the module's ``SYSTEM_ENV`` settings, if it has any, on top of the
defaults (tests/support/system.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.system import System, running_system


@pytest.fixture(scope="module")
async def system(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    label = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    async with running_system(
        tmp_path_factory.mktemp(f"{label}-logs"),
        label=label,
        extra_env=getattr(request.module, "SYSTEM_ENV", None),
    ) as running:
        yield running
