"""Read queries over the store, shared by the CLI and the REST API (one implementation each)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dxnode.store import FindingRow, Job, Study


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

    state: str | None = None
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


def study_dict(session: Session, study: Study) -> dict[str, Any]:
    """JSON object of a study."""
    return {
        "id": study.id,
        "study_instance_uid": study.study_instance_uid,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "modalities": study.modalities,
        "calling_aet": study.calling_aet,
        "num_instances": study.num_instances,
        "first_received_at": iso(study.first_received_at),
        "last_received_at": iso(study.last_received_at),
        "ignored": study.ignored,
        "state": study_state(session, study),
    }


def list_studies(session: Session, f: StudyFilter) -> list[dict[str, Any]]:
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
    return [study_dict(session, s) for s in session.scalars(q)]


def job_dict(job: Job, study_uid: str) -> dict[str, Any]:
    """JSON object of a job."""
    return {
        "id": job.id,
        "study_instance_uid": study_uid,
        "state": job.state,
        "attempts": job.attempts,
        "error": job.error,
        "worker": job.worker,
        "model_name": job.model_name,
        "model_version": job.model_version,
        "routed_model": job.routed_model,
        "routing": [line[len("routing: ") :] for line in (job.log or "").splitlines() if line.startswith("routing: ")],
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def list_jobs(session: Session, f: JobFilter) -> list[dict[str, Any]]:
    """Jobs matching the filter, newest first."""
    q = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    if f.state:
        q = q.where(Job.state == f.state)
    if f.since:
        q = q.where(Job.created_at >= f.since)
    if f.study_instance_uid:
        q = q.where(Study.study_instance_uid == f.study_instance_uid)
    q = q.order_by(Job.id.desc()).limit(f.limit).offset(f.offset)
    return [job_dict(job, uid) for job, uid in session.execute(q)]


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


RESULT_COLUMNS = [
    "study_instance_uid",
    "patient_id",
    "accession_number",
    "label",
    "probability",
    "threshold",
    "positive",
    "model_name",
    "model_version",
    "model_demo",
    "job_id",
    "created_at",
]


def list_results(session: Session, f: ResultFilter) -> list[dict[str, Any]]:
    """Findings matching the filter, newest first; by default only each study's newest done job counts."""
    q = select(FindingRow, Study).join(Study, Study.id == FindingRow.study_id)
    if not f.include_superseded:
        newest = (
            select(func.max(Job.id)).where(Job.study_id == FindingRow.study_id, Job.state == "done").scalar_subquery()
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
        {
            "study_instance_uid": study.study_instance_uid,
            "patient_id": study.patient_id,
            "accession_number": study.accession_number,
            "label": r.label,
            "probability": round(r.probability, 6),
            "threshold": r.threshold,
            "positive": r.positive,
            "model_name": r.model_name,
            "model_version": r.model_version,
            "model_demo": r.model_demo,
            "job_id": r.job_id,
            "created_at": iso(r.created_at),
        }
        for r, study in session.execute(q)
    ]


def results_csv(rows: list[dict[str, Any]]) -> str:
    """Result objects as CSV text (header row first)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with ' (OWASP CSV injection)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value
