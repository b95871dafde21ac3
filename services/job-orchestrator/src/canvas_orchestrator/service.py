"""One orchestrator process: the consumer, the relay, the timers and the HTTP app, wired
from one Settings. Nothing here needs the database or the broker to be up at start."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from uuid import UUID, uuid4

import structlog
from fastapi import FastAPI

from canvas_events.broker import Broker, Consumer
from canvas_events.envelope import utcnow
from canvas_events.logging import redact
from canvas_events.ops import Readiness
from canvas_events.postgres import Database, ensure_database, is_outage
from canvas_events.runtime import cancel_and_wait, instance_id, serve_http
from canvas_orchestrator.api import create_app
from canvas_orchestrator.committer import Clock, Committer
from canvas_orchestrator.dispatch import Dispatcher, Limits
from canvas_orchestrator.domain import Policy
from canvas_orchestrator.handlers import Handler
from canvas_orchestrator.metrics import Metrics
from canvas_orchestrator.relay import Relay
from canvas_orchestrator.retention import Pruner
from canvas_orchestrator.settings import Settings
from canvas_orchestrator.timers import Timers
from canvas_store.budget import Budget
from canvas_store.connections import init_connection
from canvas_store.migrations import migrate_pool

SERVICE_NAME = "job-orchestrator"
log = structlog.get_logger("canvas_orchestrator.service")


def policy_of(settings: Settings) -> Policy:
    """The retry and lease rules the settings describe."""
    return Policy(
        max_retries=settings.max_job_retries,
        backoff_base=settings.retry_backoff_base,
        backoff_unit_seconds=settings.retry_backoff_unit_seconds,
        lease_seconds=settings.generation_lease_seconds,
        start_timeout_seconds=settings.generation_start_timeout_seconds,
        # With a fleet budget, a 429 is the fleet's to wait out, not the job's retry.
        defer_rate_limited=settings.model_budget_limited,
    )


def dispatcher_of(
    settings: Settings,
    database: Database,
    committer: Committer,
    metrics: Metrics,
    new_id: Callable[[], UUID],
) -> Dispatcher:
    """The fair dispatcher the settings ask for (DISPATCH_*)."""
    return Dispatcher(
        database,
        committer,
        policy_of(settings),
        metrics,
        limits=Limits(
            unannounced_capacity=settings.dispatch_unannounced_capacity,
            headroom=settings.dispatch_headroom,
            headroom_fraction=settings.dispatch_headroom_fraction,
        ),
        new_id=new_id,
        interval=settings.dispatch_interval_seconds,
    )


class Service:
    """Every running part of one orchestrator process."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = utcnow,
        new_id: Callable[[], UUID] = uuid4,
        relay_poll_interval: float = 1.0,
    ) -> None:
        self.settings = settings
        self._dsn = dsn = settings.database_url.get_secret_value()
        self.metrics = Metrics()
        self.database = Database(dsn, max_size=20, init=init_connection, on_connect=migrate_pool)
        self.broker = Broker.of(settings, instance_id(SERVICE_NAME))
        policy = policy_of(settings)
        # Messages and timers record their decisions the same way, in the same cache.
        self.committer = Committer(
            self.database, clock=clock, append_commit=self.metrics.append_commit
        )
        self.dispatcher = dispatcher_of(
            settings, self.database, self.committer, self.metrics, new_id
        )
        self.handler = Handler(
            self.committer, policy, self.metrics, new_id=new_id, dispatcher=self.dispatcher
        )
        self.broker.add_consumer(
            Consumer(
                settings.topology.orchestrator,
                self.handler.handle,
                prefetch=settings.orchestrator_prefetch,
                # A batch's events go to the group commit together: one transaction.
                concurrent_batches=True,
            )
        )
        # A connection of its own: RabbitMQ throttles publishing connections under memory
        # pressure, which must not stall the consumer, and the relay can still publish
        # what the consumer recorded while it drained at shutdown.
        self.publisher = Broker.of(settings, f"{instance_id(SERVICE_NAME)}-relay")
        self.relay = Relay(
            dsn,
            self.publisher,
            self.metrics,
            poll_interval=relay_poll_interval,
            schema_ready=self.database.wait_ready,
        )
        self.timers = Timers(
            self.database,
            self.committer,
            policy,
            self.metrics,
            new_id=new_id,
            interval=settings.timer_interval_seconds,
            dispatcher=self.dispatcher,
        )
        self.pruner = Pruner(
            self.database, settings.retention, interval=settings.prune_interval_seconds
        )
        self.readiness = Readiness()
        self.readiness.add_database(self.database)
        self.readiness.add("broker", self._brokers_connected)
        self._create_database: asyncio.Task[None] | None = None

    async def _brokers_connected(self) -> str | None:
        for role, broker in (("consumer", self.broker), ("publisher", self.publisher)):
            if not broker.connected:
                return f"broker ({role}): {broker.last_error}"
        return None

    def app(self) -> FastAPI:
        """The HTTP app over this service's parts."""
        return create_app(
            database=self.database,
            broker=self.broker,
            readiness=self.readiness,
            metrics=self.metrics,
            secret=self.settings.secret,
            model_budget=Budget(
                requests=self.settings.model_requests_per_minute,
                tokens=self.settings.model_tokens_per_minute,
                window_seconds=self.settings.model_budget_window_seconds,
            ),
        )

    async def start(self) -> None:
        """Start every part; each connects in the background."""
        self._create_database = asyncio.create_task(
            _create_database_when_missing(self._dsn), name="create-database"
        )
        await self.database.start()
        await self.broker.start()
        await self.publisher.start()
        await self.relay.start()
        await self.timers.start()
        await self.dispatcher.start()
        await self.pruner.start()

    async def stop(self) -> None:
        """Stop the timers, stop consuming and let the messages in hand finish, let the
        relay publish what they recorded and release its lock, close the connections."""
        grace = self.settings.shutdown_grace_seconds
        await self.pruner.stop()
        await self.timers.stop(grace)
        await self.dispatcher.stop(grace)
        await self.broker.stop(drain_timeout=grace)
        await self.relay.stop(grace)
        await self.publisher.stop()
        if self._create_database is not None:
            await cancel_and_wait(self._create_database)
        await self.database.stop()


async def _create_database_when_missing(dsn: str) -> None:
    """Create the database named in DATABASE_URL when the server lacks it, so that a fresh
    Postgres needs no step before the services run (docs/settings.md, DATABASE_URL)."""
    delay = 0.5
    while True:
        try:
            await ensure_database(dsn)
            return
        except Exception as exc:
            if not is_outage(exc):
                # No right to create databases (a managed server): it must exist already.
                log.info("cannot check or create the database", error=redact(repr(exc)))
                return
            await asyncio.sleep(delay)  # the server is not up yet; the pool says so too
            delay = min(delay * 2, 5.0)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the orchestrator until ``stop`` is set."""
    service = Service(settings)
    await service.start()
    log.info("orchestrator started", port=settings.orchestrator_port)
    try:
        await serve_http(service.app(), settings.orchestrator_port, stop)
    finally:
        log.info("orchestrator stopping")
        await service.stop()
        log.info("orchestrator stopped")
