"""The node's jobs as UPS workitems: C-FIND, N-GET, subscriptions and N-EVENT-REPORTs over real associations.

A `dxnode serve` subprocess with [ups_watch] enabled; storescu sends studies; pynetdicom AEs built here
are the RIS (UPS Watch/Pull SCU) and the subscribers (UPS Event listeners). DCMTK's findscu has no UPS
information model (only worklist, patient, study and PSOnly ones), so every C-FIND here is pynetdicom's.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port, need_tool
from dicom_checks import dciodvfy_errors
from nodeproc import InProcessNode, Node, make_study, node_config, storescu, wait_until
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time from a table
    UnifiedProcedureStepEvent,
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
    UnifiedProcedureStepWatch,
)
from sqlalchemy import select

from dxnode.config import Settings
from dxnode.states import JobState, Priority
from dxnode.store import Job, Store, Study, UpsEvent, UpsSubscription
from dxnode.worklist import queue, ups_events
from dxnode.worklist.ups_view import _date_range, find, job_id_of, ups_priority, ups_state, workitem_uid

GLOBAL = "1.2.840.10008.5.1.4.34.5"
SR_STORAGE = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.34"}


class Subscriber:
    """A subscriber's UPS Event listener: every N-EVENT-REPORT it gets, as (workitem UID, state), in order."""

    def __init__(self, ae_title: str, port: int) -> None:
        self.ae_title, self.port = ae_title, port
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server: Any = None

    def start(self) -> Subscriber:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(UnifiedProcedureStepEvent)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)]
        )
        return self

    def _on_report(self, event: Any) -> tuple[int, None]:
        assert event.event_type == 1  # UPS State Report
        info = event.event_information
        with self.lock:
            self.events.append((str(event.request.AffectedSOPInstanceUID), str(info.ProcedureStepState)))
        return 0x0000, None

    def states(self, uid: str) -> list[str]:
        with self.lock:
            return [state for u, state in self.events if u == uid]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


class Ris:
    """A RIS: UPS Watch and Pull SCU on one association with the node."""

    def __init__(self, port: int, ae_title: str = "RIS") -> None:
        ae = AE(ae_title=ae_title)
        for cx in (UnifiedProcedureStepWatch, UnifiedProcedureStepPull, UnifiedProcedureStepPush):
            ae.add_requested_context(cx)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE")
        assert self.assoc.is_established

    def find(self, **keys: Any) -> list[Dataset]:
        query = Dataset()
        for k, v in keys.items():
            setattr(query, k, v)
        answers = []
        for status, identifier in self.assoc.send_c_find(query, UnifiedProcedureStepPull):
            assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
            if identifier is not None:
                answers.append(identifier)
        return answers

    def action(self, uid: str, action_type: int, info: Dataset | None = None) -> Dataset:
        status, _ = self.assoc.send_n_action(
            info, action_type, UnifiedProcedureStepPush, uid, meta_uid=UnifiedProcedureStepWatch
        )
        return status

    def subscribe(self, receiving_ae: str, uid: str = GLOBAL, action_type: int = 3) -> int:
        info = Dataset()
        info.ReceivingAE = receiving_ae
        if action_type == 3:
            info.DeletionLock = "FALSE"
        return int(self.action(uid, action_type, info).Status)

    def get(self, uid: str, *keywords: str) -> tuple[int, Dataset | None]:
        tags = [pydicom.datadict.tag_for_keyword(k) for k in keywords]
        status, ds = self.assoc.send_n_get(tags, UnifiedProcedureStepPush, uid, meta_uid=UnifiedProcedureStepWatch)
        return int(status.Status), ds

    def close(self) -> None:
        self.assoc.release()


@pytest.fixture
def subscribers() -> Iterator[dict[str, Subscriber]]:
    subs = {name: Subscriber(name, free_port()) for name in ("SUBA", "SUBB", "SUBC")}
    yield subs
    for sub in subs.values():
        sub.stop()


def _sr_uids(db: Path, study_uid: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT output.sop_instance_uid, output.sop_class_uid FROM output JOIN study ON study.id = output.study_id"
            " WHERE study.study_instance_uid = ?",
            (study_uid,),
        ).fetchall()
    return {uid for uid, cls in rows if cls in SR_STORAGE}


def _workitem(ris: Ris, study_uid: str, state: str = "") -> Dataset | None:
    found = ris.find(SOPInstanceUID="", StudyInstanceUID=study_uid, ProcedureStepState=state)
    return found[0] if found else None


def test_jobs_are_workitems_found_got_and_reported_to_subscribers(
    tmp_path: Path, subscribers: dict[str, Subscriber]
) -> None:
    need_tool("storescu", "dciodvfy")
    suba, subb, subc = subscribers["SUBA"].start(), subscribers["SUBB"], subscribers["SUBC"].start()
    cfg = node_config(
        tmp_path,
        ups_watch={
            "enabled": True,
            "interval_seconds": 0.3,
            "backoff_initial_seconds": 0.5,
            "backoff_max_seconds": 1,
            "subscribers": [
                {"ae_title": s.ae_title, "host": "127.0.0.1", "port": s.port} for s in subscribers.values()
            ],
        },
    )
    node = Node(cfg, "--no-web")
    ris = Ris(node.port)
    try:
        assert ris.subscribe("SUBA") == 0x0000
        assert ris.subscribe("SUBB") == 0x0000  # its listener is down until the end
        assert ris.subscribe("SUBC") == 0x0000
        assert ris.subscribe("SUBC", action_type=4) == 0x0000  # unsubscribed again: nothing of these studies
        refused = ris.action(GLOBAL, 3, _receiving("ROGUE"))
        assert refused.Status == 0xC308 and "ROGUE" in refused.ErrorComment

        study_uid, files = make_study(tmp_path / "study", n=2, patient_id="PAT-UPS")
        storescu(node.port, files)
        done = wait_until(lambda: _workitem(ris, study_uid, "COMPLETED"), timeout=120, what="a COMPLETED workitem")
        uid = done.SOPInstanceUID
        assert job_id_of(uid) is not None
        wait_until(lambda: "COMPLETED" in suba.states(uid), timeout=30, what="SUBA told COMPLETED")
        assert suba.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]

        _queries_match(ris, done, study_uid, files, tmp_path / "var" / "dxnode.db")

        # N-GET: the asked attributes; an unknown UID is 0xC307.
        code, got = ris.get(
            uid, "ProcedureStepState", "ScheduledProcedureStepPriority", "PatientID", "ProcedureStepLabel"
        )
        assert code == 0x0000 and got is not None
        assert (got.ProcedureStepState, got.ScheduledProcedureStepPriority, got.PatientID) == (
            "COMPLETED",
            "MEDIUM",
            "PAT-UPS",
        )
        assert got.ProcedureStepLabel and "InputInformationSequence" not in got
        _check_with_dciodvfy(ris.get(uid)[1], tmp_path / "workitem.dcm")
        assert ris.get(uid[:-1] + ("1" if uid[-1] != "1" else "2"), "ProcedureStepState")[0] == 0xC307
        # A subscription to one workitem starts with a report of its current state; an unknown one is 0xC307.
        assert ris.subscribe("SUBC", uid) == 0x0000
        wait_until(lambda: subc.states(uid) == ["COMPLETED"], timeout=30, what="SUBC told the current state")
        assert ris.subscribe("SUBC", workitem_uid("1.2.3", 99, dt.datetime.now(dt.UTC))) == 0xC307
        # Nobody else changes the node's jobs.
        assert ris.action(uid, 1, _state("IN PROGRESS")).Status == 0xC300
        assert ris.action(uid, 2).Status == 0xC311
        assert (
            ris.assoc.send_n_set(_state("CANCELED"), UnifiedProcedureStepPush, uid, meta_uid=UnifiedProcedureStepPull)[
                0
            ].Status
            == 0xC300
        )
        created = ris.assoc.send_n_create(_state("SCHEDULED"), UnifiedProcedureStepPush, pydicom.uid.generate_uid())
        assert created[0].Status == 0x0124

        # A job that fails is CANCELED, with its reason.
        bad_uid, bad = make_study(tmp_path / "bad", n=1, patient_id="PAT-BAD")
        broken = pydicom.dcmread(bad[0])
        broken.PixelData = broken.PixelData[:64]
        broken.save_as(bad[0])
        storescu(node.port, bad)
        canceled = wait_until(lambda: _workitem(ris, bad_uid, "CANCELED"), timeout=120, what="a CANCELED workitem")
        wait_until(lambda: "CANCELED" in suba.states(canceled.SOPInstanceUID), timeout=30, what="SUBA told CANCELED")
        assert suba.states(canceled.SOPInstanceUID)[-1] == "CANCELED"
        reason = ris.get(canceled.SOPInstanceUID, "ProcedureStepProgressInformationSequence")[1]
        assert reason is not None and reason.ProcedureStepProgressInformationSequence[0].ReasonForCancellation

        # The subscriber that was down gets everything once it listens, in order; the unsubscribed one nothing.
        subb.start()
        wait_until(lambda: "CANCELED" in subb.states(canceled.SOPInstanceUID), timeout=30, what="SUBB caught up")
        assert subb.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"]
        assert [u for u, _ in subc.events] == [uid]  # globally unsubscribed: nothing of the failed study
    finally:
        ris.close()
        node.stop()


def _queries_match(ris: Ris, done: Dataset, study_uid: str, files: list[Path], db: Path) -> None:
    """C-FIND: only the keys asked come back; matching on state, priority, patient, dates; inputs and outputs."""
    uid = done.SOPInstanceUID
    assert set(done.dir()) <= {"SOPInstanceUID", "StudyInstanceUID", "ProcedureStepState", "SpecificCharacterSet"}
    assert _workitem(ris, study_uid, "SCHEDULED") is None
    assert [d.SOPInstanceUID for d in ris.find(SOPInstanceUID="", PatientID="PAT-U*")] == [uid]
    assert ris.find(SOPInstanceUID="", PatientID="PAT-UPS", ScheduledProcedureStepPriority="LOW") == []
    assert len(ris.find(SOPInstanceUID="", ScheduledProcedureStepPriority="MEDIUM", PatientID="PAT-UPS")) == 1
    today = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
    assert len(ris.find(SOPInstanceUID="", PatientID="PAT-UPS", ScheduledProcedureStepStartDateTime=f"{today}-")) == 1
    assert ris.find(SOPInstanceUID="", PatientID="PAT-UPS", ScheduledProcedureStepStartDateTime="2000-20001231") == []
    assert [d.SOPInstanceUID for d in ris.find(SOPInstanceUID=uid)] == [uid]
    assert len(ris.find(SOPInstanceUID="", ProcedureStepState="")) == 1

    # The SR is in the Output Information Sequence; the study's instances are the input.
    full = ris.find(SOPInstanceUID=uid, UnifiedProcedureStepPerformedProcedureSequence=[], InputInformationSequence=[])
    performed = full[0].UnifiedProcedureStepPerformedProcedureSequence[0]
    outputs = {r.ReferencedSOPInstanceUID for s in performed.OutputInformationSequence for r in s.ReferencedSOPSequence}
    srs = _sr_uids(db, study_uid)
    assert srs and srs <= outputs
    inputs = {r.ReferencedSOPInstanceUID for s in full[0].InputInformationSequence for r in s.ReferencedSOPSequence}
    assert inputs == {pydicom.dcmread(f).SOPInstanceUID for f in files}


def _check_with_dciodvfy(ds: Dataset | None, path: Path) -> None:
    """The whole workitem (N-GET with no attribute list), written as a file and checked by dciodvfy.

    dicom3tools knows no UPS IOD, so it checks every value against its VR and VM only (it does flag a
    bad DT or CS there) and says it found no information object."""
    assert ds is not None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == ["Error - Information Object Not found"]


def _receiving(ae_title: str) -> Dataset:
    info = Dataset()
    info.ReceivingAE, info.DeletionLock = ae_title, "FALSE"
    return info


def _state(state: str) -> Dataset:
    info = Dataset()
    info.ProcedureStepState = state
    info.TransactionUID = pydicom.uid.generate_uid()
    return info


def test_without_ups_watch_the_listener_offers_no_ups(tmp_path: Path) -> None:
    node = InProcessNode(tmp_path)
    try:
        ae = AE(ae_title="RIS")
        ae.add_requested_context(UnifiedProcedureStepWatch)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == ["1.2.840.10008.1.1"]
        assoc.release()
    finally:
        node.stop()


def test_job_states_priorities_and_uids_map_as_documented() -> None:
    assert ups_state(JobState.QUEUED, 0) == "SCHEDULED"
    assert ups_state(JobState.QUEUED, 1) == "IN PROGRESS"  # a retry waiting: still the node's
    assert ups_state(JobState.RUNNING, 1) == "IN PROGRESS"
    assert ups_state(JobState.DONE, 1) == "COMPLETED"
    assert ups_state(JobState.FAILED, 3) == ups_state(JobState.SKIPPED, 1) == "CANCELED"
    assert [ups_priority(p) for p in Priority] == ["HIGH", "HIGH", "MEDIUM", "LOW"]
    created = dt.datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=dt.UTC)
    uid = workitem_uid("1.2.3", 4242, created)
    assert len(uid) <= 64 and job_id_of(uid) == 4242 and uid == workitem_uid("1.2.3", 4242, created)
    assert uid != workitem_uid("1.2.4", 4242, created) and job_id_of("1.2.3.4") is None


def test_a_bad_date_range_is_refused_and_a_month_ends_on_its_last_day() -> None:
    with pytest.raises(ValueError, match="DateTime"):
        _date_range("yesterday")
    cond = _date_range("202602-202602")
    bounds = [c.right.value for c in cond.clauses]
    assert bounds[0] == dt.datetime(2026, 2, 1, tzinfo=dt.UTC)
    assert bounds[1] == dt.datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=dt.UTC)


def _owed(store: Store, ae_title: str) -> list[tuple[int, str]]:
    with store.session() as s:
        rows = s.execute(
            select(UpsEvent.job_id, UpsEvent.ups_state).where(UpsEvent.ae_title == ae_title).order_by(UpsEvent.id)
        )
        return [(job, state) for job, state in rows]


def _new_job(store: Store, uid: str) -> int:
    with store.session() as s:
        study = Study(study_instance_uid=uid, calling_aet="MODALITY", num_instances=1)
        s.add(study)
        s.flush()
        return queue.queued_job(s, study.id)


def test_changes_are_owed_once_per_state_and_suspend_keeps_the_workitems_already_told(store: Store) -> None:
    """On the real database (SQLite and PostgreSQL): transitions recorded where queue.py makes them."""
    settings = Settings(database={"url": store.url}, worklist={"max_attempts": 3, "retry_backoff_seconds": 0})
    first = _new_job(store, "1.2.77.1")
    with store.session() as s:
        assert ups_events._subscribe(s, ups_events.GLOBAL, "RIS", None) == 0x0000
    assert _owed(store, "RIS") == [(first, "SCHEDULED")]  # the current state, on subscribing
    assert queue.claim(store, "w:1") == first
    queue.finish(store, settings, first, None, error="model: RuntimeError", worker="w:1")  # a retry: still IN PROGRESS
    assert queue.claim(store, "w:1") == first
    with store.session() as s:
        assert ups_events._unsubscribe(s, ups_events.GLOBAL, "RIS", suspend=True) == 0x0000
    second = _new_job(store, "1.2.77.2")  # after the suspend: not told
    queue.finish(store, settings, first, JobState.DONE, worker="w:1")
    assert _owed(store, "RIS") == [(first, "SCHEDULED"), (first, "IN PROGRESS"), (first, "COMPLETED")]
    with store.session() as s:
        job = s.get(Job, second)
        assert job is not None
        uid = workitem_uid("1.2.77.2", second, job.created_at)
        assert ups_events._subscribe(s, uid, "PACS", None) == 0x0000
        assert ups_events._unsubscribe(s, uid, "PACS", suspend=False) == 0x0000
        assert ups_events._unsubscribe(s, uid, "PACS", suspend=True).Status == 0xC314
    assert queue.claim(store, "w:2") == second
    assert _owed(store, "PACS") == [(second, "SCHEDULED")]  # unsubscribed before it ran
    # Globally subscribed, a new workitem is subscribed to as it is made, and can be unsubscribed from alone.
    with store.session() as s:
        assert ups_events._subscribe(s, ups_events.GLOBAL, "RIS", None) == 0x0000
    third = _new_job(store, "1.2.77.3")
    with store.session() as s:
        job = s.get(Job, third)
        assert job is not None
        assert ups_events._unsubscribe(s, workitem_uid("1.2.77.3", third, job.created_at), "RIS", False) == 0x0000
    assert queue.claim(store, "w:3") == third
    assert [state for job_id, state in _owed(store, "RIS") if job_id == third] == ["SCHEDULED"]
    # A node started with [ups_watch] off drops what is left: nothing would ever send it.
    with store.session() as s:
        assert s.scalars(select(UpsEvent).where(UpsEvent.state == "pending")).all()
    assert ups_events.send_due(store, settings) == 0
    with store.session() as s:
        assert s.scalars(select(UpsSubscription)).all() == []
        assert s.scalars(select(UpsEvent).where(UpsEvent.state == "pending")).all() == []


def test_a_listed_ae_cancels_a_job_not_yet_started_and_no_other(store: Store) -> None:
    running, scheduled = _new_job(store, "1.2.78.1"), _new_job(store, "1.2.78.2")
    with store.session() as s:
        pairs = s.execute(select(Job, Study).join(Study)).all()
        uids = {j.id: workitem_uid(st.study_instance_uid, j.id, j.created_at) for j, st in pairs}
        assert ups_events._subscribe(s, uids[scheduled], "PACS", None) == 0x0000
    query = Dataset()
    query.SOPInstanceUID, query.ProcedureStepState, query.UnifiedProcedureStepPerformedProcedureSequence = "", "", []
    with store.session() as s:
        found = find(s, Settings(), query)  # newest first, an empty sequence where a key has no value yet
    assert [(d.SOPInstanceUID, d.ProcedureStepState) for d in found] == [
        (uids[scheduled], "SCHEDULED"),
        (uids[running], "SCHEDULED"),
    ]
    assert all(len(d.UnifiedProcedureStepPerformedProcedureSequence) == 0 for d in found)
    assert queue.claim(store, "w:1") == running
    query.ProcedureStepState = "IN PROGRESS"
    with store.session() as s:
        assert [d.SOPInstanceUID for d in find(s, Settings(), query)] == [uids[running]]
    info = Dataset()
    info.ReasonForCancellation = "ordered by mistake"
    with store.session() as s:
        assert ups_events._cancel(s, uids[scheduled], "ROGUE", False, info).Status == 0x0124
        assert ups_events._cancel(s, uids[running], "RIS", True, info).Status == 0xC313
        assert ups_events._cancel(s, uids[scheduled], "RIS", True, info) == 0x0000
        assert ups_events._cancel(s, uids[scheduled], "RIS", True, info).Status == 0xB304
    with store.session() as s:
        job = s.get(Job, scheduled)
        assert job is not None and job.state == JobState.FAILED
        assert job.error == "canceled at the request of RIS: ordered by mistake"
        last = s.scalars(select(UpsEvent).where(UpsEvent.job_id == scheduled).order_by(UpsEvent.id.desc())).first()
        assert last is not None and (last.ups_state, last.reason) == ("CANCELED", job.error)
    assert queue.claim(store, "w:2") is None  # nothing left to run


def test_two_nodes_on_one_database_send_each_report_once(store: Store, subscribers: dict[str, Subscriber]) -> None:
    """Two serve processes' senders racing on one database (SQLite and PostgreSQL): the batch lease lets
    one of them send; the subscriber gets each state once, in order."""
    sub = subscribers["SUBA"].start()
    settings = Settings(
        database={"url": store.url},
        ups_watch={"enabled": True, "subscribers": [{"ae_title": "SUBA", "host": "127.0.0.1", "port": sub.port}]},
    )
    with store.session() as s:
        assert ups_events._subscribe(s, ups_events.GLOBAL, "SUBA", None) == 0x0000
    jobs = [_new_job(store, f"1.2.79.{n}") for n in range(1, 21)]
    other = Store(store.url)  # the second node's own engine and sessions
    barrier = threading.Barrier(2)
    sent: list[int] = []

    def node(st: Store) -> None:
        barrier.wait()
        sent.append(ups_events.send_due(st, settings))

    threads = [threading.Thread(target=node, args=(st,)) for st in (store, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(sent) == [0, len(jobs)], sent  # one sender won the batch, the other sent nothing
    assert len(sub.events) == len(jobs)
    assert len(set(sub.events)) == len(jobs)  # no report twice
    with store.session() as s:
        assert s.scalars(select(UpsEvent).where(UpsEvent.state == "pending")).all() == []
    other.dispose()


def test_subscriptions_and_queries_on_either_receiving_process_reach_every_subscriber(tmp_path: Path) -> None:
    """[node] receive_processes = 2: four RIS associations, two on each process (least connections),
    each subscribes its own listener and queries; every listener is told each state of the job, and
    a subscription to the workitem alone, made on either process, starts with its current state."""
    need_tool("storescu")
    subs = [Subscriber(f"SUB{k}", free_port()).start() for k in range(6)]
    cfg = node_config(
        tmp_path,
        node={"receive_processes": 2},
        ups_watch={
            "enabled": True,
            "interval_seconds": 0.3,
            "subscribers": [{"ae_title": s.ae_title, "host": "127.0.0.1", "port": s.port} for s in subs],
        },
    )
    node = Node(cfg, "--no-web")
    ris: list[Ris] = []
    try:
        assert node.wait_for(r"listening on .*, 2 receiving processes")
        ris = [Ris(node.port, f"RIS{k}") for k in range(4)]
        for r, sub in zip(ris, subs[:4], strict=True):  # the first four subscribe to every workitem
            assert r.subscribe(sub.ae_title) == 0x0000
        served = wait_until(lambda: _ris_processes(node), 30, "four RIS associations logged")
        assert sorted(map(len, served.values())) == [2, 2], served

        study_uid, files = make_study(tmp_path / "study", n=2, patient_id="PAT-UPS2")
        storescu(node.port, files)
        done = wait_until(lambda: _workitem(ris[0], study_uid, "COMPLETED"), timeout=120, what="a COMPLETED workitem")
        uid = done.SOPInstanceUID
        for r in ris[1:]:  # every process answers the query alike
            found = _workitem(r, study_uid, "COMPLETED")
            assert found is not None and found.SOPInstanceUID == uid
        for sub in subs[:4]:
            wait_until(lambda sub=sub: "COMPLETED" in sub.states(uid), timeout=30, what=f"{sub.ae_title} told")
            assert sub.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], sub.ae_title
        for sub, (first, *_) in zip(subs[4:], served.values(), strict=True):  # one on each process
            assert ris[first].subscribe(sub.ae_title, uid) == 0x0000
            wait_until(lambda sub=sub: sub.states(uid) == ["COMPLETED"], 30, f"{sub.ae_title} told the current state")
    finally:
        for r in ris:
            r.close()
        node.stop()
        for sub in subs:
            sub.stop()


def _ris_processes(node: Node) -> dict[str, list[int]] | None:
    """The RIS associations (by number) each process logged, once all four are logged."""
    found = re.findall(r"association from RIS(\d) \([^)]*\) in process (\d+)", "\n".join(node.lines))
    if len(found) < 4:
        return None
    by_process: dict[str, list[int]] = {}
    for number, pid in found:
        by_process.setdefault(pid, []).append(int(number))
    return by_process
