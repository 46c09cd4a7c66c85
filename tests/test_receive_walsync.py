"""The commit process's WAL flush (dxnode/receive/walsync.py): which databases get it, and that no
answer leaves before a flush of the WAL that began after its commit."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from sqlalchemy import create_engine, text

from dxnode.durable import fsync_path
from dxnode.receive.walsync import HOLD_MAX, WalSync, commit_without_sync, wal_of
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


def test_held_answers_leave_only_after_a_flush_that_began_after_their_commit(tmp_path: Path) -> None:
    wal = tmp_path / "db-wal"
    wal.write_bytes(b"frames")
    ours, theirs = multiprocessing.Pipe()
    seen_at_flush: list[bool] = []

    def flush(path: Path) -> None:  # the real fdatasync, noting whether any answer had left before it
        seen_at_flush.append(theirs.poll())
        fsync_path(path, data_only=True)

    sync = WalSync(wal, flush)
    assert sync.flush() == [] and sync.flushes == 0  # nothing held: no flush
    sync.hold({ours: [(1, ("ok", True))]})
    sync.hold({ours: [(2, ("ok", False))]})  # a second batch committed before the loop found nothing waiting
    assert sync.holding and not sync.full
    assert not theirs.poll(0.1)  # held: nothing answered before the flush
    assert sync.flush() == []
    assert seen_at_flush == [False] and sync.flushes == 1  # one flush for both batches, before either answer
    assert theirs.recv() == [(1, ("ok", True))]
    assert theirs.recv() == [(2, ("ok", False))]
    assert not sync.holding


def test_enough_held_answers_call_for_a_flush_and_a_gone_receiver_is_reported(tmp_path: Path) -> None:
    wal = tmp_path / "db-wal"
    wal.write_bytes(b"frames")
    ours, theirs = multiprocessing.Pipe()
    sync = WalSync(wal)
    sync.hold({ours: [(i, ("ok", True)) for i in range(HOLD_MAX - 1)]})
    assert not sync.full
    sync.hold({ours: [(HOLD_MAX, ("ok", True))]})
    assert sync.full  # requests may still be waiting: the loop flushes now all the same
    theirs.close()  # that receiving process is gone
    assert sync.flush() == [ours]
    assert not sync.holding and sync.flushes == 1
