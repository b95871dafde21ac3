"""The Dockerfile and .dockerignore, read statically (no Docker engine runs on these
machines). One Dockerfile builds every image, the SERVICE build argument naming which:
each image builds from the repository root in stages on python:3.11-slim, installs its
members from the lock without the dev tools, runs as a non-root user, checks /health,
and runs a console script its pyproject declares."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest

from tests.deploy.project import (
    DOCKERFILE,
    IMAGES,
    ROOT,
    STAND_IN_IMAGE,
    Build,
    Image,
    Instruction,
    Stage,
    console_scripts,
    dockerfile_build,
    dockerfile_global_args,
    dockerignore_patterns,
    dockerignored,
)

by_image = pytest.mark.parametrize("image", IMAGES, ids=lambda image: image.folder)

DEV_TOOLS = ("pytest", "ruff", "mypy", "testcontainers", "uv")


def build(image: Image) -> Build:
    """The Dockerfile as `docker build --build-arg SERVICE=<folder>` sees it."""
    return dockerfile_build(DOCKERFILE, image.build_args)


def final_stage(image: Image) -> list[Instruction]:
    """Every instruction of the image: its stage's and those of the stages below it."""
    return build(image).instructions


def builder_stages(image: Image) -> list[list[Stage]]:
    """The stages the image copies from, each with the stages it is built FROM."""
    return build(image).builders


def builder_instructions(image: Image, keyword: str) -> list[str]:
    return [
        instruction.arguments
        for chain in builder_stages(image)
        for stage in chain
        for instruction in stage.instructions
        if instruction.keyword == keyword
    ]


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


def test_one_dockerfile_builds_every_service_under_services() -> None:
    members = {path.parent.name for path in ROOT.glob("services/*/pyproject.toml")}

    assert DOCKERFILE.is_file()
    assert not list(ROOT.glob("services/*/Dockerfile"))
    assert {image.folder for image in IMAGES} == members


def test_the_service_build_argument_has_no_default() -> None:
    # Forgetting --build-arg SERVICE fails the build (FROM image-: no such image) rather
    # than build some service nobody asked for.
    assert dockerfile_global_args(DOCKERFILE)["SERVICE"] is None


def test_each_images_stage_is_named_after_its_service() -> None:
    stages = dockerfile_build(DOCKERFILE, {}).stages
    named = {stage.name for stage in stages if stage.name and stage.name.startswith("image-")}

    assert named == {f"image-{image.folder}" for image in IMAGES}


@by_image
def test_the_service_build_argument_picks_its_images_stage(image: Image) -> None:
    names = [stage.name for stage in build(image).image]

    assert f"image-{image.folder}" in names
    assert [name for name in names if name and name.startswith("image-")] == [
        f"image-{image.folder}"
    ]


@by_image
def test_image_builds_in_stages_on_python_3_11_slim(image: Image) -> None:
    built = build(image)
    bases = {built.base} | {chain[0].base for chain in built.builders}

    assert len(built.stages) >= 2
    assert built.builders
    assert bases == {"python:3.11-slim"}
    assert any(
        instruction.keyword == "COPY" and instruction.arguments.startswith("--from=")
        for instruction in built.instructions
    )


@by_image
def test_builder_installs_the_members_non_editable_pinned_by_the_lock(image: Image) -> None:
    runs = " ".join(builder_instructions(image, "RUN"))
    words = shlex.split(runs)

    # The lock's -e lines name the members editable; the rest of it pins everything else.
    assert "grep -v '^-e' requirements.lock > constraints.txt" in runs
    assert words[words.index("-c") + 1] == "constraints.txt"
    assert {"./libs/events", f"./services/{image.folder}"} <= set(words)
    assert "-e" not in words
    assert "--editable" not in words


@by_image
def test_builder_installs_its_service_only(image: Image) -> None:
    words = shlex.split(" ".join(builder_instructions(image, "RUN")))
    services = {word for word in words if word.startswith("./services/")}

    assert services == {f"./services/{image.folder}"}


@by_image
def test_builder_uses_the_makefiles_uv(image: Image) -> None:
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^UV_VERSION := (\S+)$", makefile, re.MULTILINE)

    assert pinned
    assert f"UV_VERSION={pinned[1]}" in builder_instructions(image, "ARG")


@by_image
def test_image_installs_nothing_in_its_final_stage(image: Image) -> None:
    runs = [
        instruction.arguments for instruction in final_stage(image) if instruction.keyword == "RUN"
    ]

    for run in runs:
        assert not re.search(r"\b(pip|uv|apt-get|apt)\b", run), run


@by_image
def test_image_dependencies_hold_no_dev_tool(image: Image) -> None:
    for pyproject in (ROOT / "libs/events/pyproject.toml", image.pyproject):
        dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]

        assert not {requirement_name(item) for item in dependencies} & set(DEV_TOOLS)


@by_image
def test_image_runs_as_a_non_root_user(image: Image) -> None:
    user = last(final_stage(image), "USER").arguments.split(":")[0]

    assert user not in ("root", "0")


@by_image
def test_image_prints_logs_unbuffered_and_exposes_its_port(image: Image) -> None:
    stage = final_stage(image)
    env = " ".join(instruction.arguments for instruction in stage if instruction.keyword == "ENV")

    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert re.search(rf"\b{image.port_var}={image.port}\b", env)
    assert last(stage, "EXPOSE").arguments.split() == [str(image.port)]


@by_image
def test_image_healthcheck_asks_health_with_python(image: Image) -> None:
    command = last(final_stage(image), "HEALTHCHECK").exec_form()

    # python's urllib: the slim image has no curl.
    assert command is not None
    assert command[:2] == ["python", "-c"]
    assert "urllib.request.urlopen(" in command[2]
    assert "/health" in command[2]
    assert image.port_var in command[2]


@by_image
def test_image_runs_its_console_script(image: Image) -> None:
    assert last(final_stage(image), "CMD").exec_form() == [image.script]


@by_image
def test_console_script_of_the_image_is_declared_in_its_pyproject(image: Image) -> None:
    assert image.script in console_scripts(image.pyproject)


def test_stand_in_model_listens_on_every_interface_in_its_image() -> None:
    env = " ".join(
        instruction.arguments
        for instruction in final_stage(STAND_IN_IMAGE)
        if instruction.keyword == "ENV"
    )

    # Its own default, 127.0.0.1, would be out of the other containers' reach.
    assert re.search(r"\bFAKE_OPENAI_HOST=0\.0\.0\.0\b", env)


def test_only_the_stand_in_models_package_declares_its_console_script() -> None:
    declaring = [
        image.folder
        for image in IMAGES
        if STAND_IN_IMAGE.script in console_scripts(image.pyproject)
    ]

    # Two members declaring one script would remove each other's on reinstall.
    assert declaring == [STAND_IN_IMAGE.folder]


@by_image
def test_every_file_the_image_copies_reaches_the_build_context(image: Image) -> None:
    patterns = dockerignore_patterns()
    sources = [
        source
        for arguments in builder_instructions(image, "COPY")
        if not arguments.startswith("--")
        for source in arguments.split()[:-1]
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
    orchestrator = next(image for image in IMAGES if image.folder == "job-orchestrator")
    patterns = dockerignore_patterns()
    copied = [
        ROOT / source
        for arguments in builder_instructions(orchestrator, "COPY")
        if not arguments.startswith("--")
        for source in arguments.split()[:-1]
    ]
    migrations = [
        path
        for source in copied
        if source.is_dir()
        for path in source.rglob("migrations/*.sql")
        if not dockerignored(path.relative_to(ROOT).as_posix(), patterns)
    ]

    assert migrations


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
