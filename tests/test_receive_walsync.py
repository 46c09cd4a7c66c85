"""The commit process's WAL flush off its serial section (dxnode/receive/walsync.py): which databases
get it, and that no answer leaves before a flush of the WAL that began after its commit."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from dxnode.durable import fsync_path
from dxnode.receive.walsync import WalSync, commit_without_sync, wal_of
from dxnode.store import make_engine


def test_only_a_sqlite_file_in_wal_mode_has_its_wal_flushed_here(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    wal = wal_of(engine)
    assert wal == (tmp_path / "node.db-wal").resolve()
    commit_without_sync(engine)
    with engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL: WalSync flushes
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    assert wal.exists()
    fsync_path(wal, data_only=True)
    other = make_engine(f"sqlite:///{tmp_path / 'node.db'}")  # every other connection keeps FULL
    with other.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    assert wal_of(create_engine(f"sqlite:///{tmp_path / 'plain.db'}")) is None  # rollback journal: its own syncs
    assert wal_of(make_engine("sqlite://")) is None


def test_answers_leave_only_after_a_flush_that_began_after_they_were_queued(tmp_path: Path) -> None:
    wal = tmp_path / "db-wal"
    wal.write_bytes(b"frames")
    started: list[float] = []
    gate, flush_began = threading.Event(), threading.Event()

    def slow_flush(path: Path) -> None:  # the real fdatasync, held until the test lets it go
        started.append(time.monotonic())
        flush_began.set()
        gate.wait(5)
        fsync_path(path, data_only=True)

    ours, theirs = multiprocessing.Pipe()
    sync = WalSync(wal, slow_flush)
    sync.after_flush({ours: [(1, ("ok", True))]})
    assert flush_began.wait(5)
    queued_during_flush = time.monotonic()
    sync.after_flush({ours: [(2, ("ok", True))]})
    assert not theirs.poll(0.2)  # the first flush is still running: nothing answered
    gate.set()
    assert theirs.recv() == [(1, ("ok", True))]
    assert theirs.recv() == [(2, ("ok", True))]
    assert len(started) == 2 and started[1] > queued_during_flush  # the second answer waited for a flush of its own
    sync.close()
    assert sync.flushes == 2
