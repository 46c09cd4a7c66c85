"""The contracts of the REST API and the CLI: every response body, as a pydantic model.

The read queries (dxnode.queries) and the admin actions return these; the REST API's OpenAPI
document describes them and ``--json`` on the CLI prints the same objects. A model that a CLI list
command prints as a table names its columns in ``table_columns`` (fields of the model, in order).
Times are ISO 8601 UTC text ("...Z").
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dxnode.states import DeliveryState, JobState, OrderState, Priority, RequestState, Task
from dxnode.uids import is_valid_uid


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
        "priority",
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
    priority: Priority = Priority.MEDIUM  # STAT, HIGH, MEDIUM or LOW: claimed most urgent first


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


_MATCHING = re.compile(r"[*?\\\x00-\x1f]")  # wildcards, a value separator, control characters


def _exact(value: str, what: str, limit: int) -> str:
    """value without its outer spaces (DICOM's padding, 0x20 only: other whitespace, such as a no-break
    space, is part of the value, as the API's pattern _EXACT allows it); ValueError when it is too long
    or would match more than itself at the source."""
    value = value.strip(" ")
    if len(value) > limit:
        raise ValueError(f"{what} has more than {limit} characters")
    if _MATCHING.search(value):
        raise ValueError(f"{what} may not hold wildcards (* ?), backslashes or control characters")
    return value


class Identifiers(BaseModel):
    """What a fetch looks for at its source: one study, the studies of an accession number, or a
    patient's studies (those only: optionally of one modality, and on or after a date)."""

    model_config = ConfigDict(extra="forbid")

    study_instance_uid: str = ""
    accession_number: str = ""
    patient_id: str = ""
    modality: str = ""  # with patient_id: studies with a series of this modality
    since: str = ""  # with patient_id: Study Date on or after this day (YYYYMMDD or YYYY-MM-DD)

    @field_validator("study_instance_uid")
    @classmethod
    def _uid(cls, v: str) -> str:
        v = v.strip()
        if v and not is_valid_uid(v):
            raise ValueError("not a valid DICOM UID")
        return v

    @field_validator("accession_number")
    @classmethod
    def _accession(cls, v: str) -> str:
        return _exact(v, "accession_number", 16)

    @field_validator("patient_id")
    @classmethod
    def _patient(cls, v: str) -> str:
        return _exact(v, "patient_id", 64)

    @field_validator("modality")
    @classmethod
    def _modality(cls, v: str) -> str:
        return _exact(v, "modality", 16).upper()

    @field_validator("since")
    @classmethod
    def _since(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return v
        digits = v.replace("-", "")
        try:
            if not re.fullmatch(r"\d{8}", digits):
                raise ValueError(digits)
            day = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError:
            raise ValueError("since must be a date, YYYYMMDD or YYYY-MM-DD") from None
        return f"{day.year:04d}{day.month:02d}{day.day:02d}"

    @model_validator(mode="after")
    def _one_key(self) -> Identifiers:
        keys = [k for k in ("study_instance_uid", "accession_number", "patient_id") if getattr(self, k)]
        if len(keys) != 1:
            raise ValueError("give exactly one of study_instance_uid, accession_number or patient_id")
        if (self.modality or self.since) and not self.patient_id:
            raise ValueError("modality and since narrow a patient_id only")
        return self

    def describe(self) -> str:
        """The identifiers in words, e.g. 'accession A123' (logs, errors)."""
        if self.study_instance_uid:
            return f"study {self.study_instance_uid}"
        if self.accession_number:
            return f"accession {self.accession_number}"
        extra = (f" modality {self.modality}" if self.modality else "") + (f" since {self.since}" if self.since else "")
        return f"patient {self.patient_id}{extra}"


# What an exact identifier may hold: no wildcards, backslashes or control characters, no outer spaces.
_EXACT = r"^[^*?\\\x00-\x1f ]([^*?\\\x00-\x1f]*[^*?\\\x00-\x1f ])?$"


class StudyRef(BaseModel):
    """One study, by its Study Instance UID."""

    model_config = ConfigDict(extra="forbid")

    study_instance_uid: str = Field(min_length=1, max_length=64, pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class AccessionRef(BaseModel):
    """The studies of an accession number."""

    model_config = ConfigDict(extra="forbid")

    accession_number: str = Field(min_length=1, max_length=16, pattern=_EXACT)


class PatientRef(BaseModel):
    """A patient's studies: optionally only those with a modality, and on or after a day."""

    model_config = ConfigDict(extra="forbid")

    patient_id: str = Field(min_length=1, max_length=64, pattern=_EXACT)
    modality: str = Field("", max_length=16, pattern=r"^[A-Za-z0-9_]*$")
    since: dt.date | None = None


class RequestIn(BaseModel):
    """POST /api/requests: fetch studies from a source and analyse them (the identifiers: one of three shapes)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=64)  # a [[sources]] name
    identifiers: StudyRef | AccessionRef | PatientRef
    model: str = Field("", max_length=64)  # a [[models]] name; empty: routed as usual
    destinations: list[str] = []  # [[destinations]] names; empty: as configured
    priority: Priority = Priority.MEDIUM

    def fetch_identifiers(self) -> Identifiers:
        """The identifiers as the request table keeps them."""
        data: dict[str, Any] = self.identifiers.model_dump()
        since = data.pop("since", None)
        return Identifiers(**data, since=f"{since.year:04d}{since.month:02d}{since.day:02d}" if since else "")


class RequestCreated(BaseModel):
    """A request was recorded: its id and where to follow it."""

    id: int
    state: RequestState
    url: str  # GET it for the state


class RequestJob(BaseModel):
    """A job a request queued, with links to its study and results."""

    id: int
    study_instance_uid: str
    state: JobState
    priority: Priority
    links: dict[str, str]  # study: the study with its findings and outputs; results: its findings


class RequestOut(BaseModel):
    """A fetch request and how far it got."""

    id: int
    source: str
    identifiers: Identifiers
    model: str
    destinations: list[str]
    priority: Priority
    state: RequestState  # done once every job it queued has ended
    progress: str  # e.g. "retrieving 3 of 12", "queued 1 job(s)", "failed: ..."
    retrieved: int
    total: int
    studies: list[str]
    jobs: list[RequestJob]
    attempts: int
    error: str
    actor: str
    created_at: str | None
    updated_at: str | None
    finished_at: str | None


class OrderOut(BaseModel):
    """An HL7 order as the Orders page shows it: who sent it, what it asks, the ACK it got, the request it made."""

    id: int
    sending_application: str  # MSH-3
    sending_facility: str  # MSH-4
    accession_number: str
    procedure_code: str
    procedure_text: str
    modality: str
    rule: str  # the [[hl7.rules]] entry that matched
    source: str
    priority: Priority
    state: OrderState
    ack_code: str  # MSA-1 of the ACK to its last message ("" if not recorded)
    request_id: int | None  # the fetch request it made
    detail: str
    received_at: str | None
