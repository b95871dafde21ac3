"""The documentation works from a fresh clone: every link points at a file of the
repository (nothing outside it), and every command a reader copies runs as written
(the console scripts live in .venv/bin, which is not on a fresh shell's PATH)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = (
    "canvas-orchestrator",
    "canvas-gateway",
    "canvas-notifier",
    "canvas-generator",
    "canvas-fake-openai",
    "canvas-jobs",
)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
# A console script where a command starts: line start, after a prompt, `$(`, `|`, `&&`.
_BARE = re.compile(
    r"(?:^|\$ |\$\(|\| |&& |; )(" + "|".join(re.escape(s) for s in SCRIPTS) + r")(?= |$)", re.M
)


def _markdown_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [ROOT / name for name in listed.stdout.split()]


def _links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text())
    return [link for link in _LINK.findall(text) if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_inside_the_repository(path: Path) -> None:
    wrong = []
    for link in _links(path):
        target = (path.parent / link.split("#")[0]).resolve()
        if not target.is_relative_to(ROOT) or not target.exists():
            wrong.append(link)
    assert wrong == []


def _commands(path: Path) -> list[str]:
    """The commands a reader may copy: code blocks' lines and inline code."""
    text = path.read_text()
    lines = [line for block in _FENCE.findall(text) for line in block.splitlines()]
    lines += _INLINE.findall(_FENCE.sub("", text))
    # kubectl/docker run the script inside an image, where it is on the PATH.
    return [line for line in lines if not re.search(r"\b(kubectl|docker)\b", line)]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_command_calls_a_console_script_that_a_fresh_shell_cannot_find(path: Path) -> None:
    bare = [
        line.strip()
        for line in _commands(path)
        # With arguments: a command to run, not the name of one in a sentence.
        if (match := _BARE.search(line)) and line[match.end() :].strip()
    ]
    assert bare == []


def test_the_checks_above_see_what_they_look_for(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "[out](../../shared/X.md) [in](page.md)\n"
        "```bash\ncanvas-orchestrator dlq list\n.venv/bin/canvas-jobs jobs\n```\n"
        "Run `canvas-orchestrator prune`, or `canvas-jobs` alone.\n"
    )
    assert _links(page) == ["../../shared/X.md", "page.md"]
    found = [line for line in _commands(page) if _BARE.search(line)]
    assert found == ["canvas-orchestrator dlq list", "canvas-orchestrator prune", "canvas-jobs"]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_example_puts_the_users_token_in_a_url(path: Path) -> None:
    # A client given such a URL prints it ("Connected to ws://...?token=eyJ..."), and
    # proxies log it: examples send the token in a header (python -m tools.ws).
    in_urls = [line for line in _commands(path) if re.search(r"token=\$\{?[A-Z_]", line)]
    assert in_urls == []
