"""What the deploy tests know about the repository: where the files are, which service
reads which setting (ARCHITECTURE.md 2), and small readers for the formats involved
(compose interpolation, Dockerfile instructions, .dockerignore patterns).

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
DOCKERIGNORE = ROOT / ".dockerignore"

# Read by every service: the broker and the log format.
COMMON_ENV = frozenset({"AMQP_URL", "LOG_LEVEL", "LOG_FORMAT"})


@dataclass(frozen=True)
class AppService:
    """One of the four services, as compose, its Dockerfile and its package name it."""

    name: str  # the compose service, also the `service` field of its log lines
    folder: str  # under services/
    package: str  # import name
    port_var: str
    port: int
    script: str  # console script the image runs
    env: frozenset[str]  # what it reads from ARCHITECTURE.md 2

    @property
    def dockerfile(self) -> Path:
        return ROOT / "services" / self.folder / "Dockerfile"

    @property
    def pyproject(self) -> Path:
        return ROOT / "services" / self.folder / "pyproject.toml"


APP_SERVICES = (
    AppService(
        name="gateway",
        folder="gateway",
        package="canvas_gateway",
        port_var="GATEWAY_PORT",
        port=8000,
        script="canvas-gateway",
        env=COMMON_ENV
        | {
            "DATABASE_URL",
            "JWT_SECRET",
            "GATEWAY_PORT",
            "MAX_ACTIVE_JOBS_PER_USER",
            "MAX_REQUEST_BYTES",
        },
    ),
    AppService(
        name="job-orchestrator",
        folder="job-orchestrator",
        package="canvas_orchestrator",
        port_var="ORCHESTRATOR_PORT",
        port=8002,
        script="canvas-orchestrator",
        env=COMMON_ENV
        | {
            "DATABASE_URL",
            "JWT_SECRET",
            "ORCHESTRATOR_PORT",
            "MAX_JOB_RETRIES",
            "RETRY_BACKOFF_BASE",
            "RETRY_BACKOFF_UNIT_SECONDS",
        },
    ),
    AppService(
        name="ai-generator",
        folder="ai-generator",
        package="canvas_generator",
        port_var="GENERATOR_PORT",
        port=8003,
        script="canvas-generator",
        # No database: the generator only talks to the broker and the model (and signs its
        # service credential for the orchestrator's internal API with JWT_SECRET).
        env=COMMON_ENV
        | {
            "JWT_SECRET",
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "OPENAI_MODEL",
            "OPENAI_TIMEOUT_SECONDS",
            "MAX_CONCURRENT_JOBS",
            "GENERATOR_PORT",
        },
    ),
    AppService(
        name="notifier",
        folder="notifier",
        package="canvas_notifier",
        port_var="NOTIFIER_PORT",
        port=8001,
        script="canvas-notifier",
        env=COMMON_ENV | {"DATABASE_URL", "JWT_SECRET", "NOTIFIER_PORT", "MAX_REQUEST_BYTES"},
    ),
)

# Every name of ARCHITECTURE.md 2, to prove the table above forgets none.
ARCHITECTURE_ENV = frozenset(
    {
        "DATABASE_URL",
        "AMQP_URL",
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
        "MAX_REQUEST_BYTES",
        "LOG_LEVEL",
        "LOG_FORMAT",
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


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """The instructions of each build stage, in order (the last is the image)."""
    stages: list[list[Instruction]] = []
    for instruction in _instructions(path.read_text()):
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"{path}: {instruction.keyword} before the first FROM"
        stages[-1].append(instruction)
    return stages


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
