"""The commit process's WAL flush, one for every batch committed while requests kept coming (SQLite only).

Each batch's transaction commits without a sync (``PRAGMA synchronous=NORMAL`` on the commit
process's connection only). The commit loop holds the batch's answers (``hold``) and goes on with
whatever requests wait; once none waits, or enough answers are held, it flushes the WAL file
(fdatasync) and only then sends every held answer (``flush``): one flush for all the batches that
committed since the last one (group commit across batches), on the loop's own thread. An earlier
design flushed on a thread of its own, woken for each batch: that wake-up took 18 % of the loop's
time with the GIL held on the project's VM. In 14 paired runs the loop's own flush was level on
instances/s (+1.5 %, within the noise) with about 10 % less CPU in the commit process, and a
thread fewer (docs/benchmarks.md).

Why this is as durable as ``synchronous=FULL``: in WAL mode a commit appends its frames to the WAL
file, and FULL makes COMMIT itself fdatasync that file before it returns. Here the same fdatasync of
the same file comes after COMMIT returns and before the answer is sent, so no sender is answered
before its rows are on disk. Frames are appended in order, so a flush also covers every commit
before it. What changes: the rows are visible to the node's other connections (the worklist, the
web page) up to one flush before they are durable; a crash in that window loses them along with
the answer, and the sender sends the instance again.

A flush that fails stops the commit process at once (as PostgreSQL does on a failed fsync: the
page cache can no longer be trusted); the node then stops, every waiting sender gets 0xA700, and on
restart SQLite recovers what reached the disk.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from dxnode.durable import fsync_path
from dxnode.receive.committer import send

log = logging.getLogger("dxnode.receive.walsync")

Answers = dict[Connection, list[tuple[int, Any]]]
HOLD_MAX = 64  # answers held before a flush, even with requests waiting (committer.MAX_BATCH)


def send_all(answers: Answers) -> list[Connection]:
    """Send each connection its answers; the connections a send failed on (that process is gone)."""
    return [conn for conn, batch in answers.items() if not send(conn, batch)]


def wal_of(engine: Engine) -> Path | None:
    """The WAL file of a SQLite database file in WAL mode; None for anything else (PostgreSQL, an
    in-memory database, a file system where SQLite could not use WAL: those keep their own syncs)."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    with engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    return Path(f"{Path(url.database).expanduser().resolve()}-wal") if str(mode).lower() == "wal" else None


def commit_without_sync(engine: Engine) -> None:
    """Make engine's SQLite connections commit without syncing (WalSync flushes): new connections only,
    so the pool is emptied first."""
    engine.dispose()

    @event.listens_for(engine, "connect")
    def _no_sync(dbapi_conn: Any, _record: Any) -> None:  # after make_engine's own pragmas
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")


class WalSync:
    """Answers held until the WAL file is flushed: hold() keeps a committed batch's answers, flush()
    fdatasyncs the WAL and then sends every answer held."""

    def __init__(self, wal: Path, flush: Callable[[Path], None] | None = None) -> None:
        self.wal = wal
        self._flush = flush or functools.partial(fsync_path, data_only=True)  # fdatasync
        self._held: list[Answers] = []
        self._count = 0  # answers held
        self.flushes = 0

    def hold(self, answers: Answers) -> None:
        """Keep answers (of a batch just committed) until the next flush."""
        self._held.append(answers)
        self._count += sum(len(batch) for batch in answers.values())

    @property
    def holding(self) -> bool:
        """True while answers wait for a flush."""
        return bool(self._held)

    @property
    def full(self) -> bool:
        """True once as many answers wait as one batch holds: flush now, even with requests waiting."""
        return self._count >= HOLD_MAX

    def flush(self) -> list[Connection]:
        """Flush the WAL file, then send every held answer; the connections a send failed on (gone)."""
        if not self._held:
            return []
        try:
            self._flush(self.wal)
        except OSError as exc:
            log.critical("cannot flush the database's WAL file %s: %s; stopping", self.wal, exc)
            logging.shutdown()
            os._exit(1)  # nothing may be answered after a failed flush (see the module's docstring)
        self.flushes += 1
        held, self._held, self._count = self._held, [], 0
        return list(dict.fromkeys(conn for answers in held for conn in send_all(answers)))
