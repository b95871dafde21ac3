from __future__ import annotations

import io
import json
import logging
from contextlib import redirect_stdout

import structlog

from canvas_events.logging import configure_logging, redact, register_secret


def test_redact_masks_registered_secrets_url_passwords_and_bearer_tokens() -> None:
    register_secret("sk-test-very-secret")
    text = redact(
        "key sk-test-very-secret url postgresql://app:hunter2@db/x Bearer abc.def.ghi ?token=xyz"
    )
    assert "sk-test-very-secret" not in text
    assert "hunter2" not in text
    assert "abc.def.ghi" not in text
    assert "xyz" not in text
    assert "postgresql://app:***@db/x" in text


def test_every_line_is_json_with_the_contract_fields() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        configure_logging("job-orchestrator", "INFO", "json")
        structlog.contextvars.bind_contextvars(job_id="j-1", correlation_id="c-1")
        structlog.get_logger("x").info("job queued", priority=5)
        structlog.contextvars.clear_contextvars()
        logging.getLogger("some.library").warning("from the standard library")
    # configure_logging bound its handler to the stdout of that moment
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["event"] == "job queued"
    assert lines[0]["service"] == "job-orchestrator"
    assert lines[0]["job_id"] == "j-1"
    assert lines[0]["correlation_id"] == "c-1"
    assert lines[0]["level"] == "info"
    assert lines[0]["timestamp"].endswith("Z")
    assert lines[1]["event"] == "from the standard library"
    assert lines[1]["service"] == "job-orchestrator"
