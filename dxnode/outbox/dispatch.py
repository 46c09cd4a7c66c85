"""The outbox: deliver written outputs (SR, SC) to each destination with C-STORE or STOW-RS, with retries.

Every output is on disk and recorded before a delivery row exists; a row is sent, retried with
exponential backoff (``backoff_initial_seconds * 2**(attempts-1)``, capped), or marked failed
after ``max_attempts`` with the DIMSE status or network error. With the defaults (20 attempts,
5 s doubling to 15 min) a destination may be down for about three hours before a row fails, and
``dxnode resend`` re-queues failed rows.

A row names its destination only; the address, AE title, TLS and auth come from the [[destinations]]
entry of that name in the configuration the sender runs with, so a corrected address applies to rows
already queued as soon as the node runs with it. The states of a row:

- ``pending``: to be sent (or being sent: leased, see below).
- ``sent``: the destination stored it.
- ``committed``: sent, and the destination's Storage Commitment report says it keeps it (only
  destinations with ``commitment = true``; see dxnode/outbox/commitment.py).
- ``failed``: the destination refused it for good, or ``max_attempts`` tries failed.
- ``cancelled``: ``dxnode outbox cancel``; never sent (a row already on the wire when it is
  cancelled may still arrive, and is then recorded as sent).
- ``orphaned``: its destination is no longer configured ("no destination named X"). Not ``failed``:
  nothing was tried and nothing is wrong with the row or the receiver, only the configuration; a
  state of its own keeps it out of the failure counts and alerts, tells the operator what to fix,
  and lets ``dxnode outbox retry`` bring it back once the destination is configured again. It does
  not come back by itself when a destination of that name reappears: old results going out
  unasked to a re-added node would be a surprise.

Rows of one destination go in creation order: a destination is served only when its oldest pending
row is due, and a round stops at the first row that will be retried, so a later row never
overtakes an earlier one. A row the destination can never take (SOP class refused, data set not
matching its SOP class, file unreadable) fails at once and blocks nothing.

Several processes may run the outbox on one database. A round claims a destination's rows by
moving their ``next_attempt_at`` past the send (a lease); claims are serialised by SQLite's
``BEGIN IMMEDIATE`` and by a transaction advisory lock on PostgreSQL, so no row is sent twice at
the same time and a second node sees the first one's lease on the oldest row. A lease names its
process and is refreshed after every send; a lease whose process is gone (same host) or whose
refresh is older than ``2 * timeout_seconds + 30`` s (any host) is released at the next claim.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pydicom
from apscheduler.schedulers.base import BaseScheduler
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dxnode import metrics
from dxnode.config import Destination, Settings
from dxnode.outbox import commitment
from dxnode.outbox.dicomweb import StowClient
from dxnode.receive import reactor
from dxnode.schemas import OutboxChange
from dxnode.states import DeliveryState
from dxnode.store import Delivery, Job, Output, Store, Study, audit, utcnow
from dxnode.worklist.queue import process_gone, rank_of, worker_id

log = logging.getLogger("dxnode.outbox.dispatch")

# Key of the PostgreSQL advisory lock that serialises claims between nodes ("dxnode" in ASCII).
_CLAIM_LOCK = 0x6478_6E6F_6465
# Rows claimed per destination and round; the rest follow in the next rounds.
BATCH = 100
# C-STORE statuses that say the object was stored (Success, and the Warnings of PS3.4 B.2.3).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def destinations_for(settings: Settings, calling_aet: str, only: list[str] | None = None) -> list[Destination]:
    """Every destination not marked return_only, plus the sender's own entry when return_to_sender is on;
    with only (a fetch request's destinations), those configured destinations alone."""
    if only:
        return [d for d in settings.destinations if d.name in only]
    chosen = [d for d in settings.destinations if not d.return_only]
    if settings.dispatch.return_to_sender and calling_aet:
        chosen += [d for d in settings.destinations if d.ae_title == calling_aet and d not in chosen]
    return chosen


def configured(settings: Settings, name: str) -> Destination | None:
    """The [[destinations]] entry of that name in the configuration, or None."""
    return next((d for d in settings.destinations if d.name == name), None)


def not_configured(name: str) -> str:
    """The reason an orphaned row gives."""
    return f"no destination named {name} in [[destinations]]"


def enqueue(
    session: Session,
    output: Output,
    settings: Settings,
    calling_aet: str = "",
    job_id: int | None = None,
    names: list[str] | None = None,
) -> list[Delivery]:
    """A pending delivery per destination that wants the output's kind, by name; rows that already exist are kept.
    The destinations: names (a request naming them), else those the job names, if any (job_id: the job writing
    it now, else the job that first wrote it), else as configured."""
    existing = {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.output_id == output.id))}
    writer = job_id or output.job_id
    only = names or (session.scalar(select(Job.destinations).where(Job.id == writer)) if writer else None)
    rows = []
    for dest in destinations_for(settings, calling_aet, list(only or [])):
        if output.kind not in dest.outputs:
            continue
        row = existing.get(dest.name)
        if row is None:
            row = Delivery(
                output_id=output.id, destination=dest.name, state=DeliveryState.PENDING, next_attempt_at=utcnow()
            )
            session.add(row)
        rows.append(row)
    session.flush()
    return rows


def backoff(settings: Settings, attempts: int) -> dt.timedelta:
    """Delay before the next try after the given number of failed attempts."""
    d = settings.dispatch
    return dt.timedelta(seconds=min(d.backoff_max_seconds, d.backoff_initial_seconds * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class _Leased:
    """A delivery row this process has leased, and what is needed to send it."""

    id: int
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    destination: str


def lease_stale_after(settings: Settings) -> dt.timedelta:
    """A lease not refreshed for this long belongs to a process that stopped (one send takes at most
    about two timeouts: association, then C-STORE)."""
    return dt.timedelta(seconds=2 * settings.dispatch.timeout_seconds + 30)


def _release_dead_leases(s: Session, settings: Settings, now: dt.datetime) -> None:
    """Make rows leased by a stopped process due again: its pid is gone here, or its lease went stale."""
    holders = s.execute(
        select(Delivery.leased_by, func.max(Delivery.lease_heartbeat_at))
        .where(Delivery.state == DeliveryState.PENDING, Delivery.leased_by != "", Delivery.next_attempt_at > now)
        .group_by(Delivery.leased_by)
    ).all()
    for holder, refreshed in holders:
        if holder == worker_id():
            continue
        if process_gone(holder) or refreshed is None or refreshed < now - lease_stale_after(settings):
            s.execute(
                update(Delivery)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.leased_by == holder)
                .values(next_attempt_at=now, leased_by="", lease_heartbeat_at=None)
            )
            log.warning("released the outbox lease of stopped process %s", holder)


def _orphan_unconfigured(s: Session, settings: Settings) -> None:
    """Move the pending rows of destinations missing from the configuration to ``orphaned``, with the reason.

    Rows leased by another live process are left to it (it may run with a configuration that has the
    destination); rows leased by a stopped one were made free by _release_dead_leases just before.
    """
    names = [d.name for d in settings.destinations]
    me = worker_id()
    free = (Delivery.leased_by == "") | (Delivery.leased_by == me)
    gone = s.scalars(
        select(Delivery.destination)
        .where(Delivery.state == DeliveryState.PENDING, Delivery.destination.not_in(names), free)
        .distinct()
    ).all()
    for name in gone:
        rows = s.scalars(
            select(Delivery).where(Delivery.state == DeliveryState.PENDING, Delivery.destination == name, free)
        ).all()
        for row in rows:
            row.state, row.last_error = DeliveryState.ORPHANED, not_configured(name)
            row.leased_by, row.lease_heartbeat_at = "", None
        ids = [row.id for row in rows]
        audit(s, "system", "delivery.orphaned", target=f"destination:{name}", reason=not_configured(name), ids=ids)
        log.error(
            "%d delivery(ies) orphaned: %s (`dxnode outbox retry --destination %s` once it is)",
            len(rows),
            not_configured(name),
            name,
        )


def _claim(store: Store, settings: Settings, now: dt.datetime) -> list[list[_Leased]]:
    """Lease the pending rows of every configured destination whose oldest pending row is due, the
    outputs of the most urgent jobs first, then in creation order (a batch: at most BATCH rows of one
    destination); orphan the rows of destinations no longer configured."""
    me = worker_id()
    with store.session() as s:
        if store.dialect == "postgresql":
            s.execute(select(func.pg_advisory_xact_lock(_CLAIM_LOCK)))
        _release_dead_leases(s, settings, now)
        _orphan_unconfigured(s, settings)
        head_ids = (
            select(func.min(Delivery.id))
            .where(
                Delivery.state == DeliveryState.PENDING,
                Delivery.destination.in_([d.name for d in settings.destinations]),
            )
            .group_by(Delivery.destination)
        )
        heads = s.scalars(
            select(Delivery).where(Delivery.id.in_(head_ids), Delivery.next_attempt_at <= now).order_by(Delivery.id)
        ).all()
        batches = []
        for head in heads:
            q = (
                select(Delivery, Output)
                .join(Output, Output.id == Delivery.output_id)
                .outerjoin(Job, Job.id == Output.job_id)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.destination == head.destination)
                .order_by(rank_of(Job.priority), Delivery.id)
                .limit(BATCH)
            )
            if store.dialect == "postgresql":
                q = q.with_for_update(of=Delivery)
            rows = s.execute(q).all()
            # Long enough for every C-STORE of the batch to time out, so a lease never ends mid-send.
            lease = now + dt.timedelta(seconds=settings.dispatch.timeout_seconds * (len(rows) + 2) + 60)
            batch = []
            for row, out in rows:
                row.next_attempt_at, row.leased_by, row.lease_heartbeat_at = lease, me, now
                batch.append(_Leased(row.id, out.file_path, out.sop_class_uid, out.sop_instance_uid, row.destination))
            batches.append(batch)
        return batches


def _record(
    store: Store,
    settings: Settings,
    item: _Leased,
    ok: bool,
    error: str = "",
    status: int | None = None,
    permanent: bool = False,
    http_status: int | None = None,
    retry_after: float | None = None,
) -> DeliveryState:
    """Store the outcome of one attempt; return the row's new state (retry_after: the server's wait, seconds)."""
    with store.session() as s:
        row = s.get(Delivery, item.id)
        if row is None:  # deleted meanwhile (its output was removed)
            return DeliveryState.FAILED
        row.attempts += 1
        row.dimse_status = status
        row.http_status = http_status
        row.leased_by, row.lease_heartbeat_at = "", None
        # The rest of this process's batch is still being worked on: refresh its lease.
        s.execute(
            update(Delivery)
            .where(Delivery.leased_by == worker_id(), Delivery.state == DeliveryState.PENDING, Delivery.id != row.id)
            .values(lease_heartbeat_at=utcnow())
        )
        if ok:  # also a row cancelled while on the wire: it did arrive
            row.state, row.sent_at, row.last_error = DeliveryState.SENT, utcnow(), ""
            metrics.DELIVERIES_SENT.labels(destination=row.destination).inc()
            audit(
                s,
                "system",
                "delivery.sent",
                target=f"delivery:{row.id}",
                destination=row.destination,
                sop_instance_uid=item.sop_instance_uid,
            )
            return row.state
        metrics.DELIVERY_ATTEMPTS_FAILED.labels(destination=row.destination).inc()
        if row.state != DeliveryState.PENDING:  # cancelled meanwhile: it stays so, with its reason
            return row.state
        row.last_error = error[:2000]
        if permanent or row.attempts >= settings.dispatch.max_attempts:
            row.state = DeliveryState.FAILED
            metrics.DELIVERIES_FAILED_FOR_GOOD.labels(destination=row.destination).inc()
            audit(
                s,
                "system",
                "delivery.failed",
                target=f"delivery:{row.id}",
                destination=row.destination,
                sop_instance_uid=item.sop_instance_uid,
                error=error[:500],
            )
            log.error("delivery %d to %s failed for good: %s", row.id, row.destination, error)
        else:
            row.next_attempt_at = utcnow() + (
                dt.timedelta(seconds=retry_after) if retry_after is not None else backoff(settings, row.attempts)
            )
            log.warning(
                "delivery %d to %s failed (attempt %d), retrying: %s", row.id, row.destination, row.attempts, error
            )
        return row.state


def _still_ours(store: Store, item: _Leased) -> bool:
    """False when the row was cancelled (or re-queued, or its lease released) after this process claimed
    it: it is not sent by this batch (a re-queued row goes with a later claim)."""
    with store.session() as s:
        row = s.execute(select(Delivery.state, Delivery.leased_by).where(Delivery.id == item.id)).first()
    return row is not None and row.state == DeliveryState.PENDING and row.leased_by == worker_id()


def _release(store: Store, leased: list[_Leased]) -> None:
    """Give back the lease of rows not tried this round; they wait behind the row that will be retried."""
    if leased:
        with store.session() as s:
            s.execute(
                update(Delivery)
                .where(Delivery.id.in_([d.id for d in leased]), Delivery.state == DeliveryState.PENDING)
                .values(next_attempt_at=utcnow(), leased_by="", lease_heartbeat_at=None)
            )


def tls_client_context(settings: Settings, host: str) -> ssl.SSLContext:
    """Client side of DICOM TLS: verify the peer against [node] tls_ca (else the system CAs) and
    present [node] tls_cert/tls_key when they are set."""
    node = settings.node
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(node.tls_ca) if node.tls_ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if node.tls_cert and node.tls_key:
        ctx.load_cert_chain(str(node.tls_cert), str(node.tls_key))
    return ctx


def status_text(code: int) -> str:
    """A C-STORE status in words, e.g. '0xA700 Refused: Out of Resources'."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    if meaning is None and 0xA700 <= code <= 0xA7FF:
        meaning = STORAGE_SERVICE_CLASS_STATUS[0xA700]
    elif meaning is None and 0xA900 <= code <= 0xA9FF:
        meaning = STORAGE_SERVICE_CLASS_STATUS[0xA900]
    elif meaning is None and 0xC000 <= code <= 0xCFFF:
        meaning = STORAGE_SERVICE_CLASS_STATUS[0xC000]
    return f"0x{code:04X} " + (meaning[1] if meaning else "Unknown status")


def never_storable(code: int) -> bool:
    """Statuses no retry can change: SOP class not supported, data set does not match its SOP class."""
    return code == 0x0122 or 0xA900 <= code <= 0xA9FF


def _file_error(settings: Settings, item: _Leased) -> tuple[str, str]:
    """(transfer syntax, '') of the output file, or ('', the reason it cannot be read)."""
    try:
        return str(read_file_meta_info(settings.data_dir / item.path).TransferSyntaxUID), ""
    except Exception as exc:
        return "", f"cannot read output file {Path(item.path)}: {exc}"


def _associate(settings: Settings, dest: Destination, syntaxes: dict[str, set[str]]) -> tuple[Association | None, str]:
    """An association with the destination as configured now, proposing the SOP classes and syntaxes,
    or the error in words."""
    tls_args = (tls_client_context(settings, dest.host), dest.host) if dest.tls else None
    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dispatch.timeout_seconds
    ae.connection_timeout = settings.dispatch.timeout_seconds
    for sop_class, ts in syntaxes.items():
        ae.add_requested_context(sop_class, sorted(ts | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    try:
        reactor.install()  # counts the report threads that commitment's release waits for (receive/reactor.py)
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except Exception as exc:
        return None, f"cannot associate with {where}: {exc}"
    if assoc.is_established:
        return assoc, ""
    if assoc.is_rejected:
        return None, f"association rejected by {where}"
    # pynetdicom only says 'aborted': connect again to say why (refused, unreachable, timed out).
    return None, _tcp_error(
        dest.host, dest.port, settings.dispatch.timeout_seconds
    ) or f"association with {where} aborted"


def _send_batch(store: Store, settings: Settings, batch: list[_Leased]) -> int:
    """One association for a destination's claimed rows, sent in order; return how many were stored."""
    if not batch:
        return 0
    dest = configured(settings, batch[0].destination)
    if dest is None:  # _claim only claims configured destinations; this settings object changed since
        _release(store, batch)
        return 0
    if dest.kind == "dicomweb":
        return _send_batch_dicomweb(store, settings, batch, dest)
    syntaxes: dict[str, set[str]] = {}
    ready = []
    for item in batch:
        ts, error = _file_error(settings, item)
        if error:
            _record(store, settings, item, False, error, permanent=True)
        else:
            syntaxes.setdefault(item.sop_class_uid, set()).add(ts)
            ready.append(item)
    if not ready:
        return 0
    assoc, error = _associate(settings, dest, syntaxes)
    if assoc is None:
        for item in ready:  # one failed attempt for every row: the destination is down for all of them
            _record(store, settings, item, False, error)
        return 0
    sent = 0
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for i, item in enumerate(ready):
            if i and not _still_ours(store, item):
                continue
            if item.sop_class_uid not in accepted:
                _record(
                    store,
                    settings,
                    item,
                    False,
                    f"{dest.ae_title} accepted no presentation context for SOP class {item.sop_class_uid}",
                    permanent=True,
                )
                continue
            state = _send_one(store, settings, assoc, item)
            sent += state == DeliveryState.SENT
            if state == DeliveryState.PENDING:  # will be retried: the rows behind it wait for it
                _release(store, ready[i + 1 :])
                break
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("sent %d of %d object(s) to %s", sent, len(ready), ready[0].destination)
    return sent


def _send_batch_dicomweb(store: Store, settings: Settings, batch: list[_Leased], dest: Destination) -> int:
    """STOW-RS the claimed rows one by one, in order; a row that will be retried holds back those behind it."""

    sent = 0
    with StowClient(dest, settings.dispatch.timeout_seconds) as client:
        for i, item in enumerate(batch):
            if i and not _still_ours(store, item):
                continue
            try:
                data = (settings.data_dir / item.path).read_bytes()
            except OSError as exc:
                _record(
                    store, settings, item, False, f"cannot read output file {Path(item.path)}: {exc}", permanent=True
                )
                continue
            outcome = client.store(data, item.sop_instance_uid)
            state = _record(
                store,
                settings,
                item,
                outcome.stored,
                outcome.error,
                permanent=outcome.permanent,
                http_status=outcome.http_status,
                retry_after=outcome.retry_after,
            )
            sent += state == DeliveryState.SENT
            if state == DeliveryState.PENDING:
                _release(store, batch[i + 1 :])
                break
    log.info("sent %d of %d object(s) to %s by STOW-RS", sent, len(batch), batch[0].destination)
    return sent


def _send_one(store: Store, settings: Settings, assoc: Association, item: _Leased) -> DeliveryState:
    """C-STORE one output on an open association; return the row's new state."""
    if not assoc.is_established:
        return _record(store, settings, item, False, "association ended before this object was sent")
    try:
        ds = pydicom.dcmread(settings.data_dir / item.path)
    except Exception as exc:
        return _record(
            store, settings, item, False, f"cannot read output file {Path(item.path)}: {exc}", permanent=True
        )
    try:
        status = assoc.send_c_store(ds)
    except Exception as exc:
        return _record(store, settings, item, False, f"C-STORE failed: {exc}")
    code = int(status.Status) if "Status" in status else None
    if code is None:
        return _record(store, settings, item, False, "no C-STORE response (timeout or association aborted)")
    if code in _STORED:
        return _record(store, settings, item, True, status=code)
    comment = str(status.get("ErrorComment", ""))
    error = "C-STORE status " + status_text(code) + (f": {comment}" if comment else "")
    return _record(store, settings, item, False, error, status=code, permanent=never_storable(code))


def _tcp_error(host: str, port: int, timeout: float) -> str:
    """'' if host:port accepts TCP connections, else the network error in words."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def send_due(store: Store, settings: Settings, now: dt.datetime | None = None) -> int:
    """Send the due deliveries of every destination, then ask commitment destinations to commit what
    was sent; return how many were delivered."""
    sent = sum(_send_batch(store, settings, batch) for batch in _claim(store, settings, now or utcnow()))
    commitment.request_due(store, settings, _associate)
    return sent


def resend(session: Session, target: str, actor: str = "cli", source: str = "") -> int:
    """Re-queue deliveries of an output (SOP Instance UID), a study (Study Instance UID) or a delivery id."""
    q = select(Delivery).join(Output, Output.id == Delivery.output_id)
    if target.isdigit():
        rows = list(session.scalars(q.where(Delivery.id == int(target))))
    else:
        rows = list(session.scalars(q.where(Output.sop_instance_uid == target)))
        if not rows:
            rows = list(
                session.scalars(q.join(Study, Study.id == Output.study_id).where(Study.study_instance_uid == target))
            )
    for row in rows:
        _requeue(row)
    if rows:
        audit(session, actor, "delivery.resend", target=target, source=source, rows=len(rows))
    return len(rows)


def _requeue(row: Delivery) -> None:
    """Make a row pending and due now, as if never tried."""
    row.state, row.attempts, row.last_error, row.next_attempt_at = DeliveryState.PENDING, 0, "", utcnow()
    row.dimse_status = row.http_status = None
    row.leased_by, row.lease_heartbeat_at = "", None
    row.commitment_uid, row.commitment_requested_at, row.committed_at = "", None, None


@dataclass(frozen=True)
class Selection:
    """The deliveries `dxnode outbox cancel` and `retry` act on: rows matching every criterion given."""

    delivery_ids: tuple[int, ...] = ()
    study_instance_uid: str = ""
    destination: str = ""

    @property
    def empty(self) -> bool:
        """True when no criterion is given (it would select nothing)."""
        return not (self.delivery_ids or self.study_instance_uid or self.destination)

    def describe(self) -> str:
        """The selection as the audit target, e.g. 'study:1.2.3 destination:pacs'."""
        parts = [f"delivery:{','.join(map(str, self.delivery_ids))}"] if self.delivery_ids else []
        parts += [f"study:{self.study_instance_uid}"] if self.study_instance_uid else []
        parts += [f"destination:{self.destination}"] if self.destination else []
        return " ".join(parts)


def selected(session: Session, sel: Selection) -> list[Delivery]:
    """The rows of a selection, oldest first, locked against a concurrent claim (PostgreSQL)."""
    if sel.empty:
        return []
    q = select(Delivery).order_by(Delivery.id)
    if sel.delivery_ids:
        q = q.where(Delivery.id.in_(sel.delivery_ids))
    if sel.study_instance_uid:
        q = (
            q.join(Output, Output.id == Delivery.output_id)
            .join(Study, Study.id == Output.study_id)
            .where(Study.study_instance_uid == sel.study_instance_uid)
        )
    if sel.destination:
        q = q.where(Delivery.destination == sel.destination)
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(of=Delivery)
    return list(session.scalars(q))


def cancel(session: Session, sel: Selection, actor: str, source: str = "", user: str = "") -> OutboxChange:
    """Cancel the selected rows that are not sent yet (pending, failed, orphaned): they are never sent.

    A row on the wire at this moment may still arrive (it is then recorded as sent); the rest of its
    batch is not sent. Audited as ``delivery.cancel`` with the selection, the user and the rows changed.
    """
    rows = selected(session, sel)
    who = f"{actor} ({user})" if user else actor
    changed: list[int] = []
    skipped: dict[str, list[int]] = {}
    for row in rows:
        if row.state in (DeliveryState.SENT, DeliveryState.COMMITTED, DeliveryState.CANCELLED):
            skipped.setdefault(f"already {row.state}", []).append(row.id)
            continue
        was = f"was {row.state}" + (f": {row.last_error}" if row.last_error else "")
        row.state, row.last_error = DeliveryState.CANCELLED, f"cancelled by {who}; {was}"[:2000]
        row.leased_by, row.lease_heartbeat_at = "", None
        changed.append(row.id)
    if changed:
        log.warning("%s cancelled %d delivery(ies): %s", who, len(changed), sel.describe())
    return _outcome(session, "cancel", sel, rows, changed, skipped, actor, source, user)


def retry(
    session: Session, sel: Selection, settings: Settings, actor: str, source: str = "", user: str = ""
) -> OutboxChange:
    """Queue the selected unsent rows (pending, failed, cancelled, orphaned) to go out at once: attempts
    and backoff reset, sent to their destination as configured in settings.

    Left as they are: sent rows (``dxnode resend`` sends again), rows whose destination is not in
    settings, and rows another process is sending right now. Audited as ``delivery.retry``.
    """
    rows = selected(session, sel)
    changed: list[int] = []
    skipped: dict[str, list[int]] = {}
    for row in rows:
        if row.state in (DeliveryState.SENT, DeliveryState.COMMITTED):
            reason = f"already {row.state} (dxnode resend sends it again)"
        elif configured(settings, row.destination) is None:
            reason = not_configured(row.destination)
        elif row.state == DeliveryState.PENDING and row.leased_by:
            reason = f"being sent now by {row.leased_by}"
        else:
            _requeue(row)
            changed.append(row.id)
            continue
        skipped.setdefault(reason, []).append(row.id)
    return _outcome(session, "retry", sel, rows, changed, skipped, actor, source, user)


def _outcome(
    session: Session,
    action: str,
    sel: Selection,
    rows: list[Delivery],
    changed: list[int],
    skipped: dict[str, list[int]],
    actor: str,
    source: str,
    user: str,
) -> OutboxChange:
    """Audit an outbox action that matched rows (as delivery.<action>) and say what it did."""
    if rows:
        audit(
            session,
            actor,
            f"delivery.{action}",
            target=sel.describe(),
            source=source,
            user=user,
            ids=changed,
            skipped=skipped,
        )
    return OutboxChange(action=action, selection=sel.describe(), matched=len(rows), changed=changed, skipped=skipped)


def schedule(scheduler: BaseScheduler, store: Store, settings: Settings) -> None:
    """Run the outbox every dispatch.interval_seconds."""
    scheduler.add_job(
        send_due,
        "interval",
        args=[store, settings],
        seconds=settings.dispatch.interval_seconds,
        id="dispatch",
        max_instances=1,
        coalesce=True,
    )
