"""Fetch requests: recorded by request_fetch, carried out by each source's own fetcher.

A request names a [[sources]] entry and what to look for (schemas.Identifiers). The fetcher of that
source (one scheduler job per source, so a source that is down holds up only its own requests)
claims it, queries the source (state ``querying``), refuses it when the studies have more than
``max_instances`` instances, retrieves study after study (``retrieving``, n of m instances; past
``max_mb`` it stops and refuses), and queues each study as soon as its retrieve completes, with the
request's priority (``queued``). A failure (no association, a failure or warning status, a timeout)
is recorded and retried after a backoff until ``max_attempts``; then the request is ``failed``
with the reason. The same study fetched twice gets no second job (worklist.queue.queue_retrieved); a
request naming destinations sends that job's results there too (sources/reuse.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dxnode.config import Settings, Source
from dxnode.receive.ingest import Ingest
from dxnode.schemas import Identifiers, RequestJob, RequestOut
from dxnode.sources import dimse, web
from dxnode.sources.found import FetchError, Found
from dxnode.sources.reuse import deliver_also
from dxnode.states import JobState, Priority, RequestState
from dxnode.store import FetchRequest, Instance, Job, Store, Study, audit, utcnow
from dxnode.worklist.queue import process_gone, queue_retrieved, rowcount, take_due, worker_id

log = logging.getLogger("dxnode.sources.fetch")

ENDED = (JobState.DONE, JobState.SKIPPED, JobState.FAILED)
PROGRESS_EVERY = 1.0  # seconds between writes of a retrieve's progress
STALE_AFTER = dt.timedelta(hours=1)  # a request of another host untouched this long lost its fetcher


def configured_source(settings: Settings, name: str) -> Source | None:
    """The [[sources]] entry of that name, or None."""
    return next((s for s in settings.sources if s.name == name), None)


def request_fetch(
    store: Store,
    settings: Settings,
    source: str,
    identifiers: Identifiers,
    priority: Priority = Priority.MEDIUM,
    model: str = "",
    destinations: Sequence[str] = (),
    actor: str = "system",
    address: str = "",
    wait_seconds: float = 0,
) -> int:
    """Record a request to fetch and analyse the studies identifiers name at source; returns its id.

    The source's fetcher carries it out (dxnode serve). wait_seconds: keep looking for a study that is
    not (yet) at the source for that long (an order that comes before its images). ValueError
    naming what is wrong for an unknown source, model or destination."""
    if configured_source(settings, source) is None:
        known = ", ".join(s.name for s in settings.sources) or "none configured"
        raise ValueError(f"no [[sources]] entry named {source!r} ({known})")
    if model and model not in {m.name for m in settings.models}:
        raise ValueError(f"no [[models]] entry named {model!r}")
    unknown = sorted(set(destinations) - {d.name for d in settings.destinations})
    if unknown:
        raise ValueError(f"no [[destinations]] entry named {', '.join(map(repr, unknown))}")
    now = utcnow()
    with store.session() as s:
        row = FetchRequest(
            source=source,
            identifiers=identifiers.model_dump(),
            model=model,
            destinations=list(destinations),
            priority=priority,
            state=RequestState.PENDING,
            actor=actor[:128],
            created_at=now,
            updated_at=now,
            wait_until=now + dt.timedelta(seconds=wait_seconds) if wait_seconds > 0 else None,
            total=0,
            retrieved=0,
            studies=[],
            job_ids=[],
            attempts=0,
            error="",
            worker="",
        )
        s.add(row)
        s.flush()
        audit(s, actor, "request.created", target=f"request:{row.id}", source=address, fetch=identifiers.describe())
        request_id = row.id
    log.info("request %d: fetch %s from %s (%s)", request_id, identifiers.describe(), source, priority)
    return request_id


def claim_request(store: Store, source: str, worker: str, now: dt.datetime | None = None) -> int | None:
    """Atomically take the most urgent, then oldest, due pending request of a source (counting the attempt)."""
    now = now or utcnow()
    values = {
        "state": RequestState.QUERYING,
        "attempts": FetchRequest.attempts + 1,
        "worker": worker,
        "updated_at": now,
    }
    with store.session() as s:
        return take_due(s, store.dialect, FetchRequest, RequestState.PENDING, values, FetchRequest.source == source)


def _set(store: Store, request_id: int, **values: Any) -> None:
    with store.session() as s:
        s.execute(update(FetchRequest).where(FetchRequest.id == request_id).values(updated_at=utcnow(), **values))


def _backoff(source: Source, attempts: int) -> dt.timedelta:
    delay = source.retry_backoff_seconds * 2 ** max(0, attempts - 1)
    return dt.timedelta(seconds=min(source.retry_backoff_max_seconds, delay))


def _failed(store: Store, request_id: int, source: Source | None, exc: FetchError) -> RequestState:
    """Record a failed attempt: retried after a backoff, or failed for good (permanent, out of attempts)."""
    with store.session() as s:
        row = s.get(FetchRequest, request_id)
        assert row is not None
        now = utcnow()
        waiting = getattr(exc, "waiting", False)
        if source is not None and not exc.permanent and (waiting or row.attempts < source.max_attempts):
            row.state, row.not_before = RequestState.PENDING, now + _backoff(source, 1 if waiting else row.attempts)
            if waiting:
                row.attempts = max(0, row.attempts - 1)  # looking for a study not there yet is no failure
        else:
            row.state, row.finished_at = RequestState.FAILED, now
        row.error, row.updated_at = str(exc)[:2000], now
        audit(s, "system", "request.state", target=f"request:{request_id}", state=row.state, error=str(exc)[:500])
        state = RequestState(row.state)
    log.warning("request %d: %s -> %s", request_id, exc, state)
    return state


class _NotYet(FetchError):
    """No study matches yet, and the request may still wait for one."""

    waiting = True


def _bytes_since(store: Store, study_uid: str, since: dt.datetime) -> int:
    """Bytes of the study's instances stored since a retrieve started (C-MOVE lands on the node's SCP)."""
    with store.session() as s:
        total = s.scalar(
            select(func.coalesce(func.sum(Instance.size_bytes), 0))
            .join(Study, Study.id == Instance.study_id)
            .where(Study.study_instance_uid == study_uid, Instance.received_at >= since)
        )
    return int(total or 0)


def _find(settings: Settings, source: Source, ids: Identifiers, wait_until: dt.datetime | None) -> list[Found]:
    """The studies to fetch; FetchError when none (a _NotYet while the request may wait)."""
    found = (web if source.kind == "dicomweb" else dimse).find_studies(settings, source, ids)
    found = [f for f in found if f.study_instance_uid]
    if found:
        return found
    if wait_until is not None and utcnow() < wait_until:
        raise _NotYet(
            f"no study for {ids.describe()} at {source.name} yet; looking again until {wait_until:%H:%M:%S} UTC"
        )
    raise FetchError(f"no study matches {ids.describe()} at source {source.name}", permanent=True)


def _retrieve(
    settings: Settings,
    source: Source,
    ingest: Ingest,
    found: Found,
    priority: Priority,
    progress: Callable[[int, int], None],
    over: Callable[[int], str],
) -> None:
    """One study into the node, by the source's kind and retrieve method."""
    if source.kind == "dicomweb":
        web.get_study(settings, source, ingest, found.study_instance_uid, found.instances, progress, over)
    elif source.retrieve == "get":
        dimse.get_study(settings, source, ingest, found.study_instance_uid, priority, progress, over)
    else:
        started = utcnow() - dt.timedelta(seconds=1)  # stored-at times come from this host's clock
        store = ingest.store
        dimse.move_study(
            settings,
            source,
            found.study_instance_uid,
            priority,
            progress,
            lambda: over(_bytes_since(store, found.study_instance_uid, started)),
        )


def run_request(store: Store, settings: Settings, ingest: Ingest, request_id: int) -> RequestState:
    """Carry out a claimed request: query, bound, retrieve and queue each study; returns its new state."""
    with store.session() as s:
        row = s.get(FetchRequest, request_id)
        assert row is not None
        name, ids, model, destinations = row.source, Identifiers(**row.identifiers), row.model, list(row.destinations)
        priority, wait_until = Priority(row.priority), row.wait_until
    source = configured_source(settings, name)
    if source is None:
        return _failed(store, request_id, None, FetchError(f"source {name!r} is no longer configured"))
    try:
        found = _find(settings, source, ids, wait_until)
        total = sum(f.instances for f in found)
        if total > source.max_instances:
            raise FetchError(
                f"refused: {len(found)} study(ies) with {total} instances, over [[sources]] {name} max_instances "
                f"{source.max_instances}",
                permanent=True,
            )
        studies = [f.study_instance_uid for f in found]
        _set(store, request_id, state=RequestState.RETRIEVING, total=total, retrieved=0, studies=studies, error="")
        jobs: list[int] = []
        done = spent = 0
        limit = int(source.max_mb * 2**20)
        for f in found:
            base, before, seen, last = done, spent, [0], [0.0]

            def progress(n: int, m: int, base: int = base, last: list[float] = last) -> None:
                now = time.monotonic()
                if n >= m or now - last[0] >= PROGRESS_EVERY:  # at most a write a second, and the last one
                    last[0] = now
                    _set(store, request_id, retrieved=base + min(n, m))

            def over(size: int, before: int = before, seen: list[int] = seen) -> str:
                seen[0] = size
                if before + size <= limit:
                    return ""
                return f"refused: the retrieve passed [[sources]] {name} max_mb {source.max_mb:g} (stopped)"

            _retrieve(settings, source, ingest, f, priority, progress, over)
            done, spent = done + f.instances, spent + seen[0]
            with store.session() as s:
                try:
                    job_id = queue_retrieved(
                        s, f.study_instance_uid, f"request:{request_id}", priority, model, destinations
                    )
                    job_id = deliver_also(s, settings, job_id, destinations, priority)
                except LookupError:
                    raise FetchError(f"the retrieve of study {f.study_instance_uid} stored no instance") from None
            jobs.append(job_id)
            _set(store, request_id, retrieved=done, job_ids=list(jobs))
            log.info("request %d: study %s retrieved, job %d queued", request_id, f.study_instance_uid, job_id)
    except FetchError as exc:
        return _failed(store, request_id, source, exc)
    except Exception as exc:  # a fetcher must never stop on one request: record it and retry
        log.exception("request %d failed", request_id)
        return _failed(store, request_id, source, FetchError(f"{type(exc).__name__}: {exc}"))
    _set(store, request_id, state=RequestState.QUEUED, finished_at=utcnow(), error="")
    with store.session() as s:
        audit(s, "system", "request.state", target=f"request:{request_id}", state=RequestState.QUEUED, jobs=jobs)
    return RequestState.QUEUED


def run_due(store: Store, settings: Settings, ingest: Ingest, source: str, limit: int = 100) -> int:
    """Carry out a source's due requests one after the other; returns how many ran."""
    worker = worker_id()
    recover_requests(store)
    ran = 0
    while ran < limit:
        request_id = claim_request(store, source, worker)
        if request_id is None:
            break
        run_request(store, settings, ingest, request_id)
        ran += 1
    return ran


def recover_requests(store: Store, now: dt.datetime | None = None) -> int:
    """Put back to pending the requests a stopped fetcher left querying or retrieving: those of a process
    of this host that is gone at once, any host's once untouched for STALE_AFTER; returns how many."""
    stale_before = (now or utcnow()) - STALE_AFTER
    with store.session() as s:
        running = s.execute(
            select(FetchRequest.id, FetchRequest.worker, FetchRequest.updated_at).where(
                FetchRequest.state.in_([RequestState.QUERYING, RequestState.RETRIEVING])
            )
        ).all()
        handed = 0
        for request_id, worker, updated in running:
            if not (process_gone(worker) or updated < stale_before):
                continue
            handed += rowcount(
                s.execute(
                    update(FetchRequest)
                    .where(FetchRequest.id == request_id, FetchRequest.worker == worker)
                    .where(FetchRequest.state.in_([RequestState.QUERYING, RequestState.RETRIEVING]))
                    .values(
                        state=RequestState.PENDING, error="interrupted: its fetcher stopped during the fetch; retried"
                    )
                    .execution_options(synchronize_session=False)
                )
            )
    return handed


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if value else None


def _shown(row: FetchRequest, jobs: list[RequestJob], job_errors: list[str]) -> tuple[RequestState, str, str]:
    """(state, progress in words, error) as a reader sees them: done once every job has ended."""
    state, error = RequestState(row.state), row.error
    if state == RequestState.QUEUED and jobs and all(j.state in ENDED for j in jobs):
        failed = [j for j in jobs if j.state == JobState.FAILED]
        if failed:
            return RequestState.FAILED, f"failed: job {failed[0].id} failed", (job_errors[0] if job_errors else "")
        return RequestState.DONE, f"done: {len(jobs)} job(s) ended", error
    words = {
        RequestState.PENDING: "waiting for its source" + (f" (retry after: {error})" if error else ""),
        RequestState.QUERYING: f"querying {row.source}",
        RequestState.RETRIEVING: f"retrieving {row.retrieved} of {row.total}",
        RequestState.QUEUED: f"queued {len(jobs)} job(s)",
        RequestState.FAILED: f"failed: {error}",
    }
    return state, words.get(state, str(state)), error


def request_out(session: Session, request_id: int) -> RequestOut | None:
    """A request as GET /api/requests/{id} and `dxnode fetch` show it, or None."""
    row = session.get(FetchRequest, request_id)
    if row is None:
        return None
    jobs, job_errors = [], []
    if row.job_ids:
        q = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id).where(Job.id.in_(row.job_ids))
        for job, uid in session.execute(q.order_by(Job.id)):
            links = {"study": f"/api/studies/{uid}", "results": f"/api/results?study_instance_uid={uid}"}
            jobs.append(
                RequestJob(id=job.id, study_instance_uid=uid, state=job.state, priority=job.priority, links=links)
            )
            if job.state == JobState.FAILED:
                job_errors.append(f"job {job.id}: {job.error}")
    state, progress, error = _shown(row, jobs, job_errors)
    return RequestOut(
        id=row.id,
        source=row.source,
        identifiers=Identifiers(**row.identifiers),
        model=row.model,
        destinations=list(row.destinations),
        priority=row.priority,
        state=state,
        progress=progress,
        retrieved=row.retrieved,
        total=row.total,
        studies=list(row.studies),
        jobs=jobs,
        attempts=row.attempts,
        error=error,
        actor=row.actor,
        created_at=_iso(row.created_at),
        updated_at=_iso(row.updated_at),
        finished_at=_iso(row.finished_at),
    )


def schedule(scheduler: Any, store: Store, settings: Settings, ingest: Ingest) -> None:
    """One fetcher per source, each its own scheduler job: a source that is down delays only its requests."""
    recovered = recover_requests(store)
    if recovered:
        log.warning("%d fetch request(s) interrupted by a stop are retried", recovered)
    for source in settings.sources:
        scheduler.add_job(
            run_due,
            "interval",
            args=[store, settings, ingest, source.name],
            seconds=settings.worklist.fetch_interval_seconds,
            id=f"fetch:{source.name}",
            max_instances=1,
            coalesce=True,
        )
