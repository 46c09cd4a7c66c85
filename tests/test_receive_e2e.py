"""Reception beyond tests/test_scp.py: concurrent writers on SQLite and PostgreSQL, the study row,
a database that stays locked, metrics, PHI-free INFO logs, hostile UIDs and TLS from DCMTK."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import need_tool, run
from nodeproc import InProcessNode as Node
from prometheus_client import REGISTRY
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select
from test_scp import same_content, send_one, small_ct
from test_tls import pki, tls_node  # noqa: F401  (pki is a fixture)

from dxnode.store import Audit, Instance, Series, Study, upgrade


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[Node]:
    n = Node(tmp_path, db_url)
    yield n
    n.stop()


def sender(
    port: int,
    aet: str,
    datasets: list[pydicom.Dataset],
    statuses: dict[str, list[int]],
    barrier: threading.Barrier | None = None,
) -> None:
    """One association sending datasets in order (waiting at barrier before each); records statuses."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            if barrier is not None:
                barrier.wait(timeout=30)
            status = assoc.send_c_store(ds)
            statuses.setdefault(ds.SOPInstanceUID, []).append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()


def run_senders(port: int, batches: list[list[pydicom.Dataset]], lockstep: bool) -> dict[str, list[int]]:
    """Send each batch on its own association at once; lockstep lines up the n-th C-STOREs."""
    statuses: dict[str, list[int]] = {}
    barrier = threading.Barrier(len(batches)) if lockstep else None
    threads = [
        threading.Thread(target=sender, args=(port, f"SENDER{k}", b, statuses, barrier)) for k, b in enumerate(batches)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return statuses


def assert_on_disk(node: Node, rows: dict[str, Instance]) -> None:
    """Every row names a readable file holding that instance."""
    for uid, row in rows.items():
        path = node.settings.data_dir / row.file_path
        assert path.is_file(), f"row without file: {row.file_path}"
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid


def test_first_instances_of_new_studies_from_four_senders_at_once(node: Node) -> None:
    studies = [generate_uid() for _ in range(12)]
    batches = [[small_ct(st, generate_uid(), k, size=8) for st in studies] for k in range(4)]
    statuses = run_senders(node.port, batches, lockstep=True)
    failed = {uid: s for uid, s in statuses.items() if s != [0]}
    assert len(statuses) == 48 and not failed, f"{len(failed)} refused: {list(failed.values())[:4]}"
    rows = node.instances()
    assert len(rows) == 48
    assert_on_disk(node, rows)
    with node.store.session() as s:
        assert sorted(st.num_instances for st in s.scalars(select(Study))) == [4] * 12
        assert s.scalar(select(Series.id).where(Series.study_id.is_(None))) is None


def test_same_instances_from_three_senders_at_once_are_stored_once_and_kept(node: Node) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [small_ct(study, series, i, size=8) for i in range(30)]
    statuses = run_senders(node.port, [datasets] * 3, lockstep=True)
    assert all(s == [0, 0, 0] for s in statuses.values()), statuses
    rows = node.instances()
    assert len(rows) == 30
    assert sum(r.duplicates for r in rows.values()) == 60
    assert_on_disk(node, rows)  # a losing copy must not remove the stored file
    assert not list((node.settings.data_dir / "incoming").rglob("*.tmp"))
    with node.store.session() as s:
        assert s.scalar(select(Study)).num_instances == 30
        assert len(list(s.scalars(select(Audit).where(Audit.action == "instance.duplicate")))) == 60


def test_study_row_has_the_fields_of_its_instances(node: Node) -> None:
    study = generate_uid()
    ct = small_ct(study, generate_uid(), 0)
    for k, v in {"AccessionNumber": "ACC42", "StudyDate": "20240131", "StudyDescription": "CHEST"}.items():
        setattr(ct, k, v)
    mr = small_ct(study, generate_uid(), 1)
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.Modality = "MR"
    statuses = run_senders(node.port, [[ct]], lockstep=False)
    with node.store.session() as s:
        first = s.scalar(select(Study))
        assert (first.patient_id, first.accession_number, first.study_date, first.study_description) == (
            "P1",
            "ACC42",
            "20240131",
            "CHEST",
        )
        assert "Doe" in first.patient_name and first.calling_aet == "SENDER0" and first.modalities == "CT"
        assert first.first_received_at == first.last_received_at
        t0 = first.last_received_at
    statuses |= run_senders(node.port, [[mr, ct]], lockstep=False)  # a new MR instance, then a repeat of the CT
    assert all(s == [0] for s in statuses.values()) and len(statuses) == 2
    with node.store.session() as s:
        st = s.scalar(select(Study))
        assert st.modalities == "CT\\MR" and st.num_instances == 2
        assert st.first_received_at == t0 < st.last_received_at
        t1 = st.last_received_at
        assert len(list(s.scalars(select(Series).where(Series.study_id == st.id)))) == 2
        received = list(s.scalars(select(Audit).where(Audit.action == "instance.received")))
        assert len(received) == 2 and {a.actor for a in received} == {"SENDER0"}
    run_senders(node.port, [[mr]], lockstep=False)  # a duplicate is not a new instance: stability is kept
    with node.store.session() as s:
        st = s.scalar(select(Study))
        assert st.last_received_at == t1 and st.num_instances == 2


def test_database_locked_too_long_gives_out_of_resources_and_no_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    n = Node(tmp_path, url, busy_timeout_s=0.3)
    blocker = sqlite3.connect(tmp_path / "dxnode.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        assert send_one(n.port, small_ct(generate_uid(), generate_uid())) == 0xA700
        blocker.execute("ROLLBACK")
        incoming = n.settings.data_dir / "incoming"
        assert not [p for p in incoming.rglob("*") if p.is_file()], "a refused instance left a file"
        assert n.instances() == {}
        ds = small_ct(generate_uid(), generate_uid())
        assert send_one(n.port, ds) == 0  # the same node accepts once the lock is gone
        assert list(n.instances()) == [ds.SOPInstanceUID]
    finally:
        blocker.close()
        n.stop()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_counters_follow_what_happened(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    n = Node(tmp_path, url, allowed_calling_aets=["CT1"])
    try:
        before = {
            "rx": metric("dxnode_instances_received_total", calling_aet="CT1"),
            "dup": metric("dxnode_instances_duplicate_total"),
            "bytes": metric("dxnode_bytes_received_total"),
            "bad": metric("dxnode_instances_refused_total", status="0xC000"),
            "rej": metric("dxnode_associations_rejected_total", reason="calling_aet"),
        }
        ds = small_ct(generate_uid(), generate_uid())
        assert send_one(n.port, ds, aet="CT1") == 0 and send_one(n.port, ds, aet="CT1") == 0
        broken = small_ct(generate_uid(), generate_uid())
        del broken.SeriesInstanceUID
        assert send_one(n.port, broken, aet="CT1") == 0xC000
        assert send_one(n.port, ds, aet="STRANGER") == -1
        (row,) = n.instances().values()
        assert metric("dxnode_instances_received_total", calling_aet="CT1") - before["rx"] == 1
        assert metric("dxnode_instances_duplicate_total") - before["dup"] == 1
        assert metric("dxnode_bytes_received_total") - before["bytes"] == row.size_bytes
        assert metric("dxnode_instances_refused_total", status="0xC000") - before["bad"] == 1
        assert metric("dxnode_associations_rejected_total", reason="calling_aet") - before["rej"] == 1
    finally:
        n.stop()


def test_info_logs_carry_no_patient_data_or_uids(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    ds = small_ct(generate_uid(), generate_uid())
    ds.PatientID, ds.PatientName = "PID-7731", "Secretname^Jane"
    broken = small_ct(generate_uid(), generate_uid())
    broken.PatientID = "PID-7732"
    del broken.SeriesInstanceUID
    with caplog.at_level(logging.INFO, logger="dxnode"):
        assert send_one(node.port, ds) == 0 and send_one(node.port, ds) == 0 and send_one(node.port, broken) == 0xC000
    text = "\n".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("dxnode")
    )
    assert "SENDER" in text  # the AE title is logged
    for secret in (
        "PID-7731",
        "Secretname",
        "PID-7732",
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        broken.SOPInstanceUID,
        broken.StudyInstanceUID,
    ):
        assert secret not in text


def test_storescu_with_a_hostile_sop_instance_uid_is_refused(tmp_path: Path) -> None:
    need_tool("storescu")
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    n = Node(tmp_path / "node", url)
    try:
        for field in ("SOPInstanceUID", "StudyInstanceUID"):
            ds = small_ct(generate_uid(), generate_uid())
            setattr(ds, field, "../../../../escape")
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = tmp_path / f"{field}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out = run(["storescu", "-v", "-aec", "DXNODE", "127.0.0.1", str(n.port), str(path)])
            assert out.returncode != 0 and "Error: CannotUnderstand" in out.stdout + out.stderr, out.stdout + out.stderr
        assert sorted(p.name for p in tmp_path.rglob("*escape*")) == [], "a hostile UID named a file"
        assert n.instances() == {}
        good = tmp_path / "good.dcm"
        small_ct(generate_uid(), generate_uid()).save_as(good, enforce_file_format=True)
        assert run(["storescu", "-aec", "DXNODE", "127.0.0.1", str(n.port), str(good)]).returncode == 0
    finally:
        n.stop()


def test_dcmtk_echo_and_store_over_tls(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    need_tool("echoscu", "storescu")
    scp, store = tls_node(tmp_path, pki, require_client_cert=True)
    try:
        tls = ["+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt")]
        assert run(["echoscu", *tls, "-aec", "DXNODE", "127.0.0.1", str(scp.tls_port)]).returncode == 0
        ds = small_ct(generate_uid(), generate_uid())
        path = tmp_path / "ct.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = run(["storescu", *tls, "-aec", "DXNODE", "127.0.0.1", str(scp.tls_port), str(path)])
        assert out.returncode == 0, out.stdout + out.stderr
        with store.session() as s:
            row = s.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert row is not None and same_content(pydicom.dcmread(scp.settings.data_dir / row.file_path), ds)
        # The TLS port speaks TLS only, and a client without a certificate is refused.
        assert run(["echoscu", "-aec", "DXNODE", "127.0.0.1", str(scp.tls_port)], timeout=30).returncode != 0
        assert (
            run(
                ["echoscu", "+tla", "+cf", str(pki / "ca.crt"), "-aec", "DXNODE", "127.0.0.1", str(scp.tls_port)],
                timeout=30,
            ).returncode
            != 0
        )
    finally:
        scp.stop()
        store.dispose()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_dataset_cut_short_in_its_pixel_data_is_refused_not_stored(
    node: Node, tmp_path: Path, syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pixel Data that declares more bytes than arrived: 0xC000 and nothing kept (the whole one is stored)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # a file's dataset sent as it is on disk
    ds = small_ct(generate_uid(), generate_uid(), size=64)
    ds.file_meta.TransferSyntaxUID = syntax
    whole = tmp_path / "whole.dcm"
    ds.save_as(whole, enforce_file_format=True)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole.read_bytes()[:-1000])
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(cut)
        stored = assoc.send_c_store(whole)
    finally:
        assoc.release()
    assert refused.Status == 0xC000 and refused.ErrorComment == "Pixel Data cut short: 7192 of 8192 bytes"
    assert stored.Status == 0x0000
    assert list(node.instances()) == [ds.SOPInstanceUID]
    assert (
        pydicom.dcmread(node.settings.data_dir / node.instances()[ds.SOPInstanceUID].file_path).PixelData
        == ds.PixelData
    )
