"""The outbox against real receivers: DCMTK storescp and pynetdicom SCPs that refuse some objects."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, need_tool
from dicom_checks import dciodvfy_errors
from nodeproc import StoreSCP, wait_until, write_config
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dxnode import cli
from dxnode.analysis.streaming import analyze_study
from dxnode.config import Settings
from dxnode.model import load_classifier
from dxnode.outbox import dispatch
from dxnode.outputs.report import WrittenOutput, write_outputs
from dxnode.queries import list_deliveries
from dxnode.store import Audit, Delivery, Output, Store, Study, utcnow

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
BOTH = [SecondaryCaptureImageStorage, COMPREHENSIVE_SR]


def settings_for(store: Store, tmp: Path, port: int, **dispatch_keys: object) -> Settings:
    return Settings(
        node={"data_dir": tmp / "var"},
        database={"url": store.url},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        dispatch={
            "backoff_initial_seconds": 0.2,
            "backoff_max_seconds": 0.5,
            "max_attempts": 3,
            "timeout_seconds": 5,
            **dispatch_keys,
        },
        report={"heatmap_for": "top1"},
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[WrittenOutput]]:
    """A real SR + SC for CT_small from the demo model, written once for the module and checked by dciodvfy."""
    tmp = tmp_path_factory.mktemp("outputs")
    settings = Settings(node={"data_dir": tmp}, report={"heatmap_for": "top1"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp / "torch-home"))
        src = Path(get_testdata_file("CT_small.dcm"))
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        result = analyze_study(
            ds.StudyInstanceUID, [(ds.SOPInstanceUID, src)], load_classifier(settings.model), settings, "top1"
        )
        outs = write_outputs(result, {ds.SOPInstanceUID: src}, settings, tmp / "outputs")
    assert sorted(w.kind for w in outs) == ["sc", "sr"]
    assert all(dciodvfy_errors(w.path) == [] for w in outs)
    return tmp, outs


@pytest.fixture
def outputs(store: Store, tmp_path: Path, written: tuple[Path, list[WrittenOutput]]) -> list[Output]:
    """The SR and SC under this test's data dir, recorded as Output rows of their study (no deliveries yet)."""
    root, outs = written
    shutil.copytree(root / "outputs", tmp_path / "var" / "outputs")
    ds = pydicom.dcmread(outs[0].path, stop_before_pixels=True)
    with store.session() as s:
        study = Study(study_instance_uid=ds.StudyInstanceUID, patient_id=str(ds.PatientID))
        s.add(study)
        s.flush()
        rows = []
        for w in outs:
            out = Output(
                study_id=study.id,
                kind=w.kind,
                label=w.label,
                sop_class_uid=w.sop_class_uid,
                sop_instance_uid=w.sop_instance_uid,
                series_instance_uid=w.series_instance_uid,
                file_path=str(w.path.relative_to(root)),
            )
            s.add(out)
            rows.append(out)
    return rows


def enqueue_all(store: Store, settings: Settings, outs: list[Output], calling_aet: str = "") -> None:
    with store.session() as s:
        for out in outs:
            dispatch.enqueue(s, s.get(Output, out.id), settings, calling_aet)  # type: ignore[arg-type]
            dispatch.enqueue(s, s.get(Output, out.id), settings, calling_aet)  # type: ignore[arg-type]  # idempotent


def extra_outputs(
    store: Store, data_dir: Path, template: Output, n: int, prefix: str = "1.2.826.0.1.3680043.10.511"
) -> list[Output]:
    """n more outputs: copies of the template's file under other SOP Instance UIDs, recorded as rows."""
    ds = pydicom.dcmread(data_dir / template.file_path)
    rows = []
    for i in range(n):
        uid = f"{prefix}.{i}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(data_dir / "outputs" / f"extra-{i}.dcm")
        rows.append(
            Output(
                study_id=template.study_id,
                kind=template.kind,
                label=f"x{i}",
                sop_class_uid=template.sop_class_uid,
                sop_instance_uid=uid,
                series_instance_uid=template.series_instance_uid,
                file_path=f"outputs/extra-{i}.dcm",
            )
        )
    with store.session() as s:
        s.add_all(rows)
    return rows


def deliveries(store: Store) -> list[Delivery]:
    with store.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def audit_actions(store: Store) -> list[tuple[str, str]]:
    with store.session() as s:
        return [(a.action, a.target) for a in s.scalars(select(Audit).order_by(Audit.id))]


def received_uids(folder: Path) -> list[str]:
    return sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in folder.iterdir())


class PickySCP:
    """A pynetdicom SCP for some SOP classes that answers a chosen status per SOP class and records arrival order."""

    def __init__(
        self,
        sop_classes: list[str] | None = None,
        status: dict[str, int] | None = None,
        ae_title: str = "PACS",
        require_called_aet: bool = False,
        port: int = 0,
    ) -> None:
        self.received: list[str] = []
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        for uid in sop_classes or [SecondaryCaptureImageStorage]:
            ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

        def on_store(event: evt.Event) -> int:
            code = (status or {}).get(str(event.request.AffectedSOPClassUID), 0x0000)
            if code == 0x0000:
                self.received.append(str(event.request.AffectedSOPInstanceUID))
            return code

        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def picky() -> Iterator[PickySCP]:
    scp = PickySCP()
    yield scp
    scp.stop()


def test_delivered_to_storescp(store: Store, tmp_path: Path, outputs: list[Output]) -> None:
    need_tool("storescp")
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    try:
        settings = settings_for(store, tmp_path, pacs.port)
        enqueue_all(store, settings, outputs)
        assert [d.state for d in deliveries(store)] == ["pending", "pending"]
        assert dispatch.send_due(store, settings) == 2
        assert received_uids(pacs.folder) == sorted(o.sop_instance_uid for o in outputs)
        rows = deliveries(store)
        assert [(d.state, d.attempts, d.dimse_status) for d in rows] == [("sent", 1, 0)] * 2
        assert [a for a, _ in audit_actions(store)] == ["delivery.sent"] * 2
        assert dispatch.send_due(store, settings) == 0  # nothing twice
        assert len(list(pacs.folder.iterdir())) == 2
    finally:
        pacs.stop()


def test_destination_down_then_up_gets_everything_once_in_order(
    store: Store, tmp_path: Path, outputs: list[Output]
) -> None:
    need_tool("storescp")
    port = free_port()
    # A backoff of 30-60 s, so that "still backing off" below does not depend on how fast this machine is;
    # each send looks 100 s ahead, past any such backoff.
    settings = settings_for(store, tmp_path, port, max_attempts=50, backoff_initial_seconds=30, backoff_max_seconds=60)
    ahead = dt.timedelta(seconds=100)
    enqueue_all(store, settings, outputs)
    for _ in range(3):
        assert dispatch.send_due(store, settings, now=utcnow() + ahead) == 0
    rows = deliveries(store)
    assert all(d.state == "pending" and d.attempts == 3 and "Connection refused" in d.last_error for d in rows)
    assert all(d.next_attempt_at > utcnow() for d in rows)  # backing off
    # A newer row is due at once, but waits behind the older ones that are backing off.
    extra_outputs(store, settings.data_dir, outputs[1], 1)
    with store.session() as s:
        newest = s.scalar(select(Output).order_by(Output.id.desc()))
        dispatch.enqueue(s, newest, settings)  # type: ignore[arg-type]
    assert dispatch.send_due(store, settings) == 0
    assert deliveries(store)[-1].attempts == 0
    pacs = StoreSCP(tmp_path / "pacs", port)
    try:
        assert dispatch.send_due(store, settings, now=utcnow() + ahead) == 3
        rows = deliveries(store)
        assert [d.state for d in rows] == ["sent"] * 3
        times = [d.sent_at for d in rows]
        assert times == sorted(times)  # type: ignore[type-var]
        assert len(list(pacs.folder.iterdir())) == 2 + 1
        sent_targets = [t for a, t in audit_actions(store) if a == "delivery.sent"]
        assert sent_targets == [f"delivery:{d.id}" for d in rows]  # once each, in creation order
    finally:
        pacs.stop()


def test_refused_sop_class_fails_its_row_and_the_rest_still_flow(
    store: Store, tmp_path: Path, outputs: list[Output], picky: PickySCP
) -> None:
    settings = settings_for(store, tmp_path, picky.port)
    sr, sc = sorted(outputs, key=lambda o: o.kind == "sc")
    enqueue_all(store, settings, [sr, sc])  # the refused SR comes first and must not block the SC
    assert dispatch.send_due(store, settings) == 1
    by_output = {d.output_id: d for d in deliveries(store)}
    assert by_output[sc.id].state == "sent"
    sr_row = by_output[sr.id]
    assert sr_row.state == "failed" and sr_row.attempts == 1 and "no presentation context" in sr_row.last_error
    assert ("delivery.failed", f"delivery:{sr_row.id}") in audit_actions(store)
    assert picky.received == [sc.sop_instance_uid]


def test_status_0122_fails_at_once_and_the_rest_still_flow(store: Store, tmp_path: Path, outputs: list[Output]) -> None:
    scp = PickySCP(sop_classes=BOTH, status={COMPREHENSIVE_SR: 0x0122})
    try:
        settings = settings_for(store, tmp_path, scp.port)
        sr, sc = sorted(outputs, key=lambda o: o.kind == "sc")
        enqueue_all(store, settings, [sr, sc])
        assert dispatch.send_due(store, settings) == 1
        sr_row, sc_row = deliveries(store)
        assert (sr_row.state, sr_row.attempts, sr_row.dimse_status) == ("failed", 1, 0x0122)
        assert "0x0122 Refused: SOP Class Not Supported" in sr_row.last_error
        assert sc_row.state == "sent" and scp.received == [sc.sop_instance_uid]
    finally:
        scp.stop()


def test_failure_status_is_retried_in_order_then_failed_and_resend_requeues(
    store: Store, tmp_path: Path, outputs: list[Output]
) -> None:
    refusing = PickySCP(sop_classes=BOTH, status={SecondaryCaptureImageStorage: 0xA700, COMPREHENSIVE_SR: 0xA700})
    port = refusing.port
    try:
        settings = settings_for(store, tmp_path, port, max_attempts=2)
        enqueue_all(store, settings, outputs)
        later = utcnow() + dt.timedelta(seconds=5)
        assert dispatch.send_due(store, settings, now=later) == 0
        first, second = deliveries(store)
        # The first row will be retried, so the second one was not tried after it this round.
        assert (first.state, first.attempts, first.dimse_status) == ("pending", 1, 0xA700)
        assert "0xA700 Refused: Out of Resources" in first.last_error
        assert (second.state, second.attempts) == ("pending", 0)
        for i in range(1, 4):
            dispatch.send_due(store, settings, now=later + dt.timedelta(seconds=5 * i))
        rows = deliveries(store)
        assert all(
            d.state == "failed" and d.attempts == 2 and d.dimse_status == 0xA700 and "0xA700" in d.last_error
            for d in rows
        )
    finally:
        refusing.stop()
    accepting = PickySCP(sop_classes=BOTH, port=port)
    try:
        with store.session() as s:
            study_uid = s.scalar(select(Study.study_instance_uid))
            assert dispatch.resend(s, study_uid or "", actor="test") == 2
        assert [(d.state, d.attempts, d.last_error, d.dimse_status) for d in deliveries(store)] == [
            ("pending", 0, "", None)
        ] * 2
        assert dispatch.send_due(store, settings) == 2
        assert accepting.received == [o.sop_instance_uid for o in outputs]
        with store.session() as s:
            assert dispatch.resend(s, "1.2.3.4.5", actor="test") == 0
            assert [r.state for r in list_deliveries(s)] == ["sent", "sent"]
            assert dispatch.resend(s, outputs[0].sop_instance_uid, actor="test") == 1  # one output
        assert ("delivery.resend", study_uid) in audit_actions(store)
    finally:
        accepting.stop()


def test_rejected_association_is_retried(store: Store, tmp_path: Path, outputs: list[Output]) -> None:
    scp = PickySCP(sop_classes=BOTH, ae_title="OTHER", require_called_aet=True)
    try:
        settings = settings_for(store, tmp_path, scp.port)
        enqueue_all(store, settings, outputs)
        assert dispatch.send_due(store, settings) == 0
        assert [(d.state, d.attempts) for d in deliveries(store)] == [("pending", 1)] * 2
        assert all(f"association rejected by PACS@127.0.0.1:{scp.port}" in d.last_error for d in deliveries(store))
        assert scp.received == []
    finally:
        scp.stop()


def test_unreadable_output_file_fails_its_row_only(
    store: Store, tmp_path: Path, outputs: list[Output], picky: PickySCP
) -> None:
    sc = next(o for o in outputs if o.kind == "sc")
    broken = extra_outputs(store, tmp_path / "var", sc, 1)[0]
    with store.session() as s:
        s.get(Output, broken.id).file_path = "outputs/missing.dcm"  # type: ignore[union-attr]
    settings = settings_for(store, tmp_path, picky.port)
    enqueue_all(store, settings, [broken, sc])
    assert dispatch.send_due(store, settings) == 1
    bad, good = deliveries(store)
    assert bad.state == "failed" and "cannot read output file outputs/missing.dcm" in bad.last_error
    assert good.state == "sent" and picky.received == [sc.sop_instance_uid]


def test_return_to_sender(store: Store, tmp_path: Path, outputs: list[Output]) -> None:
    def settings(on: bool) -> Settings:
        return Settings(
            node={"data_dir": tmp_path / "var"},
            database={"url": store.url},
            dispatch={"return_to_sender": on},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                {"name": "ct1", "ae_title": "CT1", "host": "10.0.0.5", "port": 104, "return_only": True},
            ],
        )

    with store.session() as s:
        sr, sc = (s.get(Output, o.id) for o in outputs)
        assert [d.destination for d in dispatch.enqueue(s, sr, settings(False), "CT1")] == ["pacs"]  # type: ignore[arg-type]
        assert [d.destination for d in dispatch.enqueue(s, sr, settings(True), "CT1")] == ["pacs", "ct1"]  # type: ignore[arg-type]
        assert [d.destination for d in dispatch.enqueue(s, sc, settings(True), "CT2")] == ["pacs"]  # type: ignore[arg-type]
    assert len(deliveries(store)) == 3


def test_two_outbox_runners_on_one_database_send_each_row_once(
    store: Store, tmp_path: Path, outputs: list[Output]
) -> None:
    need_tool("storescp")
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    other = PickySCP(sop_classes=BOTH, ae_title="ARCHIVE")
    try:
        settings = settings_for(store, tmp_path, pacs.port)
        settings.destinations.append(
            settings.destinations[0].model_copy(update={"name": "archive", "ae_title": "ARCHIVE", "port": other.port})
        )
        outs = outputs + extra_outputs(store, settings.data_dir, outputs[1], 10)
        enqueue_all(store, settings, outs)
        counts: list[int] = []
        runners = [
            threading.Thread(
                target=lambda: counts.append(sum(dispatch.send_due(Store(store.url), settings) for _ in range(3)))
            )
            for _ in range(3)
        ]
        for t in runners:
            t.start()
        for t in runners:
            t.join(120)
        assert sum(counts) == 24
        with store.session() as s:
            sent = s.execute(
                select(Audit.target, func.count()).where(Audit.action == "delivery.sent").group_by(Audit.target)
            ).all()
        assert len(sent) == 24 and all(n == 1 for _, n in sent)
        assert other.received == [o.sop_instance_uid for o in outs]  # once each, in order
        wait_until(lambda: len(list(pacs.folder.iterdir())) >= 2, timeout=10, what="files at storescp")
    finally:
        pacs.stop()
        other.stop()


def test_cli_outbox_and_resend(
    store: Store, tmp_path: Path, outputs: list[Output], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store, tmp_path, free_port(), max_attempts=1)
    enqueue_all(store, settings, outputs)
    dispatch.send_due(store, settings)  # nothing listens: one attempt, then failed
    config = write_config(
        tmp_path / "dxnode.toml",
        {
            "node": {"data_dir": str(tmp_path / "var")},
            "database": {"url": store.url},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        },
    )
    assert cli.main(["--config", str(config), "outbox", "--state", "failed", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["output_sop_instance_uid"] for r in rows) == sorted(o.sop_instance_uid for o in outputs)
    assert all(
        r["state"] == "failed" and "Connection refused" in r["last_error"] and r["study_instance_uid"] for r in rows
    )
    assert cli.main(["--config", str(config), "outbox"]) == 0
    table = capsys.readouterr().out
    assert (
        table.splitlines()[0].split()[:6] == ["ID", "KIND", "LABEL", "DESTINATION", "ADDRESS", "STATE"]
        and table.count("failed") == 2
        and table.count("PACS@127.0.0.1:104 ") == 2  # the address of the config the command runs with
    )
    assert cli.main(["--config", str(config), "resend", rows[0]["study_instance_uid"]]) == 0
    assert "re-queued 2 deliveries" in capsys.readouterr().out
    assert cli.main(["--config", str(config), "outbox", "--state", "pending", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert cli.main(["--config", str(config), "resend", "1.2.999"]) == 1
    assert "no delivery for '1.2.999'" in capsys.readouterr().err


def test_leases_of_stopped_processes_are_released(store: Store, tmp_path: Path, outputs: list[Output]) -> None:
    """A lease whose process is gone (this host) or whose refresh went stale (any host) is released
    at the next claim; a live, fresh lease of another node is left alone."""
    import socket
    import subprocess
    import sys

    settings = settings_for(store, tmp_path, free_port(), timeout_seconds=5)  # stale after 2 x 5 + 30 s
    enqueue_all(store, settings, outputs)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = utcnow()
    far = now + dt.timedelta(hours=1)
    holders = {
        "fresh elsewhere": ("otherhost:1", now),
        "dead here": (f"{socket.gethostname()}:{dead.pid}", now),
        "stale elsewhere": ("otherhost:2", now - dt.timedelta(seconds=41)),
    }
    for name, (holder, refreshed) in holders.items():
        with store.session() as s:
            for row in s.scalars(select(Delivery)):
                row.next_attempt_at, row.leased_by, row.lease_heartbeat_at = far, holder, refreshed
        batches = dispatch._claim(store, settings, now)
        claimed = [j.id for b in batches for j in b]
        assert bool(claimed) == (name != "fresh elsewhere"), name
        if claimed:
            with store.session() as s:
                assert {r.leased_by for r in s.scalars(select(Delivery))} == {dispatch.worker_id()}
