"""Fair dispatch (canvas_orchestrator.dispatch), in-process on the real Postgres and
RabbitMQ: attempts are handed out only as the fleet has room, a user's single job goes
before another user's backlog, a higher priority still goes first, and generators
announce the fleet's capacity."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from uuid import UUID

import httpx

from canvas_events.envelope import Envelope
from canvas_events.events import JobCancelRequested
from canvas_events.topology import GATEWAY
from canvas_orchestrator.dispatch import Fleet, Limits
from canvas_orchestrator.service import Service
from tests.orchestrator.harness import Bus, eventually, job_row, metric, service_headers
from tests.orchestrator.test_flow import dispatched, failed, started, succeeded


async def _requested(bus: Bus, user_id: str, count: int, priority: int = 5) -> list[UUID]:
    envelopes = await _requests(bus, user_id, count, priority)
    return [envelope.job_id for envelope in envelopes if envelope.job_id is not None]


async def _requests(bus: Bus, user_id: str, count: int, priority: int = 5) -> list[Envelope]:
    envelopes = []
    for n in range(count):
        envelope = await bus.request(user_id=user_id, priority=priority, query=f"job {n}")
        assert envelope.job_id is not None
        envelopes.append(envelope)
    return envelopes


async def _awaiting(service: Service, job_ids: list[UUID]) -> list[UUID]:
    """Those of ``job_ids`` recorded and awaiting dispatch, once every one is recorded."""

    async def recorded() -> list[UUID] | None:
        rows = [await job_row(service, job_id) for job_id in job_ids]
        if any(row is None for row in rows):
            return None
        return [row["id"] for row in rows if row is not None and row["awaiting_dispatch"]]

    found: list[UUID] = await eventually(recorded, what="every job recorded")
    return found


async def _finish(bus: Bus, requested: Envelope) -> None:
    await bus.reply(requested, started(requested))
    await bus.reply(requested, succeeded(requested))


async def test_a_users_single_job_goes_before_another_users_backlog(start, bus):
    service = await start(
        dispatch_unannounced_capacity=3, dispatch_headroom=0, dispatch_headroom_fraction=0
    )
    heavy = await _requested(bus, "heavy", 8)
    # The first three found room and went at once (the fast path); five wait.
    assert set(await _awaiting(service, heavy)) == set(heavy[3:])
    for job_id in heavy[:3]:
        await dispatched(bus, job_id)
    [light] = await _requested(bus, "light", 1)
    assert await _awaiting(service, [light]) == [light]

    # One slot frees: it goes to the light user, not to the heavy user's next job.
    await _finish(bus, await dispatched(bus, heavy[0]))
    await dispatched(bus, light)
    assert [job_id for job_id in heavy if bus.of(job_id, "GenerationRequested")] == heavy[:3]
    assert set(await _awaiting(service, heavy)) == set(heavy[3:])
    # The next slot goes to the heavy user's oldest waiting job.
    await _finish(bus, await dispatched(bus, heavy[1]))
    await dispatched(bus, heavy[3])
    assert metric(service, "canvas_dispatch_rounds_total") >= 2
    row = await job_row(service, light)
    assert row is not None and row["status"] == "queued" and not row["awaiting_dispatch"]


async def test_a_higher_priority_still_goes_first(start, bus):
    service = await start(
        dispatch_unannounced_capacity=1, dispatch_headroom=0, dispatch_headroom_fraction=0
    )
    [first] = await _requested(bus, "a", 1)
    requested = await dispatched(bus, first)
    low = await _requested(bus, "b", 2, priority=2)
    [high] = await _requested(bus, "a", 1, priority=9)
    assert set(await _awaiting(service, [*low, high])) == {*low, high}
    await _finish(bus, requested)
    # User a has more in flight than b, but its priority 9 job goes first.
    await _finish(bus, await dispatched(bus, high))
    await dispatched(bus, low[0])
    assert not bus.of(low[1], "GenerationRequested")


async def test_generators_announce_the_fleets_capacity(start, bus):
    service = await start(
        dispatch_unannounced_capacity=1, dispatch_headroom=0, dispatch_headroom_fraction=0
    )
    app = service.app()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://orchestrator"
    ) as http:
        refused = await http.post(
            "/internal/generators/heartbeat", json={"generator_id": "g", "capacity": 4}
        )
        assert refused.status_code == 401
        for name in ("g1", "g2"):
            answer = await http.post(
                "/internal/generators/heartbeat",
                json={"generator_id": name, "capacity": 2, "running": 0},
                headers=service_headers(),
            )
            assert answer.status_code == 204
    # Room for four now, not the one assumed while nobody announced.
    jobs = await _requested(bus, "heavy", 6)
    assert set(await _awaiting(service, jobs)) == set(jobs[4:])
    for job_id in jobs[:4]:
        await dispatched(bus, job_id)
    await eventually(lambda: metric(service, "canvas_fleet_capacity") == 4, what="capacity metric")
    await eventually(
        lambda: metric(service, "canvas_dispatch_waiting_jobs") == 2, what="waiting metric"
    )


async def test_a_due_retry_goes_through_dispatch_and_a_cancel_ends_the_wait(start, bus):
    service = await start(
        dispatch_unannounced_capacity=1,
        dispatch_headroom=0,
        dispatch_headroom_fraction=0,
        max_job_retries=1,
        retry_backoff_unit_seconds=0.1,
    )
    [busy] = await _requested(bus, "a", 1)
    busy_attempt = await dispatched(bus, busy)
    [request] = await _requests(bus, "b", 1)
    waiting = request.job_id
    assert waiting is not None
    assert await _awaiting(service, [waiting]) == [waiting]
    await bus.publish(request.follow(JobCancelRequested(reason="changed my mind")), GATEWAY)
    row = await eventually(
        lambda: _row_if(service, waiting, "cancelled"), what="the waiting job cancelled"
    )
    assert not row["awaiting_dispatch"]
    # A retry is queued, and dispatched when the room is there (it is: nothing else).
    await bus.reply(busy_attempt, started(busy_attempt))
    await bus.reply(busy_attempt, failed(busy_attempt, retryable=True))
    second = await dispatched(bus, busy, attempt=2)
    assert second.data["attempt"] == 2
    assert not bus.of(waiting, "GenerationRequested")


async def _row_if(service: Service, job_id: UUID, status: str):
    row = await job_row(service, job_id)
    return row if row is not None and row["status"] == status else None


async def test_the_headroom_waits_ready_while_ended_attempts_are_not_recorded_yet(start, bus):
    """An attempt counts as in flight until its end is recorded, which under load comes
    well after the generator freed its slot. The headroom's attempts are kept ready to
    start all the same: at most DISPATCH_HEADROOM handed out and not started, whatever
    the attempts in flight say (before, nothing went out until the ends were recorded,
    and a freed slot found no work)."""
    service = await start(dispatch_unannounced_capacity=1, dispatch_headroom=1)
    [first] = await _requested(bus, "a", 1)
    one = await dispatched(bus, first)
    await bus.reply(one, started(one))
    await eventually(
        lambda: _row_if(service, first, "processing"), what="the first attempt started"
    )
    # Capacity 1 plus headroom 1: the second goes too, and its generator starts it (a
    # slot the fleet freed, whose attempt's end is on its way to the orchestrator).
    [second] = await _requested(bus, "b", 1)
    two = await dispatched(bus, second)
    await bus.reply(two, started(two))
    await eventually(
        lambda: _row_if(service, second, "processing"), what="the second attempt started"
    )
    # Two in flight, over the capacity plus the headroom; none of them waits to start.
    [third] = await _requested(bus, "c", 1)
    await dispatched(bus, third)
    # Now one waits to start: the fourth waits for dispatch.
    [fourth] = await _requested(bus, "d", 1)
    assert await _awaiting(service, [fourth]) == [fourth]
    await asyncio.sleep(0.5)  # five dispatch rounds (DISPATCH_INTERVAL_SECONDS 0.1)
    assert await _awaiting(service, [fourth]) == [fourth]
    assert not bus.of(fourth, "GenerationRequested")
    # The third starts: the fourth may wait ready in its place.
    three = bus.of(third, "GenerationRequested")[0].envelope
    await bus.reply(three, started(three))
    await dispatched(bus, fourth)


def test_the_headroom_grows_with_the_fleet() -> None:
    """DISPATCH_HEADROOM, or DISPATCH_HEADROOM_FRACTION of the capacity when that is
    more: a fleet of 100 slots keeps 20 attempts ready, one of 4 keeps 5."""
    limits = Limits(headroom=5, headroom_fraction=0.2)
    assert limits.headroom_for(100) == 20
    assert limits.headroom_for(101) == 21  # rounded up
    assert limits.headroom_for(4) == 5
    assert Limits(headroom=0, headroom_fraction=0).headroom_for(1_000) == 0
    # The room: the capacity plus the headroom in flight, or the headroom unstarted.
    fleet = Fleet(
        capacity=100, announced=True, in_flight=130, unstarted=12, waiting=True, headroom=20
    )
    assert fleet.free == 8
    assert replace(fleet, in_flight=90, unstarted=0).free == 30
    assert replace(fleet, unstarted=25).free == 0
