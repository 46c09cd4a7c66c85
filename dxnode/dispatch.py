"""The outbox: deliver written outputs (SR, SC) to each destination with C-STORE, with retries.

Every output is on disk and recorded before a delivery row exists; a row is sent, retried with
exponential backoff (``backoff_initial_seconds * 2**(attempts-1)``, capped), or marked failed
after ``max_attempts`` with the DIMSE status or network error. With the defaults (20 attempts,
5 s doubling to 15 min) a destination may be down for about three hours before a row fails, and
``dxnode resend`` re-queues failed rows. Rows of one destination go in creation order. A
destination that does not accept an object's SOP class fails that row at once; the rest still go.
Several processes may run the outbox on one database: a row is claimed by moving its
``next_attempt_at`` past the send (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, SQLite's single
writer transaction on SQLite), so no row is sent twice at the same time.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session

from dxnode import metrics
from dxnode.config import Destination, Settings
from dxnode.queries import iso
from dxnode.store import Delivery, Output, Store, Study, audit, utcnow

log = logging.getLogger("dxnode.dispatch")


def destinations_for(settings: Settings, calling_aet: str) -> list[Destination]:
    """Configured destinations, plus the sender's own entry when return_to_sender is on."""
    chosen = list(settings.destinations)
    if settings.dispatch.return_to_sender and calling_aet:
        chosen += [d for d in settings.destinations if d.ae_title == calling_aet and d not in chosen]
    return chosen


def enqueue(session: Session, output: Output, settings: Settings, calling_aet: str = "") -> list[Delivery]:
    """A pending delivery per destination; rows that already exist are kept as they are."""
    existing = {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.output_id == output.id))}
    rows = []
    for dest in destinations_for(settings, calling_aet):
        row = existing.get(dest.name)
        if row is None:
            row = Delivery(output_id=output.id, destination=dest.name, ae_title=dest.ae_title, host=dest.host, port=dest.port, state="pending")
            session.add(row)
        rows.append(row)
    session.flush()
    return rows


def backoff(settings: Settings, attempts: int) -> dt.timedelta:
    """Delay before the next try after the given number of failed attempts."""
    d = settings.dispatch
    return dt.timedelta(seconds=min(d.backoff_max_seconds, d.backoff_initial_seconds * 2 ** max(0, attempts - 1)))


@dataclass
class _Job:
    """A claimed delivery row and what is needed to send it."""

    id: int
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    destination: tuple[str, str, str, int]


def _claim(store: Store, settings: Settings, now: dt.datetime, limit: int = 200) -> list[_Job]:
    """Take due pending rows, oldest first, by moving next_attempt_at past this round."""
    lease = now + dt.timedelta(seconds=settings.dispatch.timeout_seconds * 4 + 60)
    with store.session() as s:
        q = (select(Delivery, Output).join(Output, Output.id == Delivery.output_id)
             .where(Delivery.state == "pending", Delivery.next_attempt_at <= now).order_by(Delivery.id).limit(limit))
        if store.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True, of=Delivery)
        jobs = []
        for row, out in s.execute(q):
            row.next_attempt_at = lease
            jobs.append(_Job(row.id, out.file_path, out.sop_class_uid, out.sop_instance_uid, (row.destination, row.ae_title, row.host, row.port)))
        return jobs


def _record(store: Store, settings: Settings, job: _Job, ok: bool, error: str = "", status: int | None = None, permanent: bool = False) -> None:
    """Store the outcome of one attempt."""
    with store.session() as s:
        row = s.get(Delivery, job.id)
        if row is None:
            return
        row.attempts += 1
        row.dimse_status = status
        if ok:
            row.state, row.sent_at, row.last_error = "sent", utcnow(), ""
            metrics.DELIVERIES_SENT.labels(destination=row.destination).inc()
            audit(s, "system", "delivery.sent", target=f"delivery:{row.id}", destination=row.destination)
            return
        row.last_error = error[:2000]
        metrics.DELIVERIES_FAILED.labels(destination=row.destination).inc()
        if permanent or row.attempts >= settings.dispatch.max_attempts:
            row.state = "failed"
            audit(s, "system", "delivery.failed", target=f"delivery:{row.id}", destination=row.destination, error=error[:500])
            log.error("delivery %d to %s failed for good: %s", row.id, row.destination, error)
        else:
            row.next_attempt_at = utcnow() + backoff(settings, row.attempts)
            log.warning("delivery %d to %s failed (attempt %d), retrying: %s", row.id, row.destination, row.attempts, error)


def tls_client_context(settings: Settings, host: str) -> ssl.SSLContext:
    """Client side of DICOM TLS: verify the peer against [node] tls_ca (else the system CAs) and
    present [node] tls_cert/tls_key when they are set."""
    node = settings.node
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(node.tls_ca) if node.tls_ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if node.tls_cert and node.tls_key:
        ctx.load_cert_chain(str(node.tls_cert), str(node.tls_key))
    return ctx


def _send_group(store: Store, settings: Settings, dest: tuple[str, str, str, int], jobs: list[_Job]) -> int:
    """One association to one destination for its due rows, in order."""
    name, ae_title, host, port = dest
    configured = next((d for d in settings.destinations if d.name == name), None)
    tls_args = (tls_client_context(settings, host), host) if configured is not None and configured.tls else None
    datasets: dict[int, Any] = {}
    for job in jobs:
        try:
            datasets[job.id] = pydicom.dcmread(settings.data_dir / job.path)
        except Exception as exc:
            _record(store, settings, job, False, f"cannot read output file: {exc}", permanent=True)
    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.dispatch.timeout_seconds
    contexts: dict[str, set[str]] = defaultdict(set)
    for job in jobs:
        if job.id in datasets:
            contexts[job.sop_class_uid].add(str(datasets[job.id].file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    pending = [j for j in jobs if j.id in datasets]
    if not pending:
        return 0
    assoc, error = None, _tcp_error(host, port, settings.dispatch.timeout_seconds)
    if not error:
        try:
            assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
        except Exception as exc:
            error = f"cannot associate with {ae_title}@{host}:{port}: {exc}"
    if assoc is None or not assoc.is_established:
        if assoc is not None:
            error = f"association with {ae_title}@{host}:{port} " + ("rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed: no answer or connection refused")
        for job in pending:
            _record(store, settings, job, False, error)
        return 0
    sent = 0
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for job in pending:
            if job.sop_class_uid not in accepted:
                _record(store, settings, job, False, f"{ae_title} accepted no presentation context for SOP class {job.sop_class_uid}", permanent=True)
                continue
            if not assoc.is_established:
                _record(store, settings, job, False, "association ended before this object was sent")
                continue
            try:
                status = assoc.send_c_store(datasets[job.id])
            except Exception as exc:
                _record(store, settings, job, False, f"C-STORE failed: {exc}")
                continue
            code = int(status.Status) if "Status" in status else None
            if code is None:
                _record(store, settings, job, False, "no C-STORE response (timeout or association aborted)")
            elif code in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or warning (stored with coercion)
                _record(store, settings, job, True, status=code)
                sent += 1
            else:
                comment = str(status.get("ErrorComment", "")) if hasattr(status, "get") else ""
                _record(store, settings, job, False, f"C-STORE status 0x{code:04X}" + (f": {comment}" if comment else ""), status=code)
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("sent %d of %d object(s) to %s", sent, len(pending), name)
    return sent


def _tcp_error(host: str, port: int, timeout: float) -> str:
    """'' if host:port accepts TCP connections, else the network error in words (pynetdicom says only 'aborted')."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def send_due(store: Store, settings: Settings, now: dt.datetime | None = None) -> int:
    """Send every due delivery; return how many were delivered."""
    jobs = _claim(store, settings, now or utcnow())
    groups: dict[tuple[str, str, str, int], list[_Job]] = defaultdict(list)
    for job in jobs:
        groups[job.destination].append(job)
    return sum(_send_group(store, settings, dest, group) for dest, group in groups.items())


def resend(session: Session, target: str, actor: str = "cli") -> int:
    """Re-queue deliveries of an output (SOP Instance UID), a study (Study Instance UID) or a delivery id."""
    q = select(Delivery).join(Output, Output.id == Delivery.output_id)
    if target.isdigit():
        rows = list(session.scalars(q.where(Delivery.id == int(target))))
    else:
        rows = list(session.scalars(q.where(Output.sop_instance_uid == target)))
        if not rows:
            rows = list(session.scalars(q.join(Study, Study.id == Output.study_id).where(Study.study_instance_uid == target)))
    for row in rows:
        row.state, row.attempts, row.last_error, row.next_attempt_at, row.dimse_status = "pending", 0, "", utcnow(), None
    if rows:
        audit(session, actor, "delivery.resend", target=target, rows=len(rows))
    return len(rows)


def list_deliveries(session: Session, state: str | None = None, destination: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Outbox rows as JSON objects, newest first."""
    q = (select(Delivery, Output, Study.study_instance_uid).join(Output, Output.id == Delivery.output_id)
         .join(Study, Study.id == Output.study_id))
    if state:
        q = q.where(Delivery.state == state)
    if destination:
        q = q.where(Delivery.destination == destination)
    q = q.order_by(Delivery.id.desc()).limit(limit).offset(offset)
    return [
        {
            "id": d.id, "output_sop_instance_uid": o.sop_instance_uid, "kind": o.kind, "label": o.label, "study_instance_uid": study_uid,
            "destination": d.destination, "ae_title": d.ae_title, "host": d.host, "port": d.port, "state": d.state,
            "attempts": d.attempts, "next_attempt_at": iso(d.next_attempt_at), "last_error": d.last_error, "dimse_status": d.dimse_status,
            "created_at": iso(d.created_at), "sent_at": iso(d.sent_at),
        }
        for d, o, study_uid in session.execute(q)
    ]


def schedule(scheduler: Any, store: Store, settings: Settings) -> None:
    """Run the outbox every dispatch.interval_seconds."""
    scheduler.add_job(send_due, "interval", args=[store, settings], seconds=settings.dispatch.interval_seconds,
                      id="dispatch", max_instances=1, coalesce=True)
