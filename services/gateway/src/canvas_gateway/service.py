"""One gateway process: its parts (the database pool, the broker connection, the
request store and its ledger sweep, metrics, readiness), built from one Settings and
started and stopped together; ``serve`` runs the HTTP app over them until told to stop."""

from __future__ import annotations

import asyncio

import structlog

from canvas_events.broker import Broker
from canvas_events.ops import Readiness
from canvas_events.postgres import Database
from canvas_events.publishing import BatchPublisher
from canvas_events.runtime import instance_id, serve_http
from canvas_events.topology import GATEWAY
from canvas_gateway.api import create_app
from canvas_gateway.ledger import LedgerSweep
from canvas_gateway.metrics import Metrics
from canvas_gateway.settings import Settings
from canvas_gateway.store import Store
from canvas_store.connections import init_connection

log = structlog.get_logger("canvas_gateway")


class Service:
    """Every part of one gateway process; nothing connects until :meth:`start`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database = Database(
            settings.database_url.get_secret_value(),
            min_size=1,
            max_size=10,
            init=init_connection,
        )
        self.broker = Broker.of(
            settings,
            instance_id("gateway"),
            publish_timeout=settings.publish_timeout_seconds,
        )
        # JobRequested and JobCancelRequested: those of requests that arrive together
        # travel in one message.
        self.publisher = BatchPublisher(self.broker, GATEWAY)
        self.store = Store(self.database)
        self.ledger = LedgerSweep(
            self.store,
            self.broker,
            resend_after=settings.ledger_resend_after_seconds,
            max_resends=settings.ledger_max_resends,
        )
        self.metrics = Metrics()
        self.readiness = Readiness()
        self.readiness.add_database(self.database)
        self.readiness.add_broker(self.broker)

    async def start(self) -> None:
        """Connect in the background: the gateway serves /health before they are up."""
        await self.database.start()
        await self.broker.start()
        await self.ledger.start()

    async def stop(self) -> None:
        """Let the requests in hand finish (up to the grace), close the connections."""
        # A round in hand may finish its sends; a database away does not hold the stop.
        await self.ledger.stop(timeout=2.0)
        await self.broker.stop(drain_timeout=self.settings.shutdown_grace_seconds)
        await self.database.stop()


async def serve(
    settings: Settings, stop: asyncio.Event, *, host: str = "0.0.0.0", port: int | None = None
) -> None:
    """Run the gateway until ``stop`` is set, then drain and close its connections."""
    app = create_app(Service(settings))
    # serve_http runs uvicorn with lifespan="off": the service runs its own lifespan.
    async with app.router.lifespan_context(app):
        port = settings.gateway_port if port is None else port
        log.info("gateway listening", host=host, port=port)
        await serve_http(app, port, stop, host=host)
