"""Wiring of one ai-generator process: broker (work and control queues), model client,
orchestrator check, worker, HTTP app."""

from __future__ import annotations

import asyncio
import secrets

import structlog

from canvas_events.auth import ServiceCredential
from canvas_events.broker import Broker
from canvas_events.ops import Readiness
from canvas_events.runtime import instance_id, serve_http
from canvas_generator.api import create_app
from canvas_generator.budget import FleetBudget
from canvas_generator.cancellations import Cancellations
from canvas_generator.checks import AttemptChecker
from canvas_generator.client import ModelClient
from canvas_generator.heartbeat import Heartbeat
from canvas_generator.metrics import Metrics
from canvas_generator.settings import Settings
from canvas_generator.worker import Worker

log = structlog.get_logger("canvas_generator.service")


class Service:
    """Everything one process runs; ``start()`` needs neither the broker nor the model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.generator_id = instance_id("ai-generator")
        self.broker = Broker.of(settings, self.generator_id)
        self.metrics = Metrics()
        self.client = ModelClient.from_settings(settings, self.metrics)
        self.checker = AttemptChecker(
            settings.orchestrator_url,
            timeout=settings.orchestrator_timeout_seconds,
            credential=ServiceCredential("ai-generator", settings.secret),
        )
        self.budget = (
            FleetBudget(
                settings.orchestrator_url,
                model=settings.openai_model,
                # Waits are the point here: the answer itself is quick.
                timeout=settings.orchestrator_timeout_seconds,
                credential=ServiceCredential("ai-generator", settings.secret),
            )
            if settings.model_budget_limited
            else None
        )
        # The suffix keeps two generators in one process (tests) off each other's
        # exclusive control queue.
        self.cancellations = Cancellations(
            settings.topology, f"{self.generator_id}-{secrets.token_hex(3)}"
        )
        self.worker = Worker(
            self.broker,
            self.client,
            generator_id=self.generator_id,
            prefetch=settings.max_concurrent_jobs,
            cancellations=self.cancellations,
            checker=self.checker,
            budget=self.budget,
            metrics=self.metrics,
        )
        # Fair dispatch: the orchestrator hands out as much work as generators announce.
        self.heartbeat = Heartbeat(
            settings.orchestrator_url,
            generator_id=self.generator_id,
            capacity=lambda: settings.max_concurrent_jobs if self.broker.connected else 0,
            running=lambda: self.worker.running,
            timeout=settings.orchestrator_timeout_seconds,
            credential=ServiceCredential("ai-generator", settings.secret),
        )
        # Control first: on every (re)connect the control queue is consumed before any
        # work is taken, so no attempt starts unable to hear its job's cancel.
        self.broker.add_consumer(self.cancellations.consumer())
        self.broker.add_consumer(self.worker.consumer())
        self.readiness = Readiness()
        self.readiness.add_broker(self.broker)
        self.app = create_app(self.readiness, self.metrics.registry)

    async def start(self) -> None:
        """Connect to the broker in the background and start taking work."""
        await self.broker.start()
        await self.heartbeat.start()

    async def stop(self) -> None:
        """Take no new work, let the attempts in flight finish, close the connections."""
        await self.heartbeat.stop(self.settings.orchestrator_timeout_seconds + 1)
        await self.broker.stop(drain_timeout=self.settings.shutdown_grace_seconds)
        await self.worker.stop()
        await self.client.aclose()
        await self.checker.aclose()
        if self.budget is not None:
            await self.budget.aclose()


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then drain: /health keeps answering meanwhile."""
    service = Service(settings)
    await service.start()
    http_stop = asyncio.Event()
    http = asyncio.create_task(serve_http(service.app, settings.generator_port, http_stop))
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({http, stopper}, return_when=asyncio.FIRST_COMPLETED)
        log.info("ai-generator stopping; finishing the attempts in flight")
    finally:
        stopper.cancel()
        await service.stop()
        http_stop.set()
    try:
        await http
    except Exception as exc:
        # Most likely the port is taken: say so in the log, and exit non-zero.
        log.error("http server failed", port=settings.generator_port, error=repr(exc))
        raise SystemExit(1) from None
    log.info("ai-generator stopped")
