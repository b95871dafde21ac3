"""Publishing one source's events so that those that wait together travel together.

A :class:`BatchPublisher` sends what it is given one message at a time, each with its
confirm. A publish that finds nothing in flight goes at once, alone, as
:meth:`Broker.publish <canvas_events.broker.Broker.publish>` would send it: an idle
service adds no latency. Publishes that arrive while a message waits for its confirm
go together in the next one, a batch (docs/events.md, "Batches"): under load, one
message, one confirm and one delivery carry many events. Order is kept: one message
in flight at a time, and a batch holds its events in the order they were given (the
same mechanism as the orchestrator's group commit: :mod:`canvas_events.batching`).

The messages go out from a task of the publisher's own: each event takes along the
traceparent of the span it was published from, and its publish span is that span's
child (:mod:`canvas_events.tracing`), in a batch too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from canvas_events import tracing
from canvas_events.batching import Batches
from canvas_events.broker import BrokerBase
from canvas_events.envelope import Envelope
from canvas_events.topology import BATCH, routing_key

# The most events one message carries (a streamed reply's objects are a few KiB each).
MAX_BATCH: Final = 100


class BatchPublisher:
    """Publishes the events of ``source`` (``<source>.<Type>``, or ``<source>.Batch``
    for several); see the module docstring."""

    def __init__(
        self,
        broker: BrokerBase,
        source: str,
        *,
        mandatory: bool = True,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._broker = broker
        self._source = source
        self._mandatory = mandatory
        # Each event with the traceparent of the span that published it.
        self._batches: Batches[tuple[Envelope, str | None], None] = Batches(
            self._send, max_batch=max_batch, name=f"publish-{source}"
        )

    async def publish(self, envelope: Envelope) -> None:
        """Publish ``envelope`` and wait for the broker's confirm of the message that
        carried it; raises what that publish raised (a
        :class:`~canvas_events.errors.PublishError`)."""
        await self._batches.submit((envelope, tracing.current_traceparent()))

    async def _send(self, items: Sequence[tuple[Envelope, str | None]]) -> list[None]:
        if len(items) == 1:
            ((envelope, parent),) = items
            key = routing_key(self._source, envelope.type)
            await self._broker.publish(envelope, key, mandatory=self._mandatory, parent=parent)
        else:
            await self._broker.publish_envelopes(
                [envelope for envelope, _ in items],
                routing_key(self._source, BATCH),
                parents=[parent for _, parent in items],
                mandatory=self._mandatory,
            )
        return [None] * len(items)
