"""UPS Watch on the node's DICOM listener: queries, subscriptions and event reports for the node's jobs.

A RIS or PACS finds the node's workitems by C-FIND (UPS Watch or Pull), reads one by N-GET, and
subscribes by N-ACTION (Action Type 3; 4 unsubscribes, 5 suspends a global subscription), per
workitem or globally (the well-known UID 1.2.840.10008.5.1.4.34.5). PS3.4 leaves a subscriber's
address to configuration: only AEs listed in [[ups_watch.subscribers]] may subscribe (0xC308 for
any other), and their reports go to the host and port given there. Subscriptions are rows
(``ups_subscription``), so they outlive a restart; a Deletion Lock is recorded, never enforced
(the node deletes no job while it runs; retention may remove finished ones).

Every change of a job's Procedure Step State is recorded, in the transaction that changes the job
(``ups_view.record_change``, called by worklist.queue), as one ``ups_event`` row per subscriber; a
subscribe adds one with the current state. ``send_due`` (a scheduler job of serve) sends them in
order per subscriber as N-EVENT-REPORTs (UPS State Report, Event Type 1) at least once: a
subscriber that cannot be reached is tried again after a backoff, the others go on.

Nobody else changes the node's jobs: N-ACTION Change State and N-SET are refused (0xC300 for a
workitem that ended, 0xC301 for one in progress: the node holds its Transaction UID and never
gives it out, 0x0124 for a scheduled one), and so is N-CREATE (0x0124). Request Cancel (Action Type 2) from an AE listed in
[[ups_watch.subscribers]] cancels a job that has not started (it ends failed, the workitem
CANCELED with the reason given); once it runs the answer is 0xC313, "performer chooses not to
cancel" (the job ends within seconds), 0xC311 when completed, 0xB304 when already canceled, and
0x0124 for an AE not listed.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from pydicom import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event, EventHandlerType
from sqlalchemy import delete, select, true, update
from sqlalchemy.orm import Session

from dxnode.config import Settings, UpsSubscriber
from dxnode.states import DeliveryState, JobState
from dxnode.store import Job, Store, Study, UpsEvent, UpsSubscription, audit, utcnow
from dxnode.worklist.queue import cancel_queued, rowcount
from dxnode.worklist.ups_view import (
    CANCELED,
    COMPLETED,
    IN_PROGRESS,
    SCHEDULED,
    UPS_EVENT,
    UPS_PULL,
    UPS_PUSH,
    UPS_WATCH,
    find,
    load,
    only,
    owe_current,
    ups_state,
    workitem,
    workitem_uid,
)

log = logging.getLogger("dxnode.worklist.ups_events")

GLOBAL = "1.2.840.10008.5.1.4.34.5"  # UPS Global Subscription SOP Instance
FILTERED_GLOBAL = "1.2.840.10008.5.1.4.34.5.1"  # UPS Filtered Global Subscription SOP Instance
CHANGE_STATE, REQUEST_CANCEL, SUBSCRIBE, UNSUBSCRIBE, SUSPEND = 1, 2, 3, 4, 5
STATE_REPORT = 1  # Event Type ID of a UPS State Report
SUCCESS, NOT_AUTHORISED, NO_SUCH_ACTION, PROCESSING_FAILURE = 0x0000, 0x0124, 0x0123, 0x0110
ALREADY_CANCELED = 0xB304
NO_LONGER_UPDATED, WRONG_TRANSACTION, NO_SUCH_WORKITEM, UNKNOWN_AE = 0xC300, 0xC301, 0xC307, 0xC308
ALREADY_COMPLETED, WILL_NOT_CANCEL, NOT_FOR_INSTANCE = 0xC311, 0xC313, 0xC314
UNABLE_TO_PROCESS = 0xC000
BATCH = 100  # reports sent to one subscriber per association
KEEP_SENT = dt.timedelta(days=1)  # sent rows are kept this long (the last state told, for record_change)
LIVE = (JobState.QUEUED, JobState.RUNNING)


def status(code: int, comment: str = "") -> Dataset:
    """A status dataset with an Error Comment (at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


# --- N-ACTION: subscriptions ---------------------------------------------------------------------


def _subscribe(session: Session, uid: str, ae_title: str, info: Dataset | None) -> Dataset | int:
    lock = str(getattr(info, "DeletionLock", "") or "").strip().upper() == "TRUE"
    if uid == FILTERED_GLOBAL:
        return status(NOT_FOR_INSTANCE, "filtered global subscriptions are not supported")
    if uid == GLOBAL:  # every workitem not finished, and every new one (ups_view.record_change)
        mine = UpsSubscription.ae_title == ae_title
        session.execute(delete(UpsSubscription).where(mine, UpsSubscription.job_id.is_(None)))
        session.add(UpsSubscription(ae_title=ae_title, job_id=None, deletion_lock=lock))
        held = set(session.scalars(select(UpsSubscription.job_id).where(mine, UpsSubscription.job_id.is_not(None))))
        live = [j for j in session.scalars(select(Job).where(Job.state.in_(LIVE))) if j.id not in held]
        session.add_all(UpsSubscription(ae_title=ae_title, job_id=j.id, deletion_lock=lock) for j in live)
        owe_current(session, ae_title, live)
        return SUCCESS
    found = load(session, uid)
    if found is None:
        return status(NO_SUCH_WORKITEM, "no such workitem on this node")
    job = found[0]
    session.execute(
        delete(UpsSubscription).where(UpsSubscription.ae_title == ae_title, UpsSubscription.job_id == job.id)
    )
    session.add(UpsSubscription(ae_title=ae_title, job_id=job.id, deletion_lock=lock))
    owe_current(session, ae_title, [job])
    return SUCCESS


def _unsubscribe(session: Session, uid: str, ae_title: str, suspend: bool) -> Dataset | int:
    mine = UpsSubscription.ae_title == ae_title
    if uid == GLOBAL:  # suspend: no new workitems, those subscribed so far stay; unsubscribe: none at all
        only_global = UpsSubscription.job_id.is_(None) if suspend else true()
        session.execute(delete(UpsSubscription).where(mine, only_global))
        return SUCCESS
    if suspend:
        return status(NOT_FOR_INSTANCE, "suspend applies to the global subscription only")
    found = load(session, uid)
    if found is None:
        return status(NO_SUCH_WORKITEM, "no such workitem on this node")
    session.execute(delete(UpsSubscription).where(mine, UpsSubscription.job_id == found[0].id))
    return SUCCESS


def _cancel(session: Session, uid: str, calling: str, known: bool, info: Dataset | None) -> Dataset | int:
    """Request Cancel: a job not yet started is canceled; otherwise the status that says why not."""
    found = load(session, uid)
    if found is None:
        return status(NO_SUCH_WORKITEM, "no such workitem on this node")
    state = ups_state(found[0].state, found[0].attempts)
    if state == CANCELED:
        return status(ALREADY_CANCELED)
    if state == COMPLETED:
        return status(ALREADY_COMPLETED, "the workitem is already COMPLETED")
    if not known:
        return status(NOT_AUTHORISED, f"{calling} is not in [[ups_watch.subscribers]]")
    why = str(getattr(info, "ReasonForCancellation", "") or "").strip()
    reason = f"canceled at the request of {calling}" + (f": {why}" if why else "")
    if state == SCHEDULED and cancel_queued(session, found[0].id, calling, reason):
        log.info("job %d canceled at the request of %s", found[0].id, calling)
        return SUCCESS
    return status(WILL_NOT_CANCEL, "the job is running; it ends within seconds")


def _refuse_change(session: Session, uid: str) -> Dataset:
    """The answer to a state change or N-SET from outside (the node performs its own jobs)."""
    found = load(session, uid)
    if found is None:
        return status(NO_SUCH_WORKITEM, "no such workitem on this node")
    state = ups_state(found[0].state, found[0].attempts)
    if state in (COMPLETED, CANCELED):
        return status(NO_LONGER_UPDATED, f"the workitem is {state}")
    if state == IN_PROGRESS:
        return status(WRONG_TRANSACTION, "dxnode performs its own jobs")
    return status(NOT_AUTHORISED, "dxnode performs its own jobs")


def _requested(event: Event) -> str:
    """The Requested SOP Instance UID of an N-GET, N-SET or N-ACTION."""
    return str(getattr(event.request, "RequestedSOPInstanceUID", "") or "").strip()


class UpsWatch:
    """The UPS SOP classes the node's listener serves, and their handlers (scp.StorageSCP's services)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self.subscribers = {s.ae_title: s for s in settings.ups_watch.subscribers}

    def contexts(self) -> list[str]:
        """Abstract syntaxes to accept (pynetdicom's default transfer syntaxes)."""
        return [UPS_WATCH, UPS_PULL, UPS_PUSH]

    def handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_N_GET, self.on_get),
            (evt.EVT_N_ACTION, self.on_action),
            (evt.EVT_N_SET, self.on_set),
            (evt.EVT_N_CREATE, self.on_create),
        ]

    def on_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """C-FIND: the matching workitems, the keys asked for only (see ups_view.find)."""
        try:
            identifier = event.identifier
            with self.store.session() as session:
                answers = find(session, self.settings, identifier)
        except ValueError as exc:
            log.warning("UPS C-FIND from %s refused: %s", event.assoc.requestor.ae_title, exc)
            yield status(UNABLE_TO_PROCESS, str(exc)), None
            return
        except Exception as exc:  # a query must never take the listener down
            log.exception("UPS C-FIND failed: %s", exc)
            yield status(UNABLE_TO_PROCESS, "the node could not run the query"), None
            return
        for answer in answers:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, answer

    def on_get(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        """N-GET: the workitem's attributes (those asked for, or all); 0xC307 for an unknown UID."""
        uid = _requested(event)
        asked = getattr(event.request, "AttributeIdentifierList", None) or []
        wanted = [Tag(t) for t in ([asked] if isinstance(asked, int) else asked)]  # one tag comes alone, not listed
        with self.store.session() as session:
            found = load(session, uid)
            if found is None:
                return status(NO_SUCH_WORKITEM, "no such workitem on this node"), None
            ds = workitem(session, self.settings, *found, wanted=wanted or None)
        return SUCCESS, only(ds, wanted) if wanted else ds

    def on_action(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        """N-ACTION: subscribe, unsubscribe, suspend; a state change or cancel request is refused."""
        uid = _requested(event)
        action = int(event.action_type or 0)
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            info = event.action_information if action != CHANGE_STATE else None
            with self.store.session() as session:
                answer = self._act(session, uid, action, calling, info)
        except Exception as exc:  # never let one request take the listener down
            log.exception("UPS N-ACTION %d from %s failed: %s", action, calling, exc)
            return status(PROCESSING_FAILURE, "the node could not record it"), None
        return answer, None

    def _act(self, session: Session, uid: str, action: int, calling: str, info: Dataset | None) -> Dataset | int:
        if action == CHANGE_STATE:
            return _refuse_change(session, uid)
        if action == REQUEST_CANCEL:
            return _cancel(session, uid, calling, calling in self.subscribers, info)
        if action not in (SUBSCRIBE, UNSUBSCRIBE, SUSPEND):
            return status(NO_SUCH_ACTION, f"action type {action} is not a UPS action")
        receiving = str(getattr(info, "ReceivingAE", "") or calling).strip()
        if receiving not in self.subscribers:
            log.warning("UPS subscription for %r from %s refused: not in [[ups_watch.subscribers]]", receiving, calling)
            return status(UNKNOWN_AE, f"{receiving} is not in [[ups_watch.subscribers]]")
        answer = _subscribe(session, uid, receiving, info) if action == SUBSCRIBE else None
        if answer is None:
            answer = _unsubscribe(session, uid, receiving, suspend=action == SUSPEND)
        verb = {SUBSCRIBE: "subscribe", UNSUBSCRIBE: "unsubscribe", SUSPEND: "suspend"}[action]
        if answer == SUCCESS:
            audit(session, calling, f"ups.{verb}", target=uid, receiving_ae=receiving)
            log.info("UPS %s: %s for %s", verb, uid, receiving)
        return answer

    def on_create(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        """N-CREATE (UPS Push): refused, the node's workitems are its jobs."""
        log.warning("UPS N-CREATE from %s refused", event.assoc.requestor.ae_title)
        return status(NOT_AUTHORISED, "dxnode makes workitems of its own jobs only"), None

    def on_set(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        """N-SET: refused, the node performs its own jobs."""
        with self.store.session() as session:
            return _refuse_change(session, _requested(event)), None


# --- sending the reports -------------------------------------------------------------------------


def _backoff(settings: Settings, attempts: int) -> dt.timedelta:
    w = settings.ups_watch
    return dt.timedelta(seconds=min(w.backoff_max_seconds, w.backoff_initial_seconds * 2 ** max(0, attempts - 1)))


def _failed(store: Store, settings: Settings, event_id: int, attempts: int, error: str) -> None:
    """Back off the first report owed to a subscriber (the later ones wait behind it, in order)."""
    with store.session() as session:
        session.execute(
            update(UpsEvent)
            .where(UpsEvent.id == event_id)
            .values(
                attempts=attempts + 1,
                last_error=error[:500],
                next_attempt_at=utcnow() + _backoff(settings, attempts + 1),
            )
        )


def _report(row: Any) -> Dataset:
    """Event Information of a UPS State Report."""
    info = Dataset()
    info.ProcedureStepState = row.ups_state
    info.InputReadinessState = "READY"
    if row.ups_state == CANCELED:
        info.ReasonForCancellation = row.reason or "the job did not complete"
    return info


def _lease(store: Store, settings: Settings, rows: Sequence[Any], now: dt.datetime) -> bool:
    """Take the batch for this process: move its rows' next attempt past the send, on condition that the
    head row's is still what was read. Two serve nodes on one database then never send a subscriber the
    same report (the loser's conditional UPDATE matches nothing); a crashed sender's lease runs out."""
    until = now + dt.timedelta(seconds=2 * settings.ups_watch.timeout_seconds + 30)
    with store.session() as session:
        won = session.execute(
            update(UpsEvent)
            .where(
                UpsEvent.id == rows[0].id,
                UpsEvent.state == DeliveryState.PENDING,
                UpsEvent.next_attempt_at == rows[0].next_attempt_at,
            )
            .values(next_attempt_at=until)
            .execution_options(synchronize_session=False)
        )
        if rowcount(won) != 1:
            return False  # another sender holds it; the UPDATE changed nothing
        session.execute(
            update(UpsEvent)
            .where(UpsEvent.id.in_([row.id for row in rows[1:]]), UpsEvent.state == DeliveryState.PENDING)
            .values(next_attempt_at=until)
            .execution_options(synchronize_session=False)
        )
    return True


def _send_to(store: Store, settings: Settings, sub: UpsSubscriber, now: dt.datetime) -> int:
    """Send the reports owed to one subscriber, in order, on one association; return how many went."""
    with store.session() as session:
        rows = session.execute(
            select(UpsEvent.id, UpsEvent.ups_state, UpsEvent.reason, UpsEvent.attempts, UpsEvent.next_attempt_at)
            .add_columns(Job.id.label("job"), Job.created_at, Study.study_instance_uid)
            .join(Job, Job.id == UpsEvent.job_id)
            .join(Study, Study.id == Job.study_id)
            .where(UpsEvent.state == DeliveryState.PENDING, UpsEvent.ae_title == sub.ae_title)
            .order_by(UpsEvent.id)
            .limit(BATCH)
        ).all()
    if not rows or rows[0].next_attempt_at > now or not _lease(store, settings, rows, now):
        return 0
    w = settings.ups_watch
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(UPS_EVENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = w.timeout_seconds
    assoc = ae.associate(sub.host, sub.port, ae_title=sub.ae_title)
    if not assoc.is_established:
        _failed(store, settings, rows[0].id, rows[0].attempts, f"cannot associate with {sub.host}:{sub.port}")
        log.warning("UPS events for %s: cannot associate with %s:%d; retried", sub.ae_title, sub.host, sub.port)
        return 0
    sent = 0
    try:
        for row in rows:
            uid = workitem_uid(row.study_instance_uid, row.job, row.created_at)
            rsp, _ = assoc.send_n_event_report(_report(row), STATE_REPORT, UPS_PUSH, uid, meta_uid=UPS_EVENT)
            code = getattr(rsp, "Status", None)
            if code is None or code & 0xF000 in (0xA000, 0xC000) or code in (0x0110, 0x0112, 0x0113, 0x0122):
                shown = "no answer" if code is None else f"status 0x{code:04X}"
                _failed(store, settings, row.id, row.attempts, f"N-EVENT-REPORT: {shown}")
                log.warning("UPS event for %s: %s; retried", sub.ae_title, shown)
                break
            with store.session() as session:
                session.execute(
                    update(UpsEvent).where(UpsEvent.id == row.id).values(state=DeliveryState.SENT, sent_at=utcnow())
                )
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


def _drop_unlisted(session: Session, listed: set[str]) -> set[str]:
    """Drop the subscriptions and pending reports of AEs not listed; return the AEs still owed reports."""
    owed = set(session.scalars(select(UpsEvent.ae_title).where(UpsEvent.state == DeliveryState.PENDING)))
    subscribed = set(session.scalars(select(UpsSubscription.ae_title)))
    gone = sorted((owed | subscribed) - listed)
    if gone:
        why = "no longer in [[ups_watch.subscribers]]" if listed else "[ups_watch] is off"
        session.execute(
            update(UpsEvent)
            .where(UpsEvent.state == DeliveryState.PENDING, UpsEvent.ae_title.in_(gone))
            .values(state=DeliveryState.FAILED, last_error=why)
        )
        session.execute(delete(UpsSubscription).where(UpsSubscription.ae_title.in_(gone)))
        log.warning("UPS subscriptions of %s dropped: %s", ", ".join(gone), why)
    return owed & listed


def send_due(store: Store, settings: Settings) -> int:
    """Send every subscriber the reports it is owed (each in its own order); return how many went.

    Subscriptions and reports of an AE no longer in [[ups_watch.subscribers]] (of every AE while
    [ups_watch] is off) are dropped: the reports are marked failed."""
    now = utcnow()
    subscribers = {s.ae_title: s for s in settings.ups_watch.subscribers} if settings.ups_watch.enabled else {}
    with store.session() as session:
        owed = _drop_unlisted(session, set(subscribers))
        session.execute(
            delete(UpsEvent).where(UpsEvent.state != DeliveryState.PENDING, UpsEvent.created_at < now - KEEP_SENT)
        )
    sent = 0
    for ae_title in sorted(owed):
        try:
            sent += _send_to(store, settings, subscribers[ae_title], now)
        except Exception as exc:  # one subscriber's trouble never stops the others
            log.exception("UPS events for %s: %s", ae_title, exc)
    return sent


def schedule(scheduler: Any, store: Store, settings: Settings) -> None:
    """Add the event report sender to serve's scheduler; with [ups_watch] off, drop what an earlier run left
    (no report would ever be sent, and every job change would keep adding some)."""
    if not settings.ups_watch.enabled:
        send_due(store, settings)
        return
    scheduler.add_job(
        send_due, "interval", args=[store, settings], seconds=settings.ups_watch.interval_seconds, id="ups-events"
    )
