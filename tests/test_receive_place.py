"""Received files placed under their final names by the receiving processes (durable.place), the
commit process only committing their rows: what a placed file becomes when its row commits, is a
duplicate, fails, or when a file is already there ([node] receive_processes)."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from conftest import need_tool
from nodeproc import Node, c_store, make_study, node_config, storescu
from pydicom.uid import generate_uid

from dxnode.durable import place, write_temporary


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    need_tool("storescu")
    n = Node(node_config(tmp_path, node={"receive_processes": 2}, worklist={"run_jobs": False}))
    n.wait_for(r"listening on .*, 2 receiving processes")
    yield n
    n.stop()


def _db(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "var" / "dxnode.db")


def _row(tmp_path: Path, sop_uid: str) -> tuple[str, str, int] | None:
    with _db(tmp_path) as db:
        found = db.execute(
            "SELECT file_path, sha256, duplicates FROM instance WHERE sop_instance_uid = ?", (sop_uid,)
        ).fetchone()
    return None if found is None else (found[0], found[1], found[2])


def _final(tmp_path: Path, ds: pydicom.Dataset) -> Path:
    return tmp_path / "var" / "incoming" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def test_place_links_a_written_file_and_never_replaces_one(tmp_path: Path) -> None:
    final = tmp_path / "series" / "1.2.3.dcm"
    tmp = write_temporary(final, b"new")
    inode = tmp.stat().st_ino
    assert place(tmp, final, _done(inode)) == inode
    assert final.read_bytes() == b"new" and final.stat().st_ino == inode and final.stat().st_nlink == 2
    other = write_temporary(final, b"other")
    assert place(other, final, _done(other.stat().st_ino)) is None  # taken: the caller renames the old way
    assert final.read_bytes() == b"new"
    assert place(tmp_path / "gone.tmp", tmp_path / "x.dcm", _done(0)) is None  # not there (yet): the old way


def test_a_file_whose_write_fails_is_unlinked_from_its_final_name(tmp_path: Path) -> None:
    final = tmp_path / "series" / "1.2.3.dcm"
    tmp = write_temporary(final, b"half")
    failed: Future[int] = Future()
    failed.set_exception(OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        place(tmp, final, failed)
    assert not final.exists() and tmp.exists()


def _done(inode: int) -> Future[int]:
    done: Future[int] = Future()
    done.set_result(inode)
    return done


def test_placed_files_are_whole_single_links_with_their_rows(node: Node, tmp_path: Path) -> None:
    _, files = make_study(tmp_path / "s", n=4)
    storescu(node.port, files)
    for f in files:
        ds = pydicom.dcmread(f)
        row = _row(tmp_path, ds.SOPInstanceUID)
        assert row is not None and row[2] == 0
        stored = tmp_path / "var" / row[0]
        assert stored == _final(tmp_path, ds)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row[1]
        assert stored.stat().st_nlink == 1  # the temporary name is gone
    assert not list((tmp_path / "var" / "incoming").rglob(".*.tmp"))


def test_a_file_without_its_row_at_the_final_name_is_replaced_by_the_instance(node: Node, tmp_path: Path) -> None:
    """What a killed commit process can leave (a placed file, its row not committed): the sender's
    retry finds the name taken, goes the rename way and stores the instance whole."""
    _, files = make_study(tmp_path / "s", n=1)
    ds = pydicom.dcmread(files[0])
    final = _final(tmp_path, ds)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"half a file")
    storescu(node.port, files)
    row = _row(tmp_path, ds.SOPInstanceUID)
    assert row is not None and row[2] == 0
    assert hashlib.sha256(final.read_bytes()).hexdigest() == row[1]
    assert pydicom.dcmread(final).SOPInstanceUID == ds.SOPInstanceUID


def test_a_duplicate_keeps_the_first_file_and_leaves_no_second(node: Node, tmp_path: Path) -> None:
    _, files = make_study(tmp_path / "s", n=1)
    storescu(node.port, files)
    ds = pydicom.dcmread(files[0])
    first = _final(tmp_path, ds)
    before = first.read_bytes()
    storescu(node.port, files)  # the same name: found taken, counted as a duplicate
    ds.SeriesInstanceUID = generate_uid()  # the same SOP Instance UID in another series: placed, then withdrawn
    assert c_store(node.port, ds) == 0x0000
    row = _row(tmp_path, ds.SOPInstanceUID)
    assert row is not None and row[2] == 2
    assert first.read_bytes() == before
    assert not _final(tmp_path, ds).exists()
    assert not list((tmp_path / "var" / "incoming").rglob(".*.tmp"))


def test_a_placed_file_whose_row_cannot_commit_is_withdrawn(node: Node, tmp_path: Path) -> None:
    """The database refuses one instance's row (a trigger, as a constraint would): the sender gets
    0xA700 and no file of it stays, under its final name or a temporary one."""
    _, files = make_study(tmp_path / "s", n=2)
    refused, kept = (pydicom.dcmread(f) for f in files)
    with _db(tmp_path) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON instance WHEN NEW.sop_instance_uid = "
            f"'{refused.SOPInstanceUID}' BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
        )
    assert c_store(node.port, refused) == 0xA700
    assert _row(tmp_path, refused.SOPInstanceUID) is None
    assert not _final(tmp_path, refused).exists()
    assert not list((tmp_path / "var" / "incoming").rglob(".*.tmp"))
    assert c_store(node.port, kept) == 0x0000  # the node goes on
    assert _final(tmp_path, kept).exists()


def test_copies_of_one_instance_in_other_series_sent_at_once_leave_one_file(node: Node, tmp_path: Path) -> None:
    """Eight copies of one SOP instance, each in its own series (so each is placed under its own
    name), sent together over both receiving processes: one row, seven duplicates, one file."""
    _, files = make_study(tmp_path / "s", n=1)
    copies = []
    for _ in range(8):
        ds = pydicom.dcmread(files[0])
        ds.SeriesInstanceUID = generate_uid()
        copies.append(ds)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda ds: c_store(node.port, ds), copies))
    assert statuses == [0x0000] * 8
    row = _row(tmp_path, copies[0].SOPInstanceUID)
    assert row is not None and row[2] == 7
    kept = [ds for ds in copies if _final(tmp_path, ds).exists()]
    assert len(kept) == 1 and tmp_path / "var" / row[0] == _final(tmp_path, kept[0])
    assert hashlib.sha256(_final(tmp_path, kept[0]).read_bytes()).hexdigest() == row[1]
