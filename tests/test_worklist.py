"""Worklist: stable-study sweep, exactly-once claiming across processes, retries, crash recovery."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from sqlalchemy import func, select

from dxnode.config import Settings
from dxnode.store import Audit, Job, Store, Study, utcnow
from dxnode.worklist import queue


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
    assert len(queue.sweep(store, settings, now)) == 1
    assert queue.sweep(store, settings, now) == []
    assert [j.state for j in jobs_of(store, sid)] == ["queued"]
    assert jobs_of(store, fresh) == []  # not stable yet

    # The queued job ran; then more instances arrive: the study is queued again once stable.
    job_id = queue.claim(store, "w:1")
    queue.finish(store, settings, job_id, "done")
    with store.session() as s:
        s.get(Study, sid).last_received_at = now + dt.timedelta(seconds=5)
    queue.sweep(store, settings, now + dt.timedelta(seconds=8))
    assert len(jobs_of(store, sid)) == 1  # only 3 s quiet
    assert len(jobs_of(store, fresh)) == 1  # 11 s quiet now
    queue.sweep(store, settings, now + dt.timedelta(seconds=16))
    assert [j.state for j in jobs_of(store, sid)] == ["done", "queued"]


def test_new_instances_while_queued_do_not_add_a_second_queued_job(store: Store) -> None:
    settings = settings_for(store.url)
    now = utcnow()
    sid = add_study(store, "1.2.5", now - dt.timedelta(seconds=30))
    queue.sweep(store, settings, now)
    with store.session() as s:
        s.get(Study, sid).last_received_at = now
    queue.sweep(store, settings, now + dt.timedelta(seconds=11))
    assert [j.state for j in jobs_of(store, sid)] == ["queued"]


def test_per_calling_aet_stable_seconds(store: Store) -> None:
    settings = settings_for(store.url, stable_seconds_by_aet={"SLOWCT": 60})
    now = utcnow()
    slow = add_study(store, "1.2.6", now - dt.timedelta(seconds=30), aet="SLOWCT")
    quick = add_study(store, "1.2.7", now - dt.timedelta(seconds=30), aet="CR1")
    queue.sweep(store, settings, now)
    assert jobs_of(store, slow) == [] and len(jobs_of(store, quick)) == 1
    queue.sweep(store, settings, now + dt.timedelta(seconds=31))
    assert len(jobs_of(store, slow)) == 1


def test_failing_job_is_retried_then_failed_with_its_error(store: Store) -> None:
    settings = settings_for(store.url, max_attempts=2, retry_backoff_seconds=0)
    sid = add_study(store, "1.2.8", utcnow() - dt.timedelta(seconds=30))
    queue.sweep(store, settings)

    def broken(store: Store, settings: Settings, job_id: int, heartbeat: object) -> str:
        raise RuntimeError("decoder exploded")

    assert queue.drain(store, settings, broken) == 2
    (job,) = jobs_of(store, sid)
    assert job.state == "failed" and job.attempts == 2 and "decoder exploded" in job.error


def test_retry_waits_for_its_backoff_and_permanent_failures_end_at_once(store: Store) -> None:
    settings = settings_for(store.url, max_attempts=3, retry_backoff_seconds=30)
    transient = add_study(store, "1.2.8.1", utcnow() - dt.timedelta(seconds=30))
    permanent = add_study(store, "1.2.8.2", utcnow() - dt.timedelta(seconds=30))
    queue.sweep(store, settings)

    class Undecodable(Exception):
        permanent = True

    def body(store: Store, settings: Settings, job_id: int, heartbeat: object) -> str:
        with store.session() as s:
            study_id = s.get(Job, job_id).study_id
        raise (OperationalErrorLike("database is locked") if study_id == transient else Undecodable("no pixels"))

    assert queue.drain(store, settings, body) == 2  # each once: the transient one waits 30 s
    (t,) = jobs_of(store, transient)
    (p,) = jobs_of(store, permanent)
    assert t.state == "queued" and t.attempts == 1 and t.not_before > utcnow() + dt.timedelta(seconds=25)
    assert p.state == "failed" and p.attempts == 1 and "no pixels" in p.error
    assert queue.claim(store, "w:1") is None
    assert queue.claim(store, "w:1", now=utcnow() + dt.timedelta(seconds=31)) == t.id
    assert queue.retry_delay(settings, 2) == dt.timedelta(seconds=60)


class OperationalErrorLike(Exception):
    """Stands for a transient error (database busy, disk full): no ``permanent`` attribute."""


def _running(
    store: Store, uid: str, worker: str, heartbeat: dt.datetime, attempts: int = 1, supervisor: str = ""
) -> int:
    with store.session() as s:
        study = Study(study_instance_uid=uid)
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            state="running",
            worker=worker,
            heartbeat_at=heartbeat,
            updated_at=heartbeat,
            attempts=attempts,
            stage="analyze",
            supervisor=supervisor,
        )
        s.add(job)
        s.flush()
        return job.id


def test_recover_hands_back_jobs_of_dead_or_silent_workers_only(store: Store) -> None:
    import socket

    settings = settings_for(store.url, running_timeout_seconds=600, max_attempts=3, retry_backoff_seconds=0)
    now = utcnow()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ids = [
        _running(store, "1.9.0", f"{socket.gethostname()}:{dead.pid}", now),  # crashed process of this host
        _running(store, "1.9.1", "otherhost:123", now),  # alive on another node
        _running(store, "1.9.2", "otherhost:456", now - dt.timedelta(hours=2)),  # heartbeat stale
        _running(store, "1.9.3", queue.worker_id(), now),  # this very process
        _running(store, "1.9.4", f"{socket.gethostname()}:{dead.pid}", now, attempts=3),  # its last attempt
        # The whole node died (job process and its supervisor): the attempt is given back.
        _running(store, "1.9.5", f"{socket.gethostname()}:{dead.pid}", now, 3, f"{socket.gethostname()}:{dead.pid}"),
    ]
    assert queue.recover(store, settings) == 4
    with store.session() as s:
        jobs = [s.get(Job, i) for i in ids]
    assert [j.state for j in jobs] == ["queued", "running", "queued", "running", "failed", "queued"]
    assert jobs[5].attempts == 2 and jobs[5].lost == 1 and "whole node stopped" in jobs[5].error
    assert jobs[4].lost == 1 and jobs[4].error.startswith("the worker stopped 1 time while running this job")
    assert "last stage reached: analyze" in jobs[4].error
    assert "its process is gone" in jobs[0].error and "no heartbeat" in jobs[2].error


def test_a_job_that_keeps_killing_its_worker_ends_failed_after_max_attempts(store: Store) -> None:
    settings = settings_for(store.url, max_attempts=3, retry_backoff_seconds=0)
    sid = add_study(store, "1.2.9", utcnow() - dt.timedelta(seconds=30))
    queue.sweep(store, settings)
    states = []
    for n in range(3):
        job_id = queue.claim(store, f"host:{100 + n}")
        assert job_id is not None  # the poison job is claimed again: nothing else is queued
        states.append(queue.worker_lost(store, settings, f"host:{100 + n}", "killed by SIGKILL"))
    (job,) = jobs_of(store, sid)
    assert job.state == "failed" and job.attempts == 3 and job.lost == 3
    assert job.error.startswith("the worker stopped 3 times while running this job (last stage reached: claimed")
    assert queue.claim(store, "host:200") is None


def test_heartbeat_records_the_stage_and_stops_the_job_when_the_process_stops(store: Store) -> None:
    import threading

    settings = settings_for(store.url, max_attempts=1)
    sid = add_study(store, "1.2.10", utcnow() - dt.timedelta(seconds=30))
    queue.sweep(store, settings)
    stop = threading.Event()
    seen: list[str] = []

    def body(store: Store, settings: Settings, job_id: int, heartbeat: object) -> str:
        heartbeat("decode")  # type: ignore[operator]
        with store.session() as s:
            seen.append(s.get(Job, job_id).stage)
        stop.set()  # SIGTERM arrives during the stage
        try:
            heartbeat("model")  # type: ignore[operator]
        except Exception:  # a job body's per-instance handler must not swallow it
            seen.append("swallowed")
        return "done"

    queue.run_one(store, settings, body, "w:1", stop)
    (job,) = jobs_of(store, sid)
    assert seen == ["decode"]
    # Re-queued without counting the attempt, though max_attempts is 1.
    assert job.state == "queued" and job.attempts == 0 and "stopped during stage model" in job.error

    # A job handed to another worker meanwhile: the first one's heartbeat stops it, its end is not recorded.
    def slow(store: Store, settings: Settings, job_id: int, heartbeat: object) -> str:
        queue.lost(store, settings, job_id, "w:2", "no heartbeat")
        heartbeat("model")  # type: ignore[operator]
        return "done"

    job_id = queue.run_one(store, settings, slow, "w:2")
    with store.session() as s:
        assert s.get(Job, job_id).state == "failed"  # lost on its only attempt, not "done"


WORKER = textwrap.dedent(
    """
    import sys, time
    from dxnode.config import Settings
    from dxnode.store import Store, audit
    from dxnode.worklist import queue

    def handler(store, settings, job_id, heartbeat):
        with store.session() as s:
            audit(s, queue.worker_id(), "test.ran", target=f"job:{job_id}")
        time.sleep(0.005)
        return "done"

    store = Store(sys.argv[1])
    settings = Settings(database={"url": sys.argv[1]})
    print(queue.drain(store, settings, handler))
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


class Arriving:
    """A receiver's view: studies still arriving and when their associations were released."""

    def __init__(self, busy: set[str], released: dict[str, dt.datetime]) -> None:
        self.busy, self.released = busy, released

    def busy_studies(self) -> set[str]:
        return self.busy

    def released_at(self) -> dict[str, dt.datetime]:
        return self.released


def test_a_study_still_arriving_is_not_stable_whatever_its_last_commit(store: Store) -> None:
    settings = settings_for(store.url)
    now = utcnow()
    busy = add_study(store, "1.2.11", now - dt.timedelta(seconds=60))
    released = add_study(store, "1.2.12", now - dt.timedelta(seconds=60))
    assert queue.sweep(store, settings, now, Arriving({"1.2.11"}, {"1.2.12": now - dt.timedelta(seconds=4)})) == []
    # Quiet time counts from the release of the association that sent it.
    assert queue.sweep(store, settings, now + dt.timedelta(seconds=7), Arriving(set(), {"1.2.12": now}))
    assert len(jobs_of(store, busy)) == 1 and jobs_of(store, released) == []
    assert queue.sweep(store, settings, now + dt.timedelta(seconds=11), Arriving(set(), {"1.2.12": now}))
    assert len(jobs_of(store, released)) == 1


def test_every_body_gets_the_heartbeat_and_its_state_must_be_a_job_state(store: Store) -> None:
    """The JobBody contract: heartbeat always passed; a body answering something else fails the attempt."""
    from dxnode.states import JobState

    settings = settings_for(store.url, max_attempts=1)
    first = add_study(store, "1.2.9.1", utcnow() - dt.timedelta(seconds=30))
    second = add_study(store, "1.2.9.2", utcnow() - dt.timedelta(seconds=30))
    queue.sweep(store, settings)
    got: list[object] = []

    def body(store: Store, settings: Settings, job_id: int, heartbeat: queue.Heartbeat) -> JobState:
        got.append(heartbeat)
        heartbeat("decode")
        with store.session() as s:
            study_id = s.get(Job, job_id).study_id  # type: ignore[union-attr]
        return JobState.SKIPPED if study_id == first else "finished"  # type: ignore[return-value]

    assert queue.drain(store, settings, body) == 2
    assert all(isinstance(h, queue.Heartbeat) for h in got) and len(got) == 2
    (a,) = jobs_of(store, first)
    (b,) = jobs_of(store, second)
    assert a.state is JobState.SKIPPED and a.stage == "decode"
    assert b.state is JobState.FAILED and "'finished' is not a valid JobState" in b.error
