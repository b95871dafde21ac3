"""Where messages go: one topic exchange, one durable queue per service, a dead-letter
queue beside each. Declared in one place so the RabbitMQ management UI shows the whole
flow by name (docs/events.md draws it).

Routing keys say who published what:

- ``gateway.<Type>``: JobRequested, JobCancelRequested, from the gateway
- ``generator.<Type>``: Generation* results, from the ai-generator
- ``job.<Type>``: the events recorded in a job's stream that some service consumes
  (:data:`RELAYED_EVENT_TYPES`), republished by the orchestrator's relay with their
  global position (generators take GenerationRequested and the cancellations,
  notifiers take the status events); the whole stream stays readable in the store
- ``<source>.Batch``: several events of one source in one message, where they waited
  together (docs/events.md, "Batches"); only events whose every consumer binds
  ``<source>.*`` travel so (:data:`SOLO_EVENT_TYPES` never do)

Every name starts with a prefix (``AMQP_TOPOLOGY_PREFIX``, default ``canvas``) so that
tests and side-by-side installations can share one broker without touching each other.

The queues shared by every process (the services' queues and the ``.dlq`` queues) are
of ``AMQP_QUEUE_TYPE``: quorum (replicated by Raft across a cluster's nodes) by default,
or classic (one node); per-process queues are classic, exclusive and auto-delete. A
queue that already exists with the other type is kept as it is (``broker.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

GATEWAY = "gateway"
GENERATOR = "generator"
JOB = "job"
# The type, and routing key's last word, of a message that carries several events
# (``<source>.Batch``): every queue bound to ``<source>.*`` takes it.
BATCH = "Batch"

# What the relay republishes: every type a queue is bound to. JobRequested,
# GenerationSucceeded (it carries every object) and GenerationFailed have no consumer on
# the bus, so publishing them would only cost the broker and every notifier.
RELAYED_EVENT_TYPES = frozenset(
    {
        "JobQueued",
        "GenerationRequested",
        "GenerationStarted",
        "GenerationProgressed",
        "JobRetryScheduled",
        "JobCompleted",
        "JobFailed",
        "JobCancelRequested",
        "JobCancelled",
    }
)

# Job priority is 0..9: a classic work queue hands out the highest first. Quorum queues
# have no message priorities before RabbitMQ 4.0; there the orchestrator's dispatcher
# orders the work (docs/events.md, "Topology").
MAX_PRIORITY = 9

QueueType = Literal["quorum", "classic"]
QUORUM: Final = "quorum"
CLASSIC: Final = "classic"
# Broker-side dead-lettering (a reject, or RabbitMQ 4's delivery limit) is at-most-once
# from a quorum queue unless at-least-once, which needs reject-publish on overflow (no
# queue here has a length limit, so it changes nothing else).
QUORUM_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": QUORUM,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


def other_type(queue_type: QueueType) -> QueueType:
    """The queue type that is not ``queue_type``."""
    return CLASSIC if queue_type == QUORUM else QUORUM


def dead_letter_queue_arguments(queue_type: QueueType) -> dict[str, Any]:
    """A ``.dlq`` queue's arguments: its type only (dead letters go nowhere further)."""
    return {"x-queue-type": QUORUM} if queue_type == QUORUM else {}


def routing_key(source: str, event_type: str) -> str:
    """The routing key of an event published by ``source`` (gateway, generator, job)."""
    return f"{source}.{event_type}"


@dataclass(frozen=True)
class QueueSpec:
    """A queue, its bindings on the events exchange and where its dead letters go."""

    name: str
    bindings: tuple[str, ...]
    dead_letter_queue: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)
    # A shared durable queue's type; None for a per-process (classic, exclusive) one.
    queue_type: QueueType | None = None
    # What only a classic queue takes (the work queue's x-max-priority).
    classic_arguments: dict[str, Any] = field(default_factory=dict)

    def declare_arguments(
        self, dead_letter_exchange: str, queue_type: QueueType | None = None
    ) -> dict[str, Any]:
        """Queue arguments, dead-lettering into ``dead_letter_queue`` through the DLX, for
        ``queue_type`` (default: the spec's own)."""
        kind = queue_type or self.queue_type or CLASSIC
        typed = QUORUM_ARGUMENTS if kind == QUORUM else self.classic_arguments
        return {
            "x-dead-letter-exchange": dead_letter_exchange,
            "x-dead-letter-routing-key": self.dead_letter_queue,
            **self.arguments,
            **typed,
        }


@dataclass(frozen=True)
class Topology:
    """Every exchange and queue name of one canvas-jobs installation."""

    prefix: str = "canvas"
    # The type of the queues every process shares (AMQP_QUEUE_TYPE).
    queue_type: QueueType = QUORUM

    @property
    def exchange(self) -> str:
        """The topic exchange every event is published to."""
        return f"{self.prefix}.events"

    @property
    def dead_letter_exchange(self) -> str:
        """A direct exchange; routing key = the dead-letter queue's name."""
        return f"{self.prefix}.dlx"

    @property
    def orchestrator(self) -> QueueSpec:
        """What the orchestrator consumes: requests from the gateway, results from generators."""
        name = f"{self.prefix}.job-orchestrator"
        return QueueSpec(
            name=name,
            bindings=(f"{GATEWAY}.*", f"{GENERATOR}.*"),
            dead_letter_queue=f"{name}.dlq",
            queue_type=self.queue_type,
        )

    @property
    def generator_work(self) -> QueueSpec:
        """Attempts handed out to generators; generators compete (higher priority first
        on a classic queue, in the order handed out on a quorum queue)."""
        name = f"{self.prefix}.ai-generator.work"
        return QueueSpec(
            name=name,
            bindings=(routing_key(JOB, "GenerationRequested"),),
            dead_letter_queue=f"{name}.dlq",
            queue_type=self.queue_type,
            classic_arguments={"x-max-priority": MAX_PRIORITY},
        )

    def generator_control(self, instance_id: str) -> QueueSpec:
        """One per generator process: cancellations to abort in-flight calls."""
        return QueueSpec(
            name=f"{self.prefix}.ai-generator.control.{instance_id}",
            bindings=(
                routing_key(JOB, "JobCancelRequested"),
                routing_key(JOB, "JobCancelled"),
            ),
            dead_letter_queue=f"{self.prefix}.ai-generator.control.dlq",
            durable=False,
            exclusive=True,
            auto_delete=True,
        )

    def notifier(self, instance_id: str) -> QueueSpec:
        """One per notifier process: every recorded job event (each notifier sees all)."""
        return QueueSpec(
            name=f"{self.prefix}.notifier.{instance_id}",
            bindings=(f"{JOB}.*",),
            dead_letter_queue=f"{self.prefix}.notifier.dlq",
            durable=False,
            exclusive=True,
            auto_delete=True,
        )

    @property
    def durable_queues(self) -> tuple[QueueSpec, ...]:
        """The queues that outlive every process: declared by every service at connect."""
        return (self.orchestrator, self.generator_work)

    @property
    def dead_letter_queues(self) -> tuple[str, ...]:
        """Every ``.dlq`` queue, durable, one per service, of ``queue_type``."""
        return (
            self.orchestrator.dead_letter_queue,
            self.generator_work.dead_letter_queue,
            f"{self.prefix}.ai-generator.control.dlq",
            f"{self.prefix}.notifier.dlq",
        )


# The relayed types some queue binds by name (generators' work and control queues): each
# goes in a message of its own, never in a batch, which only ``job.*`` takes.
SOLO_EVENT_TYPES = frozenset(
    key.split(".", 1)[1]
    for spec in (Topology().generator_work, Topology().generator_control("-"))
    for key in spec.bindings
)
