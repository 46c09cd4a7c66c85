"""The IHE AIW-I task performer: SCHEDULED workitems of a [[ups]] Task Manager's UPS service, claimed,
fetched, analysed and reported back (RAD-80 to RAD-88's performer side).

One scheduler job per [[ups]] entry (``ups:NAME``) polls its Task Manager every ``poll_seconds``, or
at once when an event of it came (UPS State Report of a new workitem, Cancel Requested). A round:
- subscribes once (N-ACTION Subscribe on the global subscription instance, over UPS Watch, without
  Deletion Lock; why global: dxnode.sources.ups_scu.subscribe), when ``subscribe``; events come to
  the node's DICOM listener (``event_handler``);
- C-FINDs SCHEDULED workitems over UPS Pull and keeps those whose Scheduled Workitem Code and
  Scheduled Station Name codes match ``workitem_codes`` and ``station_names`` (an empty list: any);
- claims each new one: a Transaction UID is generated and stored (``ups_workitem``) before the
  N-ACTION Change State to IN PROGRESS is sent over UPS Pull. A refusal (0xC301 wrong Transaction
  UID, 0xC302 already IN PROGRESS, 0xC307 no such workitem, ...) is recorded (``refused``) and the
  workitem skipped for good. PS3.4 has no status for "IN PROGRESS with your Transaction UID" (a claim
  sent again after a stop gets 0xC302, as from dcm4chee-arc), so on 0xC302 an N-SET with the stored
  Transaction UID asks whether it is ours: accepted, the claim went through before;
- for each claimed workitem: an N-GET of its state (CANCELED, COMPLETED or gone at the Task Manager:
  ``gone``, nothing more sent), a pending cancel request (put to CANCELED), fetch requests for the
  Input Information Sequence's studies (dxnode.sources.fetch.request_fetch, from the source whose AE
  title the item's Retrieve AE Title names, else the entry's ``source``), the workitem's Scheduled
  Procedure Step Priority as theirs (HIGH, MEDIUM, LOW: UPS has no STAT), Procedure Step Progress by
  N-SET at 30 % (inputs retrieved), 50 % (job queued), 90 % (results delivered), then the Output
  Information Sequence and Performed Procedure attributes by N-SET and Change State to COMPLETED; a
  failed fetch, job or delivery puts it to CANCELED with the reason.
A Task Manager that cannot be reached is logged and tried again after a backoff (poll_seconds doubled
per failed round, up to retry_backoff_max_seconds); it holds up only its own scheduler job.
Cancelled or gone: the fetch requests not yet started are failed; a job already queued still runs and
delivers as configured, but nothing is reported to the Task Manager as completed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time from a table
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPush,
)
from sqlalchemy import select, update

from dxnode import metrics
from dxnode.config import Settings, UpsEntry
from dxnode.schemas import Identifiers
from dxnode.sources import ups_report
from dxnode.sources.fetch import request_fetch
from dxnode.sources.ups_scu import (
    ALREADY_IN_PROGRESS,
    NO_SUCH_INSTANCE,
    UpsDown,
    accepted,
    change_state,
    describe,
    find_scheduled,
    n_get,
    n_set,
    pull,
    state_of,
    subscribe,
)
from dxnode.states import Priority, RequestState, UpsState
from dxnode.store import FetchRequest, Store, UpsWorkitem, audit, utcnow

log = logging.getLogger("dxnode.sources.ups")
Handler = Callable[[Any], tuple[int, Dataset | None]]

ACTIVE = (UpsState.CLAIMING, UpsState.IN_PROGRESS)
CANCEL_REQUESTED, STATE_REPORT = 2, 1  # UPS Event Type IDs (PS3.4 CC.2.4.2)
TICK_SECONDS = 1.0  # how often each [[ups]] job looks whether its poll is due or an event woke it
STAGES = ((30, "inputs retrieved"), (50, "analysis queued"), (90, "results delivered"))


@dataclass
class _Manager:
    """What a running node keeps of a Task Manager between rounds (not durable: a restart subscribes anew)."""

    next_round: float = 0.0
    failures: int = 0
    subscribed: bool = False
    wake: threading.Event = field(default_factory=threading.Event)


_managers: dict[str, _Manager] = {}
_lock = threading.Lock()


def _manager(name: str) -> _Manager:
    with _lock:
        return _managers.setdefault(name, _Manager())


def priority_of(value: str) -> Priority:
    """A Scheduled Procedure Step Priority as a job priority: HIGH, MEDIUM or LOW (UPS has no STAT); else MEDIUM."""
    return {"HIGH": Priority.HIGH, "LOW": Priority.LOW}.get(str(value or "").strip().upper(), Priority.MEDIUM)


def _codes(ds: Dataset, keyword: str) -> list[str]:
    return [str(item.get("CodeValue", "")) for item in ds.get(keyword, None) or []]


def matches(entry: UpsEntry, ds: Dataset) -> bool:
    """The workitem is SCHEDULED and its codes are among the entry's match rules (an empty rule matches any)."""
    if str(ds.get("ProcedureStepState", "")) != "SCHEDULED":
        return False
    work, stations = _codes(ds, "ScheduledWorkitemCodeSequence"), _codes(ds, "ScheduledStationNameCodeSequence")
    return (not entry.workitem_codes or any(c in entry.workitem_codes for c in work)) and (
        not entry.station_names or any(c in entry.station_names for c in stations)
    )


def inputs_of(settings: Settings, entry: UpsEntry, ds: Dataset) -> list[list[str]]:
    """[[study UID, [[sources]] name], ...] of the Input Information Sequence, each study once."""
    by_ae = {s.ae_title: s.name for s in settings.sources if s.ae_title}
    seen: dict[str, str] = {}
    for item in ds.get("InputInformationSequence", None) or []:
        study = str(item.get("StudyInstanceUID", "") or "")
        if not study or study in seen:
            continue
        retrieval = (item.get("DICOMRetrievalSequence", None) or [Dataset()])[0]
        aets = retrieval.get("RetrieveAETitle", None) or item.get("RetrieveAETitle", None) or []
        aets = [aets] if isinstance(aets, str) else list(aets)
        seen[study] = next((by_ae[a] for a in map(str, aets) if a in by_ae), entry.source)
    return [[study, source] for study, source in seen.items()]


def _set(store: Store, row_id: int, **values: Any) -> None:
    with store.session() as s:
        s.execute(update(UpsWorkitem).where(UpsWorkitem.id == row_id).values(updated_at=utcnow(), **values))


def _end(store: Store, row: UpsWorkitem, state: UpsState, detail: str, status: int | None = None) -> None:
    """Record a workitem's end; fail its fetch requests that have not started."""
    with store.session() as s:
        s.execute(
            update(UpsWorkitem)
            .where(UpsWorkitem.id == row.id)
            .values(state=state, detail=detail[:2000], status=status, updated_at=utcnow())
        )
        if state != UpsState.COMPLETED and row.request_ids:
            s.execute(
                update(FetchRequest)
                .where(FetchRequest.id.in_(row.request_ids), FetchRequest.state == RequestState.PENDING)
                .values(state=RequestState.FAILED, error=f"cancelled: UPS workitem {row.workitem_uid} {state}")
            )
        audit(s, "system", f"ups.{state}", target=f"ups:{row.ups}:{row.workitem_uid}", detail=detail[:500])
    metrics.UPS_WORKITEMS.labels(ups=row.ups, outcome=str(state)).inc()
    say = log.info if state == UpsState.COMPLETED else log.warning
    say("ups %s: workitem %s %s: %s", row.ups, row.workitem_uid, state, detail)


def _claim(store: Store, settings: Settings, entry: UpsEntry, assoc: Association, ds: Dataset) -> None:
    """Record a new workitem with a fresh Transaction UID, then ask for IN PROGRESS."""
    uid = str(ds.SOPInstanceUID)
    if not ds.get("InputInformationSequence", None):  # some Task Managers leave sequences out of C-FIND answers
        status, got = n_get(assoc, entry, uid, ["InputInformationSequence", "ProcedureStepState"])
        if status == 0 and "InputInformationSequence" in got:
            ds.InputInformationSequence = got.InputInformationSequence
    inputs = inputs_of(settings, entry, ds)
    code = next(iter(ds.get("ScheduledWorkitemCodeSequence", None) or []), None)
    with store.session() as s:
        if s.scalar(select(UpsWorkitem.id).where(UpsWorkitem.ups == entry.name, UpsWorkitem.workitem_uid == uid)):
            return
        row = UpsWorkitem(
            ups=entry.name,
            workitem_uid=uid,
            transaction_uid=generate_uid(),
            state=UpsState.CLAIMING,
            priority=priority_of(ds.get("ScheduledProcedureStepPriority", "")),
            label=str(ds.get("ProcedureStepLabel", "") or "")[:128],
            inputs=inputs,
            workitem_code=[str(code.get(k, "")) for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")]
            if code is not None
            else [],
            request_ids=[],
            progress=0,
            cancel_requested=False,
            detail="",
        )
        s.add(row)
        s.flush()
        s.expunge(row)
    if not inputs:
        _end(store, row, UpsState.REFUSED, "not claimed: its Input Information Sequence names no study")
        return
    _send_claim(store, entry, assoc, row)


def _send_claim(store: Store, entry: UpsEntry, assoc: Association, row: UpsWorkitem) -> bool:
    """N-ACTION to IN PROGRESS with the stored Transaction UID; True when the workitem is ours."""
    status = change_state(assoc, entry, row.workitem_uid, "IN PROGRESS", row.transaction_uid)
    if status == ALREADY_IN_PROGRESS and _ours(entry, assoc, row):
        status = 0x0000
    if status != 0x0000:
        _end(store, row, UpsState.REFUSED, f"claim refused: {describe(status)}", status)
        return False
    with store.session() as s:
        s.execute(
            update(UpsWorkitem)
            .where(UpsWorkitem.id == row.id)
            .values(state=UpsState.IN_PROGRESS, started_at=utcnow(), updated_at=utcnow())
        )
        audit(s, "system", "ups.claimed", target=f"ups:{row.ups}:{row.workitem_uid}", transaction=row.transaction_uid)
    row.state = UpsState.IN_PROGRESS
    metrics.UPS_WORKITEMS.labels(ups=row.ups, outcome="claimed").inc()
    log.info(
        "ups %s: workitem %s claimed (transaction %s, %s), %d input study(ies)",
        row.ups,
        row.workitem_uid,
        row.transaction_uid,
        row.priority,
        len(row.inputs),
    )
    return True


def _ours(entry: UpsEntry, assoc: Association, row: UpsWorkitem) -> bool:
    """Whether an IN PROGRESS workitem holds our Transaction UID: only then does the Task Manager accept an
    N-SET with it (PS3.4 CC.2.6.3; N-GET may not return the Transaction UID)."""
    probe = ups_report.progress(row.transaction_uid, row.progress, "claimed")
    return accepted(n_set(assoc, entry, row.workitem_uid, probe))


def _cancel(
    store: Store, settings: Settings, entry: UpsEntry, assoc: Association, row: UpsWorkitem, reason: str
) -> None:
    """Report the reason by N-SET, then Change State to CANCELED."""
    status = n_set(assoc, entry, row.workitem_uid, ups_report.canceled(settings, row, reason, utcnow()))
    if accepted(status):
        status = change_state(assoc, entry, row.workitem_uid, "CANCELED", row.transaction_uid)
    detail = reason if accepted(status) else f"{reason}; the Task Manager answered {describe(status)}"
    _end(store, row, UpsState.CANCELED, detail, status or None)


def _request_inputs(store: Store, settings: Settings, row: UpsWorkitem) -> None:
    ids = [
        request_fetch(
            store,
            settings,
            source,
            Identifiers(study_instance_uid=study),
            row.priority,
            actor=f"ups:{row.ups}",
        )
        for study, source in row.inputs
    ]
    _set(store, row.id, request_ids=ids)
    row.request_ids = ids


def _report(store: Store, settings: Settings, entry: UpsEntry, assoc: Association, row: UpsWorkitem) -> None:
    """Progress by N-SET as the work goes on; COMPLETED once the results are delivered."""
    now = ups_report.standing(store, row)
    if now.failed:
        _cancel(store, settings, entry, assoc, row, now.failed)
        return
    reached = [now.retrieved, bool(now.job_ids) and now.retrieved, now.delivered]
    words = [
        f"{now.instances} instance(s) retrieved",
        f"job(s) {', '.join(map(str, now.job_ids))} queued",
        f"results delivered to {', '.join(now.destinations) or 'no destination'}",
    ]
    for (percent, what), done, said in zip(STAGES, reached, words, strict=True):
        if done and row.progress < percent:
            status = n_set(assoc, entry, row.workitem_uid, ups_report.progress(row.transaction_uid, percent, said))
            if not accepted(status):
                log.warning("ups %s: progress of %s refused: %s", row.ups, row.workitem_uid, describe(status))
            _set(store, row.id, progress=percent, status=status or None)
            row.progress = percent
            log.info("ups %s: workitem %s %d %% (%s): %s", row.ups, row.workitem_uid, percent, what, said)
    if not now.delivered:
        return
    outputs = ups_report.output_items(store, settings, now.job_ids)
    status = n_set(assoc, entry, row.workitem_uid, ups_report.final(settings, row, outputs, utcnow()))
    if accepted(status):
        status = change_state(assoc, entry, row.workitem_uid, "COMPLETED", row.transaction_uid)
    if accepted(status):
        _end(store, row, UpsState.COMPLETED, f"completed with {len(outputs)} output series")
    else:
        _cancel(store, settings, entry, assoc, row, f"the Task Manager refused the completion: {describe(status)}")


def _advance(store: Store, settings: Settings, entry: UpsEntry, assoc: Association, row: UpsWorkitem) -> None:
    """One step of a claimed workitem."""
    if row.state == UpsState.CLAIMING and not _send_claim(store, entry, assoc, row):
        return
    status, state = state_of(assoc, entry, row.workitem_uid)
    if status == NO_SUCH_INSTANCE or status >= 0xA000:
        _end(store, row, UpsState.GONE, f"no longer at the Task Manager: N-GET {describe(status)}", status)
        return
    if state in ("CANCELED", "COMPLETED"):
        _end(store, row, UpsState.GONE, f"ended as {state} at the Task Manager; nothing reported")
        return
    if row.cancel_requested:
        _cancel(store, settings, entry, assoc, row, row.detail or "cancel requested by the Task Manager")
        return
    if not row.request_ids:
        try:
            _request_inputs(store, settings, row)
        except ValueError as exc:  # its source left the configuration since the claim
            _cancel(store, settings, entry, assoc, row, f"cannot fetch its inputs: {exc}")
            return
    _report(store, settings, entry, assoc, row)


def poll(store: Store, settings: Settings, entry: UpsEntry) -> None:
    """One round with a Task Manager (UpsDown when it cannot be reached)."""
    manager = _manager(entry.name)
    if entry.subscribe and not manager.subscribed:
        status = subscribe(settings, entry)
        manager.subscribed = accepted(status)  # 0xB301 (Deletion Lock not granted) is a warning
        say = log.info if manager.subscribed else log.warning
        say("ups %s: subscribe to its events: %s", entry.name, "done" if status == 0 else describe(status))
    with pull(settings, entry) as assoc:
        for ds in find_scheduled(assoc, entry):
            if "SOPInstanceUID" in ds and matches(entry, ds):
                _claim(store, settings, entry, assoc, ds)
        with store.session() as s:
            rows = s.scalars(
                select(UpsWorkitem)
                .where(UpsWorkitem.ups == entry.name, UpsWorkitem.state.in_(ACTIVE))
                .order_by(UpsWorkitem.id)
            ).all()
            s.expunge_all()
        for row in rows:
            _advance(store, settings, entry, assoc, row)


def tick(store: Store, settings: Settings, name: str) -> None:
    """The scheduler job of one [[ups]] entry: a round when due or woken by an event; backoff when down."""
    entry = next((u for u in settings.ups if u.name == name), None)
    manager = _manager(name)
    if entry is None or (time.monotonic() < manager.next_round and not manager.wake.is_set()):
        return
    manager.wake.clear()
    try:
        poll(store, settings, entry)
    except UpsDown as exc:
        manager.failures += 1
        manager.subscribed = False  # a Task Manager that restarted may have lost its subscriptions
        delay = min(entry.retry_backoff_max_seconds, entry.poll_seconds * 2 ** (manager.failures - 1))
        metrics.UPS_UNREACHABLE.labels(ups=name).inc()
        log.warning("ups %s: %s; next try in %g s", name, exc, delay)
        manager.next_round = time.monotonic() + delay
        return
    except Exception:  # a bug must not stop the performer: logged, and the next round comes
        log.exception("ups %s: round failed", name)
    manager.failures = 0
    manager.next_round = time.monotonic() + entry.poll_seconds


def cancel_reason(info: Dataset) -> str:
    """The reason a UPS Cancel Requested event gives: who asked (Requesting AE) and why, when they said."""
    by = str(info.get("RequestingAE", "") or "").strip() or "the Task Manager"
    why = str(info.get("ReasonForCancellation", "") or "").strip()
    return f"cancel requested by {by}" + (f": {why}" if why else "")


def event_handler(store: Store) -> Handler:
    """The EVT_N_EVENT_REPORT handler for UPS Event reports on the node's DICOM listener.

    Cancel Requested marks the workitem and keeps who asked and why (the next round puts it to CANCELED
    with that reason: PS3.4 CC.2.2.3 leaves using it to the performer); any report wakes the
    performers, so a new SCHEDULED workitem is claimed without waiting for the poll."""

    def on_event(event: Any) -> tuple[int, Dataset | None]:
        uid = str(event.request.AffectedSOPInstanceUID)
        kind = int(event.event_type)
        info = event.event_information
        state = str(getattr(info, "ProcedureStepState", "") or "") if info is not None else ""
        if kind == CANCEL_REQUESTED or (kind == STATE_REPORT and state == "CANCELED"):
            said = {"detail": cancel_reason(info)[:2000]} if kind == CANCEL_REQUESTED and info is not None else {}
            with store.session() as s:
                s.execute(
                    update(UpsWorkitem)
                    .where(UpsWorkitem.workitem_uid == uid, UpsWorkitem.state.in_(ACTIVE))
                    .values(cancel_requested=True, **said)
                )
            log.warning("ups: cancel requested for workitem %s (event %d)", uid, kind)
        with _lock:
            for manager in _managers.values():
                manager.wake.set()
        return 0x0000, None

    return on_event


def listen_for_events(ae: Any, store: Store, other: Handler) -> Handler:
    """Make the node's listener take UPS Event reports: the UPS Event context on its AE (the Task
    Manager proposes the SCP role for itself), and an EVT_N_EVENT_REPORT handler that sends UPS
    events to event_handler and the rest (Storage Commitment reports) to other."""
    ae.add_supported_context(UnifiedProcedureStepEvent, scu_role=True, scp_role=True)
    ups = event_handler(store)
    ups_classes = {UnifiedProcedureStepEvent, UnifiedProcedureStepPush}

    def on_report(event: Any) -> tuple[int, Dataset | None]:
        if str(event.request.AffectedSOPClassUID) in ups_classes:
            return ups(event)
        return other(event)

    return on_report


def schedule(scheduler: Any, store: Store, settings: Settings) -> None:
    """One performer per [[ups]] entry, each its own scheduler job: a Task Manager that is down delays only itself."""
    for entry in settings.ups:
        _manager(entry.name)
        scheduler.add_job(
            tick,
            "interval",
            args=[store, settings, entry.name],
            seconds=min(TICK_SECONDS, entry.poll_seconds),
            id=f"ups:{entry.name}",
            max_instances=1,
            coalesce=True,
        )
