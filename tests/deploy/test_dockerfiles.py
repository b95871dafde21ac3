"""The services' Dockerfiles and .dockerignore, read statically (no Docker engine runs on
these machines): each image builds from the repository root in two stages on
python:3.11-slim, installs its members from the lock without the dev tools, runs as a
non-root user, checks /health, and runs a console script its pyproject declares."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest

from tests.deploy.project import (
    APP_SERVICES,
    ROOT,
    AppService,
    Instruction,
    console_scripts,
    dockerfile_stages,
    dockerignore_patterns,
    dockerignored,
)

by_name = pytest.mark.parametrize("app", APP_SERVICES, ids=lambda app: app.name)

DEV_TOOLS = ("pytest", "ruff", "mypy", "testcontainers", "uv")


def final_stage(app: AppService) -> list[Instruction]:
    return dockerfile_stages(app.dockerfile)[-1]


def builder_stages(app: AppService) -> list[list[Instruction]]:
    return dockerfile_stages(app.dockerfile)[:-1]


def last(stage: list[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in stage if instruction.keyword == keyword]
    assert found, f"no {keyword} in the stage"
    return found[-1]


def left_out_on_purpose(relative: str) -> bool:
    # Bytecode is rebuilt in the image; the Dockerfile reaches the builder by itself,
    # and keeping it out of the context keeps an edit of it from busting the COPY cache.
    return (
        "__pycache__/" in relative
        or relative.endswith((".pyc", "/Dockerfile"))
        or ".egg-info/" in relative
    )


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match[0].lower()


@by_name
def test_image_builds_in_stages_on_python_3_11_slim(app: AppService) -> None:
    stages = dockerfile_stages(app.dockerfile)
    bases = [stage[0].arguments.split()[0] for stage in stages]

    assert len(stages) >= 2
    assert set(bases) == {"python:3.11-slim"}
    assert any(
        instruction.keyword == "COPY" and instruction.arguments.startswith("--from=")
        for instruction in stages[-1]
    )


@by_name
def test_builder_installs_the_members_non_editable_pinned_by_the_lock(app: AppService) -> None:
    runs = " ".join(
        instruction.arguments
        for stage in builder_stages(app)
        for instruction in stage
        if instruction.keyword == "RUN"
    )
    words = shlex.split(runs)

    # The lock's -e lines name the members editable; the rest of it pins everything else.
    assert "grep -v '^-e' requirements.lock > constraints.txt" in runs
    assert words[words.index("-c") + 1] == "constraints.txt"
    assert {"./libs/events", f"./services/{app.folder}"} <= set(words)
    assert "-e" not in words
    assert "--editable" not in words


@by_name
def test_builder_uses_the_makefiles_uv(app: AppService) -> None:
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^UV_VERSION := (\S+)$", makefile, re.MULTILINE)
    args = [
        instruction.arguments
        for stage in builder_stages(app)
        for instruction in stage
        if instruction.keyword == "ARG"
    ]

    assert pinned
    assert f"UV_VERSION={pinned[1]}" in args


@by_name
def test_image_installs_nothing_in_its_final_stage(app: AppService) -> None:
    runs = [
        instruction.arguments for instruction in final_stage(app) if instruction.keyword == "RUN"
    ]

    for run in runs:
        assert not re.search(r"\b(pip|uv|apt-get|apt)\b", run), run


@by_name
def test_image_dependencies_hold_no_dev_tool(app: AppService) -> None:
    for pyproject in (ROOT / "libs/events/pyproject.toml", app.pyproject):
        dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]

        assert not {requirement_name(item) for item in dependencies} & set(DEV_TOOLS)


@by_name
def test_image_runs_as_a_non_root_user(app: AppService) -> None:
    user = last(final_stage(app), "USER").arguments.split(":")[0]

    assert user not in ("root", "0")


@by_name
def test_image_prints_logs_unbuffered_and_exposes_its_port(app: AppService) -> None:
    stage = final_stage(app)
    env = " ".join(instruction.arguments for instruction in stage if instruction.keyword == "ENV")

    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert last(stage, "EXPOSE").arguments.split() == [str(app.port)]


@by_name
def test_image_healthcheck_asks_health_with_python(app: AppService) -> None:
    command = last(final_stage(app), "HEALTHCHECK").exec_form()

    # python's urllib: the slim image has no curl.
    assert command is not None
    assert command[:2] == ["python", "-c"]
    assert "urllib.request.urlopen(" in command[2]
    assert "/health" in command[2]
    assert app.port_var in command[2]


@by_name
def test_image_runs_its_console_script(app: AppService) -> None:
    assert last(final_stage(app), "CMD").exec_form() == [app.script]


@by_name
def test_console_script_of_the_image_is_declared_in_its_pyproject(app: AppService) -> None:
    assert app.script in console_scripts(app.pyproject)


def test_generator_image_also_carries_the_stand_in_model() -> None:
    generator = next(app for app in APP_SERVICES if app.name == "ai-generator")

    assert "canvas-fake-openai" in console_scripts(generator.pyproject)


@by_name
def test_every_file_the_image_copies_reaches_the_build_context(app: AppService) -> None:
    patterns = dockerignore_patterns()
    sources = [
        source
        for stage in builder_stages(app)
        for instruction in stage
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--")
        for source in instruction.arguments.split()[:-1]
    ]

    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if not left_out_on_purpose(relative):
                assert not dockerignored(relative, patterns), relative


def test_migrations_reach_the_orchestrator_image() -> None:
    migrations = ROOT / "services/job-orchestrator/src/canvas_orchestrator/migrations"

    assert list(migrations.glob("*.sql"))
    assert not dockerignored(migrations.relative_to(ROOT).as_posix(), dockerignore_patterns())


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "services/gateway/src/canvas_gateway/__pycache__/app.cpython-311.pyc",
        ".mypy_cache/3.11/cache.db",
        ".pytest_cache/v/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        "bench/results/run.json",
        ".env",
    ],
)
def test_dockerignore_keeps_local_state_and_tests_out_of_the_context(path: str) -> None:
    assert dockerignored(path, dockerignore_patterns())


@pytest.mark.parametrize(
    ("pattern", "path", "ignored"),
    [
        ("**/__pycache__", "__pycache__/x.pyc", True),
        ("**/__pycache__", "a/b/__pycache__/x.pyc", True),
        ("tests", "tests/deploy/x.py", True),
        ("tests", "services/tests.py", False),
        ("*.env", "a/b.env", False),
        ("**/*.env", "a/b.env", True),
        ("docs/*.md", "docs/a/b.md", False),
    ],
)
def test_dockerignore_reader_follows_dockers_matching(
    pattern: str, path: str, ignored: bool
) -> None:
    assert dockerignored(path, [pattern]) is ignored


def test_dockerignore_reader_lets_a_later_negation_bring_a_path_back() -> None:
    patterns = ["bench", "!bench/keep.txt"]

    assert not dockerignored("bench/keep.txt", patterns)
    assert dockerignored("bench/other.txt", patterns)
