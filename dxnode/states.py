"""The states of jobs and outbox rows: one enum each, used by the store, the API, the CLI and the metrics."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """The states of a job (``job.state``); the same names in the API, the CLI and the metrics."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class DeliveryState(StrEnum):
    """The states of an outbox row (``delivery.state``); see dxnode/dispatch.py for each one's meaning."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"  # `dxnode outbox cancel`: never sent; `outbox retry` queues it again
    ORPHANED = "orphaned"  # its destination is no longer configured: not tried; `outbox retry` once it is again
