"""Retention inside `dxnode serve`: the purge by age on an interval, the quota and free-space watch,
and the reconcile at start. One purge at a time in this process; the receiver's busy studies are spared."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import TYPE_CHECKING, Any

from dxnode.config import Settings
from dxnode.lifecycle.candidates import stored_bytes
from dxnode.lifecycle.purge import MB, PurgeRun, needs_purge, purge, retention_on
from dxnode.lifecycle.reconcile import Reconciled, finish_interrupted, scan
from dxnode.store import Store

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

    from dxnode.worklist.queue import StudyActivity

log = logging.getLogger("dxnode.lifecycle")


class Retention:
    """The node's purges: scheduled by age, on demand when the quota or the free space calls for it."""

    def __init__(self, store: Store, settings: Settings, activity: StudyActivity | None = None) -> None:
        self.store, self.settings, self.activity = store, settings, activity
        self._lock = threading.Lock()
        self._over = False  # still over the quota after the last purge (warned once)

    def _busy(self) -> set[str]:
        return self.activity.busy_studies() if self.activity is not None else set()

    def run(self, by_age: bool = True) -> PurgeRun | None:
        """One purge now (None when one is already running in this process)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            done = purge(self.store, self.settings, "system", self._busy(), by_age=by_age)
        finally:
            self._lock.release()
        if done.purged:
            log.info(
                "purged %d stud%s (%d MB); received instances now %d MB",
                len(done.purged),
                "y" if len(done.purged) == 1 else "ies",
                sum(p.bytes for p in done.purged) // MB,
                done.stored_after // MB,
            )
        return done

    def watch(self) -> None:
        """Purge when the quota's high-water mark or the free-space headroom is crossed; warn when
        what is left is still over the quota (studies in flight are never purged)."""
        if not needs_purge(self.store, self.settings):
            self._over = False
            return
        self.run(by_age=False)
        quota = self.settings.retention.max_storage_mb * MB
        with self.store.session() as s:
            stored = stored_bytes(s)
        over = stored > quota
        if over and not self._over:
            log.warning(
                "received instances hold %d MB, over the %d MB quota: the rest is not finished yet "
                "(queued or running jobs, undelivered results, studies still arriving)",
                stored // MB,
                quota // MB,
            )
        self._over = over

    def finish_interrupted(self) -> Reconciled:
        """Complete the purges a crash interrupted (at start, before the receiver opens)."""
        try:
            out = finish_interrupted(self.store, self.settings, "system")
        except OSError as exc:  # a file that cannot be removed must not keep the node from receiving
            log.error("could not finish the interrupted purges: %s (run `dxnode purge --reconcile`)", exc)
            return Reconciled()
        if out.finished or out.expired:
            log.warning(
                "finished %d purge(s) and %d results removal(s) a stop had interrupted", len(out.finished), out.expired
            )
        return out

    def scan_and_log(self) -> Reconciled:
        """Look for files without rows and rows without files; log what is found."""
        out = scan(self.store, self.settings)
        for what, paths in (
            ("file(s) without a row", out.files_without_rows),
            ("row(s) without a file", out.rows_without_files),
        ):
            if paths:  # the paths carry study and instance UIDs: named at DEBUG only
                log.warning(
                    "reconcile: %d %s under %s (`dxnode purge --reconcile` lists them)",
                    len(paths),
                    what,
                    self.settings.data_dir,
                )
                log.debug("reconcile: %s: %s", what, ", ".join(paths))
        if out.consistent:
            log.info("reconcile: every received and written file has its row, and every row its file")
        return out

    def schedule(self, scheduler: BaseScheduler) -> None:
        """Add the purge, the quota watch and the start-up scan to the node's scheduler."""
        r = self.settings.retention
        kwargs: dict[str, Any] = {"max_instances": 1, "coalesce": True}
        if retention_on(self.settings):
            first = dt.datetime.now(dt.UTC)  # once at start, then every interval
            scheduler.add_job(
                self.run, "interval", seconds=r.interval_seconds, id="retention", next_run_time=first, **kwargs
            )
        if r.max_storage_mb > 0:
            scheduler.add_job(self.watch, "interval", seconds=r.quota_check_seconds, id="quota", **kwargs)
        if r.reconcile_at_start:
            scheduler.add_job(self.scan_and_log, id="reconcile", **kwargs)  # once, now
