"""The outbox against real receivers: DCMTK storescp and a pynetdicom SCP that refuses some objects."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, need_tool
from dicom_checks import dciodvfy_errors
from nodeproc import StoreSCP, wait_until
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dxnode import dispatch
from dxnode import model as model_mod
from dxnode.config import Settings
from dxnode.model import analyze_study, load_classifier
from dxnode.report import write_outputs
from dxnode.store import Audit, Delivery, Output, Store, Study, utcnow


def settings_for(store: Store, tmp: Path, port: int, **dispatch_keys: object) -> Settings:
    return Settings(
        node={"data_dir": tmp / "var"}, database={"url": store.url},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        dispatch={"backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5, "max_attempts": 3, "timeout_seconds": 5, **dispatch_keys},
        report={"heatmap_for": "top1"},
    )


def outputs_for_a_study(store: Store, settings: Settings, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[Output]:
    """Write a real SR + SC for CT_small (demo model) and their outbox rows."""
    monkeypatch.setenv("TORCH_HOME", str(tmp / "torch-home"))
    model_mod._cache.clear()
    src = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    result = analyze_study(ds.StudyInstanceUID, [(ds.SOPInstanceUID, src)], load_classifier(settings.model), settings, "top1")
    written = write_outputs(result, {ds.SOPInstanceUID: src}, settings, settings.data_dir / "outputs")
    assert all(dciodvfy_errors(w.path) == [] for w in written)
    with store.session() as s:
        study = Study(study_instance_uid=ds.StudyInstanceUID, patient_id=str(ds.PatientID))
        s.add(study)
        s.flush()
        rows = []
        for w in written:
            out = Output(study_id=study.id, kind=w.kind, label=w.label, sop_class_uid=w.sop_class_uid, sop_instance_uid=w.sop_instance_uid,
                         series_instance_uid=w.series_instance_uid, file_path=str(w.path.relative_to(settings.data_dir)))
            s.add(out)
            s.flush()
            dispatch.enqueue(s, out, settings)
            dispatch.enqueue(s, out, settings)  # idempotent
            rows.append(out)
    return rows


def deliveries(store: Store) -> list[Delivery]:
    with store.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def received_uids(folder: Path) -> list[str]:
    return sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in folder.iterdir())


def test_delivered_to_storescp(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_tool("storescp")
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    try:
        settings = settings_for(store, tmp_path, pacs.port)
        outs = outputs_for_a_study(store, settings, tmp_path, monkeypatch)
        assert len(deliveries(store)) == 2
        assert dispatch.send_due(store, settings) == 2
        assert received_uids(pacs.folder) == sorted(o.sop_instance_uid for o in outs)
        assert {d.state for d in deliveries(store)} == {"sent"}
        assert dispatch.send_due(store, settings) == 0  # nothing twice
    finally:
        pacs.stop()


def test_destination_down_then_up_gets_everything_once_in_order(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_tool("storescp")
    port = free_port()
    settings = settings_for(store, tmp_path, port, max_attempts=50)
    outputs_for_a_study(store, settings, tmp_path, monkeypatch)
    for _ in range(3):
        assert dispatch.send_due(store, settings, now=utcnow() + dt.timedelta(seconds=10)) == 0
    rows = deliveries(store)
    assert all(d.state == "pending" and d.attempts == 3 and "Connection refused" in d.last_error for d in rows)
    assert rows[0].next_attempt_at > utcnow()  # backing off
    pacs = StoreSCP(tmp_path / "pacs", port)
    try:
        assert dispatch.send_due(store, settings, now=utcnow() + dt.timedelta(seconds=10)) == 2
        rows = deliveries(store)
        assert [d.state for d in rows] == ["sent", "sent"] and rows[0].sent_at <= rows[1].sent_at
        assert len(list(pacs.folder.iterdir())) == 2
    finally:
        pacs.stop()


class PickySCP:
    """A pynetdicom SCP that supports Secondary Capture only, or answers a failure status."""

    def __init__(self, status: int = 0x0000, sop_classes: list[str] | None = None) -> None:
        self.received: list[str] = []
        ae = AE(ae_title="PACS")
        for uid in sop_classes or [SecondaryCaptureImageStorage]:
            ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

        def on_store(event: evt.Event) -> int:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return status

        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def picky() -> Iterator[PickySCP]:
    scp = PickySCP()
    yield scp
    scp.stop()


def test_refused_sop_class_fails_its_row_and_the_rest_still_flow(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, picky: PickySCP) -> None:
    settings = settings_for(store, tmp_path, picky.port)
    outs = outputs_for_a_study(store, settings, tmp_path, monkeypatch)
    assert dispatch.send_due(store, settings) == 1
    by_kind = {o.kind: o for o in outs}
    states = {d.output_id: d for d in deliveries(store)}
    assert states[by_kind["sc"].id].state == "sent"
    sr_row = states[by_kind["sr"].id]
    assert sr_row.state == "failed" and "no presentation context" in sr_row.last_error
    assert picky.received == [by_kind["sc"].sop_instance_uid]


def test_failure_status_is_retried_then_failed_and_resend_requeues(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refusing = PickySCP(status=0xA700, sop_classes=[SecondaryCaptureImageStorage, "1.2.840.10008.5.1.4.1.1.88.33"])
    try:
        settings = settings_for(store, tmp_path, refusing.port, max_attempts=2)
        outputs_for_a_study(store, settings, tmp_path, monkeypatch)
        later = utcnow() + dt.timedelta(seconds=5)
        dispatch.send_due(store, settings, now=later)
        dispatch.send_due(store, settings, now=later + dt.timedelta(seconds=5))
        rows = deliveries(store)
        assert all(d.state == "failed" and d.dimse_status == 0xA700 and "0xA700" in d.last_error for d in rows)
    finally:
        refusing.stop()
    accepting = PickySCP(sop_classes=[SecondaryCaptureImageStorage, "1.2.840.10008.5.1.4.1.1.88.33"])
    try:
        settings = settings_for(store, tmp_path, accepting.port)
        with store.session() as s:
            for d in s.scalars(select(Delivery)):
                d.port = accepting.port
            study_uid = s.scalar(select(Study.study_instance_uid))
            assert dispatch.resend(s, study_uid, actor="test") == 2
        assert dispatch.send_due(store, settings) == 2
        with store.session() as s:
            assert dispatch.resend(s, "1.2.3.4.5", actor="test") == 0
            assert [r["state"] for r in dispatch.list_deliveries(s)] == ["sent", "sent"]
    finally:
        accepting.stop()


def test_two_outbox_runners_on_one_database_send_each_row_once(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_tool("storescp")
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    try:
        settings = settings_for(store, tmp_path, pacs.port)
        outs = outputs_for_a_study(store, settings, tmp_path, monkeypatch)
        with store.session() as s:  # ten more rows (the same SC file under other output rows)
            study = s.scalar(select(Study))
            for i in range(10):
                extra = Output(study_id=study.id, kind="sc", label=f"x{i}", sop_class_uid=outs[1].sop_class_uid,
                               sop_instance_uid=f"1.2.826.0.1.{i}", series_instance_uid=outs[1].series_instance_uid, file_path=outs[1].file_path)
                s.add(extra)
                s.flush()
                dispatch.enqueue(s, extra, settings)
        counts: list[int] = []
        runners = [threading.Thread(target=lambda: counts.append(dispatch.send_due(Store(store.url), settings))) for _ in range(2)]
        for t in runners:
            t.start()
        for t in runners:
            t.join(120)
        assert sum(counts) == 12
        with store.session() as s:
            sent = s.execute(select(Audit.target, func.count()).where(Audit.action == "delivery.sent").group_by(Audit.target)).all()
        assert len(sent) == 12 and all(n == 1 for _, n in sent)
        wait_until(lambda: len(list(pacs.folder.iterdir())) >= 2, timeout=10, what="files at storescp")
    finally:
        pacs.stop()
