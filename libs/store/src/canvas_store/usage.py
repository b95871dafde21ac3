"""How many model tokens a user's jobs used in a day: what the per-user daily token
budget (the gateway's ``USER_DAILY_TOKEN_BUDGET``) is measured against.

A day is a UTC day, from 00:00 to the next 00:00 UTC. A user's usage of a day is the
sum, over their jobs that *completed* that day (``completed_at`` in the day), of the
``usage`` their result records: ``total_tokens``, or ``prompt_tokens`` +
``completion_tokens`` when the model gave no total. Failed and cancelled attempts may
have used tokens too, but no result records them, so they do not count; nor do jobs
still running. The partial index ``jobs_user_completed`` (migration 0009) keeps the sum
to the day's completed jobs of the one user.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from canvas_store.jobs import Queryable


def _count(name: str) -> str:
    # A count of result.usage when it is a JSON number, else nothing.
    path = f"result -> 'usage' -> '{name}'"
    return f"CASE WHEN jsonb_typeof({path}) = 'number' THEN ({path})::numeric END"


# The tokens one completed job used, from its ``result`` (jsonb): 0 when it says nothing.
JOB_TOKENS: Final = (
    f"COALESCE({_count('total_tokens')}, "
    f"COALESCE({_count('prompt_tokens')}, 0) + COALESCE({_count('completion_tokens')}, 0))"
)


def tokens_query(user: str, start: str, end: str) -> str:
    """A statement of the tokens used by the jobs of user ``user`` completed in
    [``start``, ``end``), given as placeholders (``$1``...): one row, one bigint column
    ``tokens``. The status is written out so that the jobs_user_completed index serves
    it."""
    return (
        f"SELECT COALESCE(sum({JOB_TOKENS}), 0)::bigint AS tokens FROM jobs "  # noqa: S608
        f"WHERE user_id = {user} AND status = 'completed' "
        f"AND completed_at >= {start}::timestamptz AND completed_at < {end}::timestamptz"
    )


@dataclass(frozen=True)
class Day:
    """One UTC day: usage counts from ``start``; the budget resets at ``end``."""

    start: datetime
    end: datetime

    @classmethod
    def of(cls, moment: datetime) -> Day:
        """The UTC day ``moment`` (timezone-aware) falls in."""
        start = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return cls(start, start + timedelta(days=1))


async def tokens_used(conn: Queryable, user_id: str, day: Day) -> int:
    """The tokens ``user_id``'s jobs completed in ``day`` used (so far)."""
    used = await conn.fetchval(tokens_query("$1", "$2", "$3"), user_id, day.start, day.end)
    return int(used)


@dataclass(frozen=True)
class TokenBudget:
    """What a user may use in ``day``: ``tokens``; a request is refused once the jobs
    completed in the day used that many or more."""

    tokens: int
    day: Day
