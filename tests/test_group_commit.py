"""Group commit on receive: concurrent associations share one commit, and each sender still gets its
success only once its own file, folder entry and row are durable.

The batches are made deterministic with a real lock: the test holds SQLite's write lock (BEGIN
IMMEDIATE on the node's database file), so the first instance waits in its commit (leading it) while the
others queue behind it; releasing the lock lets the queued ones commit as one batch.
"""

from __future__ import annotations

import copy
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from nodeproc import InProcessNode, wait_until
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_scp import send_one, small_ct

from dxnode.store import Audit, Study


@pytest.fixture
def node(tmp_path: Path) -> Iterator[InProcessNode]:
    n = InProcessNode(tmp_path)
    yield n
    n.stop()


def _send_while_locked(node: InProcessNode, first: pydicom.Dataset, queued: list[pydicom.Dataset]) -> list[float]:
    """Send first, then the queued datasets on concurrent associations, all while the test holds the
    database's write lock; release it once they all wait. Returns, per dataset, the seconds from the
    release to its C-STORE response (negative: answered while the lock was held)."""
    group = node.ingest._group
    db = sqlite3.connect(node.store.engine.url.database or "", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    answered: list[float] = [0.0] * (1 + len(queued))
    statuses: list[int] = [-1] * (1 + len(queued))
    released = [float("inf")]

    def send(i: int, ds: pydicom.Dataset) -> None:
        statuses[i] = send_one(node.port, ds)
        answered[i] = time.monotonic() - released[0]

    before = len(group.batches)
    threads = [threading.Thread(target=send, args=(0, first))]
    threads[0].start()
    wait_until(lambda: len(group.batches) > before, 30, "the first instance leading a commit")
    threads += [threading.Thread(target=send, args=(i + 1, ds)) for i, ds in enumerate(queued)]
    for t in threads[1:]:
        t.start()
    wait_until(lambda: len(group._queue) == len(queued), 30, "the other instances queued")
    released[0] = time.monotonic()
    db.execute("ROLLBACK")
    db.close()
    for t in threads:
        t.join(60)
    assert statuses == [0] * len(statuses)
    return answered


def test_concurrent_instances_share_one_commit_and_are_durable_before_success(node: InProcessNode) -> None:
    study, series = generate_uid(), generate_uid()
    first = small_ct(study, series, 0)
    # Others of the same series and of two new studies (rows created inside the shared transaction).
    queued = [small_ct(study, series, n) for n in range(1, 4)] + [
        small_ct(generate_uid(), generate_uid(), n) for n in range(2)
    ]
    answered = _send_while_locked(node, first, queued)
    assert min(answered) >= 0  # nobody got 0x0000 while its row could not be committed
    assert list(node.ingest._group.batches) == [1, len(queued)]

    rows = node.instances()
    assert set(rows) == {ds.SOPInstanceUID for ds in [first, *queued]}
    for inst in rows.values():
        data = (node.settings.data_dir / inst.file_path).read_bytes()
        assert inst.size_bytes == len(data) and inst.sha256 == hashlib.sha256(data).hexdigest()
    assert not list((node.settings.data_dir / "incoming").rglob("*.tmp"))
    with node.store.session() as s:
        counts = {st.study_instance_uid: st.num_instances for st in s.scalars(select(Study))}
        received = s.scalars(select(Audit.target).where(Audit.action == "instance.received")).all()
    assert counts[study] == 4 and sorted(counts.values()) == [1, 1, 4]
    assert len(received) == 6


def test_a_batch_that_cannot_commit_together_is_committed_one_by_one(node: InProcessNode) -> None:
    study, series = generate_uid(), generate_uid()
    assert send_one(node.port, small_ct(study, series, 0)) == 0  # the series is known: the short path
    twice = small_ct(study, series, 1)
    other = small_ct(study, series, 2)
    # Two copies of one new instance in one batch: the second insert fails the unique key, the batch
    # rolls back, and each instance is committed on its own (one new, one duplicate).
    _send_while_locked(node, small_ct(study, series, 3), [twice, copy.deepcopy(twice), other])
    assert list(node.ingest._group.batches)[-2:] == [1, 3]
    rows = node.instances()
    assert len(rows) == 4 and rows[twice.SOPInstanceUID].duplicates == 1
    folder = node.settings.data_dir / rows[twice.SOPInstanceUID].file_path
    assert folder.exists() and not list(folder.parent.glob("*.tmp"))
    with node.store.session() as s:
        assert s.scalar(select(Study.num_instances).where(Study.study_instance_uid == study)) == 4
        duplicate = s.scalars(select(Audit.action).where(Audit.action == "instance.duplicate")).all()
    assert len(duplicate) == 1
