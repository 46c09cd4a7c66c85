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
import urllib.request
from pathlib import Path

from conftest import need_tool
from nodeproc import Node, node_config, storescu, wait_until
from retention_kit import apart, settle, tiny_studies
from sqlalchemy import func, select

from dxnode.states import JobState
from dxnode.store import Audit, FindingRow, Instance, Job, Store, Study

STUDIES = 1000
QUOTA_MB = 2
PER_STUDY = 1  # instances of about 5 KB each
CHUNK = 100  # studies per storescu association
READ = "prometheus-read-token-0123456789"


def role(i: int) -> str:
    """Most studies finish; one in 50 keeps a queued job, one in 50 an undelivered result."""
    return "queued" if i % 50 == 7 else "pending" if i % 50 == 31 else "done"


def scrape(base: str) -> dict[str, float]:
    """GET /metrics with a read token: {'name{labels}': value} of the dxnode_ samples."""
    request = urllib.request.Request(base + "metrics", headers={"Authorization": f"Bearer {READ}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        lines = answer.read().decode().splitlines()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in lines if line.startswith("dxnode_"))}


def disk_use(incoming: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(incoming):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass  # purged meanwhile
    return total


class Around:
    """Beside the node: a sampler of the received files' disk use, and the job processes and the
    outbox as far as this test needs them (jobs settled through the store as each study's role says)."""

    def __init__(self, store: Store, data_dir: Path, roles: dict[str, str]) -> None:
        self.store, self.data_dir, self.roles = store, data_dir, roles
        self.stop = threading.Event()
        self.samples: list[int] = []
        self.settled: set[int] = set()
        self.threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._jobs, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append(disk_use(self.data_dir / "incoming"))

    def _jobs(self) -> None:
        while not self.stop.wait(0.1):
            with self.store.session() as s:
                for job in s.scalars(select(Job).where(Job.state == JobState.QUEUED, Job.id.not_in(self.settled))):
                    self.settled.add(job.id)
                    study = s.get(Study, job.study_id)
                    assert study is not None
                    if self.roles[study.study_instance_uid] != "queued":
                        settle(s, self.data_dir, study, self.roles[study.study_instance_uid])

    def quiet(self, quota: int) -> bool:
        """Every study queued and settled, and the quota's purge done."""
        with self.store.session() as s:
            jobs = s.scalar(select(func.count(Job.id)))
            stored = s.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)))
        return jobs == STUDIES and len(self.settled) == STUDIES and stored <= quota * 0.75

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def check_rows(store: Store, roles: dict[str, str]) -> set[str]:
    """Nothing in flight purged, every result row kept, every purge audited; returns the purged studies."""
    with store.session() as s:
        rows = dict(
            s.execute(
                select(Study.study_instance_uid, func.count(Instance.id)).outerjoin(Instance).group_by(Study.id)
            ).all()
        )
        purged = set(s.scalars(select(Study.study_instance_uid).where(Study.purged_at.is_not(None))))
        findings = s.scalar(select(func.count(FindingRow.id)))
        audited = s.scalar(select(func.count(Audit.id)).where(Audit.action == "study.purged"))
    in_flight = {u for u, r in roles.items() if r != "done"}
    assert len(rows) == STUDIES
    assert all(rows[u] == PER_STUDY for u in in_flight) and not purged & in_flight  # nothing in flight purged
    assert len(purged) >= STUDIES // 2 and audited == len(purged)  # the quota recycled most of them
    assert findings == sum(r != "queued" for r in roles.values())  # every result row kept
    return purged


def test_a_thousand_studies_through_a_quota_that_holds_a_fraction(tmp_path: Path) -> None:
    need_tool("storescu")
    uids, files = tiny_studies(tmp_path / "send", STUDIES, PER_STUDY, rows=48, columns=48)
    roles = {uid: role(i) for i, uid in enumerate(uids)}
    total = sum(p.stat().st_size for p in files)
    quota = QUOTA_MB * 1024 * 1024
    assert total > 2 * quota  # the quota holds a fraction of them
    config = node_config(
        tmp_path,
        worklist={"stable_seconds": 0.5, "sweep_interval_seconds": 0.2, "run_jobs": False},
        web={"enabled": True, "host": "127.0.0.1", "port": 0, "tokens": [{"name": "p", "token": READ, "role": "read"}]},
        retention={
            "max_storage_mb": QUOTA_MB,
            "high_water_percent": 75,
            "low_water_percent": 50,
            "free_headroom_mb": 0,
            "quota_check_seconds": 0.1,
        },
    )
    node = Node(config)
    base = node.wait_for(r"dxnode web: (http://\S+/)").group(1)
    data_dir = tmp_path / "var"
    store = Store(f"sqlite:///{data_dir / 'dxnode.db'}")
    around = Around(store, data_dir, roles)
    started = time.monotonic()
    try:
        for i in range(0, len(files), PER_STUDY * CHUNK):
            storescu(node.port, files[i : i + PER_STUDY * CHUNK])
        wait_until(lambda: around.quiet(quota), timeout=120, what="every study queued, settled and the quota met")
        elapsed = time.monotonic() - started
        around.end()
        peak = max(around.samples)
        assert peak <= quota, f"disk use peaked at {peak} bytes over a {quota}-byte quota"
        purged = check_rows(store, roles)
        assert apart(store, data_dir) == (set(), set(), set())
        metrics = scrape(base)
        assert metrics['dxnode_studies_purged_total{reason="quota"}'] == len(purged)
        assert metrics["dxnode_stored_bytes"] == disk_use(data_dir / "incoming") <= quota * 0.75
        check = node.cli("purge", "--reconcile", "--min-age", "0")
        assert check.returncode == 0, check.stdout + check.stderr
        print(f"{STUDIES} studies ({total} bytes) in {elapsed:.1f} s; disk use peaked at {peak} of {quota}")
    finally:
        around.end()
        node.stop()
        store.dispose()
