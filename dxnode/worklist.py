"""The worklist: notice complete studies, queue one job each, and run jobs exactly once.

DICOM has no end-of-study signal, so a study is complete once no new instance arrived for
``stable_seconds`` (per calling AE overrides in ``stable_seconds_by_aet``; ``dxnode complete``
forces it). Several runners, in one or several processes or machines sharing a database, claim
jobs atomically: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, a conditional UPDATE inside
SQLite's single-writer ``BEGIN IMMEDIATE`` transaction on SQLite. Jobs left ``running`` by a crashed
process of this host are re-queued at start; a job whose worker went silent for
``running_timeout_seconds`` is re-queued by any node.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

from sqlalchemy import CursorResult, Result, or_, select, update
from sqlalchemy.orm import Session

from dxnode import metrics
from dxnode.config import Settings
from dxnode.store import Job, Store, Study, audit, utcnow

log = logging.getLogger("dxnode.worklist")

# A job body: runs the pipeline for job_id and returns its final state, "done" or "skipped".
# Raising marks the attempt failed (re-queued until worklist.max_attempts).
JobHandler = Callable[[Store, Settings, int], str]


def worker_id() -> str:
    """host:pid of this process, recorded on the jobs it claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


def stable_after(settings: Settings, calling_aet: str) -> dt.timedelta:
    """How long a study from this calling AE must be quiet before it is complete."""
    seconds = settings.worklist.stable_seconds_by_aet.get(calling_aet, settings.worklist.stable_seconds)
    return dt.timedelta(seconds=seconds)


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (an UPDATE's result is always a CursorResult; Session.execute is typed wider)."""
    assert isinstance(result, CursorResult)
    return result.rowcount


def _queue(session: Session, study: Study, seen: dt.datetime, actor: str, action: str) -> int | None:
    """Mark the study queued through ``seen`` and add a job unless one is already waiting."""
    claimed = rowcount(
        session.execute(
            update(Study)
            .where(Study.id == study.id, Study.last_received_at == seen)
            .where(or_(Study.queued_through.is_(None), Study.queued_through < seen))
            .values(queued_through=seen)
            .execution_options(synchronize_session=False)
        )
    )
    if claimed != 1:
        return None  # another sweeper got it, or a new instance arrived meanwhile
    waiting = session.scalar(select(Job.id).where(Job.study_id == study.id, Job.state == "queued"))
    if waiting is not None:
        return waiting  # the queued job will read every instance when it runs
    job_id = queued_job(session, study.id)
    audit(session, actor, action, target=f"job:{job_id}", study_id=study.id)
    return job_id


def queued_job(session: Session, study_id: int) -> int:
    """The study's waiting job, or a new queued one (a queued job reads every instance when it runs)."""
    waiting = session.scalar(select(Job.id).where(Job.study_id == study_id, Job.state == "queued"))
    if waiting is not None:
        return int(waiting)
    job = Job(study_id=study_id, state="queued")
    session.add(job)
    session.flush()
    return job.id


def sweep(store: Store, settings: Settings, now: dt.datetime | None = None) -> list[int]:
    """Queue a job for every study that went stable since its last job; return the job ids."""
    now = now or utcnow()
    shortest = min([settings.worklist.stable_seconds, *settings.worklist.stable_seconds_by_aet.values()])
    with store.session() as session:
        candidates = session.execute(
            select(Study.id, Study.calling_aet, Study.last_received_at)
            .where(Study.ignored.is_(False))
            .where(Study.last_received_at <= now - dt.timedelta(seconds=shortest))
            .where(or_(Study.queued_through.is_(None), Study.queued_through < Study.last_received_at))
        ).all()
    queued: list[int] = []
    for study_id, calling_aet, last in candidates:
        if last > now - stable_after(settings, calling_aet):
            continue
        with store.session() as session:
            study = session.get(Study, study_id)
            if study is None:
                continue
            job_id = _queue(session, study, last, "system", "job.queued")
        if job_id is not None:
            queued.append(job_id)
    if queued:
        log.info("queued %d job(s) for stable studies", len(queued))
    return queued


def requeue_study(
    session: Session, study_instance_uid: str, actor: str, action: str = "study.requeue", source: str = ""
) -> int:
    """Queue a study now, stable or not (force-complete, re-run); returns the job id."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise LookupError(f"no study with Study Instance UID {study_instance_uid!r}")
    study.ignored = False
    study.queued_through = study.last_received_at
    job_id = queued_job(session, study.id)
    audit(session, actor, action, target=f"job:{job_id}", source=source, study_id=study.id)
    return job_id


def requeue_job(session: Session, job_id: int, actor: str, source: str = "") -> int:
    """Run a job's study again. A failed or skipped job goes back to the queue (attempts reset);
    a done job keeps its results visible and a new job is queued for the study. Returns the queued job's id."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.state in ("running", "queued"):
        raise ValueError(f"job {job_id} is {job.state}")
    if job.state == "done":
        waiting = queued_job(session, job.study_id)
        audit(session, actor, "job.requeue", target=f"job:{job_id}", source=source, queued=f"job:{waiting}")
        return waiting
    job.state, job.attempts, job.error = "queued", 0, ""
    audit(session, actor, "job.requeue", target=f"job:{job_id}", source=source)
    return job_id


def claim(store: Store, worker: str | None = None) -> int | None:
    """Atomically take the oldest queued job for this worker; None when the queue is empty."""
    worker = worker or worker_id()
    with store.session() as session:
        q = select(Job.id).where(Job.state == "queued").order_by(Job.id).limit(1)
        if store.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        job_id = session.scalar(q)
        if job_id is None:
            return None
        now = utcnow()
        taken = rowcount(
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(state="running", attempts=Job.attempts + 1, worker=worker, started_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            )
        )
        if taken != 1:
            return None
        audit(session, worker, "job.state", target=f"job:{job_id}", state="running")
        return job_id


def finish(store: Store, settings: Settings, job_id: int, state: str | None, error: str = "") -> str:
    """Record the end of an attempt: done/skipped, or failed (re-queued until max_attempts)."""
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        if state is None:
            state = "failed" if job.attempts >= settings.worklist.max_attempts else "queued"
            job.error = error
        job.state = state
        job.finished_at = utcnow() if state != "queued" else None
        audit(session, job.worker or "system", "job.state", target=f"job:{job_id}", state=state, error=error[:500])
    if state != "queued":
        metrics.JOBS_FINISHED.labels(state=state).inc()
    return state


def run_one(store: Store, settings: Settings, handler: JobHandler, worker: str | None = None) -> int | None:
    """Claim and run one job; return its id, or None if nothing was queued."""
    job_id = claim(store, worker)
    if job_id is None:
        return None
    try:
        state = handler(store, settings, job_id)
    except Exception as exc:  # a job failure must never stop the runner
        log.error("job %d failed: %s", job_id, exc)
        log.debug("job %d traceback:\n%s", job_id, traceback.format_exc())
        final = finish(store, settings, job_id, None, error=f"{type(exc).__name__}: {exc}")
        log.info("job %d -> %s", job_id, final)
        return job_id
    finish(store, settings, job_id, state)
    log.info("job %d -> %s", job_id, state)
    return job_id


def drain(store: Store, settings: Settings, handler: JobHandler, worker: str | None = None, limit: int = 1000) -> int:
    """Run queued jobs until the queue is empty (or limit); return how many ran."""
    ran = 0
    while ran < limit and run_one(store, settings, handler, worker) is not None:
        ran += 1
    return ran


def recover(store: Store, settings: Settings) -> int:
    """Re-queue jobs left running by dead processes of this host, or silent past the timeout."""
    host = socket.gethostname()
    stale_before = utcnow() - dt.timedelta(seconds=settings.worklist.running_timeout_seconds)
    requeued = 0
    with store.session() as session:
        for job in session.scalars(select(Job).where(Job.state == "running")):
            w_host, _, w_pid = job.worker.rpartition(":")
            dead_here = w_host == host and not _pid_alive(int(w_pid) if w_pid.isdigit() else -1)
            if dead_here or job.updated_at < stale_before:
                job.state = "queued"
                job.error = f"re-queued after its worker {job.worker} stopped"
                audit(session, "system", "job.state", target=f"job:{job.id}", state="queued", reason="recovered")
                requeued += 1
    if requeued:
        log.warning("re-queued %d job(s) left running by a stopped worker", requeued)
    return requeued


def _pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (and is not this one just restarted under it)."""
    if pid <= 0 or pid == os.getpid():
        return False  # recover() runs before this process claims anything
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
