"""Where a job is: the ``status`` of the jobs read model and of the public API."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A job's status (the state machine is canvas_orchestrator.domain's)."""

    # Accepted; an attempt waits in the work queue for a generator.
    QUEUED = "queued"
    # A generator took the current attempt and is calling the model.
    PROCESSING = "processing"
    # The last attempt failed in a way worth retrying; a timer queues it again.
    RETRY_SCHEDULED = "retry_scheduled"
    # Final: the objects are on the canvas.
    COMPLETED = "completed"
    # Final: a permanent error, or every retry used up; error_message says why.
    FAILED = "failed"
    # Final: the user cancelled it; none of its objects reach the canvas.
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether nothing can change the job any more."""
        return self in FINAL_STATUSES


ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.PROCESSING, JobStatus.RETRY_SCHEDULED})
FINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
