"""The purge: a finished study's received instances go, by age or to keep under the quota; its
results rows (findings, outputs, audit) go after their own period.

Crash-safe order, per study: one transaction marks its instance rows ``purging`` (after checking
again, under the write lock, that the study is finished); the files are removed and their folders
fsynced; a second transaction deletes the marked rows and audits the purge. A crash in between
leaves marked rows only, which ``reconcile.finish_interrupted`` completes. Results go the same
way: ``study.expiring`` is set, the output files removed, then the study row with everything of it.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field

from sqlalchemy import delete, select, update

from dxnode import metrics
from dxnode.config import Settings
from dxnode.lifecycle.candidates import Candidate, finished_studies, stored_bytes
from dxnode.lifecycle.files import remove_durably
from dxnode.store import Audit, Instance, Output, Store, Study, audit, utcnow
from dxnode.worklist.queue import rowcount

log = logging.getLogger("dxnode.lifecycle.purge")

MB = 1024 * 1024
_CHUNK = 500  # row ids per DELETE (SQLite's bound parameters)
BATCH = 100  # studies marked in one transaction and deleted in the next


@dataclass(frozen=True)
class Purged:
    """One study purged (or that a dry run would purge): why, and what went."""

    study_uid: str
    reason: str  # age, quota, space, results, reconcile
    instances: int
    bytes: int
    results: bool = False  # its results rows went too (results_keep_days)


@dataclass
class PurgeRun:
    """What one purge did (or would do)."""

    dry_run: bool = False
    purged: list[Purged] = field(default_factory=list)
    audit_rows: int = 0  # audit rows older than results_keep_days removed
    stored_before: int = 0
    stored_after: int = 0


def retention_on(settings: Settings) -> bool:
    """True when [retention] asks for any purge at all (the default asks for none)."""
    r = settings.retention
    return r.keep_days > 0 or r.max_storage_mb > 0 or r.results_keep_days > 0


def mark(store: Store, settings: Settings, study_ids: Collection[int], busy: Collection[str] = ()) -> list[int]:
    """Mark the instance rows of those studies that are still finished purging (one transaction);
    returns their ids."""
    with store.session() as s:
        found = finished_studies(s, settings, utcnow(), busy, study_ids=study_ids, lock=True)
        still = [c.study_id for c in found if c.instances]  # another purge may have taken some meanwhile
        if still:
            s.execute(
                update(Instance)
                .where(Instance.study_id.in_(still), Instance.purging.is_(False))
                .values(purging=True)
                .execution_options(synchronize_session=False)
            )
    return still


def finish(store: Store, settings: Settings, reasons: dict[int, str], actor: str) -> list[Purged]:
    """Remove the files of the marked rows of those studies (id -> reason), then those rows, audited:
    a purge's second half, and what the reconcile runs for a purge a crash interrupted."""
    ids = list(reasons)
    with store.session() as s:
        uids = dict(s.execute(select(Study.id, Study.study_instance_uid).where(Study.id.in_(ids))).all())
        rows = s.execute(
            select(Instance.id, Instance.study_id, Instance.file_path, Instance.size_bytes).where(
                Instance.study_id.in_(ids), Instance.purging.is_(True)
            )
        ).all()
    remove_durably(settings.data_dir, [r.file_path for r in rows], keep=[settings.data_dir / "incoming"])
    counts: dict[int, list[int]] = {sid: [0, 0] for sid in ids}
    for r in rows:
        counts[r.study_id][0] += 1
        counts[r.study_id][1] += r.size_bytes
    done = [Purged(uids.get(sid, f"study:{sid}"), reasons[sid], n, size) for sid, (n, size) in counts.items()]
    with store.session() as s:
        row_ids = [r.id for r in rows]
        for i in range(0, len(row_ids), _CHUNK):
            s.execute(delete(Instance).where(Instance.id.in_(row_ids[i : i + _CHUNK])))
        s.execute(update(Study).where(Study.id.in_(ids)).values(purged_at=utcnow()))
        for p in done:
            audit(s, actor, "study.purged", target=p.study_uid, reason=p.reason, instances=p.instances, bytes=p.bytes)
    for p in done:
        metrics.STUDIES_PURGED.labels(reason=p.reason).inc()
        log.debug("purged study %s (%s): %d instance(s), %d bytes", p.study_uid, p.reason, p.instances, p.bytes)
    return done


def purge_studies(
    store: Store, settings: Settings, chosen: list[tuple[Candidate, str]], actor: str, busy: Collection[str] = ()
) -> list[Purged]:
    """Purge the received instances of finished studies, BATCH at a time; those no longer finished are left."""
    done: list[Purged] = []
    for i in range(0, len(chosen), BATCH):
        reasons = {c.study_id: why for c, why in chosen[i : i + BATCH]}
        marked = mark(store, settings, list(reasons), busy)
        if marked:
            done += finish(store, settings, {sid: reasons[sid] for sid in marked}, actor)
    return done


def expire_study(
    store: Store, settings: Settings, c: Candidate, actor: str, busy: Collection[str] = ()
) -> Purged | None:
    """Remove a finished study whole: its received instances first, then its results; None when not finished."""
    pixels = purge_studies(store, settings, [(c, "results")], actor, busy) if c.instances else []
    if c.instances and not pixels:
        return None
    with store.session() as s:
        found = finished_studies(s, settings, utcnow(), busy, study_ids=[c.study_id], lock=True)
        if not found or found[0].instances:
            return None
        s.execute(update(Study).where(Study.id == c.study_id).values(expiring=True))
    finish_expiry(store, settings, c.study_id, actor)
    return Purged(c.study_uid, "results", sum(p.instances for p in pixels), sum(p.bytes for p in pixels), True)


def finish_expiry(store: Store, settings: Settings, study_id: int, actor: str) -> None:
    """Remove an expiring study's output files, then the study row and everything of it (audited)."""
    with store.session() as s:
        uid = s.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
        paths = list(s.scalars(select(Output.file_path).where(Output.study_id == study_id)))
    remove_durably(settings.data_dir, paths, keep=[settings.data_dir / "outputs"])
    with store.session() as s:
        s.execute(delete(Study).where(Study.id == study_id, Study.expiring.is_(True)))
        audit(s, actor, "study.results_expired", target=uid or f"study:{study_id}", outputs=len(paths))
    log.debug("removed the results of study %s (%d output file(s))", uid, len(paths))


def disk_free(settings: Settings) -> int:
    """Free bytes on the data dir's file system (0 when it cannot be read)."""
    try:
        return shutil.disk_usage(settings.data_dir).free
    except OSError:
        return 0


def _plan(
    settings: Settings, candidates: list[Candidate], stored: int, free: int, now: dt.datetime, by_age: bool
) -> list[tuple[Candidate, str]]:
    """The studies to purge and why: past keep_days, then the oldest finished while over the quota
    or short of free space."""
    r = settings.retention
    chosen: list[tuple[Candidate, str]] = []
    rest = [c for c in candidates if c.instances]
    if by_age and r.keep_days > 0:
        due = now - dt.timedelta(days=r.keep_days)
        chosen = [(c, "age") for c in rest if c.finished_at <= due]
        rest = [c for c in rest if c.finished_at > due]
    freed = sum(c.stored_bytes for c, _ in chosen)
    if r.max_storage_mb <= 0:
        return chosen
    quota = r.max_storage_mb * MB
    if stored - freed > quota * r.high_water_percent / 100:
        while rest and stored - freed > quota * r.low_water_percent / 100:
            c = rest.pop(0)
            chosen.append((c, "quota"))
            freed += c.stored_bytes
    need = (settings.node.min_free_mb + r.free_headroom_mb) * MB
    while rest and free + freed < need:
        c = rest.pop(0)
        chosen.append((c, "space"))
        freed += c.stored_bytes
    return chosen


def purge(
    store: Store,
    settings: Settings,
    actor: str,
    busy: Collection[str] = (),
    dry_run: bool = False,
    by_age: bool = True,
    now: dt.datetime | None = None,
) -> PurgeRun:
    """Purge what [retention] asks for now (by_age False: only the quota and free space); audited."""
    now = now or utcnow()
    r = settings.retention
    run = PurgeRun(dry_run=dry_run)
    with store.session() as s:
        candidates = finished_studies(s, settings, now, busy)
        run.stored_before = stored_bytes(s)
    chosen = _plan(settings, candidates, run.stored_before, disk_free(settings), now, by_age)
    expire: list[Candidate] = []
    if by_age and r.results_keep_days > 0:
        due = now - dt.timedelta(days=r.results_keep_days)
        expire = [c for c in candidates if c.finished_at <= due]
        gone = {c.study_id for c in expire}
        chosen = [(c, why) for c, why in chosen if c.study_id not in gone]
    if dry_run:
        run.purged += [Purged(c.study_uid, why, c.instances, c.stored_bytes) for c, why in chosen]
    else:
        run.purged += purge_studies(store, settings, chosen, actor, busy)
    for c in expire:
        done = (
            Purged(c.study_uid, "results", c.instances, c.stored_bytes, True)
            if dry_run
            else expire_study(store, settings, c, actor, busy)
        )
        if done is not None:
            run.purged.append(done)
    if by_age and r.results_keep_days > 0 and not dry_run:
        run.audit_rows = _expire_audit(store, now - dt.timedelta(days=r.results_keep_days), actor)
    run.stored_after = run.stored_before - sum(p.bytes for p in run.purged)
    return run


def _expire_audit(store: Store, before: dt.datetime, actor: str) -> int:
    """Delete audit rows older than before; the deletion itself is audited (a new row)."""
    with store.session() as s:
        n = rowcount(s.execute(delete(Audit).where(Audit.at < before)))
        if n:
            audit(s, actor, "audit.expired", rows=n, before=before.isoformat())
    return n


def needs_purge(store: Store, settings: Settings) -> bool:
    """With a quota: stored bytes above its high-water mark, or free disk below min_free_mb + headroom."""
    r = settings.retention
    if r.max_storage_mb <= 0:
        return False
    if disk_free(settings) < (settings.node.min_free_mb + r.free_headroom_mb) * MB:
        return True
    with store.session() as s:
        return stored_bytes(s) > r.max_storage_mb * MB * r.high_water_percent / 100
