"""1,000 small studies through a `dxnode serve` whose [retention] quota holds a fraction of them.

The node receives over DICOM (DCMTK storescu) and queues a job per stable study; it runs no jobs
(``run_jobs = false``): this test plays the job processes and the outbox through the store, leaving
some jobs queued and some results undelivered. The disk use of the received files, sampled
throughout, stays under the quota; every result row is kept; nothing in flight is purged.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from conftest import need_tool
from nodeproc import Node, node_config, storescu, wait_until
from retention_kit import apart, settle, tiny_studies
from sqlalchemy import func, select

from dxnode.states import JobState
from dxnode.store import Audit, FindingRow, Instance, Job, Store, Study

STUDIES = 1000
QUOTA_MB = 2
CHUNK = 100  # studies per storescu association


def role(i: int) -> str:
    """Most studies finish; one in 50 keeps a queued job, one in 50 an undelivered result."""
    return "queued" if i % 50 == 7 else "pending" if i % 50 == 31 else "done"


def disk_use(incoming: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(incoming):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass  # purged meanwhile
    return total


def test_a_thousand_studies_through_a_quota_that_holds_a_fraction(tmp_path: Path) -> None:
    need_tool("storescu")
    uids, files = tiny_studies(tmp_path / "send", STUDIES, rows=32, columns=32)
    roles = {uid: role(i) for i, uid in enumerate(uids)}
    total = sum(p.stat().st_size for p in files)
    quota = QUOTA_MB * 1024 * 1024
    assert total > 2 * quota  # the quota holds a fraction of them
    config = node_config(
        tmp_path,
        worklist={"stable_seconds": 0.5, "sweep_interval_seconds": 0.2, "run_jobs": False},
        retention={
            "max_storage_mb": QUOTA_MB,
            "high_water_percent": 75,
            "low_water_percent": 50,
            "free_headroom_mb": 0,
            "quota_check_seconds": 0.1,
        },
    )
    node = Node(config)
    data_dir = tmp_path / "var"
    store = Store(f"sqlite:///{data_dir / 'dxnode.db'}")
    stop = threading.Event()
    samples: list[int] = []
    settled: set[int] = set()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(disk_use(data_dir / "incoming"))

    def finish_jobs() -> None:
        """The job processes and the outbox, as far as this test needs them."""
        while not stop.wait(0.1):
            with store.session() as s:
                for job in s.scalars(select(Job).where(Job.state == JobState.QUEUED, Job.id.not_in(settled))):
                    settled.add(job.id)
                    study = s.get(Study, job.study_id)
                    assert study is not None
                    if roles[study.study_instance_uid] != "queued":
                        settle(s, data_dir, study, roles[study.study_instance_uid])

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=finish_jobs, daemon=True)]
    for t in threads:
        t.start()
    started = time.monotonic()
    try:
        for i in range(0, len(files), 2 * CHUNK):
            storescu(node.port, files[i : i + 2 * CHUNK])

        def quiet() -> bool:
            with store.session() as s:
                jobs = s.scalar(select(func.count(Job.id)))
                stored = s.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)))
            return jobs == STUDIES and len(settled) == STUDIES and stored <= quota * 0.75

        wait_until(quiet, timeout=120, what="every study queued, settled and the quota met")
        elapsed = time.monotonic() - started
        stop.set()
        for t in threads:
            t.join(10)
        assert samples and max(samples) <= quota, f"disk use peaked at {max(samples)} bytes over a {quota}-byte quota"
        with store.session() as s:
            rows = dict(
                s.execute(
                    select(Study.study_instance_uid, func.count(Instance.id)).outerjoin(Instance).group_by(Study.id)
                )
                .tuples()
                .all()
            )
            purged = set(s.scalars(select(Study.study_instance_uid).where(Study.purged_at.is_not(None))))
            findings = s.scalar(select(func.count(FindingRow.id)))
            audited = s.scalar(select(func.count(Audit.id)).where(Audit.action == "study.purged"))
        in_flight = {u for u, r in roles.items() if r != "done"}
        assert len(rows) == STUDIES
        assert all(rows[u] == 2 for u in in_flight) and not purged & in_flight  # nothing in flight purged
        assert len(purged) >= STUDIES // 2 and audited == len(purged)  # the quota recycled most of them
        assert findings == sum(r != "queued" for r in roles.values())  # every result row kept
        assert apart(store, data_dir) == (set(), set(), set())
        check = node.cli("purge", "--reconcile", "--min-age", "0")
        assert check.returncode == 0, check.stdout + check.stderr
        print(f"{STUDIES} studies ({total} bytes) in {elapsed:.1f} s; disk use peaked at {max(samples)} of {quota}")
    finally:
        stop.set()
        node.stop()
        store.dispose()
