"""Entry point of the `canvas-jobs` command."""

import sys


def main() -> None:
    """Placeholder until the CLI lands."""
    print("canvas-jobs: not built yet", file=sys.stderr)
    raise SystemExit(1)
