"""The gateway's OpenAPI schema, fuzzed with schemathesis as a caller with a valid (admin)
token: every operation, inputs that fit the schema and inputs that do not (NUL bytes,
huge numbers, wrong types, missing fields), and not one answer may be a 5xx. Before the
fields refused what the store cannot hold, it found a 500 within seconds."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from tests.gateway.conftest import Gateway, token

ST = Path(sys.executable).parent / "st"
# Per operation: enough to meet NULs, surrogates and out-of-range numbers in every field
# (a seeded run, so a failure reproduces), and a few seconds for the whole schema.
MAX_EXAMPLES = 40


async def test_no_input_the_schema_allows_or_not_answers_a_server_error(
    gateway: Gateway, tmp_path: Path
) -> None:
    base = str(gateway.client.base_url).rstrip("/")
    process = await asyncio.create_subprocess_exec(
        str(ST),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--header",
        f"Authorization: {token('fuzzer', admin=True)['Authorization']}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "1",
        "--generation-allow-x00",
        "true",
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--report-dir",
        str(tmp_path),
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    # The gateway serves in this event loop: wait without blocking it.
    output, _ = await asyncio.wait_for(process.communicate(), 240)
    text = output.decode(errors="replace")

    assert process.returncode == 0, text[-6000:]
    # Every case generated passed, over every operation (admin ones too).
    summary = re.search(r"Tested: (\d+).*?(\d+) generated, (\d+) passed", text, re.DOTALL)
    assert summary is not None, text[-3000:]
    tested, generated, passed = map(int, summary.groups())
    assert generated == passed > 100
    assert tested >= 11
