"""One running system (real processes) shared by the end-to-end tests of a module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.system import System, running_system


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    async with running_system(tmp_path_factory.mktemp("e2e-logs"), label="e2e") as running:
        yield running
