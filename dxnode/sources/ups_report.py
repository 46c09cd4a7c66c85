"""What the UPS task performer reports to its Task Manager: the datasets of its N-SETs (progress, the
final Performed Procedure attributes with the Output Information Sequence), and how a workitem's
fetch requests, jobs and deliveries stand (read from the store).

PS3.4 Table CC.2.5-3 (final state requirements): COMPLETED needs the Unified Procedure Step Performed
Procedure Sequence with the Performed Station Name Code Sequence, Performed Procedure Step Start and
End DateTime, the Performed Workitem Code Sequence and the Output Information Sequence; CANCELED needs
the Procedure Step Progress Information Sequence with the Procedure Step Cancellation DateTime, the
Reason For Cancellation and the Procedure Step Discontinuation Reason Code Sequence.
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
    return value.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S")


def progress(transaction_uid: str, percent: int, description: str) -> Dataset:
    """The N-SET of a Procedure Step Progress (0..100) and its description."""
    info = Dataset()
    info.ProcedureStepProgress = percent
    info.ProcedureStepProgressDescription = description[:64]
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ProcedureStepProgressInformationSequence = DicomSequence([info])
    return ds


def output_items(store: Store, settings: Settings, job_ids: list[int]) -> list[Dataset]:
    """Output Information Sequence items: one per (study, series) of the jobs' outputs, each naming its
    instances and where they were stored (Retrieve AE Title / Retrieve URL of the destinations)."""
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
        _access(item, [destinations[d] for d in sorted(where[(study_uid, series_uid)]) if d in destinations])
        items.append(item)
    return items


def _access(item: Dataset, held_by: list[Destination]) -> None:
    """Where the outputs can be retrieved (Referenced Instances and Access Macro): the Retrieve AE Title
    of the DIMSE destinations that hold them, the Retrieve URL of the DICOMweb ones."""
    retrieval = Dataset()
    retrieval.RetrieveAETitle = [d.ae_title for d in held_by if d.kind != "dicomweb" and d.ae_title] or ""
    item.DICOMRetrievalSequence = DicomSequence([retrieval])
    urls = [d.url for d in held_by if d.kind == "dicomweb" and d.url]
    if urls:
        wado = Dataset()
        wado.RetrieveURL = urls[0]
        item.WADORSRetrievalSequence = DicomSequence([wado])


def _performed(settings: Settings, row: UpsWorkitem, ended: dt.datetime) -> Dataset:
    performed = Dataset()
    performed.PerformedStationNameCodeSequence = DicomSequence(
        [_code(settings.node.ae_title, STATION_SCHEME, f"dxnode {settings.node.ae_title}")]
    )
    performed.PerformedProcedureStepStartDateTime = _dt(row.started_at)
    performed.PerformedProcedureStepEndDateTime = _dt(ended)
    code = list(row.workitem_code) or ["DXNODE-AI", STATION_SCHEME, "AI analysis"]
    performed.PerformedWorkitemCodeSequence = DicomSequence([_code(*code)])
    performed.OutputInformationSequence = DicomSequence()
    return performed


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
    return ds


def canceled(settings: Settings, row: UpsWorkitem, reason: str, ended: dt.datetime) -> Dataset:
    """The N-SET before Change State to CANCELED: the reason, in words and as a code."""
    info = Dataset()
    info.ProcedureStepProgress = row.progress
    info.ProcedureStepCancellationDateTime = _dt(ended)
    info.ReasonForCancellation = reason[:1024]
    info.ProcedureStepDiscontinuationReasonCodeSequence = DicomSequence(
        [_code("110513", "DCM", "Discontinued for unspecified reasons")]
    )
    ds = Dataset()
    ds.TransactionUID = row.transaction_uid
    ds.ProcedureStepProgressInformationSequence = DicomSequence([info])
    ds.UnifiedProcedureStepPerformedProcedureSequence = DicomSequence([_performed(settings, row, ended)])
    return ds
