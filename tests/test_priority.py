"""Priorities: jobs are claimed STAT first, then oldest; a STAT job's deliveries go first; rules by AE and
by Requested Procedure Priority; a study fetched again gets no second job (real SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from sqlalchemy import select

from dxnode.config import Settings
from dxnode.outbox import dispatch
from dxnode.states import JobState, OutputKind, Priority
from dxnode.store import Delivery, Instance, Job, Output, Series, Store, Study, utcnow
from dxnode.worklist import queue


def settings_for(url: str, tmp: Path | None = None, **worklist: object) -> Settings:
    node = {"data_dir": str(tmp / "var")} if tmp is not None else {}
    return Settings(
        database={"url": url},
        node=node,
        worklist={"stable_seconds": 10, **worklist},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
    )


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


def queue_job(store: Store, study_id: int, priority: Priority | None = None) -> int:
    with store.session() as s:
        return queue.queued_job(s, study_id, priority=priority)


def test_claim_takes_the_most_urgent_job_first_then_the_oldest(store: Store) -> None:
    now = utcnow()
    ids = {}
    for name, priority in [("low", Priority.LOW), ("med1", None), ("med2", Priority.MEDIUM), ("stat", Priority.STAT)]:
        ids[name] = queue_job(store, add_study(store, f"1.2.9.{len(ids) + 1}", now), priority)
    ids["high"] = queue_job(store, add_study(store, "1.2.9.9", now), Priority.HIGH)
    order = [queue.claim(store, "w:1") for _ in range(5)]
    assert order == [ids["stat"], ids["high"], ids["med1"], ids["med2"], ids["low"]]
    assert queue.claim(store, "w:1") is None


def test_a_waiting_job_is_raised_never_lowered_and_routed_jobs_keep_their_studys_priority(store: Store) -> None:
    sid = add_study(store, "1.2.10", utcnow())
    job = queue_job(store, sid, Priority.LOW)
    assert queue_job(store, sid, Priority.HIGH) == job
    assert queue_job(store, sid, Priority.LOW) == job
    with store.session() as s:
        assert s.get(Job, job).priority == Priority.HIGH
        routed = queue.queued_job(s, sid, routed_model="chest")  # what routing does: no priority given
        assert s.get(Job, routed).priority == Priority.HIGH


def test_a_study_retrieved_again_gets_no_second_job(store: Store) -> None:
    now = utcnow()
    sid = add_study(store, "1.2.11", now)
    with store.session() as s:
        first = queue.queue_retrieved(s, "1.2.11", "request:1", Priority.MEDIUM)
    with store.session() as s:  # the same request again while the job waits: raised, not doubled
        assert queue.queue_retrieved(s, "1.2.11", "request:2", Priority.STAT) == first
        assert s.get(Job, first).priority == Priority.STAT
    assert queue.claim(store, "w:1") == first
    queue.finish(store, settings_for(store.url), first, JobState.DONE)
    with store.session() as s:  # done, and no instance since: the done job answers
        assert queue.queue_retrieved(s, "1.2.11", "request:3", Priority.MEDIUM) == first
        s.get(Study, sid).last_received_at = now + dt.timedelta(seconds=1)  # a new instance arrived
    with store.session() as s:
        second = queue.queue_retrieved(s, "1.2.11", "request:4", Priority.LOW)
    assert second != first
    assert queue.sweep(store, settings_for(store.url), now + dt.timedelta(seconds=60)) == []  # no quiet-time job too
    with store.session() as s, pytest.raises(LookupError):
        queue.queue_retrieved(s, "1.2.999", "request:5", Priority.LOW)


def _output(store: Store, study_id: int, job_id: int, n: int) -> None:
    with store.session() as s:
        out = Output(
            job_id=job_id,
            study_id=study_id,
            kind=OutputKind.SR,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
            sop_instance_uid=f"2.25.{n}",
            series_instance_uid=f"2.25.{n}0",
            file_path=f"outputs/{n}.dcm",
        )
        s.add(out)
        s.flush()
        s.add(Delivery(output_id=out.id, destination="pacs"))


def test_the_outbox_sends_a_stat_jobs_outputs_before_older_routine_ones(store: Store) -> None:
    settings = settings_for(store.url)
    now = utcnow()
    routine = [add_study(store, f"1.2.12.{i}", now) for i in range(3)]
    for i, sid in enumerate(routine):
        _output(store, sid, queue_job(store, sid), i)
    stat = add_study(store, "1.2.12.9", now)
    _output(store, stat, queue_job(store, stat, Priority.STAT), 9)
    batches = dispatch._claim(store, settings, now + dt.timedelta(seconds=1))
    assert [item.sop_instance_uid for item in batches[0]] == ["2.25.9", "2.25.0", "2.25.1", "2.25.2"]


def _instance_file(tmp: Path, study_uid: str, **tags: object) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid
    for key, value in tags.items():
        setattr(ds, key, value)
    path = tmp / "var" / "incoming" / f"{study_uid}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _with_file(store: Store, tmp: Path, uid: str, aet: str = "MODALITY", **tags: object) -> int:
    sid = add_study(store, uid, utcnow() - dt.timedelta(seconds=60), aet)
    path = _instance_file(tmp, uid, **tags)
    with store.session() as s:
        series = Series(study_id=sid, series_instance_uid=uid + ".1")
        s.add(series)
        s.flush()
        s.add(
            Instance(
                series_id=series.id,
                study_id=sid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=uid + ".1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                file_path=str(path.relative_to(tmp / "var")),
                size_bytes=path.stat().st_size,
            )
        )
    return sid


def test_pushed_studies_take_their_priority_from_the_rules(store: Store, tmp_path: Path) -> None:
    settings = settings_for(store.url, tmp_path, priority_by_aet={"ER_CR": "HIGH"})
    request = Dataset()
    request.RequestedProcedurePriority = "STAT"
    stat = _with_file(store, tmp_path, "1.2.13.1", RequestAttributesSequence=[request])
    er = _with_file(store, tmp_path, "1.2.13.2", aet="ER_CR")
    routine = _with_file(store, tmp_path, "1.2.13.3", RequestedProcedurePriority="ROUTINE")
    low = _with_file(store, tmp_path, "1.2.13.4", RequestedProcedurePriority="LOW")
    queue.sweep(store, settings)
    with store.session() as s:
        got = {job.study_id: job.priority for job in s.scalars(select(Job))}
    assert got == {stat: Priority.STAT, er: Priority.HIGH, routine: Priority.MEDIUM, low: Priority.LOW}
    off = settings_for(store.url, tmp_path, priority_from_dataset=False)
    with store.session() as s:
        study = s.get(Study, stat)
        assert queue.rule_priority(off, s, study) is None


def test_priority_names_parse_as_dicom_writes_them() -> None:
    assert Priority.parse("stat") == Priority.STAT and Priority.parse("ROUTINE") == Priority.MEDIUM
    with pytest.raises(ValueError, match="STAT, HIGH, MEDIUM or LOW"):
        Priority.parse("urgent")
