"""Publishing one source's events so that those that wait together travel together.

A :class:`BatchPublisher` sends what it is given one message at a time, each with its
confirm. A publish that finds nothing in flight goes at once, alone, as
:meth:`Broker.publish <canvas_events.broker.Broker.publish>` would send it: an idle
service adds no latency. Publishes that arrive while a message waits for its confirm
go together in the next one, a batch (docs/events.md, "Batches"): under load, one
message, one confirm and one delivery carry many events. Order is kept: one message
in flight at a time, and a batch holds its events in the order they were given.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from canvas_events.envelope import Envelope
from canvas_events.topology import BATCH, routing_key

# The most events one message carries (a streamed reply's objects are a few KiB each).
MAX_BATCH: Final = 100


class Publisher(Protocol):
    """What a BatchPublisher publishes through: a Broker, or the in-memory one."""

    async def publish(
        self,
        envelope: Envelope,
        routing_key: str,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        mandatory: bool = True,
    ) -> None: ...

    async def publish_batch(
        self,
        bodies: Sequence[bytes],
        routing_key: str,
        *,
        timeout: float | None = None,
        mandatory: bool = True,
    ) -> None: ...


@dataclass
class _Waiting:
    envelope: Envelope
    done: asyncio.Future[None]


class BatchPublisher:
    """Publishes the events of ``source`` (``<source>.<Type>``, or ``<source>.Batch``
    for several); see the module docstring."""

    def __init__(
        self,
        broker: Publisher,
        source: str,
        *,
        mandatory: bool = True,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._broker = broker
        self._source = source
        self._mandatory = mandatory
        self._max_batch = max_batch
        self._waiting: list[_Waiting] = []
        self._task: asyncio.Task[None] | None = None

    async def publish(self, envelope: Envelope) -> None:
        """Publish ``envelope`` and wait for the broker's confirm of the message that
        carried it; raises what that publish raised (a
        :class:`~canvas_events.errors.PublishError`)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(envelope, done))
        if self._task is None:
            # A context of its own: the task publishes for many callers.
            self._task = asyncio.create_task(
                self._work(), name=f"publish-{self._source}", context=contextvars.Context()
            )
        await done

    async def _work(self) -> None:
        try:
            # No await between the last empty take and leaving: a publish queued after it
            # finds no task and starts one.
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    await self._send([item.envelope for item in batch])
                except Exception as exc:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(exc)
                except BaseException:
                    for item in batch:
                        item.done.cancel()
                    raise
                else:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_result(None)
        finally:
            self._task = None

    async def _send(self, envelopes: list[Envelope]) -> None:
        if len(envelopes) == 1:
            (envelope,) = envelopes
            key = routing_key(self._source, envelope.type)
            await self._broker.publish(envelope, key, mandatory=self._mandatory)
            return
        await self._broker.publish_batch(
            [envelope.to_json() for envelope in envelopes],
            routing_key(self._source, BATCH),
            mandatory=self._mandatory,
        )
