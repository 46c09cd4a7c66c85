"""Job processes and their supervisor: the job body never runs in the receiver's process.

``dxnode serve`` and ``dxnode worker`` start ``[worklist] workers`` job processes (multiprocessing,
spawn: a fresh interpreter, no state shared with the receiver). Each loads the model once, then
claims and runs jobs until told to stop. The supervisor, a thread of the parent, restarts a job
process that dies (out of memory, a codec crash, SIGKILL) and hands its job back to the worklist at
once (counted as an attempt: a job that keeps killing its worker ends failed after max_attempts).
It also stops a job process whose resident memory passes ``worker_max_rss_mb``, or whose job's
heartbeat went stale (hung), with that reason recorded on the job.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from sqlalchemy import select

from dxnode.config import Settings
from dxnode.states import JobState
from dxnode.store import Job, Store, utcnow
from dxnode.worklist import queue

log = logging.getLogger("dxnode.worklist.supervisor")


def run_named(main: str, *args: Any) -> None:
    """A job process's target: import ``module:function`` in the child and run it with args.

    The parent names the function instead of importing it, so the job stack (model, outputs, outbox)
    loads in the job processes only, never in the receiver."""
    module, _, function = main.partition(":")
    getattr(importlib.import_module(module), function)(*args)


# Exit status of a job process that cannot load its model: a configuration error, not a crash.
EXIT_CONFIG = 78


def rss_mb(pid: int) -> int:
    """Resident memory of a process in MiB (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _exit_reason(code: int | None) -> str:
    """A job process's exit status in words."""
    if code is None:
        return "stopped"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exited with status {code}"


@dataclass
class _Slot:
    """One job process the supervisor keeps running."""

    index: int
    proc: BaseProcess | None = None
    worker: str = ""
    started: float = 0.0
    failures: int = 0  # quick deaths in a row, for the restart backoff
    next_start: float = 0.0
    why: str = ""  # the reason the supervisor itself stopped it
    checked: float = 0.0  # when its job's heartbeat was last looked at
    ready: Any = None  # multiprocessing Event: set by the job process once its model is loaded
    failed_starts: int = 0  # deaths in a row before ever getting ready


# A node whose every job process died this many times in a row before getting ready stops (exit 1):
# restarting it would not help, and a node that receives but never analyses must not look alive.
START_TRIES = 3


class Supervisor:
    """Keeps ``count`` job processes running and hands back the jobs of those that die.

    main names what each job process runs, as ``module:function`` (dxnode.daemon.JOB_PROCESS_MAIN)."""

    def __init__(self, settings: Settings, store: Store, count: int, main: str, log_level: str = "INFO") -> None:
        self.settings, self.store, self.main, self.log_level = settings, store, main, log_level
        self.slots = [_Slot(i) for i in range(count)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._problems = self._ctx.SimpleQueue()  # one-line reasons from job processes that give up
        self.fatal = threading.Event()  # the job processes cannot run: the node stops
        self.fatal_reason = ""

    @property
    def workers(self) -> frozenset[str]:
        """Worker ids of the live job processes (the recovery sweep leaves their jobs to us)."""
        return frozenset(s.worker for s in self.slots if s.worker)

    @property
    def alive(self) -> int:
        """How many job processes are running."""
        return sum(1 for s in self.slots if s.proc is not None and s.proc.is_alive())

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._watch, name="dxnode-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, slot: _Slot) -> None:
        ready = self._ctx.Event()
        proc = self._ctx.Process(
            target=run_named,
            args=(self.main, self.settings, self.log_level, os.getpid(), ready, self._problems),
            name=f"dxnode-job-{slot.index}",
        )
        proc.start()
        slot.ready = ready
        assert proc.pid is not None
        slot.proc, slot.worker, slot.started, slot.why = proc, queue.worker_id(proc.pid), time.monotonic(), ""
        log.info("started job process %d (pid %d)", slot.index, proc.pid)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for slot in self.slots:
                try:
                    self._check(slot)
                except Exception:  # the supervisor must outlive a database hiccup
                    log.exception("supervisor check of job process %d failed", slot.index)

    def _check(self, slot: _Slot) -> None:
        proc = slot.proc
        if proc is None:
            if time.monotonic() >= slot.next_start and not self._stop.is_set():
                self._spawn(slot)
            return
        if proc.is_alive():
            self._limit(slot, proc)
            return
        code = proc.exitcode
        why = slot.why or _exit_reason(code)
        handed = queue.worker_lost(self.store, self.settings, slot.worker, why)
        log.error("job process %d (pid %s) %s; %d job(s) handed back", slot.index, proc.pid, why, handed)
        _forget_metrics(proc.pid)
        if code == EXIT_CONFIG:
            # the node stops: restarting would fail the same way
            self._give_up(self._problem() or "a job process cannot load the model")
            slot.proc, slot.worker, slot.next_start = None, "", float("inf")
            return
        slot.failed_starts = 0 if slot.ready is not None and slot.ready.is_set() else slot.failed_starts + 1
        if all(s.failed_starts >= START_TRIES for s in self.slots):
            self._give_up(f"every job process failed to start {START_TRIES} times in a row (last: {why})")
        quick = time.monotonic() - slot.started < 10
        slot.failures = slot.failures + 1 if quick else 0
        slot.proc, slot.worker = None, ""
        slot.next_start = time.monotonic() + min(30.0, 0.5 * 2 ** min(slot.failures, 6)) if slot.failures else 0.0

    def _problem(self) -> str:
        """The latest reason a job process sent before giving up ('' if none)."""
        last = ""
        while not self._problems.empty():
            last = str(self._problems.get())
        return last

    def _give_up(self, reason: str) -> None:
        if not self.fatal.is_set():
            self.fatal_reason = reason
            self.fatal.set()

    def failure(self) -> str | None:
        """Why the job processes cannot run (None while they can): the node then stops."""
        if self.fatal.is_set():
            return self.fatal_reason
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "the job supervisor thread stopped"
        return None

    def _limit(self, slot: _Slot, proc: BaseProcess) -> None:
        """Stop a job process over its memory limit, or one whose job's heartbeat went stale (hung)."""
        assert proc.pid is not None
        limit = self.settings.worklist.worker_max_rss_mb
        if limit and (rss := rss_mb(proc.pid)) > limit:
            self._kill(slot, proc, f"stopped for using {rss} MB, over worker_max_rss_mb = {limit}")
            return
        if time.monotonic() - slot.checked < 5:
            return
        slot.checked = time.monotonic()
        stale = utcnow() - dt.timedelta(seconds=self.settings.worklist.running_timeout_seconds)
        with self.store.session() as session:
            hung = session.scalar(
                select(Job.id).where(Job.state == JobState.RUNNING, Job.worker == slot.worker, Job.heartbeat_at < stale)
            )
        if hung is not None:
            self._kill(slot, proc, f"stopped: no heartbeat for {self.settings.worklist.running_timeout_seconds:g} s")

    def _kill(self, slot: _Slot, proc: BaseProcess, why: str) -> None:
        log.error("job process %d (pid %s) %s", slot.index, proc.pid, why)
        slot.why = why
        proc.kill()
        proc.join(5)

    def stop(self, deadline: float) -> None:
        """SIGTERM every job process (each re-queues its job at the next stage boundary); SIGKILL
        those still running at deadline (time.monotonic()) and re-queue their jobs ourselves."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        running = [s for s in self.slots if s.proc is not None and s.proc.is_alive()]
        for slot in running:
            assert slot.proc is not None
            slot.proc.terminate()
        for slot in running:
            assert slot.proc is not None
            slot.proc.join(max(0.0, deadline - time.monotonic()))
            if slot.proc.is_alive():
                log.warning("job process %d did not stop in time: killed, its job re-queued", slot.index)
                slot.proc.kill()
                slot.proc.join(5)
        for slot in self.slots:
            if slot.worker:
                queue.release_worker(self.store, slot.worker, "the node stopped")
            if slot.proc is not None and slot.proc.pid is not None:
                _forget_metrics(slot.proc.pid)


def _forget_metrics(pid: int | None) -> None:
    """Tell prometheus_client's multiprocess mode that a job process is gone (its counters stay counted)."""
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    # start-up time: prometheus_client loads only when this runs
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)
    except OSError:
        log.debug("mark_process_dead(%d) failed", pid, exc_info=True)
