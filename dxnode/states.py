"""The states of jobs, instances and outbox rows, and the kinds of outputs: one enum each, used by the
store (its columns load them), the API, the CLI and the metrics. Values are the stored strings."""

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
    """The states of an outbox row (``delivery.state``); see dxnode/outbox/dispatch.py for each one's meaning."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    CANCELLED = "cancelled"  # `dxnode outbox cancel`: never sent; `outbox retry` queues it again
    ORPHANED = "orphaned"  # its destination is no longer configured: not tried; `outbox retry` once it is again
    COMMITTED = (
        "committed"  # sent, and the destination's Storage Commitment report says it keeps it (commitment = true)
    )


class InstanceState(StrEnum):
    """What a job did with one instance (``instance_result.state``)."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class OutputKind(StrEnum):
    """The kind of a DICOM object dxnode wrote (``output.kind``)."""

    SR = "sr"  # the Comprehensive SR report
    SC = "sc"  # a heatmap Secondary Capture


class Task(StrEnum):
    """What a model's outputs mean (a bundle manifest's ``task``)."""

    MULTILABEL = "multilabel"  # one sigmoid per label: any number of labels can be present
    MULTICLASS = "multiclass"  # one softmax over the labels: exactly one is the answer


class HeatmapFor(StrEnum):
    """Which findings get a Grad-CAM heatmap (``[report] heatmap_for``)."""

    POSITIVE = "positive"  # each finding at or above its threshold
    TOP1 = "top1"  # the most probable finding, positive or not
    ALL = "all"  # every label
