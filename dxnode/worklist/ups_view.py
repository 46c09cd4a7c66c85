"""The node's jobs as UPS workitems (PS3.4 Annex CC, PS3.3 C.30): one workitem per job, pushed and pulled alike.

Procedure Step State from the job (``ups_state``):

- queued, never tried: SCHEDULED;
- running, or queued again for a retry after a failed attempt: IN PROGRESS (the node still performs it);
- done: COMPLETED (its outputs are durable; sending them is the outbox's, ``dxnode outbox``);
- failed or skipped (nothing the model is declared for): CANCELED, the job's reason as Reason For Cancellation.

An admin's re-run of a failed job (``dxnode jobs requeue``) or a shutdown that gives back a job's
first attempt takes the same workitem back to SCHEDULED, a step PS3.4's state machine does not have:
subscribers are told, as of any change.

Scheduled Procedure Step Priority: STAT and HIGH are HIGH, MEDIUM and LOW themselves. The SOP Instance
UID is derived from the job (``workitem_uid``): 2.25 form, its low 32 bits the job id, the rest a
digest of the study, the job id and its creation time, so it is the same on every read, differs
between nodes, and leads back to its job without a stored column.

``record_change`` (called by worklist.queue at every job transition) records the reports each
subscriber is owed; worklist/ups_events.py serves the SOP classes and sends the reports.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from dxnode.config import Settings
from dxnode.states import DeliveryState, JobState, Priority
from dxnode.store import Delivery, Instance, Job, Output, Series, Study, UpsEvent, UpsSubscription

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"  # the SOP Class of every UPS instance
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED = "SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"
# CID 9231 "Workitem Definition": the node's model flags findings on images.
WORKITEM_CODE = ("110004", "DCM", "Computer Aided Detection")
LOCAL_SCHEME = "99DXNODE"  # the coding scheme of the station name code (the node's AE title)
_JOB_BITS = 32


def ups_state(state: JobState | str, attempts: int) -> str:
    """The Procedure Step State of a job (see the module's docstring)."""
    state = JobState(state)
    if state == JobState.QUEUED:
        return IN_PROGRESS if attempts > 0 else SCHEDULED
    if state == JobState.RUNNING:
        return IN_PROGRESS
    return COMPLETED if state == JobState.DONE else CANCELED


def job_states(ups: str) -> Any:
    """SQL condition on Job for one Procedure Step State (None for an unknown one)."""
    if ups == SCHEDULED:
        return and_(Job.state == JobState.QUEUED, Job.attempts == 0)
    if ups == IN_PROGRESS:
        return or_(Job.state == JobState.RUNNING, and_(Job.state == JobState.QUEUED, Job.attempts > 0))
    if ups == COMPLETED:
        return Job.state == JobState.DONE
    if ups == CANCELED:
        return Job.state.in_([JobState.FAILED, JobState.SKIPPED])
    return None


def ups_priority(priority: Priority | str) -> str:
    """Scheduled Procedure Step Priority (HIGH, MEDIUM, LOW) of a job priority."""
    p = Priority(priority)
    return "HIGH" if p in (Priority.STAT, Priority.HIGH) else p.value


PRIORITIES = {"HIGH": (Priority.STAT, Priority.HIGH), "MEDIUM": (Priority.MEDIUM,), "LOW": (Priority.LOW,)}


def _digest(study_uid: str, job_id: int, created_at: dt.datetime) -> int:
    text = f"dxnode-ups\x1f{study_uid}\x1f{job_id}\x1f{created_at.astimezone(dt.UTC).isoformat()}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:12], "big")


def workitem_uid(study_uid: str, job_id: int, created_at: dt.datetime) -> str:
    """The SOP Instance UID of a job's workitem (2.25 form, at most 44 characters)."""
    return f"2.25.{(_digest(study_uid, job_id, created_at) << _JOB_BITS) | (job_id & 0xFFFFFFFF)}"


def job_id_of(uid: str) -> int | None:
    """The job id a workitem UID names (checked against the job by ``load``), None if it is not ours."""
    m = re.fullmatch(r"2\.25\.([1-9][0-9]{0,38})", uid.strip())
    if m is None:
        return None
    return int(m.group(1)) & 0xFFFFFFFF or None


def load(session: Session, uid: str) -> tuple[Job, Study] | None:
    """The job and study of a workitem UID, or None when no job of this node has that UID."""
    job_id = job_id_of(uid)
    row = session.execute(select(Job, Study).join(Study).where(Job.id == job_id)).first() if job_id else None
    if row is None or workitem_uid(row[1].study_instance_uid, row[0].id, row[0].created_at) != uid.strip():
        return None
    return row[0], row[1]


def _dt(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000") if value is not None else ""


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning[:64]
    return item


def _references(study_uid: str, series: dict[str, list[tuple[str, str]]], retrieve_ae: list[str]) -> Sequence:
    """Referenced Instances and Access items (PS3.3 10.3b), one per series."""
    items = []
    for series_uid, refs in series.items():
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID, item.SeriesInstanceUID = study_uid, series_uid
        item.ReferencedSOPSequence = Sequence()
        for class_uid, instance_uid in refs:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = class_uid, instance_uid
            item.ReferencedSOPSequence.append(ref)
        where = Dataset()
        where.RetrieveAETitle = [ae for ae in retrieve_ae if ae] or ""
        item.DICOMRetrievalSequence = Sequence([where])
        items.append(item)
    return Sequence(items)


def _inputs(session: Session, study: Study) -> Sequence:
    rows = session.execute(
        select(Series.series_instance_uid, Instance.sop_class_uid, Instance.sop_instance_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .order_by(Series.id, Instance.id)
    ).all()
    series: dict[str, list[tuple[str, str]]] = {}
    for series_uid, class_uid, instance_uid in rows:
        series.setdefault(series_uid, []).append((class_uid, instance_uid))
    return _references(study.study_instance_uid, series, [study.calling_aet])


def _outputs(session: Session, settings: Settings, job: Job, study: Study) -> Sequence:
    rows = session.execute(
        select(Output.id, Output.series_instance_uid, Output.sop_class_uid, Output.sop_instance_uid)
        .where(Output.job_id == job.id)
        .order_by(Output.id)
    ).all()
    sent = set(
        session.scalars(
            select(Delivery.destination).where(
                Delivery.output_id.in_([r[0] for r in rows]),
                Delivery.state.in_([DeliveryState.SENT, DeliveryState.COMMITTED]),
            )
        )
    )
    where = [settings.node.ae_title] + [d.ae_title for d in settings.destinations if d.name in sent]
    series: dict[str, list[tuple[str, str]]] = {}
    for _, series_uid, class_uid, instance_uid in rows:
        series.setdefault(series_uid, []).append((class_uid, instance_uid))
    return _references(study.study_instance_uid, series, where)


def _performed(session: Session, settings: Settings, job: Job, study: Study, state: str) -> Sequence:
    item = Dataset()
    item.PerformedStationNameCodeSequence = Sequence([_code(settings.node.ae_title, LOCAL_SCHEME, "dxnode")])
    item.PerformedWorkitemCodeSequence = Sequence([_code(*WORKITEM_CODE)])
    item.PerformedProcedureStepStartDateTime = _dt(job.started_at)
    item.PerformedProcedureStepEndDateTime = _dt(job.finished_at) if state in (COMPLETED, CANCELED) else ""
    item.ActualHumanPerformersSequence = Sequence()
    item.OutputInformationSequence = _outputs(session, settings, job, study) if state == COMPLETED else Sequence()
    return Sequence([item])


# Attributes that cost a query each: built only when asked for.
_COSTLY = {Tag("InputInformationSequence"), Tag("UnifiedProcedureStepPerformedProcedureSequence")}


def workitem(
    session: Session, settings: Settings, job: Job, study: Study, wanted: Iterable[BaseTag] | None = None
) -> Dataset:
    """The UPS attributes of a job (wanted: build only these, where costly ones are concerned)."""
    want = set(wanted) if wanted is not None else None
    state = ups_state(job.state, job.attempts)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UPS_PUSH
    ds.SOPInstanceUID = workitem_uid(study.study_instance_uid, job.id, job.created_at)
    ds.PatientName, ds.PatientID = study.patient_name, study.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyInstanceUID = study.study_instance_uid
    request = Dataset()
    request.StudyInstanceUID, request.AccessionNumber = study.study_instance_uid, study.accession_number
    request.RequestedProcedureID, request.RequestedProcedureDescription = "", study.study_description
    ds.ReferencedRequestSequence = Sequence([request])
    ds.ProcedureStepState = state
    ds.ScheduledProcedureStepPriority = ups_priority(job.priority)
    ds.ProcedureStepLabel = (job.model_name or job.routed_model or "AI analysis")[:64]
    ds.WorklistLabel = settings.node.ae_title
    ds.ScheduledProcedureStepStartDateTime = _dt(job.created_at)
    ds.ScheduledProcedureStepModificationDateTime = _dt(job.updated_at)
    ds.ExpectedCompletionDateTime = ""
    ds.ScheduledWorkitemCodeSequence = Sequence([_code(*WORKITEM_CODE)])
    ds.ScheduledStationNameCodeSequence = Sequence([_code(settings.node.ae_title, LOCAL_SCHEME, "dxnode")])
    ds.InputReadinessState = "READY"
    if want is None or Tag("InputInformationSequence") in want:
        ds.InputInformationSequence = _inputs(session, study)
    if state != SCHEDULED and (want is None or Tag("UnifiedProcedureStepPerformedProcedureSequence") in want):
        ds.UnifiedProcedureStepPerformedProcedureSequence = _performed(session, settings, job, study, state)
    if state == CANCELED:
        progress = Dataset()
        progress.ProcedureStepCancellationDateTime = _dt(job.finished_at)
        progress.ReasonForCancellation = (job.error or f"the job ended {job.state}")[:10240]
        ds.ProcedureStepProgressInformationSequence = Sequence([progress])
    return ds


def only(ds: Dataset, tags: Iterable[BaseTag]) -> Dataset:
    """The attributes of ds named by tags (absent ones empty), with its character set."""
    out = Dataset()
    out.SpecificCharacterSet = ds.SpecificCharacterSet
    for tag in tags:
        if tag in ds:
            out[tag] = ds[tag]
        elif tag != Tag("SpecificCharacterSet"):
            out.add_new(tag, _vr(tag), None)
    return out


def _vr(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _text(identifier: Dataset, keyword: str) -> str:
    value = identifier.get(keyword, "")
    return "" if value is None else str(value).strip()


def _wildcard(column: Any, pattern: str) -> Any:
    """SQL for DICOM wildcard matching (* and ?) of a text column, or equality when there is none."""
    if "*" not in pattern and "?" not in pattern:
        return column == pattern
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


_DT = r"\d{4,14}(?:\.\d{1,6})?(?:[+-]\d{4})?"


def _parse_dt(text: str, end: bool) -> dt.datetime | None:
    """A DICOM DT bound (YYYY[MM[DD[HH[MM[SS]]]]], optional zone) as UTC, the end of its span with end; None if empty."""
    if not text:
        return None
    m = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?", text)
    if m is None:
        raise ValueError(f"not a DICOM DateTime: {text!r}")
    year, given = int(m.group(1)), [int(p) if p else None for p in m.groups()[1:6]]
    start = dt.datetime(year, given[0] or 1, given[1] or 1, given[2] or 0, given[3] or 0, given[4] or 0)
    zone = m.group(7) or "+0000"
    offset = dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[3:])) * (1 if zone[0] == "+" else -1)
    start = start.replace(tzinfo=dt.timezone(offset)).astimezone(dt.UTC)
    if not end:
        return start
    # the end of the span the value names: its last given field, plus one, less a microsecond
    last = max((i for i, v in enumerate(given) if v is not None), default=-1)
    if last == -1:
        after = start.replace(year=start.year + 1)
    elif last == 0:
        after = (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    else:
        after = (
            start
            + [dt.timedelta(days=1), dt.timedelta(hours=1), dt.timedelta(minutes=1), dt.timedelta(seconds=1)][last - 1]
        )
    return after - dt.timedelta(microseconds=1)


def _date_range(text: str) -> Any:
    """SQL for a Scheduled Procedure Step Start DateTime match: a value, or a range A-B, -B or A-."""
    text = text.strip()
    m = re.fullmatch(f"({_DT})?-({_DT})?", text)
    low, high = (m.group(1) or "", m.group(2) or "") if m else (text, text)
    start, stop = _parse_dt(low, end=False), _parse_dt(high, end=True)
    conds = [Job.created_at >= start] if start else []
    conds += [Job.created_at <= stop] if stop else []
    return and_(*conds) if conds else None


def matching(identifier: Dataset) -> Select[Job, Study]:
    """The jobs a UPS C-FIND identifier matches (ValueError for a key value that cannot match anything).

    Matched keys: Procedure Step State, Scheduled Procedure Step Priority, SOP Instance UID, Study
    Instance UID (UID lists), Patient ID and Patient's Name (wildcards), Procedure Step Label
    (wildcards, on the model name) and Scheduled Procedure Step Start DateTime (value or range).
    An empty key matches everything (universal matching); any other key is only returned."""
    q = select(Job, Study).join(Study)
    conds: list[Any] = []
    if state := _text(identifier, "ProcedureStepState"):
        cond = job_states(state.upper())
        conds.append(cond if cond is not None else Job.id < 0)
    if priority := _text(identifier, "ScheduledProcedureStepPriority"):
        conds.append(Job.priority.in_(PRIORITIES.get(priority.upper(), ())))
    if uids := _values(identifier.get("SOPInstanceUID", None)):
        conds.append(Job.id.in_([j for u in uids if (j := job_id_of(u)) is not None]))
    if "StudyInstanceUID" in identifier and (studies := _values(identifier.StudyInstanceUID)):
        conds.append(Study.study_instance_uid.in_(studies))
    if patient_id := _text(identifier, "PatientID"):
        conds.append(_wildcard(Study.patient_id, patient_id))
    if name := _text(identifier, "PatientName"):
        conds.append(_wildcard(Study.patient_name, name))
    if label := _text(identifier, "ProcedureStepLabel"):
        conds.append(or_(_wildcard(Job.model_name, label), _wildcard(Job.routed_model, label)))
    if when := _text(identifier, "ScheduledProcedureStepStartDateTime"):
        cond = _date_range(when)
        if cond is not None:
            conds.append(cond)
    return q.where(*conds).order_by(Job.id.desc())


def _values(value: Any) -> list[str]:
    """The non-empty values of a (possibly multi-valued) attribute value, as strings."""
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v).strip() for v in items if v is not None and str(v).strip()]


def find(session: Session, settings: Settings, identifier: Dataset) -> list[Dataset]:
    """The workitems matching a C-FIND identifier, only the asked keys each, at most [ups_watch] max_matches
    (the newest jobs first). SOP Instance UIDs are checked against their job, so a forged one matches nothing."""
    tags = [elem.tag for elem in identifier if elem.keyword != "SpecificCharacterSet"]
    wanted = set(tags)
    uids = set(_values(identifier.get("SOPInstanceUID", None)))
    answers = []
    for job, study in session.execute(matching(identifier).limit(settings.ups_watch.max_matches)).all():
        ds = workitem(session, settings, job, study, wanted)
        if uids and ds.SOPInstanceUID not in uids:
            continue
        answers.append(only(ds, tags))
    return answers


# --- what subscribers are owed (ups_events sends it) ---------------------------------------------


# --- what is owed to whom ------------------------------------------------------------------------


def _owe(session: Session, job_id: int, ae_title: str, state: str, reason: str) -> None:
    """Add a report of state for ae_title unless the last one recorded for that job already said it."""
    last = session.scalar(
        select(UpsEvent.ups_state)
        .where(UpsEvent.job_id == job_id, UpsEvent.ae_title == ae_title)
        .order_by(UpsEvent.id.desc())
        .limit(1)
    )
    if last != state:
        session.add(UpsEvent(job_id=job_id, ae_title=ae_title, ups_state=state, reason=reason[:1024]))


def record_change(session: Session, job_id: int, created: bool = False) -> None:
    """Record, in the caller's transaction, the report each subscriber of job_id is owed for its current state.

    Called by worklist.queue wherever a job is made (created: every global subscriber is subscribed to
    it, PS3.4 CC.2.3) or changes state; costs a query or two when nobody subscribed."""
    if created:
        holders = session.scalars(select(UpsSubscription).where(UpsSubscription.job_id.is_(None))).all()
        session.add_all(
            UpsSubscription(ae_title=h.ae_title, job_id=job_id, deletion_lock=h.deletion_lock) for h in holders
        )
    subscribers = session.scalars(
        select(UpsSubscription.ae_title).where(UpsSubscription.job_id == job_id).distinct()
    ).all()
    if not subscribers:
        return
    row = session.execute(select(Job.state, Job.attempts, Job.error).where(Job.id == job_id)).one_or_none()
    if row is None:
        return
    state = ups_state(row.state, row.attempts)
    for ae_title in subscribers:
        _owe(session, job_id, ae_title, state, row.error if state == CANCELED else "")


def owe_current(session: Session, ae_title: str, jobs: list[Job]) -> None:
    """Record the report of each job's current state for a new subscriber (unless the last one said it)."""
    for job in jobs:
        state = ups_state(job.state, job.attempts)
        _owe(session, job.id, ae_title, state, job.error if state == CANCELED else "")
