"""``canvas-jobs`` run in-process: exit codes of usage errors, the token command."""

from __future__ import annotations

import pytest

from canvas_cli.__main__ import main
from canvas_events.auth import decode_token
from canvas_events.settings import DEV_JWT_SECRET


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CANVAS_TOKEN",
        "CANVAS_GATEWAY_URL",
        "CANVAS_NOTIFIER_URL",
        "JWT_SECRET",
        "CANVAS_ENV",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["submit"],  # no prompt
        ["submit", "a box", "--priority", "12"],
        ["status", "not-a-uuid"],
        ["jobs", "--status", "sleeping"],
        ["jobs", "--page-size", "500"],
        ["token"],  # no --user
        ["token", "--user", "u", "--ttl-hours", "0"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_3_not_2_which_means_cancelled(argv: list[str]) -> None:
    assert main(argv) == 3


def test_a_command_without_a_token_says_how_to_get_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["status", "3f1c9a52-8d7e-4b1a-9c33-2f5d6e7a8b90"]) == 3
    err = capsys.readouterr().err
    assert "canvas-jobs: error: no token: set CANVAS_TOKEN or pass --token" in err
    assert "canvas-jobs token --user NAME" in err


def test_token_without_jwt_secret_says_what_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--user", "alice"]) == 3
    err = capsys.readouterr().err
    assert "canvas-jobs: error: JWT_SECRET is not set" in err
    assert "CANVAS_ENV=development" in err


def test_token_in_development_warns_and_signs_with_the_development_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANVAS_ENV", "development")
    assert main(["token", "--user", "alice", "--admin", "--ttl-hours", "2"]) == 0
    captured = capsys.readouterr()
    assert "warning: JWT_SECRET is not set" in captured.err
    principal = decode_token(captured.out.strip(), DEV_JWT_SECRET)
    assert principal.user_id == "alice"
    assert principal.is_admin


def test_token_signs_with_jwt_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "a-test-secret-that-is-long-enough-for-hs256"
    monkeypatch.setenv("JWT_SECRET", secret)
    assert main(["token", "--user", "bob"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    principal = decode_token(captured.out.strip(), secret)
    assert principal.user_id == "bob"
    assert not principal.is_admin


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    name, version = capsys.readouterr().out.split()
    assert name == "canvas-jobs"
    assert version.count(".") == 2  # the package's own version (pyproject), e.g. 0.1.0


def test_shell_completion_script_is_printed_for_bash(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where Typer can tell the shell it runs under, --show-completion is a flag and
    # "bash" an extra argument; under a process tree with no shell in it (a CI runner's
    # `timeout make test`) it detects none. Typer's own switch for its tests makes the
    # option take the shell's name whatever the process tree.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    # Typer's completion options end the process themselves, with status 0.
    with pytest.raises(SystemExit) as exited:
        main(["--show-completion", "bash"])
    assert exited.value.code in (0, None)
    script = capsys.readouterr().out
    assert "complete" in script
    assert "canvas-jobs" in script or "canvas_jobs" in script
