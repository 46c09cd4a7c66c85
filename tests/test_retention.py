"""Retention: only finished studies are purged, results rows stay, the quota takes the oldest
first, results expire whole, and the reconcile finds files and rows apart (real SQLite files and
PostgreSQL, real files received over DICOM by DCMTK storescu)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need_tool
from nodeproc import DXNODE, InProcessNode, Node, node_config, storescu, write_config
from retention_kit import apart, settle, tiny_studies
from sqlalchemy import func, select

from dxnode.config import Settings
from dxnode.lifecycle.candidates import Candidate
from dxnode.lifecycle.purge import MB, _plan, mark, purge
from dxnode.metrics import store_families
from dxnode.store import Audit, FindingRow, Instance, Output, Study, utcnow

ROLES = ["done", "committed", "cancelled", "ignored", "pending", "queued", "running", "uncovered", "busy"]
FINISHED = {"done", "committed", "cancelled", "ignored"}


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[InProcessNode]:
    need_tool("storescu")
    n = InProcessNode(tmp_path, url=db_url)
    yield n
    n.stop()


def settings_for(node: InProcessNode, **retention: Any) -> Settings:
    """The in-process node's settings with [retention] and no stable-study wait."""
    return Settings(
        node=node.settings.node,
        database=node.settings.database,
        worklist={"stable_seconds": 0},
        retention=retention,
    )


def receive(node: InProcessNode, tmp: Path, roles: list[str], per_study: int = 2) -> dict[str, str]:
    """One tiny study per role, sent by storescu and settled as the role says; returns uid -> role."""
    uids, files = tiny_studies(tmp / "send", len(roles), per_study)
    storescu(node.port, files)
    with node.store.session() as s:
        for uid, role in zip(uids, roles, strict=True):
            study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
            assert study is not None
            settle(s, node.settings.data_dir, study, role)
    return dict(zip(uids, roles, strict=True))


def test_only_finished_studies_lose_their_instances_and_their_results_stay(node: InProcessNode, tmp_path: Path) -> None:
    roles = receive(node, tmp_path, ROLES)
    busy = {uid for uid, role in roles.items() if role == "busy"}
    settings = settings_for(node, keep_days=1e-9)
    run = purge(node.store, settings, "test", busy=busy)
    assert {roles[p.study_uid] for p in run.purged} == FINISHED
    assert all(p.reason == "age" and p.instances == 2 and p.bytes > 4096 for p in run.purged)
    with node.store.session() as s:
        kept = dict(
            s.execute(
                select(Study.study_instance_uid, func.count(Instance.id)).outerjoin(Instance).group_by(Study.id)
            ).all()
        )
        assert {uid: n for uid, n in kept.items()} == {uid: 0 if r in FINISHED else 2 for uid, r in roles.items()}
        purged_at = dict(s.execute(select(Study.study_instance_uid, Study.purged_at)).all())
        assert {u for u, t in purged_at.items() if t is not None} == {u for u, r in roles.items() if r in FINISHED}
        results = {r for (r,) in s.execute(select(Study.study_instance_uid).join(FindingRow)).all()}
        assert {roles[u] for u in results} == {"done", "committed", "cancelled", "pending", "busy"}  # all kept
        assert s.scalar(select(func.count(Output.id))) == 5
        audited = set(s.scalars(select(Audit.target).where(Audit.action == "study.purged")))
        assert audited == {u for u, r in roles.items() if r in FINISHED}
    assert apart(node.store, settings.data_dir) == (set(), set(), set())
    (family,) = [f for f in store_families(node.store) if f.name == "dxnode_stored_bytes"]
    assert family.samples[0].value == run.stored_after > 0
    assert purge(node.store, settings, "test", busy=busy).purged == []  # nothing more to do


def test_results_expire_after_their_own_period_with_the_study(node: InProcessNode, tmp_path: Path) -> None:
    roles = receive(node, tmp_path, ["done", "pending"])
    settings = settings_for(node, results_keep_days=1e-9)
    run = purge(node.store, settings, "test")
    assert [(roles[p.study_uid], p.results, p.instances) for p in run.purged] == [("done", True, 2)]
    with node.store.session() as s:
        assert [roles[u] for u in s.scalars(select(Study.study_instance_uid))] == ["pending"]
        assert s.scalar(select(func.count(Output.id))) == 1
        assert s.scalar(select(func.count(Audit.id)).where(Audit.action == "study.results_expired")) == 1
    assert not (settings.data_dir / "outputs" / next(u for u, r in roles.items() if r == "done")).exists()
    assert apart(node.store, settings.data_dir) == (set(), set(), set())


def candidate(i: int, minutes_ago: int, size_mb: float, now: dt.datetime) -> Candidate:
    return Candidate(i, f"1.2.{i}", now - dt.timedelta(minutes=minutes_ago), 1, int(size_mb * MB))


def test_the_quota_takes_the_oldest_finished_first_down_to_the_low_water_mark() -> None:
    now = utcnow()
    settings = Settings(retention={"max_storage_mb": 10, "high_water_percent": 90, "low_water_percent": 50})
    found = [candidate(1, 5, 2, now), candidate(2, 50, 2, now), candidate(3, 30, 2, now), candidate(4, 1, 2, now)]
    found.sort(key=lambda c: c.finished_at)
    assert _plan(settings, found, int(8.9 * MB), 10**12, now, by_age=True) == []  # under the high-water mark
    chosen = _plan(settings, found, 11 * MB, 10**12, now, by_age=True)  # 11 MB stored, 5 MB wanted
    assert [(c.study_id, why) for c, why in chosen] == [(2, "quota"), (3, "quota"), (1, "quota")]
    aged = Settings(retention={"keep_days": 0.01, "max_storage_mb": 10})  # 14.4 minutes
    assert [(c.study_id, why) for c, why in _plan(aged, found, 8 * MB, 10**12, now, by_age=True)] == [
        (2, "age"),
        (3, "age"),
    ]
    low_disk = Settings(node={"min_free_mb": 100}, retention={"max_storage_mb": 1000, "free_headroom_mb": 3})
    chosen = _plan(low_disk, found, 8 * MB, 100 * MB, now, by_age=True)  # 3 MB short of 103 MB free
    assert [(c.study_id, why) for c, why in chosen] == [(2, "space"), (3, "space")]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DXNODE, "--config", str(config), *args], capture_output=True, text=True, timeout=120)


def cli_config(node: InProcessNode, tmp: Path, **retention: Any) -> Path:
    return write_config(
        tmp / "dxnode.toml",
        {
            "node": {"data_dir": str(node.settings.data_dir), "min_free_mb": 10},
            "database": {"url": node.settings.database.url},
            "worklist": {"stable_seconds": 0},
            "web": {"enabled": False},
            "retention": retention,
        },
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_purge_command_dry_run_then_purge_and_the_reconcile_reports_files_and_rows_apart(
    node: InProcessNode, tmp_path: Path
) -> None:
    roles = receive(node, tmp_path, ["done", "queued", "done"])
    off = cli(cli_config(node, tmp_path), "purge")
    assert off.returncode == 0 and "retention is off" in off.stdout
    config = cli_config(node, tmp_path, keep_days=1e-9)
    before = apart(node.store, node.settings.data_dir)
    dry = cli(config, "purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would purge 1.") == 2 and "would purge 2 studies" in dry.stdout
    assert apart(node.store, node.settings.data_dir) == before
    done = cli(config, "purge")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(age): 2 instances") == 2, done.stdout
    with node.store.session() as s:
        left = list(s.scalars(select(Instance.file_path)))
        assert (
            s.scalar(select(func.count(Audit.id)).where(Audit.action == "study.purged", Audit.actor.like("cli:%"))) == 2
        )
    assert len(left) == 2 and all(roles[p.split("/")[1]] == "queued" for p in left)
    clean = cli(config, "purge", "--reconcile", "--min-age", "0")
    assert clean.returncode == 0 and "0 file(s) without a row, 0 row(s) without a file" in clean.stdout, clean.stdout
    stray = node.settings.data_dir / "incoming" / "1.2.3" / "4.5.6" / "7.8.9.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left by hand")
    (node.settings.data_dir / left[0]).unlink()
    found = cli(config, "purge", "--reconcile", "--min-age", "0")
    assert found.returncode == 1
    assert "file without a row: incoming/1.2.3/4.5.6/7.8.9.dcm" in found.stdout
    assert f"row without a file: {left[0]}" in found.stdout


def marked(db: Path) -> int:
    """Instance rows marked purging, read without taking SQLite's write lock."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        return int(conn.execute("SELECT count(*) FROM instance WHERE purging").fetchone()[0])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sigkill_during_purge_leaves_no_file_without_its_row_and_the_reconcile_finishes(
    node: InProcessNode, tmp_path: Path
) -> None:
    """`dxnode purge` killed at random points: after each kill every file has its row and every
    live row its file (only marked rows may have lost theirs); --reconcile then finishes them."""
    roles = receive(node, tmp_path, ["done"] * 300, per_study=1)
    config = cli_config(node, tmp_path, keep_days=1e-9)
    db = Path(node.settings.database.url.removeprefix("sqlite:///"))
    seed = int(os.environ.get("DXNODE_TEST_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    interrupted, left = 0, apart(node.store, node.settings.data_dir)[2]
    for round_ in range(4):
        before = marked(db)
        proc = subprocess.Popen([DXNODE, "--config", str(config), "purge"], stdout=subprocess.DEVNULL)
        try:
            if round_ == 0:
                time.sleep(rng.uniform(0.0, 0.2))  # while it starts, or in its first transaction
            else:  # once a batch is marked: while its files go, or in the transaction deleting their rows
                deadline = time.monotonic() + 60
                while proc.poll() is None and marked(db) == before and time.monotonic() < deadline:
                    time.sleep(0.002)
                # A batch's files go in well under a second on a quiet disk: a longer wait lets the
                # whole purge finish first, and then no kill lands inside one.
                time.sleep(rng.uniform(0.0, 0.03))
        finally:
            proc.kill()
            proc.wait()
        without_rows, without_files, marked_rows = apart(node.store, node.settings.data_dir)
        assert without_rows == set(), f"seed {seed}: files without rows after a kill"
        assert without_files == set(), f"seed {seed}: live rows without files after a kill"
        interrupted += marked_rows != left  # this kill left a batch half done
        left = marked_rows
    assert interrupted, f"seed {seed}: no kill landed inside a purge"
    out = cli(config, "purge", "--reconcile", "--min-age", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "finished an interrupted purge" in out.stdout
    assert apart(node.store, node.settings.data_dir) == (set(), set(), set())
    assert cli(config, "purge").returncode == 0
    with node.store.session() as s:
        assert s.scalar(select(func.count(Instance.id))) == 0
        assert s.scalar(select(func.count(FindingRow.id))) == len(roles)  # every result kept
        purged = s.scalar(select(func.count(Study.id)).where(Study.purged_at.is_not(None)))
        assert purged == len(roles)
    assert apart(node.store, node.settings.data_dir) == (set(), set(), set())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_serve_finishes_a_purge_a_kill_interrupted_before_it_receives(node: InProcessNode, tmp_path: Path) -> None:
    roles = receive(node, tmp_path, ["done", "done", "queued"])
    settings = settings_for(node, keep_days=1e-9)
    with node.store.session() as s:
        ids = dict(s.execute(select(Study.study_instance_uid, Study.id)).all())
    first = next(u for u, r in roles.items() if r == "done")
    assert mark(node.store, settings, [ids[first]]) == [ids[first]]
    with node.store.session() as s:
        half = s.scalars(select(Instance.file_path).where(Instance.study_id == ids[first])).first()
    assert half is not None
    (settings.data_dir / half).unlink()  # killed after removing one of its two files
    assert apart(node.store, settings.data_dir)[:2] == (set(), set())
    config = node_config(
        tmp_path,
        node={"data_dir": str(settings.data_dir)},
        database={"url": node.settings.database.url},
        worklist={"run_jobs": False},
    )
    serve = Node(config)
    try:
        serve.wait_for(r"finished 1 purge\(s\) and 0 results removal\(s\) a stop had interrupted")
        serve.wait_for(r"reconcile: every received and written file has its row")
        assert apart(node.store, settings.data_dir) == (set(), set(), set())
        with node.store.session() as s:
            reasons = list(s.scalars(select(Audit.detail).where(Audit.action == "study.purged")))
        assert len(reasons) == 1 and '"reason": "reconcile"' in reasons[0]
    finally:
        serve.stop()
