"""What the UPS task performer reports to its Task Manager: the datasets of its N-SETs (progress, the
final Performed Procedure attributes with the Output Information Sequence), and how a workitem's
fetch requests, jobs and deliveries stand (read from the store).

Checked against PS3.4 CC.2.5 Table CC.2.5-3 (its Final State column) and dcm4chee-arc-light's UPS
service (UPSServiceEJB.meetFinalStateRequirementsOfCompleted, set-iod.xml); docs/sources.md lists it:
- COMPLETED (codes R and P): the Unified Procedure Step Performed Procedure Sequence with one item
  holding Performed Station Name Code Sequence, Performed Procedure Step Start and End DateTime,
  Performed Workitem Code Sequence (complete codes: value, scheme, meaning) and the Output Information
  Sequence (Type 2: present, empty when nothing was made);
- CANCELED (codes X): the Procedure Step Progress Information Sequence with Procedure Step
  Cancellation DateTime and Procedure Step Discontinuation Reason Code Sequence (the reason in words too);
- every N-SET carries the Transaction UID, no attribute N-SET may not change, no empty Type 1 value
  (an output item names only places that hold it: a Retrieve AE Title or a WADO-RS Retrieve URL), whole
  sequences (PS3.4 CC.2.6.2), and Specific Character Set ISO_IR 192 when a text is not ASCII;
- no Actual Human Performers Sequence (an AI performer has none: RC "if known").
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import select

from dxnode.config import Destination, Settings
from dxnode.sources.fetch import request_out
from dxnode.states import DeliveryState, JobState, RequestState
from dxnode.store import Delivery, Job, Output, Store, Study, UpsWorkitem

DELIVERED = (DeliveryState.SENT, DeliveryState.COMMITTED)
NOT_DELIVERED = (DeliveryState.FAILED, DeliveryState.CANCELLED, DeliveryState.ORPHANED)
STATION_SCHEME = "99DXNODE"  # the coding scheme of the node's own station code (its AE title)
DEFAULT_WORKITEM_CODE = ("DXNODE-AI", STATION_SCHEME, "AI analysis")


@dataclass
class Standing:
    """How a claimed workitem's work stands: retrieved, queued, results delivered, or failed."""

    retrieved: bool = False
    instances: int = 0
    job_ids: list[int] = field(default_factory=list)
    delivered: bool = False
    destinations: list[str] = field(default_factory=list)
    failed: str = ""  # the reason, when it cannot complete


def standing(store: Store, row: UpsWorkitem) -> Standing:
    """Read the fetch requests, jobs and deliveries of a workitem."""
    out = Standing()
    with store.session() as s:
        requests = [request_out(s, int(i)) for i in row.request_ids]
        if not requests or any(r is None for r in requests):
            out.failed = "its fetch request is gone"
            return out
        for r in requests:
            assert r is not None
            if r.state == RequestState.FAILED:
                out.failed = (
                    f"fetch of {', '.join(r.studies) or r.identifiers.describe()} failed: {r.error or r.progress}"
                )
                return out
        out.retrieved = all(r.state in (RequestState.QUEUED, RequestState.DONE) for r in requests)  # type: ignore[union-attr]
        out.instances = sum(r.retrieved for r in requests if r is not None)
        out.job_ids = [j.id for r in requests if r is not None for j in r.jobs]
        if not out.retrieved or not all(r.state == RequestState.DONE for r in requests if r is not None):
            return out
        for job in s.scalars(select(Job).where(Job.id.in_(out.job_ids))):
            if job.state != JobState.DONE:
                out.failed = f"job {job.id} {job.state}: {job.error or 'no reason recorded'}"
                return out
        rows = s.execute(
            select(Delivery.destination, Delivery.state, Delivery.last_error, Output.sop_instance_uid)
            .join(Output, Output.id == Delivery.output_id)
            .where(Output.job_id.in_(out.job_ids))
        ).all()
    for dest, state, error, uid in rows:
        if state in NOT_DELIVERED:
            out.failed = f"result {uid} not delivered to {dest} ({state}): {error or 'no reason recorded'}"
            return out
    out.delivered = all(state in DELIVERED for _, state, _, _ in rows)
    out.destinations = sorted({dest for dest, *_ in rows})
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning[:64]
    return item


def _dt(value: dt.datetime) -> str:
    """A DT in UTC with its offset, so a Task Manager in another time zone reads it right (a naive value
    is the store's UTC, as SQLite gives it back)."""
    value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return value.strftime("%Y%m%d%H%M%S+0000")


def progress(transaction_uid: str, percent: int, description: str) -> Dataset:
    """The N-SET of a Procedure Step Progress (0..100) and its description."""
    info = Dataset()
    info.ProcedureStepProgress = percent
    info.ProcedureStepProgressDescription = description[:64]
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ProcedureStepProgressInformationSequence = DicomSequence([info])
    return _charset(ds)


def output_items(store: Store, settings: Settings, job_ids: list[int]) -> list[Dataset]:
    """Output Information Sequence items: one per (study, series) of the jobs' outputs, each naming its
    instances and where they were stored (Retrieve AE Title / Retrieve URL of the destinations); a
    series that reached no destination is left out (PS3.4 lets a performer not distribute outputs)."""
    by_series: dict[tuple[str, str], list[tuple[str, str]]] = {}
    where: dict[tuple[str, str], set[str]] = {}
    with store.session() as s:
        rows = s.execute(
            select(
                Output.id,
                Output.sop_class_uid,
                Output.sop_instance_uid,
                Output.series_instance_uid,
                Study.study_instance_uid,
            )
            .join(Study, Study.id == Output.study_id)
            .where(Output.job_id.in_(job_ids))
            .order_by(Output.id)
        ).all()
        sent = s.execute(
            select(Delivery.output_id, Delivery.destination).where(
                Delivery.output_id.in_([r[0] for r in rows]), Delivery.state.in_(DELIVERED)
            )
        ).all()
    sent_to: dict[int, set[str]] = {}
    for output_id, dest in sent:
        sent_to.setdefault(output_id, set()).add(dest)
    for output_id, sop_class, sop_uid, series_uid, study_uid in rows:
        key = (study_uid, series_uid)
        by_series.setdefault(key, []).append((sop_class, sop_uid))
        where.setdefault(key, set()).update(sent_to.get(output_id, set()))
    destinations = {d.name: d for d in settings.destinations}
    items = []
    for (study_uid, series_uid), instances in by_series.items():
        item = Dataset()
        item.TypeOfInstances = "DICOM"
        item.StudyInstanceUID, item.SeriesInstanceUID = study_uid, series_uid
        refs = []
        for sop_class, sop_uid in instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_uid
            refs.append(ref)
        item.ReferencedSOPSequence = DicomSequence(refs)
        held_by = [destinations[d] for d in sorted(where[(study_uid, series_uid)]) if d in destinations]
        if _access(item, study_uid, series_uid, held_by):  # outputs kept nowhere cannot be referenced
            items.append(item)
    return items


def _access(item: Dataset, study_uid: str, series_uid: str, held_by: list[Destination]) -> bool:
    """Where the outputs can be retrieved (Referenced Instances and Access Macro): a DICOM Retrieval
    Sequence item per DIMSE destination that holds them, a WADO-RS Retrieval Sequence item per DICOMweb
    one (the series' URL). False when none holds them: Retrieve AE Title and Retrieve URL are Type 1."""
    aets = sorted({d.ae_title for d in held_by if d.kind != "dicomweb" and d.ae_title})
    urls = sorted(
        {
            f"{d.url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"
            for d in held_by
            if d.kind == "dicomweb" and d.url
        }
    )
    if aets:
        item.DICOMRetrievalSequence = DicomSequence([_item(RetrieveAETitle=a) for a in aets])
    if urls:
        item.WADORSRetrievalSequence = DicomSequence([_item(RetrieveURL=u) for u in urls])
    return bool(aets or urls)


def _item(**values: str) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _performed(settings: Settings, row: UpsWorkitem, ended: dt.datetime) -> Dataset:
    performed = Dataset()
    performed.PerformedStationNameCodeSequence = DicomSequence(
        [_code(settings.node.ae_title, STATION_SCHEME, f"dxnode {settings.node.ae_title}")]
    )
    performed.PerformedProcedureStepStartDateTime = _dt(row.started_at or ended)
    performed.PerformedProcedureStepEndDateTime = _dt(ended)
    performed.PerformedWorkitemCodeSequence = DicomSequence([_code(*performed_code(row))])
    performed.OutputInformationSequence = DicomSequence()
    return performed


def performed_code(row: UpsWorkitem) -> tuple[str, str, str]:
    """The Performed Workitem Code: the scheduled one when it was a complete short code, else the node's own
    (a Long or URN Code Value, or a missing meaning, would be an empty Type 1 value here)."""
    code = [str(v or "").strip() for v in row.workitem_code or []]
    if len(code) == 3 and all(code) and len(code[0]) <= 16:
        return code[0], code[1], code[2]
    return DEFAULT_WORKITEM_CODE


def final(settings: Settings, row: UpsWorkitem, outputs: list[Dataset], ended: dt.datetime) -> Dataset:
    """The N-SET before Change State to COMPLETED: the performed procedure and its outputs."""
    performed = _performed(settings, row, ended)
    performed.OutputInformationSequence = DicomSequence(outputs)
    ds = Dataset()
    ds.TransactionUID = row.transaction_uid
    ds.UnifiedProcedureStepPerformedProcedureSequence = DicomSequence([performed])
    info = Dataset()
    info.ProcedureStepProgress = 100
    info.ProcedureStepProgressDescription = "completed"
    ds.ProcedureStepProgressInformationSequence = DicomSequence([info])
    return _charset(ds)


def canceled(settings: Settings, row: UpsWorkitem, reason: str, ended: dt.datetime) -> Dataset:
    """The N-SET before Change State to CANCELED: the reason, in words and as a code, and what was performed
    (its Output Information Sequence empty: nothing of a canceled workitem is offered as its result)."""
    info = Dataset()
    info.ProcedureStepProgress = row.progress
    info.ProcedureStepProgressDescription = "canceled"
    info.ProcedureStepCancellationDateTime = _dt(ended)
    info.ReasonForCancellation = reason[:1024]
    info.ProcedureStepDiscontinuationReasonCodeSequence = DicomSequence(
        [_code("110513", "DCM", "Discontinued for unspecified reasons")]
    )
    ds = Dataset()
    ds.TransactionUID = row.transaction_uid
    ds.ProcedureStepProgressInformationSequence = DicomSequence([info])
    ds.UnifiedProcedureStepPerformedProcedureSequence = DicomSequence([_performed(settings, row, ended)])
    return _charset(ds)


def _texts(ds: Dataset) -> list[str]:
    out: list[str] = []
    for elem in ds:
        if elem.VR == "SQ":
            out.extend(t for item in elem.value for t in _texts(item))
        elif isinstance(elem.value, str):
            out.append(elem.value)
    return out


def _charset(ds: Dataset) -> Dataset:
    """Specific Character Set ISO_IR 192 (UTF-8) when a text is not ASCII (Table CC.2.5-3: RC)."""
    if not all(t.isascii() for t in _texts(ds)):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
