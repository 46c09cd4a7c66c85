"""The worklist: notice complete studies, queue one job each, and run jobs exactly once.

DICOM has no end-of-study signal, so a study is complete once no new instance arrived for
``stable_seconds`` (per calling AE overrides in ``stable_seconds_by_aet``; ``dxnode complete``
forces it). Several runners, in one or several processes or machines sharing a database, claim
jobs atomically: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, a conditional UPDATE inside
SQLite's single-writer ``BEGIN IMMEDIATE`` transaction on SQLite. A study still arriving (an open
association that sent to it, an instance in flight: see ``StudyActivity``) is never judged stable.

A running job's heartbeat is refreshed between stages and batches. Every node's periodic
``recover`` re-queues jobs of a dead process of its own host at once (pid gone) and those of any
host whose heartbeat is older than ``running_timeout_seconds``. Attempts count at claim time, so a
job whose worker dies ``max_attempts`` times ends ``failed``; failed attempts are retried after a
backoff, and permanent failures end the job at once: an exception with ``permanent = True``, or
one that the same input raises again (``classify``: bad data or a bug, e.g. a ValueError from a
dataset). A job's recorded reason is one line naming the stage, never a raw exception.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import CursorResult, Result, case, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dxnode import metrics
from dxnode.config import Settings
from dxnode.states import PRIORITY_ORDER, JobState, Priority
from dxnode.store import Job, Store, Study, audit, utcnow
from dxnode.worklist.priority import rule_priority
from dxnode.worklist.ups_view import record_change

log = logging.getLogger("dxnode.worklist.queue")


class JobBody(Protocol):
    """A job body: runs the pipeline for job_id and returns its final state, DONE or SKIPPED.

    Raising marks the attempt failed (retried after a backoff until worklist.max_attempts; at once
    failed when the exception has ``permanent = True``). heartbeat is always passed: call it with
    the stage name at stage boundaries and between batches (it raises Stopping or TakenOver)."""

    def __call__(self, store: Store, settings: Settings, job_id: int, heartbeat: Callable[[str], None]) -> JobState: ...


class Stopping(BaseException):
    """Raised by a heartbeat when the process is stopping: the job is re-queued, not failed.

    A BaseException, so per-instance ``except Exception`` blocks in the job body let it through."""


class TakenOver(BaseException):
    """Raised by a heartbeat when the job is no longer this worker's (re-queued by a sweep)."""


class JobFailure(Exception):
    """A failed attempt, classified at the stage boundary: its message is the job's recorded reason.

    permanent: the same input fails again (bad data, a bug), so the job is not retried."""

    def __init__(self, stage: str, reason: str, permanent: bool) -> None:
        super().__init__(f"{stage}: {one_line(reason)}")
        self.stage, self.permanent = stage, permanent


# What a retry reads the same input into again: bad input data (pydicom, highdicom and NumPy raise
# ValueError, TypeError, KeyError, ...) or a bug. Everything else (disk, database, network, memory,
# a library's RuntimeError) may pass and is retried after a backoff.
DETERMINISTIC: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    AttributeError,
    LookupError,
    ArithmeticError,
    AssertionError,
    NotImplementedError,
)
TRANSIENT: tuple[type[BaseException], ...] = (OSError, MemoryError, SQLAlchemyError)


def one_line(text: str, limit: int = 500) -> str:
    """The first line of a message, whitespace collapsed, at most limit characters."""
    lines = str(text).strip().splitlines()
    return " ".join(lines[0].split())[:limit] if lines else ""


def classify(exc: Exception, stage: str, what: str = "") -> JobFailure:
    """The failure an exception raised at stage stands for; what says what the stage was doing.

    A failure that says itself whether it is permanent (a ``permanent`` attribute) keeps its message;
    any other is named by its type and classified by DETERMINISTIC and TRANSIENT."""
    if isinstance(exc, JobFailure):
        return exc
    declared = getattr(exc, "permanent", None)
    text = one_line(str(exc))
    if declared is not None:
        message, permanent = text, bool(declared)
    else:
        message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        permanent = isinstance(exc, DETERMINISTIC) and not isinstance(exc, TRANSIENT)
    return JobFailure(stage, f"{what}: {message}" if what else message, permanent)


class StudyActivity(Protocol):
    """What the receiver knows that the database does not yet: studies still arriving."""

    def busy_studies(self) -> set[str]:
        """Study UIDs with an instance in flight or an open association that sent to them."""
        ...

    def released_at(self) -> dict[str, dt.datetime]:
        """When the last association that sent to each study was released (recent ones only)."""
        ...


def _start_ticks(pid: int) -> str:
    """The start time of a process in clock ticks since boot ('' when unknown: not Linux, no such pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else ""


def worker_id(pid: int | None = None) -> str:
    """host:pid/start of a process (this one by default), recorded on the jobs and leases it takes.

    The start time tells a process from a later one under the same pid (containers restart as pid 1)."""
    pid = pid or os.getpid()
    start = _start_ticks(pid)
    return f"{socket.gethostname()}:{pid}" + (f"/{start}" if start else "")


def process_gone(worker: str) -> bool:
    """True when worker names a process of this host that no longer runs (other hosts: never known)."""
    host, _, rest = worker.rpartition(":")
    pid_text, _, start = rest.partition("/")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    now = _start_ticks(pid)
    if Path(f"/proc/{pid}/stat").exists() and not now:
        return True  # a zombie: exited, not yet reaped
    return bool(start and now and now != start)  # the pid now belongs to a later process


# A job whose node keeps dying under it (not counted as attempts) still ends failed after
# this many times max_attempts such deaths: no crash loop lasts for ever.
CRASH_LOOP_FACTOR = 3


def retry_delay(settings: Settings, attempts: int) -> dt.timedelta:
    """Wait before retrying a job after its attempts-th failed attempt."""
    w = settings.worklist
    return dt.timedelta(seconds=min(w.retry_backoff_max_seconds, w.retry_backoff_seconds * 2 ** max(0, attempts - 1)))


def stable_after(settings: Settings, calling_aet: str) -> dt.timedelta:
    """How long a study from this calling AE must be quiet before it is complete."""
    seconds = settings.worklist.stable_seconds_by_aet.get(calling_aet, settings.worklist.stable_seconds)
    return dt.timedelta(seconds=seconds)


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (an UPDATE's result is always a CursorResult; Session.execute is typed wider)."""
    assert isinstance(result, CursorResult)
    return result.rowcount


def _queue(
    session: Session, settings: Settings, study: Study, seen: dt.datetime, actor: str, action: str
) -> int | None:
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
    waiting = session.scalar(
        select(Job.id).where(Job.study_id == study.id, Job.state == JobState.QUEUED, Job.routed_model == "")
    )
    if waiting is not None:
        return waiting  # the queued job will read every instance (and route) when it runs
    job_id = queued_job(session, study.id, priority=rule_priority(settings, session, study))
    audit(session, actor, action, target=f"job:{job_id}", study_id=study.id)
    return job_id


def queued_job(session: Session, study_id: int, routed_model: str = "", priority: Priority | None = None) -> int:
    """The study's waiting job for routed_model, or a new queued one: every job is made here.

    A queued job reads every instance when it runs. "" is an unrouted job, which routes the study
    when it runs (the receiver and the sweep queue only those: a job queued for one model would miss
    the others); routing queues one per further [[models]] entry the study matches. priority None:
    that of the study's newest job (so routed jobs keep their study's), else MEDIUM; a waiting job
    is only ever raised."""
    if priority is None:
        newest = session.scalar(select(Job.priority).where(Job.study_id == study_id).order_by(Job.id.desc()).limit(1))
        priority = Priority(newest) if newest is not None else Priority.MEDIUM
    waiting = session.scalar(
        select(Job).where(Job.study_id == study_id, Job.state == JobState.QUEUED, Job.routed_model == routed_model)
    )
    if waiting is not None:
        if priority.rank < Priority(waiting.priority).rank:
            waiting.priority = priority
        return int(waiting.id)
    job = Job(study_id=study_id, state=JobState.QUEUED, routed_model=routed_model, priority=priority)
    session.add(job)
    session.flush()
    record_change(session, job.id, created=True)
    return job.id


def queue_retrieved(
    session: Session,
    study_instance_uid: str,
    actor: str,
    priority: Priority,
    routed_model: str = "",
    destinations: list[str] | None = None,
) -> int:
    """Queue a study a fetch has just retrieved, at once (no quiet time); returns the job id.
    destinations: the only [[destinations]] its outputs go to (None or []: as configured).

    A study with no instance since its newest job (the same study fetched again) gets no new job:
    that job's id comes back (its priority raised while it waits), so nothing is analysed or sent twice."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise LookupError(f"no study with Study Instance UID {study_instance_uid!r}")
    covered = study.queued_through is not None and study.queued_through >= study.last_received_at
    if covered and not study.ignored:
        newest = session.scalar(
            select(Job)
            .where(Job.study_id == study.id, Job.routed_model == routed_model, Job.state != JobState.FAILED)
            .order_by(Job.id.desc())
            .limit(1)
        )
        if newest is not None:
            if newest.state == JobState.QUEUED and priority.rank < Priority(newest.priority).rank:
                newest.priority = priority
            return int(newest.id)
    study.ignored = False
    study.queued_through = study.last_received_at
    waiting = session.scalar(
        select(Job.id).where(Job.study_id == study.id, Job.state == JobState.QUEUED, Job.routed_model == routed_model)
    )
    job_id = queued_job(session, study.id, routed_model, priority)
    job = session.get(Job, job_id)
    assert job is not None
    if destinations and (job_id != waiting or job.destinations):
        # a waiting job for every configured destination keeps them (sources/reuse.py adds the named ones)
        job.destinations = sorted(set(job.destinations or []) | set(destinations))
    audit(session, actor, "job.queued", target=f"job:{job_id}", study_id=study.id, priority=priority)
    return job_id


def rank_of(column: Any) -> Any:
    """SQL for a priority column's rank (0 = STAT): claims order by it, then by age."""
    return case({p.value: p.rank for p in PRIORITY_ORDER}, value=column, else_=Priority.MEDIUM.rank)


def sweep(
    store: Store, settings: Settings, now: dt.datetime | None = None, activity: StudyActivity | None = None
) -> list[int]:
    """Queue a job for every study that went stable since its last job; return the job ids.

    With the receiver's activity, a study still arriving is skipped, and quiet time counts from
    the later of its last committed instance and the release of the last association that sent to it."""
    now = now or utcnow()
    shortest = min([settings.worklist.stable_seconds, *settings.worklist.stable_seconds_by_aet.values()])
    busy = activity.busy_studies() if activity is not None else set()
    released = activity.released_at() if activity is not None else {}
    with store.session() as session:
        candidates = session.execute(
            select(Study.id, Study.study_instance_uid, Study.calling_aet, Study.last_received_at)
            .where(Study.ignored.is_(False))
            .where(Study.last_received_at <= now - dt.timedelta(seconds=shortest))
            .where(or_(Study.queued_through.is_(None), Study.queued_through < Study.last_received_at))
        ).all()
    queued: list[int] = []
    for study_id, study_uid, calling_aet, last in candidates:
        if study_uid in busy:
            continue
        quiet_from = max(last, released.get(study_uid, last))
        if quiet_from > now - stable_after(settings, calling_aet):
            continue
        with store.session() as session:
            study = session.get(Study, study_id)
            if study is None:
                continue
            job_id = _queue(session, settings, study, last, "system", "job.queued")
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


def set_study_ignored(session: Session, study_instance_uid: str, ignored: bool, actor: str, source: str = "") -> None:
    """Mark a study ignored (never queued) or not, audited; LookupError if it is unknown."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise LookupError(f"no study with Study Instance UID {study_instance_uid!r}")
    study.ignored = ignored
    audit(session, actor, "study.ignore" if ignored else "study.unignore", target=study_instance_uid, source=source)


def requeue_job(session: Session, job_id: int, actor: str, source: str = "") -> int:
    """Run a job's study again. A failed or skipped job goes back to the queue (attempts reset);
    a done job keeps its results visible and a new job is queued for the study. Returns the queued job's id."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.state in (JobState.RUNNING, JobState.QUEUED):
        raise ValueError(f"job {job_id} is {job.state}")
    if job.state == JobState.DONE:
        waiting = queued_job(session, job.study_id)
        audit(session, actor, "job.requeue", target=f"job:{job_id}", source=source, queued=f"job:{waiting}")
        return waiting
    job.state, job.attempts, job.error, job.lost, job.not_before = JobState.QUEUED, 0, "", 0, None
    record_change(session, job_id)
    audit(session, actor, "job.requeue", target=f"job:{job_id}", source=source)
    return job_id


def cancel_queued(session: Session, job_id: int, actor: str, reason: str, source: str = "") -> bool:
    """End a job that is still waiting (queued) as failed with reason, audited; False once it has started or ended."""
    now = utcnow()
    taken = rowcount(
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(state=JobState.FAILED, error=one_line(reason), finished_at=now, updated_at=now, not_before=None)
            .execution_options(synchronize_session=False)
        )
    )
    if taken != 1:
        return False
    record_change(session, job_id)
    audit(session, actor, "job.cancel", target=f"job:{job_id}", source=source, reason=one_line(reason))
    return True


def take_due(
    session: Session, dialect: str, table: Any, waiting: Any, values: dict[str, Any], *where: Any
) -> int | None:
    """Atomically move the most urgent, then oldest, due row of table (Job, FetchRequest) out of state
    waiting, setting values; its id, or None. The one claim protocol: SKIP LOCKED on PostgreSQL, and a
    conditional UPDATE that only one claimant wins everywhere."""
    now = values["updated_at"]
    q = (
        select(table.id)
        .where(table.state == waiting, or_(table.not_before.is_(None), table.not_before <= now), *where)
        .order_by(rank_of(table.priority), table.id)
        .limit(1)
    )
    if dialect == "postgresql":
        q = q.with_for_update(skip_locked=True)
    row_id = session.scalar(q)
    if row_id is None:
        return None
    taken = rowcount(
        session.execute(
            update(table)
            .where(table.id == row_id, table.state == waiting)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    )
    return int(row_id) if taken == 1 else None


def claim(store: Store, worker: str | None = None, now: dt.datetime | None = None, supervisor: str = "") -> int | None:
    """Atomically take the most urgent, then oldest, due queued job for this worker (counting the
    attempt); None if none.

    supervisor: the worker id of the process that started this worker, if any (see recover)."""
    worker = worker or worker_id()
    now = now or utcnow()
    with store.session() as session:
        values = {
            "state": JobState.RUNNING,
            "attempts": Job.attempts + 1,
            "worker": worker,
            "started_at": now,
            "updated_at": now,
            "heartbeat_at": now,
            "stage": "claimed",
            "not_before": None,
            "supervisor": supervisor,
        }
        job_id = take_due(session, store.dialect, Job, JobState.QUEUED, values)
        if job_id is None:
            return None
        record_change(session, job_id)
        audit(session, worker, "job.state", target=f"job:{job_id}", state=JobState.RUNNING)
        return job_id


def beat(store: Store, job_id: int, worker: str, stage: str) -> bool:
    """Refresh a running job's heartbeat and stage; False when the job is no longer this worker's."""
    now = utcnow()
    with store.session() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == worker)
            .values(heartbeat_at=now, updated_at=now, stage=stage[:32])
            .execution_options(synchronize_session=False)
        )
        return rowcount(result) == 1


class Heartbeat:
    """The heartbeat a job body calls with its stage name; raises Stopping once the process stops."""

    def __init__(
        self, store: Store, job_id: int, worker: str, stop: threading.Event | None = None, every: float = 1.0
    ) -> None:
        self.store, self.job_id, self.worker, self.stop, self.every = store, job_id, worker, stop, every
        self.stage, self.last = "claimed", time.monotonic()

    def __call__(self, stage: str) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopping(stage)
        now = time.monotonic()
        if stage == self.stage and now - self.last < self.every:
            return  # between batches of one stage: at most one write a second
        if not beat(self.store, self.job_id, self.worker, stage):
            raise TakenOver(f"job {self.job_id} is no longer run by {self.worker}")
        self.stage, self.last = stage, now


def finish(
    store: Store,
    settings: Settings,
    job_id: int,
    state: JobState | None,
    error: str = "",
    permanent: bool = False,
    worker: str | None = None,
) -> JobState:
    """Record the end of an attempt: done/skipped, or failed (retried after a backoff until
    max_attempts; at once failed when permanent). With worker, only while the job is still its own."""
    with store.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        if worker is not None and (job.state != JobState.RUNNING or job.worker != worker):
            log.warning(
                "job %d was taken over (now %s by %s): this attempt's end is not recorded",
                job_id,
                job.state,
                job.worker,
            )
            return job.state
        if state is None:
            if permanent or job.attempts >= settings.worklist.max_attempts:
                state = JobState.FAILED
            else:
                state = JobState.QUEUED
                job.not_before = utcnow() + retry_delay(settings, job.attempts)
            job.error = error
        job.state = state
        job.finished_at = utcnow() if state != JobState.QUEUED else None
        record_change(session, job_id)
        audit(session, job.worker or "system", "job.state", target=f"job:{job_id}", state=state, error=error[:500])
    if state != JobState.QUEUED:
        metrics.JOBS_FINISHED.labels(state=state).inc()
    return state


def release(store: Store, job_id: int, worker: str, why: str) -> bool:
    """Put a job this worker stopped on purpose (shutdown) back in the queue, not counting the attempt."""
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING or job.worker != worker:
            return False
        job.state, job.attempts, job.not_before = JobState.QUEUED, max(0, job.attempts - 1), None
        job.error = f"re-queued at stage {job.stage or 'start'}: {why}"
        record_change(session, job_id)
        audit(session, worker, "job.state", target=f"job:{job_id}", state=JobState.QUEUED, reason=why)
    log.info("job %d re-queued: %s", job_id, why)
    return True


def run_one(
    store: Store,
    settings: Settings,
    body: JobBody,
    worker: str | None = None,
    stop: threading.Event | None = None,
    supervisor: str = "",
) -> int | None:
    """Claim and run one job; return its id, or None if nothing was due."""
    worker = worker or worker_id()
    job_id = claim(store, worker, supervisor=supervisor)
    if job_id is None:
        return None
    heartbeat = Heartbeat(store, job_id, worker, stop)
    try:
        state = JobState(body(store, settings, job_id, heartbeat=heartbeat))
    except Stopping as exc:
        release(store, job_id, worker, f"the node stopped during stage {exc}")
        return job_id
    except TakenOver as exc:
        log.warning("%s", exc)
        return job_id
    except Exception as exc:  # a job failure must never stop the runner
        failure = classify(exc, heartbeat.stage)  # a body that did not classify: the last stage it reported
        log.error("job %d failed%s: %s", job_id, " (permanent)" if failure.permanent else "", failure)
        log.debug("job %d traceback:\n%s", job_id, traceback.format_exc())
        final = finish(store, settings, job_id, None, error=str(failure), permanent=failure.permanent, worker=worker)
        log.info("job %d -> %s", job_id, final)
        return job_id
    finish(store, settings, job_id, state, worker=worker)
    log.info("job %d -> %s", job_id, state)
    return job_id


def drain(store: Store, settings: Settings, body: JobBody, worker: str | None = None, limit: int = 1000) -> int:
    """Run due jobs until none is left (or limit); return how many ran."""
    ran = 0
    while ran < limit and run_one(store, settings, body, worker) is not None:
        ran += 1
    return ran


def lost(store: Store, settings: Settings, job_id: int, worker: str, why: str, counted: bool = True) -> str | None:
    """Record that a running job's worker stopped: retried after a backoff, or failed once it has
    used max_attempts. Not counted (the whole node stopped, its supervisor with it): the attempt is
    given back, and only a crash loop (3 x max_attempts such stops) fails the job.
    Returns the new state, or None if the job was not running under that worker."""
    now = utcnow()
    with store.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING or job.worker != worker:
            return None
        times, stage = job.lost + 1, job.stage or "start"
        values: dict[str, Any] = {"lost": times, "updated_at": now}
        if not counted:
            values["attempts"] = max(0, job.attempts - 1)
        limit = settings.worklist.max_attempts
        if (counted and job.attempts >= limit) or times >= CRASH_LOOP_FACTOR * limit:
            values.update(
                state=JobState.FAILED,
                finished_at=now,
                error=(
                    f"the worker stopped {times} time{'s' if times != 1 else ''} while running this job "
                    f"(last stage reached: {stage}; last time: {why})"
                ),
            )
        else:
            values.update(
                state=JobState.QUEUED,
                not_before=now + retry_delay(settings, job.attempts),
                error=f"its worker {worker} stopped at stage {stage} ({why}); retried",
            )
        changed = rowcount(
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == worker)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        )
        if changed != 1:
            return None
        record_change(session, job_id)
        audit(session, "system", "job.state", target=f"job:{job_id}", state=values["state"], reason=why)
    log.warning("job %d: worker %s stopped (%s) -> %s", job_id, worker, why, values["state"])
    if values["state"] == JobState.FAILED:
        metrics.JOBS_FINISHED.labels(state=JobState.FAILED).inc()
    return str(values["state"])


def worker_lost(store: Store, settings: Settings, worker: str, why: str) -> int:
    """Handle every job a stopped worker process was running; return how many."""
    with store.session() as session:
        ids = list(session.scalars(select(Job.id).where(Job.state == JobState.RUNNING, Job.worker == worker)))
    return sum(lost(store, settings, job_id, worker, why) is not None for job_id in ids)


def release_worker(store: Store, worker: str, why: str) -> int:
    """Re-queue, without counting the attempt, the jobs of a worker stopped on purpose (shutdown)."""
    with store.session() as session:
        ids = list(session.scalars(select(Job.id).where(Job.state == JobState.RUNNING, Job.worker == worker)))
    return sum(release(store, job_id, worker, why) for job_id in ids)


def recover(
    store: Store, settings: Settings, now: dt.datetime | None = None, exclude: frozenset[str] = frozenset()
) -> int:
    """Hand back running jobs whose worker is gone: a dead process of this host at once, any host's
    once its heartbeat is older than running_timeout_seconds. A job process that died together with
    its supervisor (the whole node was killed) does not use up an attempt. Workers in exclude are left alone
    (a supervisor handles its own children). Returns how many jobs were handed back."""
    stale_before = (now or utcnow()) - dt.timedelta(seconds=settings.worklist.running_timeout_seconds)
    with store.session() as session:
        running = session.execute(
            select(Job.id, Job.worker, Job.supervisor, Job.heartbeat_at, Job.updated_at).where(
                Job.state == JobState.RUNNING
            )
        ).all()
    handed = 0
    for job_id, worker, supervisor, heartbeat, updated in running:
        if worker in exclude:
            continue
        counted = True
        if process_gone(worker):
            why = "its process is gone"
            if supervisor and process_gone(supervisor):
                why, counted = "the whole node stopped (its supervisor is gone too)", False
        elif (heartbeat or updated) < stale_before:
            why = f"no heartbeat for {settings.worklist.running_timeout_seconds:g} s"
        else:
            continue
        handed += lost(store, settings, job_id, worker, why, counted) is not None
    if handed:
        log.warning("handed back %d job(s) of stopped workers", handed)
    return handed
