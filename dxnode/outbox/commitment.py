"""Storage Commitment (Push Model) for destinations with ``commitment = true``: delivered means kept.

After the outbox has stored a destination's outputs (rows ``sent``), request_due sends one N-ACTION
(Storage Commitment Push Model SOP Class, action type 1) with a new Transaction UID and the
Referenced SOP Sequence of up to BATCH sent rows; the UID is recorded on the rows first. The
destination answers with an N-EVENT-REPORT, either on the same association (waited for at most
SAME_ASSOCIATION_WAIT seconds) or on a later one it opens to the node's DICOM listener (scp.py
accepts it with SCP/SCU role selection). on_report then:

- marks each referenced row of that transaction ``committed``;
- makes each row of the Failed SOP Sequence ``pending`` again, with the failure reason as its
  error: the outbox sends it again, and it is asked to be committed again once sent.

A transaction with no report within the destination's ``commitment_timeout`` is an alert (log
error, ``dxnode_commitment_timeouts_total``, audit ``delivery.commitment_timeout``) and its rows
are asked again under a new Transaction UID. An N-ACTION that cannot be sent (destination down,
context refused, failure status) is logged and tried again after
``min(commitment_timeout, [dispatch] backoff_max_seconds)``. A report for a Transaction UID no
longer awaited (it timed out and was asked again) is acknowledged and logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from sqlalchemy import select, update

from dxnode import metrics
from dxnode.config import Destination, Settings
from dxnode.receive import reactor
from dxnode.states import DeliveryState
from dxnode.store import Delivery, Output, Store, audit, utcnow

log = logging.getLogger("dxnode.outbox.commitment")

PUSH_MODEL = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
BATCH = 500  # references per N-ACTION
SAME_ASSOCIATION_WAIT = 3.0  # seconds to keep the association open for a report on it
SUCCESS, PROCESSING_FAILURE, NO_SUCH_EVENT_TYPE = 0x0000, 0x0110, 0x0113

# Requests of this process waiting for their report, by Transaction UID: set when it arrives on any association.
_awaited: dict[str, threading.Event] = {}

# dispatch._associate: an association with a destination proposing the given SOP classes, or the error.
Associate = Callable[[Settings, Destination, dict[str, set[str]]], tuple[Association | None, str]]


@dataclass(frozen=True)
class Report:
    """What one N-EVENT-REPORT says: the transaction, the committed and the failed SOP Instance UIDs."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, int], ...]  # (SOP Instance UID, Failure Reason)


def request_due(store: Store, settings: Settings, associate: Associate) -> int:
    """Ask every commitment destination to commit its sent rows not yet asked (timed-out ones again);
    return how many rows were asked."""
    asked = 0
    for dest in settings.destinations:
        if dest.commitment and dest.kind == "dimse":
            _expire(store, dest, utcnow())
            asked += _request(store, settings, dest, associate)
    return asked


def _expire(store: Store, dest: Destination, now: dt.datetime) -> None:
    """Alert on the destination's transactions with no report within commitment_timeout; free their rows to be asked again."""
    cutoff = now - dt.timedelta(seconds=dest.commitment_timeout)
    with store.session() as s:
        rows = s.scalars(
            select(Delivery).where(
                Delivery.state == DeliveryState.SENT,
                Delivery.destination == dest.name,
                Delivery.commitment_uid != "",
                Delivery.commitment_requested_at < cutoff,
            )
        ).all()
        by_uid: dict[str, list[int]] = {}
        for row in rows:
            by_uid.setdefault(row.commitment_uid, []).append(row.id)
            row.commitment_uid, row.commitment_requested_at = "", None
        for uid, ids in by_uid.items():
            metrics.COMMITMENT_TIMEOUTS.labels(destination=dest.name).inc()
            audit(
                s, "system", "delivery.commitment_timeout", target=f"commitment:{uid}", destination=dest.name, ids=ids
            )
            log.error(
                "storage commitment %s: no report from %s within %g s for %d object(s); asking again",
                uid,
                dest.name,
                dest.commitment_timeout,
                len(ids),
            )


def _claim(store: Store, settings: Settings, dest: Destination) -> tuple[str, list[tuple[str, str]]]:
    """Record a new Transaction UID on the destination's sent rows not yet asked (at most BATCH);
    return it and the (SOP Class UID, SOP Instance UID) of the rows it now covers."""
    now = utcnow()
    retry_after = dt.timedelta(seconds=min(dest.commitment_timeout, settings.dispatch.backoff_max_seconds))
    uid = generate_uid()
    with store.session() as s:
        ids = s.scalars(
            select(Delivery.id)
            .where(
                Delivery.state == DeliveryState.SENT,
                Delivery.destination == dest.name,
                Delivery.commitment_uid == "",
                (Delivery.commitment_requested_at.is_(None)) | (Delivery.commitment_requested_at <= now - retry_after),
            )
            .order_by(Delivery.id)
            .limit(BATCH)
        ).all()
        if not ids:
            return uid, []
        # Conditional: another node asking at the same time keeps the rows it marked first.
        s.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.commitment_uid == "")
            .values(commitment_uid=uid, commitment_requested_at=now)
        )
    with store.session() as s:
        refs = s.execute(
            select(Output.sop_class_uid, Output.sop_instance_uid)
            .join(Delivery, Delivery.output_id == Output.id)
            .where(Delivery.commitment_uid == uid)
            .order_by(Delivery.id)
        ).all()
    return uid, [(str(c), str(i)) for c, i in refs]


def _unclaim(store: Store, uid: str) -> None:
    """The request was not made: its rows are asked again later (commitment_requested_at keeps the time)."""
    with store.session() as s:
        s.execute(update(Delivery).where(Delivery.commitment_uid == uid).values(commitment_uid=""))


def action_dataset(uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information: Transaction UID and Referenced SOP Sequence."""
    ds = Dataset()
    ds.TransactionUID = uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _request(store: Store, settings: Settings, dest: Destination, associate: Associate) -> int:
    """One N-ACTION for the destination's rows not yet asked; wait briefly for a report on the same association."""
    uid, refs = _claim(store, settings, dest)
    if not refs:
        return 0
    try:
        assoc, error = associate(settings, dest, {PUSH_MODEL: set()})
    except Exception as exc:  # never leave the rows claimed by a request that was not made
        assoc, error = None, f"cannot associate: {exc}"
    if assoc is None:
        _unclaim(store, uid)
        log.warning("storage commitment request to %s not sent (asked again later): %s", dest.name, error)
        return 0
    reported = _awaited.setdefault(uid, threading.Event())  # also set by a report on the listener
    try:
        if PUSH_MODEL not in {cx.abstract_syntax for cx in assoc.accepted_contexts}:
            error = f"{dest.ae_title} accepted no Storage Commitment Push Model context (is it a commitment SCP?)"
        else:
            assoc.bind(evt.EVT_N_EVENT_REPORT, report_handler(store))
            status, _ = assoc.send_n_action(action_dataset(uid, refs), 1, PUSH_MODEL, PUSH_MODEL_INSTANCE)
            code = int(status.Status) if "Status" in status else None
            if code == SUCCESS:
                log.info("storage commitment %s: asked %s to commit %d object(s)", uid, dest.name, len(refs))
                reported.wait(min(SAME_ASSOCIATION_WAIT, dest.commitment_timeout))
                return len(refs)
            error = "no N-ACTION response" if code is None else f"N-ACTION status 0x{code:04X}"
    except Exception as exc:  # pynetdicom raises on an association that ends mid-request
        error = f"N-ACTION failed: {exc}"
    finally:
        _awaited.pop(uid, None)
        # A report being handled on the association now: release it after (receive/reactor.py).
        reactor.release(assoc, settings.dispatch.timeout_seconds)
    _unclaim(store, uid)
    log.warning("storage commitment request to %s failed (asked again later): %s", dest.name, error)
    return 0


def parse_report(info: Dataset) -> Report:
    """The Transaction UID and the committed and failed references of an N-EVENT-REPORT's Event Information."""
    committed = tuple(str(i.get("ReferencedSOPInstanceUID", "")) for i in info.get("ReferencedSOPSequence", []))
    failed = tuple(
        (str(i.get("ReferencedSOPInstanceUID", "")), int(i.get("FailureReason", PROCESSING_FAILURE)))
        for i in info.get("FailedSOPSequence", [])
    )
    return Report(str(info.get("TransactionUID", "")), committed, failed)


def on_report(store: Store, event: Event) -> tuple[int, Report | None]:
    """Handle a Storage Commitment N-EVENT-REPORT (on the node's listener or on its own request's
    association); return the status to answer and what the report said."""
    peer = str(event.assoc.requestor.ae_title if event.assoc.is_acceptor else event.assoc.acceptor.ae_title).strip()
    if event.event_type not in (1, 2):  # 1: all committed, 2: some failed
        log.warning("storage commitment report from %s: unknown event type %s", peer, event.event_type)
        return NO_SUCH_EVENT_TYPE, None
    try:
        report = parse_report(event.event_information)
    except Exception as exc:  # pydicom raises many kinds on a corrupt data set
        log.warning("storage commitment report from %s unreadable: %s", peer, exc)
        return PROCESSING_FAILURE, None
    record_report(store, report, peer)
    if (waiting := _awaited.get(report.transaction_uid)) is not None:
        waiting.set()
    return SUCCESS, report


def report_handler(store: Store) -> Callable[[Event], tuple[int, Dataset | None]]:
    """The EVT_N_EVENT_REPORT handler for the node's DICOM listener (a report on a later association)."""
    return lambda event: (on_report(store, event)[0], None)


def record_report(store: Store, report: Report, peer: str) -> tuple[list[int], list[int]]:
    """Apply a report to the rows of its transaction; return the ids committed and the ids to send again."""
    committed: list[int] = []
    again: list[int] = []
    with store.session() as s:
        rows = s.execute(
            select(Delivery, Output.sop_instance_uid)
            .join(Output, Output.id == Delivery.output_id)
            .where(Delivery.commitment_uid == report.transaction_uid, Delivery.state == DeliveryState.SENT)
        ).all()
        if not rows:
            log.warning(
                "storage commitment report from %s for transaction %s: not awaited (timed out and asked again?)",
                peer,
                report.transaction_uid,
            )
            return committed, again
        by_uid = {uid: row for row, uid in rows}
        now = utcnow()
        for uid in report.committed:
            row = by_uid.pop(uid, None)
            if row is not None:
                row.state, row.committed_at = DeliveryState.COMMITTED, now
                metrics.DELIVERIES_COMMITTED.labels(destination=row.destination).inc()
                committed.append(row.id)
        for uid, reason in report.failed:
            row = by_uid.pop(uid, None)
            if row is not None:
                row.state, row.next_attempt_at = DeliveryState.PENDING, now
                row.commitment_uid, row.commitment_requested_at = "", None
                row.last_error = f"storage commitment failed at {row.destination}: failure reason 0x{reason:04X}"
                row.leased_by, row.lease_heartbeat_at = "", None
                metrics.COMMITMENT_FAILED_REFERENCES.labels(destination=row.destination).inc()
                again.append(row.id)
        audit(
            s,
            peer or "system",
            "delivery.commitment_report",
            target=f"commitment:{report.transaction_uid}",
            committed=committed,
            failed=again,
            unanswered=sorted(r.id for r in by_uid.values()),
        )
    if again:
        log.warning(
            "storage commitment %s: %s could not commit %d object(s); sending them again",
            report.transaction_uid,
            peer,
            len(again),
        )
    log.info("storage commitment %s: %d object(s) committed by %s", report.transaction_uid, len(committed), peer)
    return committed, again
