"""Storage Commitment for results: a pynetdicom peer that reports some references failed or never
reports, and Orthanc (its Storage Commitment SCP reports on an association it opens to the node)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_dispatch
from conftest import free_port, need
from nodeproc import wait_port, wait_until
from pydantic import ValidationError
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from test_dispatch import BOTH, audit_actions, deliveries, enqueue_all

from dxnode import metrics
from dxnode.config import Settings
from dxnode.outbox import commitment, dispatch
from dxnode.receive.ingest import Ingest
from dxnode.scp import StorageSCP
from dxnode.states import DeliveryState
from dxnode.store import Output, Store

written, outputs = test_dispatch.written, test_dispatch.outputs  # shared fixtures: a real SR + SC as outbox rows


class CommitPeer:
    """A pynetdicom Storage SCP and Storage Commitment SCP on a free port.

    It reports on the association that asked, once its N-ACTION response is on the wire; the SOP
    Instance UIDs in fail_once are reported failed (reason 0x0110) the first time they are asked
    for. With report=False it never reports."""

    def __init__(self, fail_once: set[str] | None = None, report: bool = True) -> None:
        self.fail_once = set(fail_once or ())
        self.report = report
        self.stored: list[str] = []
        self.actions: list[Dataset] = []
        self.reports: list[Dataset] = []
        self._armed: dict[int, Dataset] = {}  # association -> report to send after the N-ACTION response
        ae = AE("PACS")
        for uid in BOTH:
            ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(StorageCommitmentPushModel)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_PDU_SENT, self._on_pdu_sent),
        ]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _on_action(self, event: Event) -> tuple[int, None]:
        info = event.action_information
        self.actions.append(info)
        if self.report:
            report = Dataset()
            report.TransactionUID = info.TransactionUID
            ok, failed = [], []
            for ref in info.ReferencedSOPSequence:
                item = Dataset()
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = (
                    ref.ReferencedSOPClassUID,
                    ref.ReferencedSOPInstanceUID,
                )
                if ref.ReferencedSOPInstanceUID in self.fail_once:
                    self.fail_once.discard(ref.ReferencedSOPInstanceUID)
                    item.FailureReason = 0x0110
                    failed.append(item)
                else:
                    ok.append(item)
            report.ReferencedSOPSequence = ok
            if failed:
                report.FailedSOPSequence = failed
            self._armed[id(event.assoc)] = report
        return 0x0000, None

    def _on_pdu_sent(self, event: Event) -> None:
        # The N-ACTION response (a command without a data set: one P-DATA) was written: report now.
        if isinstance(event.pdu, P_DATA_TF) and id(event.assoc) in self._armed:
            report = self._armed.pop(id(event.assoc))
            threading.Thread(target=self._send_report, args=(event.assoc, report), daemon=True).start()

    def _send_report(self, assoc: Any, report: Dataset) -> None:
        event_type = 2 if "FailedSOPSequence" in report else 1
        status, _ = assoc.send_n_event_report(
            report, event_type, StorageCommitmentPushModel, commitment.PUSH_MODEL_INSTANCE
        )
        assert status.Status == 0x0000
        self.reports.append(report)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer_factory() -> Iterator[Any]:
    peers: list[CommitPeer] = []

    def make(**kw: Any) -> CommitPeer:
        peers.append(CommitPeer(**kw))
        return peers[-1]

    yield make
    for p in peers:
        p.stop()


def commit_settings(store: Store, tmp: Path, port: int, timeout: float = 60, ae_title: str = "PACS") -> Settings:
    return Settings(
        node={"data_dir": tmp / "var", "host": "127.0.0.1", "port": free_port()},
        database={"url": store.url},
        destinations=[
            {
                "name": "pacs",
                "ae_title": ae_title,
                "host": "127.0.0.1",
                "port": port,
                "commitment": True,
                "commitment_timeout": timeout,
            }
        ],
        dispatch={"backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5, "max_attempts": 5, "timeout_seconds": 10},
        report={"heatmap_for": "top1"},
    )


def counter(c: Any, destination: str = "pacs") -> float:
    return float(c.labels(destination=destination)._value.get())


def by_uid(store: Store, outs: list[Output]) -> dict[str, Any]:
    kinds = {o.id: o.sop_instance_uid for o in outs}
    return {kinds[d.output_id]: d for d in deliveries(store)}


def test_failed_references_are_sent_again_and_committed_later(
    store: Store, tmp_path: Path, outputs: list[Output], peer_factory: Any
) -> None:
    sr, sc = sorted(outputs, key=lambda o: o.kind, reverse=True)  # "sr", "sc"
    peer = peer_factory(fail_once={sc.sop_instance_uid})
    settings = commit_settings(store, tmp_path, peer.port)
    enqueue_all(store, settings, outputs)
    committed_before = counter(metrics.DELIVERIES_COMMITTED)
    failed_before = counter(metrics.COMMITMENT_FAILED_REFERENCES)

    assert dispatch.send_due(store, settings) == 2
    # One N-ACTION for both objects; the report came back on the same association before send_due returned.
    assert len(peer.actions) == 1
    first = peer.actions[0]
    assert sorted((r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in first.ReferencedSOPSequence) == sorted(
        (o.sop_class_uid, o.sop_instance_uid) for o in outputs
    )
    rows = by_uid(store, outputs)
    assert rows[sr.sop_instance_uid].state == DeliveryState.COMMITTED
    assert rows[sr.sop_instance_uid].committed_at is not None
    assert rows[sc.sop_instance_uid].state == DeliveryState.PENDING
    assert "failure reason 0x0110" in rows[sc.sop_instance_uid].last_error

    # The next round sends the SC again and asks again, under a new Transaction UID: now committed.
    assert dispatch.send_due(store, settings) == 1
    assert peer.stored.count(sc.sop_instance_uid) == 2 and peer.stored.count(sr.sop_instance_uid) == 1
    assert len(peer.actions) == 2 and peer.actions[1].TransactionUID != first.TransactionUID
    assert [r.ReferencedSOPInstanceUID for r in peer.actions[1].ReferencedSOPSequence] == [sc.sop_instance_uid]
    assert {d.state for d in deliveries(store)} == {DeliveryState.COMMITTED}
    assert counter(metrics.DELIVERIES_COMMITTED) - committed_before == 2
    assert counter(metrics.COMMITMENT_FAILED_REFERENCES) - failed_before == 1
    reports = [t for a, t in audit_actions(store) if a == "delivery.commitment_report"]
    assert reports == [f"commitment:{first.TransactionUID}", f"commitment:{peer.actions[1].TransactionUID}"]

    # A committed row is not cancelled, and nothing more is asked.
    with store.session() as s:
        change = dispatch.cancel(s, dispatch.Selection(destination="pacs"), "test")
    assert change.changed == [] and list(change.skipped) == ["already committed"]
    assert dispatch.send_due(store, settings) == 0 and len(peer.actions) == 2


def test_no_report_within_the_timeout_alerts_and_asks_again(
    store: Store, tmp_path: Path, outputs: list[Output], peer_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    peer = peer_factory(report=False)
    settings = commit_settings(store, tmp_path, peer.port, timeout=0.5)
    enqueue_all(store, settings, outputs)
    timeouts_before = counter(metrics.COMMITMENT_TIMEOUTS)
    assert dispatch.send_due(store, settings) == 2
    assert len(peer.actions) == 1 and {d.state for d in deliveries(store)} == {DeliveryState.SENT}
    first = str(peer.actions[0].TransactionUID)
    assert {d.commitment_uid for d in deliveries(store)} == {first}

    with caplog.at_level(logging.ERROR, logger="dxnode.outbox.commitment"):
        wait_until(lambda: dispatch.send_due(store, settings) == 0 and len(peer.actions) >= 2, 30, "a second request")
    assert any("no report from pacs within 0.5 s for 2 object(s)" in r.getMessage() for r in caplog.records)
    assert counter(metrics.COMMITMENT_TIMEOUTS) - timeouts_before == 1
    assert ("delivery.commitment_timeout", f"commitment:{first}") in audit_actions(store)
    second = str(peer.actions[1].TransactionUID)
    assert second != first and len(peer.actions[1].ReferencedSOPSequence) == 2
    assert peer.stored and len(peer.stored) == 2  # asked again, not sent again

    # A late report for the first transaction changes nothing; one for the second commits.
    refs = tuple(o.sop_instance_uid for o in outputs)
    assert commitment.record_report(store, commitment.Report(first, refs, ()), "PACS") == ([], [])
    assert {d.state for d in deliveries(store)} == {DeliveryState.SENT}
    committed, again = commitment.record_report(store, commitment.Report(second, refs, ()), "PACS")
    assert len(committed) == 2 and again == []
    assert {d.state for d in deliveries(store)} == {DeliveryState.COMMITTED}


def test_commitment_needs_a_dimse_destination() -> None:
    with pytest.raises(ValidationError, match=r"commitment .*needs a dimse destination"):
        Settings(destinations=[{"name": "w", "kind": "dicomweb", "url": "http://127.0.0.1/dw", "commitment": True}])
    with pytest.raises(ValidationError):
        Settings(destinations=[{"name": "d", "ae_title": "P", "host": "h", "port": 104, "commitment_timeout": 0}])


def _orthanc(tmp: Path, dicom_port: int, http_port: int, node_port: int) -> subprocess.Popen[bytes]:
    """Orthanc on free ports; it knows the node as modality DXNODE (where it sends commitment reports)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {
        "Name": "dxnode-commitment",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "Plugins": [],
        "DicomModalities": {"dxnode": ["DXNODE", "127.0.0.1", node_port]},
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
    }
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    log = (tmp / "orthanc.log").open("wb")  # kept for the reader of a failing test
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"  # Debian puts it in /usr/sbin
    proc = subprocess.Popen([binary, "--verbose", str(tmp / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    wait_port(http_port, timeout=60)
    wait_port(dicom_port, timeout=60)
    return proc


def test_orthanc_commits_on_an_association_it_opens_to_the_node(
    store: Store, tmp_path: Path, outputs: list[Output]
) -> None:
    need(shutil.which("Orthanc") is not None or Path("/usr/sbin/Orthanc").exists(), "orthanc")
    dicom_port, http_port = free_port(), free_port()
    settings = commit_settings(store, tmp_path, dicom_port, ae_title="ORTHANC")
    scp = StorageSCP(settings, Ingest(settings, store), commitment.report_handler(store))
    scp.start()
    orthanc = _orthanc(tmp_path / "orthanc", dicom_port, http_port, scp.port)
    try:
        enqueue_all(store, settings, outputs)
        assert dispatch.send_due(store, settings) == 2, [d.last_error for d in deliveries(store)]
        states = wait_until(
            lambda: {d.state for d in deliveries(store)} == {DeliveryState.COMMITTED},
            60,
            "Orthanc's commitment report",
        )
        assert states
        # The report named the transaction that covered both rows, and came from Orthanc.
        reports = [a for a in audit_actions(store) if a[0] == "delivery.commitment_report"]
        assert len(reports) == 1
        for o in outputs:
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/tools/lookup", data=o.sop_instance_uid.encode())
            with urllib.request.urlopen(req, timeout=30) as r:
                assert json.loads(r.read())[0]["Type"] == "Instance"
    finally:
        scp.stop()
        orthanc.terminate()
        orthanc.wait(timeout=30)
