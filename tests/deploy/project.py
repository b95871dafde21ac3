"""What the deploy tests know about the repository: where the files are, which service
reads which setting (docs/settings.md), which images the one Dockerfile builds, and
small readers for the formats involved (compose interpolation, Dockerfile instructions,
stages and build arguments, .dockerignore patterns).

There is no Docker engine on the machines that run the tests, so everything here reads
the files statically; each reader follows the documented rules closely enough for the
files of this repository, and says where it simplifies.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# The one Dockerfile: `--build-arg SERVICE=<folder under services/>` picks the image.
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Read by every service: the broker and the log format.
COMMON_ENV = frozenset({"AMQP_URL", "AMQP_QUEUE_TYPE", "LOG_LEVEL", "LOG_FORMAT"})


@dataclass(frozen=True)
class Image:
    """One image the Dockerfile builds: its service's folder (the SERVICE build argument),
    the console script it runs, and the port it listens on."""

    folder: str  # under services/
    script: str
    port_var: str
    port: int

    @property
    def build_args(self) -> dict[str, str]:
        return {"SERVICE": self.folder}

    @property
    def pyproject(self) -> Path:
        return ROOT / "services" / self.folder / "pyproject.toml"


@dataclass(frozen=True)
class AppService:
    """One of the four services, as compose, the Dockerfile and its package name it."""

    name: str  # the compose service, also the `service` field of its log lines
    folder: str  # under services/
    package: str  # import name
    port_var: str
    port: int
    script: str  # console script the image runs
    env: frozenset[str]  # what it reads of docs/settings.md

    @property
    def dockerfile(self) -> Path:
        return DOCKERFILE

    @property
    def image(self) -> Image:
        return Image(self.folder, self.script, self.port_var, self.port)

    @property
    def pyproject(self) -> Path:
        return self.image.pyproject


def _app(name: str, short: str, port: int, env: set[str]) -> AppService:
    """The service in services/<name>, which compose names the same; its import
    package, console script and port setting are named after ``short`` (canvas_<short>,
    canvas-<short>, <SHORT>_PORT). It reads COMMON_ENV, its port setting and ``env``."""
    port_var = f"{short.upper()}_PORT"
    return AppService(
        name=name,
        folder=name,
        package=f"canvas_{short}",
        port_var=port_var,
        port=port,
        script=f"canvas-{short}",
        env=COMMON_ENV | {port_var} | env,
    )


APP_SERVICES = (
    _app(
        "gateway",
        "gateway",
        8000,
        {
            "DATABASE_URL",
            "JWT_SECRET",
            "MAX_ACTIVE_JOBS_PER_USER",
            "MAX_REQUEST_BYTES",
            "USER_DAILY_TOKEN_BUDGET",
        },
    ),
    _app(
        "job-orchestrator",
        "orchestrator",
        8002,
        {
            "DATABASE_URL",
            "JWT_SECRET",
            "MAX_JOB_RETRIES",
            "RETRY_BACKOFF_BASE",
            "RETRY_BACKOFF_UNIT_SECONDS",
            "MODEL_REQUESTS_PER_MINUTE",
            "MODEL_TOKENS_PER_MINUTE",
        },
    ),
    # No database: the generator only talks to the broker and the model (and signs its
    # service credential for the orchestrator's internal API with JWT_SECRET).
    _app(
        "ai-generator",
        "generator",
        8003,
        {
            "JWT_SECRET",
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "OPENAI_MODEL",
            "OPENAI_TIMEOUT_SECONDS",
            "MAX_CONCURRENT_JOBS",
            "MODEL_REQUESTS_PER_MINUTE",
            "MODEL_TOKENS_PER_MINUTE",
        },
    ),
    _app("notifier", "notifier", 8001, {"DATABASE_URL", "JWT_SECRET", "MAX_REQUEST_BYTES"}),
)

# The offline stand-in model (services/fake-openai): compose runs it under a profile.
STAND_IN_IMAGE = Image(
    folder="fake-openai", script="canvas-fake-openai", port_var="FAKE_OPENAI_PORT", port=8090
)

# Every image the Dockerfile builds.
IMAGES = (*(app.image for app in APP_SERVICES), STAND_IN_IMAGE)

# Every name docs/settings.md documents, to prove the table above forgets none.
DOCUMENTED_ENV = frozenset(
    {
        "DATABASE_URL",
        "AMQP_URL",
        "AMQP_QUEUE_TYPE",
        "JWT_SECRET",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_MODEL",
        "OPENAI_TIMEOUT_SECONDS",
        "MAX_CONCURRENT_JOBS",
        "MAX_JOB_RETRIES",
        "RETRY_BACKOFF_BASE",
        "RETRY_BACKOFF_UNIT_SECONDS",
        "GATEWAY_PORT",
        "NOTIFIER_PORT",
        "ORCHESTRATOR_PORT",
        "GENERATOR_PORT",
        "MAX_ACTIVE_JOBS_PER_USER",
        "USER_DAILY_TOKEN_BUDGET",
        "MAX_REQUEST_BYTES",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "MODEL_REQUESTS_PER_MINUTE",
        "MODEL_TOKENS_PER_MINUTE",
    }
)


def load_compose() -> dict[str, Any]:
    """docker-compose.yml as compose reads it (YAML merge keys resolved)."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def console_scripts(pyproject: Path) -> dict[str, str]:
    """[project.scripts] of a member's pyproject.toml."""
    scripts = tomllib.loads(pyproject.read_text())["project"].get("scripts", {})
    assert isinstance(scripts, dict)
    return scripts


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_]\w*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>.*))?")


def interpolate(value: str, environment: Mapping[str, str]) -> str:
    """``value`` with compose's ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?message}`` and ``$$`` replaced as compose would,
    given ``environment`` (one level: defaults are not interpolated again)."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return environment.get(match["named"], "")
        braced = _BRACED.fullmatch(match["braced"])
        assert braced, f"unsupported interpolation ${{{match['braced']}}} in {value!r}"
        name, op, arg = braced["name"], braced["op"], braced["arg"] or ""
        current = environment.get(name)
        set_and_not_empty = bool(current)
        if op in (":-", ":?"):
            chosen = current if set_and_not_empty else None
        elif op in ("-", "?"):
            chosen = current
        elif op == ":+":
            return arg if set_and_not_empty else ""
        elif op == "+":
            return arg if current is not None else ""
        else:
            return current or ""
        if chosen is None:
            assert not op.endswith("?"), f"{name} is required: {arg}"
            return arg
        return chosen

    return _VARIABLE.sub(replace, value)


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined, comments dropped."""

    keyword: str  # upper case
    arguments: str

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            _, found, command = f" {text}".partition(" CMD ")
            text = command if found else ""
        text = text.strip()
        if not text.startswith("["):
            return None
        parsed = json.loads(text)
        assert isinstance(parsed, list)
        return [str(item) for item in parsed]


def dockerfile_global_args(path: Path) -> dict[str, str | None]:
    """The ARGs declared before the first FROM, with their defaults (None: no default)."""
    found: dict[str, str | None] = {}
    for instruction in _instructions(path.read_text()):
        if instruction.keyword == "FROM":
            break
        assert instruction.keyword == "ARG", f"{path}: {instruction.keyword} before FROM"
        name, equals, default = instruction.arguments.partition("=")
        found[name.strip()] = default if equals else None
    return found


@dataclass(frozen=True)
class Stage:
    """One build stage as a build with given arguments sees it: its base (an image, or
    the name of an earlier stage), its name, and its instructions after FROM with the
    build arguments in scope substituted."""

    base: str
    name: str | None
    instructions: list[Instruction]


@dataclass(frozen=True)
class Build:
    """What ``docker build`` makes of a Dockerfile, given build arguments."""

    stages: list[Stage]

    def chain(self, stage: Stage) -> list[Stage]:
        """``stage`` and the stages it is built FROM, the first one first."""
        chain = [stage]
        while (parent := self.stage(chain[0].base)) is not None:
            assert parent not in chain, f"stage {parent.name} is its own base"
            chain.insert(0, parent)
        return chain

    def stage(self, name: str) -> Stage | None:
        """The stage named ``name`` (FROM ... AS name), if any."""
        return next((stage for stage in self.stages if stage.name == name), None)

    @property
    def image(self) -> list[Stage]:
        """The stages of the image built: the last stage and those it is built FROM."""
        return self.chain(self.stages[-1])

    @property
    def base(self) -> str:
        """What the image is built on in the end (a registry image, unless no stage has
        the name the last FROM gives)."""
        return self.image[0].base

    @property
    def instructions(self) -> list[Instruction]:
        """Every instruction of the image, in the order the build runs them."""
        return [instruction for stage in self.image for instruction in stage.instructions]

    @property
    def builders(self) -> list[list[Stage]]:
        """The stages the image copies from (COPY --from=NAME), each with its bases."""
        found: list[list[Stage]] = []
        for instruction in self.instructions:
            if instruction.keyword == "COPY" and instruction.arguments.startswith("--from="):
                name = instruction.arguments.removeprefix("--from=").split()[0]
                stage = self.stage(name)
                assert stage is not None, f"COPY --from={name}: no such stage"
                found.append(self.chain(stage))
        return found


# Docker substitutes build arguments in these; RUN's shell sees them as variables, which
# comes to the same for the ${NAME} and $NAME forms read here. Exec-form commands
# (CMD, ENTRYPOINT, HEALTHCHECK) are left as written, as Docker leaves them.
_NOT_SUBSTITUTED = frozenset({"ARG", "CMD", "ENTRYPOINT", "HEALTHCHECK"})
_ARG_REFERENCE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_]\w*)\}|(?P<named>[A-Za-z_]\w*))")


def _substitute(text: str, values: Mapping[str, str]) -> str:
    """``text`` with ``$NAME`` and ``${NAME}`` replaced for the names in ``values``;
    other references (ENV of the base image, like ${PATH}) are left as written."""

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["named"]
        return values.get(name, match[0])

    return _ARG_REFERENCE.sub(replace, text)


def dockerfile_build(path: Path, build_args: Mapping[str, str]) -> Build:
    """The stages of ``path`` as ``docker build --build-arg NAME=VALUE ...`` sees them.

    Docker's rules, as far as this repository's Dockerfile needs them: the ARGs before
    the first FROM are substituted in FROM lines only; an ARG inside a stage makes the
    argument visible there (with the global default when it gives none) until the
    stage ends, not in the stages built FROM it; an argument without a value is empty.
    """
    defaults = dockerfile_global_args(path)
    global_values = {
        name: build_args.get(name, default or "") for name, default in defaults.items()
    }
    stages: list[Stage] = []
    scope: dict[str, str] = {}
    for instruction in _instructions(path.read_text()):
        if instruction.keyword == "ARG" and not stages:
            continue
        if instruction.keyword == "FROM":
            words = [
                word
                for word in _substitute(instruction.arguments, global_values).split()
                if not word.startswith("--")  # --platform=...
            ]
            assert len(words) in (1, 3), f"FROM {instruction.arguments}"
            assert len(words) == 1 or words[1].upper() == "AS", f"FROM {instruction.arguments}"
            stages.append(Stage(words[0], words[2] if len(words) == 3 else None, []))
            scope = {}
            continue
        if instruction.keyword == "ARG":
            name, equals, default = instruction.arguments.partition("=")
            name = name.strip()
            fallback = default if equals else (defaults.get(name) or "")
            scope[name] = build_args.get(name, fallback)
        elif instruction.keyword not in _NOT_SUBSTITUTED:
            instruction = Instruction(
                instruction.keyword, _substitute(instruction.arguments, scope)
            )
        stages[-1].instructions.append(instruction)
    assert stages, f"{path}: no FROM"
    return Build(stages)


def _instructions(text: str) -> Iterator[Instruction]:
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        # Comment lines may sit inside a continued instruction; Docker drops them.
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        yield Instruction(keyword.upper(), arguments.strip())
    assert not pending, "the Dockerfile ends inside a continued line"


def dockerignore_patterns() -> list[str]:
    """The patterns of .dockerignore, in order."""
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip("/")
    parts = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            parts.append(pattern[index : end + 1])
            index = end + 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts))


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether the build context leaves out ``relative`` (a path from the repository root).

    Docker's rules: patterns are Go filepath.Match globs plus ``**``, taken from the
    context root; a matching directory takes its whole content with it; ``!`` brings a
    path back; the last matching pattern wins.
    """
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: count + 1]) for count in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded
