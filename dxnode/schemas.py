"""The contracts of the REST API and the CLI: every response body, as a pydantic model.

The read queries (dxnode.queries) and the admin actions return these; the REST API's OpenAPI
document describes them and ``--json`` on the CLI prints the same objects. A model that a CLI list
command prints as a table names its columns in ``table_columns`` (fields of the model, in order).
Times are ISO 8601 UTC text ("...Z").
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from dxnode.states import DeliveryState, JobState, Task


class TableRow(BaseModel):
    """A model that a CLI list command prints as a table: ``table_columns`` are the fields shown."""

    table_columns: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        unknown = [c for c in cls.table_columns if c not in cls.model_fields]
        if unknown:
            raise TypeError(f"{cls.__name__}.table_columns names no field {unknown}")


class StudyOut(TableRow):
    """A received study."""

    table_columns: ClassVar[tuple[str, ...]] = (
        "study_instance_uid",
        "patient_id",
        "study_date",
        "modalities",
        "num_instances",
        "calling_aet",
        "last_received_at",
        "state",
    )

    id: int
    study_instance_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    study_description: str
    modalities: str  # backslash-separated
    calling_aet: str
    num_instances: int
    first_received_at: str | None
    last_received_at: str | None
    ignored: bool
    state: str  # the newest job's state, "receiving" before the first job, or "ignored"


class JobOut(TableRow):
    """A job: one run of the pipeline over a study."""

    table_columns: ClassVar[tuple[str, ...]] = (
        "id",
        "study_instance_uid",
        "state",
        "attempts",
        "routed_model",
        "model_name",
        "model_version",
        "created_at",
        "finished_at",
        "reason",
    )

    id: int
    study_instance_uid: str
    state: JobState
    attempts: int
    error: str
    reason: str  # why it failed (its error) or was skipped (the routing summary), in one line
    worker: str
    model_name: str
    model_version: str
    routed_model: str  # the [[models]] entry ("" for [model], or not routed yet)
    routing: list[str]  # why: the model chosen and the others' refusals (dxnode/worklist/routing.py)
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    timings: dict[str, float] = {}  # seconds per stage of the last attempt (decode, model, ..., queued_to_done)


class JobWithLog(JobOut):
    """A job with the lines it logged (the study page)."""

    log: str


class ResultOut(TableRow):
    """A study-level finding: one label's probability from one job."""

    table_columns: ClassVar[tuple[str, ...]] = (
        "study_instance_uid",
        "patient_id",
        "label",
        "probability",
        "positive",
        "model_name",
        "model_version",
        "job_id",
        "created_at",
    )

    study_instance_uid: str
    patient_id: str
    accession_number: str
    label: str
    probability: float
    threshold: float
    positive: bool
    model_name: str
    model_version: str
    model_demo: bool
    job_id: int
    created_at: str | None
    modality: str = ""  # of the series of the image that drove the finding (the study's modalities if unknown)
    body_part_examined: str = ""  # of that series


class DeliveryOut(TableRow):
    """An outbox row: one output to one destination, with the address it goes to under the configuration
    in force (a delivery names its destination only)."""

    table_columns: ClassVar[tuple[str, ...]] = (
        "id",
        "kind",
        "label",
        "destination",
        "address",
        "state",
        "attempts",
        "next_attempt_at",
        "sent_at",
        "last_error",
    )

    id: int
    output_sop_instance_uid: str
    kind: str  # "sr" or "sc"
    label: str
    study_instance_uid: str
    destination: str
    configured: bool  # the destination is in [[destinations]] (false: its rows are orphaned)
    address: str  # "AE@host:port" (" TLS"), or the STOW-RS URL; "" when not configured
    ae_title: str  # of the configured destination ("" for DICOMweb or not configured)
    host: str
    port: int
    state: DeliveryState
    attempts: int
    next_attempt_at: str | None
    last_error: str
    dimse_status: int | None
    http_status: int | None  # of the last STOW-RS attempt (DICOMweb destinations)
    created_at: str | None
    sent_at: str | None


class OutboxChange(BaseModel):
    """What `dxnode outbox cancel` or `retry` did: the rows changed, and those left as they were, by reason."""

    action: str  # cancel or retry
    selection: str  # e.g. "study:1.2.3 destination:pacs"
    matched: int
    changed: list[int]  # delivery ids
    skipped: dict[str, list[int]]  # reason -> delivery ids


class SeriesOut(BaseModel):
    """A series of a study."""

    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str


class FindingOut(BaseModel):
    """A finding of the study's newest done job."""

    label: str
    probability: float
    threshold: float
    positive: bool
    source_sop_instance_uid: str
    model_name: str
    model_version: str
    model_demo: bool


class InstanceResultOut(BaseModel):
    """What the newest done job did with one instance."""

    sop_instance_uid: str
    state: str  # done, skipped or failed
    reason: str


class OutputOut(BaseModel):
    """An SR or heatmap SC written for the study; ``current`` when it is from the newest done job."""

    id: int
    kind: str
    label: str
    sop_instance_uid: str
    summary: str
    model_version: str
    current: bool


class StudyDetail(StudyOut):
    """A study in full: what the study page and GET /api/studies/{uid} show."""

    series: list[SeriesOut]
    jobs: list[JobWithLog]
    findings: list[FindingOut]
    instance_results: list[InstanceResultOut]
    outputs: list[OutputOut]
    deliveries: list[DeliveryOut]


class JobQueued(BaseModel):
    """A study was queued: the job that will run it."""

    job_id: int


class JobRequeued(BaseModel):
    """A job was re-queued: the queued job (the same one, or a new one when it was done)."""

    job_id: int
    requeued_from: int
    state: JobState


class StudyIgnored(BaseModel):
    """A study's ignored flag after the change."""

    study_instance_uid: str
    ignored: bool


class Requeued(BaseModel):
    """How many deliveries were queued again."""

    requeued: int


class PreprocessingOut(BaseModel):
    """How the bundle wants its input made."""

    input_size: int
    resize: str
    channels: str
    windows: list[tuple[float, float]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ModelInfo(BaseModel):
    """A model bundle's manifest, as served (keys a newer manifest adds are passed through)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    version: str
    labels: list[str]
    task: Task
    thresholds: list[float]
    preprocessing: PreprocessingOut
    weights_file: str
    weights_sha256: str
    demo: bool
    description: str
    extra: dict[str, Any]
    label_count: int
    onnx_file: str = ""  # model.onnx of the ONNX Runtime engine ("" in older bundles)
    onnx_sha256: str = ""
    quantization: dict[str, Any] = {}  # set on int8 bundles
    engine: str = ""  # the engine running it: onnxruntime or torch
    engine_reason: str = ""  # why that engine


class FindingScore(BaseModel):
    """One label of a prediction."""

    label: str
    probability: float
    positive: bool
    threshold: float


class ModelRef(BaseModel):
    """The model that made a prediction."""

    name: str
    version: str
    demo: bool


class PredictionOut(BaseModel):
    """`dxnode predict --json`: the findings for one file, or why it failed."""

    model_config = ConfigDict(protected_namespaces=())

    file: str
    findings: list[FindingScore]
    model: ModelRef
    heatmap: str | None  # the PNG written with --heatmap-dir
    error: str | None


class UploadPrediction(PredictionOut):
    """POST /api/predict: the prediction plus the heatmap and the windowed image as PNG data URLs."""

    heatmap_png: str | None
    image_png: str | None


class Health(BaseModel):
    """GET /healthz: the process is up."""

    status: str


class ReadyOut(BaseModel):
    """GET /readyz: each check, and whether all passed (status 503 if not)."""

    ready: bool
    checks: dict[str, bool]


class DashboardCounters(BaseModel):
    """The dashboard's counters: instances received since midnight UTC, jobs by state, the outbox."""

    received_today: int
    queued: int
    running: int
    failed: int
    outbox_backlog: int
    outbox_failed: int
