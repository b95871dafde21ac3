"""What the benchmarks read about the machine itself."""

from __future__ import annotations

from pathlib import Path


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How busy the machine was between two :func:`machine_ticks`, in percent."""
    return round(100 * (after[0] - before[0]) / max(1, after[1] - before[1]), 1)
