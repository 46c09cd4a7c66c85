"""The read queries: every count and list the CLI, the REST API and the pages show, one implementation each.

Each query returns a contract of dxnode.schemas (pydantic models), so the REST API's OpenAPI
document describes every response body and ``--json`` on the CLI prints the same objects.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dxnode.config import Destination
from dxnode.schemas import (
    DashboardCounters,
    DeliveryOut,
    FindingOut,
    InstanceResultOut,
    JobOut,
    JobWithLog,
    OrderOut,
    OutputOut,
    ResultOut,
    SeriesOut,
    StudyDetail,
    StudyOut,
)
from dxnode.states import DeliveryState, JobState, Priority
from dxnode.store import (
    Delivery,
    FetchRequest,
    FindingRow,
    Hl7Order,
    Instance,
    InstanceResult,
    Job,
    Output,
    Series,
    Study,
    utcnow,
)


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC text of a timestamp, or None."""
    return value.isoformat().replace("+00:00", "Z") if value else None


@dataclass
class StudyFilter:
    """Filters of the studies listing."""

    patient_id: str | None = None
    accession_number: str | None = None
    date_from: str | None = None  # DICOM DA YYYYMMDD, inclusive
    date_to: str | None = None
    modality: str | None = None
    calling_aet: str | None = None
    limit: int = 100
    offset: int = 0


@dataclass
class JobFilter:
    """Filters of the jobs listing."""

    state: JobState | None = None
    since: dt.datetime | None = None
    study_instance_uid: str | None = None
    limit: int = 100
    offset: int = 0


def study_state(session: Session, study: Study) -> str:
    """The state of the study's newest job, or 'receiving' if it has none yet."""
    job = session.scalar(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc()).limit(1))
    if study.ignored:
        return "ignored"
    return job.state if job else "receiving"


def study_out(session: Session, study: Study) -> StudyOut:
    """The read model of a study row."""
    return StudyOut(
        id=study.id,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        accession_number=study.accession_number,
        study_date=study.study_date,
        study_description=study.study_description,
        modalities=study.modalities,
        calling_aet=study.calling_aet,
        num_instances=study.num_instances,
        first_received_at=iso(study.first_received_at),
        last_received_at=iso(study.last_received_at),
        ignored=study.ignored,
        state=study_state(session, study),
    )


def list_studies(session: Session, f: StudyFilter) -> list[StudyOut]:
    """Studies matching the filter, most recently received first."""
    q = select(Study)
    if f.patient_id:
        q = q.where(Study.patient_id == f.patient_id)
    if f.accession_number:
        q = q.where(Study.accession_number == f.accession_number)
    if f.date_from:
        q = q.where(Study.study_date >= f.date_from)
    if f.date_to:
        q = q.where(Study.study_date <= f.date_to)
    if f.modality:
        q = q.where(Study.modalities.contains(f.modality))
    if f.calling_aet:
        q = q.where(Study.calling_aet == f.calling_aet)
    q = q.order_by(Study.last_received_at.desc(), Study.id.desc()).limit(f.limit).offset(f.offset)
    return [study_out(session, s) for s in session.scalars(q)]


def job_out(job: Job, study_uid: str) -> JobOut:
    """The read model of a job row."""
    routing = [line[len("routing: ") :] for line in (job.log or "").splitlines() if line.startswith("routing: ")]
    skipped = JobState(job.state) == JobState.SKIPPED
    return JobOut(
        id=job.id,
        study_instance_uid=study_uid,
        state=JobState(job.state),
        attempts=job.attempts,
        error=job.error,
        reason=job.error or (routing[0] if skipped and routing else ""),
        worker=job.worker,
        model_name=job.model_name,
        model_version=job.model_version,
        routed_model=job.routed_model,
        routing=routing,
        created_at=iso(job.created_at),
        started_at=iso(job.started_at),
        finished_at=iso(job.finished_at),
        timings=dict(job.timings or {}),
        priority=Priority(job.priority),
    )


def list_jobs(session: Session, f: JobFilter) -> list[JobOut]:
    """Jobs matching the filter, newest first."""
    q = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    if f.state:
        q = q.where(Job.state == f.state)
    if f.since:
        q = q.where(Job.created_at >= f.since)
    if f.study_instance_uid:
        q = q.where(Study.study_instance_uid == f.study_instance_uid)
    q = q.order_by(Job.id.desc()).limit(f.limit).offset(f.offset)
    return [job_out(job, uid) for job, uid in session.execute(q)]


@dataclass
class ResultFilter:
    """Filters of the results listing (study-level findings)."""

    label: str | None = None
    min_probability: float | None = None
    positive_only: bool = False
    model_name: str | None = None
    model_version: str | None = None
    since: dt.datetime | None = None  # created at or after (UTC)
    until: dt.datetime | None = None  # created before (UTC)
    study_instance_uid: str | None = None
    include_superseded: bool = False  # also findings of older jobs of the same study
    limit: int = 1000
    offset: int = 0


RESULT_COLUMNS = list(ResultOut.model_fields)


def list_results(session: Session, f: ResultFilter) -> list[ResultOut]:
    """Findings matching the filter, newest first; by default only each study's newest done job counts."""
    q = (
        select(FindingRow, Study, Series.modality, Series.body_part_examined)
        .join(Study, Study.id == FindingRow.study_id)
        # the series of the image that drove the finding (none when it is gone or was not named)
        .outerjoin(Instance, Instance.sop_instance_uid == FindingRow.source_sop_instance_uid)
        .outerjoin(Series, Series.id == Instance.series_id)
    )
    if not f.include_superseded:
        newest = (
            select(func.max(Job.id))
            .where(Job.study_id == FindingRow.study_id, Job.state == JobState.DONE.value)
            .scalar_subquery()
        )
        q = q.where(FindingRow.job_id == newest)
    if f.label:
        q = q.where(FindingRow.label == f.label)
    if f.min_probability is not None:
        q = q.where(FindingRow.probability >= f.min_probability)
    if f.positive_only:
        q = q.where(FindingRow.positive.is_(True))
    if f.model_name:
        q = q.where(FindingRow.model_name == f.model_name)
    if f.model_version:
        q = q.where(FindingRow.model_version == f.model_version)
    if f.since:
        q = q.where(FindingRow.created_at >= f.since)
    if f.until:
        q = q.where(FindingRow.created_at < f.until)
    if f.study_instance_uid:
        q = q.where(Study.study_instance_uid == f.study_instance_uid)
    q = q.order_by(FindingRow.job_id.desc(), FindingRow.rank).limit(f.limit).offset(f.offset)
    return [
        ResultOut(
            study_instance_uid=study.study_instance_uid,
            patient_id=study.patient_id,
            accession_number=study.accession_number,
            label=r.label,
            probability=round(r.probability, 6),
            threshold=r.threshold,
            positive=r.positive,
            model_name=r.model_name,
            model_version=r.model_version,
            model_demo=r.model_demo,
            job_id=r.job_id,
            created_at=iso(r.created_at),
            modality=modality or study.modalities,
            body_part_examined=body_part or "",
        )
        for r, study, modality, body_part in session.execute(q)
    ]


def results_csv(rows: list[ResultOut]) -> str:
    """Result objects as CSV text (header row first)."""

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in r.model_dump().items()} for r in rows)
    return buf.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with ' (OWASP CSV injection)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def destination_address(dest: Destination | None) -> str:
    """Where a destination's deliveries go: 'AE@host:port' (plus ' TLS') or the STOW-RS URL; '' if not configured."""
    if dest is None:
        return ""
    if dest.kind == "dicomweb":
        return dest.url
    return f"{dest.ae_title}@{dest.host}:{dest.port}" + (" TLS" if dest.tls else "")


def list_deliveries(
    session: Session,
    state: DeliveryState | None = None,
    destination: str | None = None,
    limit: int = 100,
    offset: int = 0,
    study_instance_uid: str | None = None,
    destinations: Sequence[Destination] = (),
) -> list[DeliveryOut]:
    """Outbox rows, newest first; addresses from destinations (the configuration's [[destinations]])."""
    by_name = {d.name: d for d in destinations}
    q = (
        select(Delivery, Output, Study.study_instance_uid)
        .join(Output, Output.id == Delivery.output_id)
        .join(Study, Study.id == Output.study_id)
    )
    if state:
        q = q.where(Delivery.state == state)
    if destination:
        q = q.where(Delivery.destination == destination)
    if study_instance_uid:
        q = q.where(Study.study_instance_uid == study_instance_uid)
    q = q.order_by(Delivery.id.desc()).limit(limit).offset(offset)
    return [
        DeliveryOut(
            id=d.id,
            output_sop_instance_uid=o.sop_instance_uid,
            kind=o.kind,
            label=o.label,
            study_instance_uid=study_uid,
            destination=d.destination,
            configured=d.destination in by_name,
            address=destination_address(by_name.get(d.destination)),
            **_address_parts(by_name.get(d.destination)),
            state=DeliveryState(d.state),
            attempts=d.attempts,
            next_attempt_at=iso(d.next_attempt_at),
            last_error=d.last_error,
            dimse_status=d.dimse_status,
            http_status=d.http_status,
            created_at=iso(d.created_at),
            sent_at=iso(d.sent_at),
        )
        for d, o, study_uid in session.execute(q)
    ]


def _address_parts(dest: Destination | None) -> dict[str, Any]:
    """ae_title, host and port of a destination as configured (of its URL for DICOMweb)."""
    if dest is None:
        return {"ae_title": "", "host": "", "port": 0}
    if dest.kind == "dicomweb":
        url = urlsplit(dest.url)
        return {"ae_title": "", "host": url.hostname or "", "port": url.port or (443 if url.scheme == "https" else 80)}
    return {"ae_title": dest.ae_title, "host": dest.host, "port": dest.port}


def study_detail(
    session: Session, study_instance_uid: str, destinations: Sequence[Destination] = ()
) -> StudyDetail | None:
    """One study with its series, jobs, findings, outputs and deliveries (addresses from destinations);
    None if unknown."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        return None
    series = [
        SeriesOut(
            series_instance_uid=x.series_instance_uid,
            modality=x.modality,
            series_number=x.series_number,
            series_description=x.series_description,
            body_part_examined=x.body_part_examined,
        )
        for x in session.scalars(select(Series).where(Series.study_id == study.id))
    ]
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())))
    newest_done = next((j for j in jobs if j.state == JobState.DONE), None)
    done_id = newest_done.id if newest_done else -1
    findings = [
        FindingOut(
            label=f.label,
            probability=round(f.probability, 6),
            threshold=f.threshold,
            positive=f.positive,
            source_sop_instance_uid=f.source_sop_instance_uid,
            model_name=f.model_name,
            model_version=f.model_version,
            model_demo=f.model_demo,
        )
        for f in session.scalars(select(FindingRow).where(FindingRow.job_id == done_id).order_by(FindingRow.rank))
    ]
    instance_results = [
        InstanceResultOut(sop_instance_uid=r.sop_instance_uid, state=r.state, reason=r.reason)
        for r in session.scalars(select(InstanceResult).where(InstanceResult.job_id == done_id))
    ]
    outputs = list(session.scalars(select(Output).where(Output.study_id == study.id).order_by(Output.id)))
    current = {o.id for o in outputs if o.job_id == done_id} or {o.id for o in outputs}
    return StudyDetail(
        **study_out(session, study).model_dump(),
        series=series,
        jobs=[JobWithLog(**job_out(j, study_instance_uid).model_dump(), log=j.log) for j in jobs],
        findings=findings,
        instance_results=instance_results,
        outputs=[
            OutputOut(
                id=o.id,
                kind=o.kind,
                label=o.label,
                sop_instance_uid=o.sop_instance_uid,
                summary=o.summary,
                model_version=o.model_version,
                current=o.id in current,
            )
            for o in outputs
        ],
        deliveries=list_deliveries(
            session, limit=1000, study_instance_uid=study_instance_uid, destinations=destinations
        ),
    )


def dashboard_counters(session: Session) -> DashboardCounters:
    """Instances received since midnight UTC, queued/running/failed jobs, the outbox backlog and failures."""
    midnight = dt.datetime.combine(utcnow().date(), dt.time(), tzinfo=dt.UTC)
    received = session.scalar(select(func.count()).select_from(Instance).where(Instance.received_at >= midnight))
    jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    deliveries = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
    return DashboardCounters(
        received_today=received or 0,
        queued=jobs.get(JobState.QUEUED, 0),
        running=jobs.get(JobState.RUNNING, 0),
        failed=jobs.get(JobState.FAILED, 0),
        outbox_backlog=deliveries.get(DeliveryState.PENDING, 0),
        outbox_failed=deliveries.get(DeliveryState.FAILED, 0),
    )


def heatmap_file(session: Session, output_id: int) -> tuple[str, str] | None:
    """(SOP Instance UID, file path under the data dir) of a heatmap SC output, or None."""
    out = session.get(Output, output_id)
    return (out.sop_instance_uid, out.file_path) if out is not None and out.kind == "sc" else None


def instance_file(session: Session, sop_instance_uid: str) -> str | None:
    """The file path (under the data dir) of a received instance, or None."""
    return session.scalar(select(Instance.file_path).where(Instance.sop_instance_uid == sop_instance_uid))


def request_ids(session: Session, limit: int, offset: int = 0) -> tuple[list[int], int]:
    """A page of fetch request ids, newest first, and how many there are (the Requests page)."""
    total = session.scalar(select(func.count(FetchRequest.id))) or 0
    ids = session.scalars(select(FetchRequest.id).order_by(FetchRequest.id.desc()).limit(limit).offset(offset))
    return list(ids), int(total)


def list_orders(session: Session, limit: int, offset: int = 0) -> tuple[list[OrderOut], int]:
    """A page of HL7 orders, newest first, and how many there are (the Orders page)."""
    total = session.scalar(select(func.count(Hl7Order.id))) or 0
    rows = session.scalars(select(Hl7Order).order_by(Hl7Order.id.desc()).limit(limit).offset(offset))
    orders = []
    for o in rows:
        app, _, facility = o.sender.partition("^")
        orders.append(
            OrderOut(
                id=o.id,
                sending_application=app,
                sending_facility=facility,
                accession_number=o.accession_number,
                procedure_code=o.procedure_code,
                procedure_text=o.procedure_text,
                modality=o.modality,
                rule=o.rule,
                source=o.source,
                priority=o.priority,
                state=o.state,
                ack_code=o.ack_code,
                request_id=o.request_id,
                detail=o.detail,
                received_at=iso(o.received_at),
            )
        )
    return orders, int(total)
