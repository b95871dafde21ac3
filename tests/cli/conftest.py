"""One running system (real processes) per test module, and ``canvas-jobs`` run as a
subprocess against it, as a user would."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.system import System, running_system


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(tmp_path_factory.mktemp("cli-logs"), label="cli") as running:
        yield running
