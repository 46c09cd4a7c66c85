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
    SEG = "seg"  # a Segmentation of the attention regions (binary, or fractional: the map)
    PMAP = "pmap"  # a Parametric Map of one finding's Grad-CAM (0..1, AI attention)
    GSPS = "gsps"  # a Grayscale Softcopy Presentation State per source series: outlines and text
    KOS = "kos"  # a Key Object Selection naming the images with positive findings


class Task(StrEnum):
    """What a model's outputs mean (a bundle manifest's ``task``)."""

    MULTILABEL = "multilabel"  # one sigmoid per label: any number of labels can be present
    MULTICLASS = "multiclass"  # one softmax over the labels: exactly one is the answer


class HeatmapFor(StrEnum):
    """Which findings get a Grad-CAM heatmap (``[report] heatmap_for``)."""

    POSITIVE = "positive"  # each finding at or above its threshold
    TOP1 = "top1"  # the most probable finding, positive or not
    ALL = "all"  # every label


class Priority(StrEnum):
    """How urgent a job is (``job.priority``): job processes and the outbox take STAT first, then the oldest.

    The names of DICOM's Requested Procedure Priority and UPS Scheduled Procedure Step Priority."""

    STAT = "STAT"
    HIGH = "HIGH"
    MEDIUM = "MEDIUM"  # the default; a DICOM ROUTINE is MEDIUM
    LOW = "LOW"

    @property
    def rank(self) -> int:
        """0 for STAT up to 3 for LOW: the order claims take."""
        return PRIORITY_ORDER.index(self)

    @classmethod
    def parse(cls, text: str) -> Priority:
        """A priority from its name in any case, ROUTINE as MEDIUM; ValueError naming the choices."""
        name = text.strip().upper()
        if name == "ROUTINE":
            return cls.MEDIUM
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"{text!r} is not a priority (STAT, HIGH, MEDIUM or LOW)") from None


PRIORITY_ORDER = (Priority.STAT, Priority.HIGH, Priority.MEDIUM, Priority.LOW)


class RequestState(StrEnum):
    """The states of a fetch request (``request.state``); ``done`` is shown once its jobs have ended."""

    PENDING = "pending"  # recorded, waiting for its source's fetcher (or for a retry after a failure)
    QUERYING = "querying"  # C-FIND or QIDO-RS at the source
    RETRIEVING = "retrieving"  # C-MOVE, C-GET or WADO-RS: n of m instances
    QUEUED = "queued"  # every study retrieved and queued as a job
    DONE = "done"  # its jobs have ended (shown by the read, never stored)
    FAILED = "failed"  # refused (a bound), not found, or out of attempts: error says why


class OrderState(StrEnum):
    """The states of an HL7 order (``hl7_order.state``); see dxnode/hl7/orders.py."""

    PENDING = "pending"  # recorded; not yet handed to the fetch stage (dxnode.sources)
    REQUESTED = "requested"  # handed to the fetch stage, which polls the source for the study
    CANCELLED = "cancelled"  # the placer cancelled it (ORC-1 CA, OC, DC)


class Hl7ResultKind(StrEnum):
    """How a result goes to an [[hl7.destinations]] entry (``hl7_result.kind``)."""

    ORU = "oru"  # an HL7 v2 ORU^R01 over MLLP
    FHIR = "fhir"  # a FHIR transaction Bundle: a DiagnosticReport and its Observations


class UpsState(StrEnum):
    """The node's side of a Task Manager's workitem (``ups_workitem.state``); see dxnode/sources/ups.py."""

    CLAIMING = "claiming"  # its Transaction UID recorded, the N-ACTION to IN PROGRESS sent or about to be
    IN_PROGRESS = "in_progress"  # claimed: its inputs are fetched, its job runs, progress is reported
    COMPLETED = "completed"  # Output Information set and the workitem put to COMPLETED
    CANCELED = "canceled"  # failed, or cancelled on request: put to CANCELED with the reason
    REFUSED = "refused"  # the claim was refused (another performer, wrong Transaction UID): skipped
    GONE = "gone"  # the Task Manager no longer has it (0xC307) or ended it itself: nothing more sent
