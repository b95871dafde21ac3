"""The per-user daily token budget (``USER_DAILY_TOKEN_BUDGET``): whose requests it
holds, and the 429 of a user who used it.

The budget is the caller's: an admin is exempt, whether the request makes a job of
their own or (through any route that admits a job for another user) of someone else's;
the tokens of such a job still count in its owner's day. What a day is and what counts
is canvas_store.usage's: jobs completed since 00:00 UTC, by their results' usage.
"""

from __future__ import annotations

import math
from datetime import datetime

from fastapi import HTTPException, status

from canvas_events.auth import Principal
from canvas_gateway.settings import Settings
from canvas_store.errors import BudgetSpent
from canvas_store.usage import Day, TokenBudget


def budget_of(settings: Settings, caller: Principal, now: datetime) -> TokenBudget | None:
    """The budget the caller's requests are held to today; None when there is none (no
    USER_DAILY_TOKEN_BUDGET, or the caller is an admin)."""
    if settings.user_daily_token_budget is None or caller.is_admin:
        return None
    return TokenBudget(settings.user_daily_token_budget, Day.of(now))


def utc_text(moment: datetime) -> str:
    """``moment`` as ISO 8601 in UTC with a ``Z``, to the second."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def budget_refusal(spent: BudgetSpent, now: datetime) -> HTTPException:
    """The 429 of a request refused for the budget: the detail says how much was used of
    how much and when it resets; ``Retry-After`` is the seconds until then."""
    wait = max(1, math.ceil((spent.resets_at - now).total_seconds()))
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail=f"daily token budget used ({spent.used:,} of {spent.budget:,} tokens); "
        f"it resets at {utc_text(spent.resets_at)}",
        headers={"Retry-After": str(wait)},
    )
