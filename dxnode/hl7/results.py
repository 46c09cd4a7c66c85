"""The HL7 results outbox: a done job's findings to each [[hl7.destinations]] entry, as an ORU^R01 over
MLLP or a FHIR transaction Bundle, with retries.

The job body calls ``enqueue`` once its outputs are written: one ``hl7_result`` row per destination
that takes the study (``studies = "all"``, or ``"ordered"`` and an HL7 order with the study's accession
number that was not cancelled). A row is sent once its job is done; every process running the outbox
may send, each claiming rows by moving their ``next_attempt_at`` past the send (a lease, with its
holder in ``leased_by``; SQLite's ``BEGIN IMMEDIATE`` or ``SKIP LOCKED`` on PostgreSQL keep two
processes off one row); a lease that was not given back (its process died) ends by itself.

Outcomes: an ACK with MSA-1 AA (or CA) marks the row ``sent``; AE or no answer is retried with
[dispatch] backoff and max_attempts, the ORU keeping its message control id, so the receiver can
tell a resend; AR is final (``failed``, with MSA-3). FHIR: 2xx is sent; 4xx other than 408 and 429
is final; the rest is retried. A destination no longer configured leaves its rows ``orphaned``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass

import httpx
from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dxnode.config import Hl7Destination, Settings
from dxnode.hl7.content import load_report, to_oru
from dxnode.hl7.fhir import InvalidFhir, to_bundle
from dxnode.hl7.mllp import exchange
from dxnode.hl7.orders import hand_pending
from dxnode.hl7.v2 import control_id
from dxnode.states import DeliveryState, Hl7ResultKind, JobState, OrderState
from dxnode.store import Hl7Order, Hl7Result, Job, Store, Study, audit, utcnow
from dxnode.worklist.queue import worker_id

log = logging.getLogger("dxnode.hl7.results")

BATCH = 50  # rows claimed per round


@dataclass(frozen=True)
class Outcome:
    """What one attempt to send a row came to."""

    ok: bool
    error: str = ""
    permanent: bool = False
    ack_code: str = ""
    http_status: int | None = None


def enqueue(store: Store, settings: Settings, job_id: int) -> int:
    """Queue a job's results for every [[hl7.destinations]] entry that takes its study; the rows added."""
    destinations = settings.hl7.destinations
    if not destinations:
        return 0
    added = 0
    with store.session() as s:
        job = s.get(Job, job_id)
        study = s.get(Study, job.study_id) if job is not None else None
        if study is None:
            return 0
        order_id = _order_of(s, study)
        have = set(s.scalars(select(Hl7Result.destination).where(Hl7Result.job_id == job_id)))
        for dest in destinations:
            if dest.name in have or (dest.studies == "ordered" and order_id is None):
                continue
            kind = Hl7ResultKind.ORU if dest.kind == "mllp" else Hl7ResultKind.FHIR
            s.add(
                Hl7Result(job_id=job_id, order_id=order_id, destination=dest.name, kind=kind, control_id=control_id())
            )
            added += 1
    return added


def _order_of(session: Session, study: Study) -> int | None:
    """The newest open HL7 order for the study's accession number (or its Study Instance UID)."""
    keys = [Hl7Order.study_instance_uid == study.study_instance_uid]
    if study.accession_number:
        keys.append(Hl7Order.accession_number == study.accession_number)
    return session.scalar(
        select(Hl7Order.id)
        .where(or_(*keys), Hl7Order.state != OrderState.CANCELLED)
        .order_by(Hl7Order.id.desc())
        .limit(1)
    )


def backoff(settings: Settings, attempts: int) -> dt.timedelta:
    """Delay before the next try after that many failed attempts ([dispatch] backoff, as for DICOM deliveries)."""
    d = settings.dispatch
    return dt.timedelta(seconds=min(d.backoff_max_seconds, d.backoff_initial_seconds * 2 ** max(0, attempts - 1)))


def _claim(store: Store, settings: Settings, now: dt.datetime) -> list[int]:
    """Lease the due rows of done jobs; orphan the pending rows of destinations no longer configured."""
    names = [d.name for d in settings.hl7.destinations]
    lease = now + dt.timedelta(seconds=2 * settings.dispatch.timeout_seconds + 30)
    with store.session() as s:
        gone = s.scalars(
            select(Hl7Result).where(Hl7Result.state == DeliveryState.PENDING, Hl7Result.destination.not_in(names))
        ).all()
        for row in gone:
            row.state, row.last_error = DeliveryState.ORPHANED, f"no [[hl7.destinations]] entry named {row.destination}"
        q = (
            select(Hl7Result)
            .join(Job, Job.id == Hl7Result.job_id)
            .where(
                Hl7Result.state == DeliveryState.PENDING, Hl7Result.next_attempt_at <= now, Job.state == JobState.DONE
            )
            .order_by(Hl7Result.id)
            .limit(BATCH)
        )
        if store.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True, of=Hl7Result)
        rows = s.scalars(q).all()
        for row in rows:
            row.next_attempt_at, row.leased_by = lease, worker_id()
        return [row.id for row in rows]


def _send_oru(settings: Settings, dest: Hl7Destination, message: str) -> Outcome:
    """Send an ORU over MLLP and read MSA-1 and MSA-3 of the answer."""
    try:
        answer = exchange(dest.host, dest.port, message.encode("utf-8"), settings.dispatch.timeout_seconds)
    except OSError as exc:
        return Outcome(False, f"{dest.host}:{dest.port}: {exc.strerror or exc or type(exc).__name__}")
    text = answer.decode("utf-8", "replace").replace("\n", "\r")
    msa = next((seg.split("|") for seg in text.split("\r") if seg.startswith("MSA|")), None)
    if msa is None or len(msa) < 2:
        return Outcome(False, "the answer has no MSA segment")
    code, reason = msa[1].upper(), (msa[3] if len(msa) > 3 else "")
    if code in ("AA", "CA"):
        return Outcome(True, ack_code=code)
    detail = f"{dest.name} answered {code}" + (f": {reason}" if reason else "")
    return Outcome(False, detail, permanent=code in ("AR", "CR"), ack_code=code[:2])


def _send_fhir(settings: Settings, dest: Hl7Destination, bundle: dict[str, object]) -> Outcome:
    """POST a transaction Bundle to the FHIR base URL."""
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if dest.secret_env:
        token = os.environ.get(dest.secret_env, "")
        if not token:
            return Outcome(False, f"environment variable {dest.secret_env} (secret_env) is not set")
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.post(dest.url, json=bundle, headers=headers, timeout=settings.dispatch.timeout_seconds)
    except httpx.HTTPError as exc:
        return Outcome(False, f"{dest.url}: {exc or type(exc).__name__}")
    if response.is_success:
        return Outcome(True, http_status=response.status_code)
    final = 400 <= response.status_code < 500 and response.status_code not in (408, 429)
    text = f"{dest.url}: HTTP {response.status_code} {response.text[:300]}".strip()
    return Outcome(False, text, permanent=final, http_status=response.status_code)


def _attempt(store: Store, settings: Settings, row_id: int) -> Outcome:
    """Build and send one leased row."""
    with store.session() as s:
        row = s.get(Hl7Result, row_id)
        if row is None:
            return Outcome(False, "the row is gone", permanent=True)
        dest = next((d for d in settings.hl7.destinations if d.name == row.destination), None)
        report = load_report(s, row.job_id, row.order_id, row.destination)
        control = row.control_id
    if dest is None or report is None:
        return Outcome(False, "its destination or its job is gone", permanent=True)
    if dest.kind == "mllp":
        return _send_oru(settings, dest, to_oru(report, settings, dest, control))
    try:
        bundle = to_bundle(report)
    except InvalidFhir as exc:
        return Outcome(False, str(exc), permanent=True)
    return _send_fhir(settings, dest, bundle)


def _record(store: Store, settings: Settings, row_id: int, outcome: Outcome) -> DeliveryState:
    """Store an attempt's outcome; the row's new state."""
    with store.session() as s:
        row = s.get(Hl7Result, row_id)
        if row is None:
            return DeliveryState.FAILED
        row.attempts += 1
        row.leased_by = ""
        row.ack_code, row.http_status = outcome.ack_code, outcome.http_status
        if outcome.ok:
            row.state, row.sent_at, row.last_error = DeliveryState.SENT, utcnow(), ""
            audit(s, "system", "hl7.result.sent", target=f"hl7_result:{row.id}", destination=row.destination)
            return row.state
        row.last_error = outcome.error[:2000]
        if outcome.permanent or row.attempts >= settings.dispatch.max_attempts:
            row.state = DeliveryState.FAILED
            audit(s, "system", "hl7.result.failed", target=f"hl7_result:{row.id}", error=outcome.error[:500])
            log.error("hl7 result %d to %s failed for good: %s", row.id, row.destination, outcome.error)
        else:
            row.next_attempt_at = utcnow() + backoff(settings, row.attempts)
            log.warning(
                "hl7 result %d to %s failed (attempt %d), retrying: %s",
                row.id,
                row.destination,
                row.attempts,
                outcome.error,
            )
        return row.state


def send_due(store: Store, settings: Settings, now: dt.datetime | None = None) -> int:
    """Send every due row once; the number sent."""
    sent = 0
    for row_id in _claim(store, settings, now or utcnow()):
        try:
            outcome = _attempt(store, settings, row_id)
        except Exception as exc:  # a bug must not stop the other rows: the row is retried, with the reason
            log.exception("hl7 result %d", row_id)
            outcome = Outcome(False, f"{type(exc).__name__}: {exc}")
        sent += _record(store, settings, row_id, outcome) == DeliveryState.SENT
    return sent


def schedule(scheduler: BaseScheduler, store: Store, settings: Settings, results: bool, orders: bool) -> None:
    """Send HL7 results every [dispatch] interval_seconds; hand pending orders to the fetch stage every 30 s."""
    if results and settings.hl7.destinations:
        scheduler.add_job(
            send_due, "interval", args=[store, settings], seconds=settings.dispatch.interval_seconds, id="hl7-results"
        )
    if orders and settings.hl7.enabled:
        scheduler.add_job(hand_pending, "interval", args=[store, settings], seconds=30, id="hl7-orders")
