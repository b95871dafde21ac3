"""The caller's model tokens of the day against their daily budget
(``USER_DAILY_TOKEN_BUDGET``, canvas_gateway.budget)."""

from __future__ import annotations

from fastapi import APIRouter

from canvas_events.envelope import utcnow
from canvas_gateway.budget import budget_of
from canvas_gateway.deps import CurrentUser, SettingsDep, StoreDep
from canvas_gateway.routes import error_responses
from canvas_gateway.schemas import UsagePublic
from canvas_store.usage import Day

router = APIRouter(prefix="/api/ai-agent", tags=["jobs"])


@router.get(
    "/usage",
    summary="The caller's tokens today and their daily budget",
    description="Tokens of the caller's jobs completed since 00:00 UTC (each job's "
    "`result.usage`), the daily budget (`null`: no limit, as for admins) and when the "
    "count starts again. While `tokens_used_today` is at or over `daily_budget`, "
    "create answers 429 until `resets_at`.",
    responses=error_responses(401, 503),
)
async def usage(user: CurrentUser, store: StoreDep, settings: SettingsDep) -> UsagePublic:
    now = utcnow()
    day = Day.of(now)
    budget = budget_of(settings, user, now)
    return UsagePublic(
        tokens_used_today=await store.tokens_used(user.user_id, day),
        daily_budget=budget.tokens if budget is not None else None,
        resets_at=day.end,
    )
