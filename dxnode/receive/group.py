"""Group commit for received instances: concurrent associations share one database commit and one
fsync per folder.

Each storing thread queues its instance (temporary file being written and fsynced, final path, the
statements of its rows) and waits. The first waiting thread that finds no commit under way leads:
it takes everything queued (its own instance first among them) and commits it, then hands the lead
to the next waiter, so no thread hands its instance to another when it would wait alone (leader and
followers, as databases do group commit). One instance alone goes the per-instance way (its own
transaction, with the retries of Ingest._commit); several wait for their files' fsync, run their
statements in one transaction, rename every file into place, fsync each folder once (the folders
in parallel), and commit once. Only then is each instance's waiter released, so the contract stays
per instance: no success status before that instance's file, folder entry and row are durable.

A batch whose statements fail (a unique key lost to a race, two copies of one instance) is rolled
back and each instance then goes the per-instance way, with its own outcome. A failed rename,
folder fsync or commit fails every instance of the batch (renamed files are withdrawn): the
senders get 0xA700 and retry. A failed file write rolls the batch back too, and then fails that
instance only.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine

from dxnode import metrics
from dxnode.durable import publish_all, withdraw

MAX_BATCH = 64  # instances per commit


@dataclass
class Pending:
    """One instance waiting for its commit; done gets True (new), False (a duplicate) or the error."""

    tmp: Path  # being written and fsynced by written
    path: Path
    written: Future[int]  # the inode of tmp once durable
    rows: Callable[[Connection], Any]  # runs its statements; None for a duplicate (nothing to rename)
    alone: Callable[[], bool]  # the per-instance way: own transaction, retries, rename, commit
    committed: Callable[[Any], None]  # after the commit, with what rows returned
    placed: bool = False  # durable under path already (durable.place): nothing to rename, withdrawn unless committed
    done: Future[bool] = field(default_factory=Future)
    woken: threading.Event = field(default_factory=threading.Event)  # done, or its thread's turn to lead


class GroupCommit:
    """The commits of one Ingest, led in turn by the threads that wait for them."""

    def __init__(self, engine: Engine, pool: Executor) -> None:
        self._engine = engine
        self._pool = pool  # fsyncs the folders of a batch in parallel
        self._queue: deque[Pending] = deque()
        self._lock = threading.Lock()
        self._leading = False  # a thread is committing a batch, or has been told to
        self.batches: deque[int] = deque(maxlen=1024)  # sizes of the latest batches, for tests and debugging

    def commit(self, item: Pending) -> bool:
        """Queue the instance and wait for its commit, leading one when none is under way or when its
        turn comes; True if new, False for a duplicate; raises its error."""
        with self._lock:
            self._queue.append(item)
            lead = not self._leading
            self._leading = True
        if not lead:
            item.woken.wait()
        if not item.done.done():  # its turn: item is now at the head of the queue
            self._lead()
        return item.done.result()

    def _lead(self) -> None:
        """Commit a batch from the head of the queue, then hand the lead to the next instance's thread
        (each thread is woken once: to lead, or with its instance done)."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
        try:
            self.settle(batch)
        finally:
            with self._lock:
                if self._queue:
                    self._queue[0].woken.set()
                else:
                    self._leading = False
            for item in batch:
                item.woken.set()

    def settle(self, batch: list[Pending]) -> None:
        """Commit batch and settle every waiter in it, whatever happens."""
        try:
            self.batches.append(len(batch))
            metrics.RECEIVE_COMMIT_BATCH.observe(len(batch))
            if len(batch) == 1:
                _alone(batch[0])
            else:
                self._commit(batch)
        except BaseException as exc:  # never leave a sender waiting
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)

    def _commit(self, batch: list[Pending]) -> None:
        """One transaction, one rename pass and one fsync per folder for the instances of batch."""
        results: list[Any] = []
        publishing = False
        try:
            with self._engine.begin() as conn:
                results = [item.rows(conn) for item in batch]  # while the files are still being fsynced
                concurrent.futures.wait([item.written for item in batch])
                for item in batch:
                    item.written.result()  # a failed write: rolled back, and each instance on its own below
                publishing = True
                publish_all(
                    [(i.tmp, i.path) for i, r in zip(batch, results, strict=True) if r is not None and not i.placed],
                    self._pool,
                )
        except Exception as exc:
            if not publishing:  # rolled back before any rename: each instance on its own
                for item in batch:
                    _alone(item)
                return
            for item, r in zip(batch, results, strict=True):
                if r is not None or item.placed:
                    withdraw(item.path, item.written.result())  # no row: the sender gets a failure and retries
                item.done.set_exception(exc)
            return
        for item, r in zip(batch, results, strict=True):
            if r is not None:
                item.committed(r)
            elif item.placed:
                withdraw(item.path, item.written.result())  # a duplicate: its file is not kept
            item.done.set_result(r is not None)


def _alone(item: Pending) -> None:
    """Commit one instance the per-instance way and settle its waiter."""
    try:
        item.done.set_result(item.alone())
    except BaseException as exc:
        item.done.set_exception(exc)
