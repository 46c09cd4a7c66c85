"""Worklist: stable-study sweep, exactly-once claiming across processes, retries, crash recovery."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from sqlalchemy import func, select

from dxnode import worklist
from dxnode.config import Settings
from dxnode.store import Audit, Job, Store, Study, utcnow


def settings_for(url: str, **worklist_keys: object) -> Settings:
    return Settings(database={"url": url}, worklist={"stable_seconds": 10, **worklist_keys})


def add_study(store: Store, uid: str, received: dt.datetime, aet: str = "MODALITY") -> int:
    with store.session() as s:
        study = Study(
            study_instance_uid=uid,
            calling_aet=aet,
            first_received_at=received,
            last_received_at=received,
            num_instances=1,
        )
        s.add(study)
        s.flush()
        return study.id


def jobs_of(store: Store, study_id: int) -> list[Job]:
    with store.session() as s:
        return list(s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id)))


def test_sweep_queues_stable_study_once_and_again_after_new_instances(store: Store) -> None:
    settings = settings_for(store.url)
    now = utcnow()
    sid = add_study(store, "1.2.3", now - dt.timedelta(seconds=30))
    fresh = add_study(store, "1.2.4", now - dt.timedelta(seconds=3))
    assert len(worklist.sweep(store, settings, now)) == 1
    assert worklist.sweep(store, settings, now) == []
    assert [j.state for j in jobs_of(store, sid)] == ["queued"]
    assert jobs_of(store, fresh) == []  # not stable yet

    # The queued job ran; then more instances arrive: the study is queued again once stable.
    job_id = worklist.claim(store, "w:1")
    worklist.finish(store, settings, job_id, "done")
    with store.session() as s:
        s.get(Study, sid).last_received_at = now + dt.timedelta(seconds=5)
    worklist.sweep(store, settings, now + dt.timedelta(seconds=8))
    assert len(jobs_of(store, sid)) == 1  # only 3 s quiet
    assert len(jobs_of(store, fresh)) == 1  # 11 s quiet now
    worklist.sweep(store, settings, now + dt.timedelta(seconds=16))
    assert [j.state for j in jobs_of(store, sid)] == ["done", "queued"]


def test_new_instances_while_queued_do_not_add_a_second_queued_job(store: Store) -> None:
    settings = settings_for(store.url)
    now = utcnow()
    sid = add_study(store, "1.2.5", now - dt.timedelta(seconds=30))
    worklist.sweep(store, settings, now)
    with store.session() as s:
        s.get(Study, sid).last_received_at = now
    worklist.sweep(store, settings, now + dt.timedelta(seconds=11))
    assert [j.state for j in jobs_of(store, sid)] == ["queued"]


def test_per_calling_aet_stable_seconds(store: Store) -> None:
    settings = settings_for(store.url, stable_seconds_by_aet={"SLOWCT": 60})
    now = utcnow()
    slow = add_study(store, "1.2.6", now - dt.timedelta(seconds=30), aet="SLOWCT")
    quick = add_study(store, "1.2.7", now - dt.timedelta(seconds=30), aet="CR1")
    worklist.sweep(store, settings, now)
    assert jobs_of(store, slow) == [] and len(jobs_of(store, quick)) == 1
    worklist.sweep(store, settings, now + dt.timedelta(seconds=31))
    assert len(jobs_of(store, slow)) == 1


def test_failing_job_is_retried_then_failed_with_its_error(store: Store) -> None:
    settings = settings_for(store.url, max_attempts=2)
    sid = add_study(store, "1.2.8", utcnow() - dt.timedelta(seconds=30))
    worklist.sweep(store, settings)

    def broken(store: Store, settings: Settings, job_id: int) -> str:
        raise RuntimeError("decoder exploded")

    assert worklist.drain(store, settings, broken) == 2
    (job,) = jobs_of(store, sid)
    assert job.state == "failed" and job.attempts == 2 and "decoder exploded" in job.error


def test_recover_requeues_jobs_of_dead_workers_only(store: Store) -> None:
    import socket

    settings = settings_for(store.url, running_timeout_seconds=600)
    now = utcnow()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with store.session() as s:
        ids = []
        for i, (worker, updated) in enumerate(
            [
                (f"{socket.gethostname()}:{dead.pid}", now),  # crashed process of this host
                ("otherhost:123", now),  # alive on another node
                ("otherhost:456", now - dt.timedelta(hours=2)),  # silent too long
            ]
        ):
            study = Study(study_instance_uid=f"1.9.{i}")
            s.add(study)
            s.flush()
            job = Job(study_id=study.id, state="running", worker=worker, updated_at=updated, attempts=1)
            s.add(job)
            s.flush()
            ids.append(job.id)
    assert worklist.recover(store, settings) == 2
    with store.session() as s:
        states = [s.get(Job, i).state for i in ids]
    assert states == ["queued", "running", "queued"]


WORKER = textwrap.dedent(
    """
    import sys, time
    from dxnode.config import Settings
    from dxnode.store import Store, audit
    from dxnode import worklist

    def handler(store, settings, job_id):
        with store.session() as s:
            audit(s, worklist.worker_id(), "test.ran", target=f"job:{job_id}")
        time.sleep(0.005)
        return "done"

    store = Store(sys.argv[1])
    settings = Settings(database={"url": sys.argv[1]})
    print(worklist.drain(store, settings, handler))
    """
)


def test_two_worker_processes_run_each_job_exactly_once(store: Store, tmp_path: Path) -> None:
    with store.session() as s:
        for i in range(100):
            study = Study(study_instance_uid=f"1.2.840.99.{i}")
            s.add(study)
            s.flush()
            s.add(Job(study_id=study.id, state="queued"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    procs = [
        subprocess.Popen([sys.executable, str(script), store.url], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    counts = [int(p.communicate(timeout=180)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(counts) == 100
    assert min(counts) > 0, f"one worker did all the work: {counts}"
    with store.session() as s:
        runs = s.execute(
            select(Audit.target, func.count()).where(Audit.action == "test.ran").group_by(Audit.target)
        ).all()
        states = set(s.scalars(select(Job.state)))
    assert len(runs) == 100 and all(n == 1 for _, n in runs)
    assert states == {"done"}
