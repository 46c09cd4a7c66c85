"""The commit process's WAL flush, taken out of its serial section (SQLite only).

Each batch's transaction commits without a sync (``PRAGMA synchronous=NORMAL`` on the commit
process's connection only), and one thread here flushes the WAL file (fdatasync) and only then sends
the answers of every batch that committed before that flush began. The next batch runs its
statements and commits meanwhile, and one flush serves every batch that committed while the one
before it ran (group commit across batches).

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
import threading
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
    """Make engine's SQLite connections commit without syncing (WalSync syncs): new connections only,
    so the pool is emptied first."""
    engine.dispose()

    @event.listens_for(engine, "connect")
    def _no_sync(dbapi_conn: Any, _record: Any) -> None:  # after make_engine's own pragmas
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")


class WalSync:
    """Answers sent once the WAL file is flushed: after_flush queues a batch's answers, a thread flushes
    and sends everything queued before the flush began."""

    def __init__(self, wal: Path, flush: Callable[[Path], None] | None = None) -> None:
        self.wal = wal
        self._flush = flush or functools.partial(fsync_path, data_only=True)  # fdatasync
        self._cond = threading.Condition()
        self._queued: list[Answers] = []
        self._closing = False
        self.flushes = 0
        self._thread = threading.Thread(target=self._run, name="dxnode-wal-sync", daemon=True)
        self._thread.start()

    def after_flush(self, answers: Answers) -> None:
        """Send answers after the next flush of the WAL file that begins from now."""
        with self._cond:
            self._queued.append(answers)
            self._cond.notify()

    def close(self) -> None:
        """Flush and send what is queued, then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closing:
                    self._cond.wait()
                queued, self._queued = self._queued, []
                if not queued:
                    return
            try:
                self._flush(self.wal)
            except OSError as exc:
                log.critical("cannot flush the database's WAL file %s: %s; stopping", self.wal, exc)
                logging.shutdown()
                os._exit(1)  # nothing may be answered after a failed flush (see the module's docstring)
            self.flushes += 1
            for answers in queued:
                for conn, batch in answers.items():
                    send(conn, batch)
