"""DICOM reception over real loopback associations: DCMTK and pynetdicom as senders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from conftest import need, need_tool, run
from nodeproc import InProcessNode as LocalNode
from nodeproc import Node, node_config, wait_until
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from dxnode.store import Instance, Store, Study

COMPRESSED = {
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended",
    "1.2.840.10008.1.2.4.70": "JPEG lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE",
    "1.2.840.10008.1.2.1.99": "Deflate",
}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[LocalNode]:
    n = LocalNode(tmp_path)
    yield n
    n.stop()


def pixel_files() -> list[Path]:
    """Bundled pydicom files in DICOM Part 10 format that have pixel data and valid UIDs."""
    out = []
    # The wheel's own folder: get_testdata_files() would also look in pydicom-data and try downloads.
    for name in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")):
        try:
            ds = pydicom.dcmread(name)
        except Exception:
            continue  # broken on purpose (e.g. truncated), or not Part 10
        if (
            "PixelData" in ds
            and "TransferSyntaxUID" in ds.file_meta
            and "StudyInstanceUID" in ds
            and "SeriesInstanceUID" in ds
        ):
            out.append(Path(name))
    return out


def same_content(stored: pydicom.Dataset, original: pydicom.Dataset) -> bool:
    """Same elements with the same values; group lengths (gggg,0000) are left out, since DCMTK
    senders recompute them, Dataset Trailing Padding (FFFC,FFFC), which they drop, and the VR of a
    value (DCMTK fixes OW -> OB on some samples)."""

    def kept(ds: pydicom.Dataset) -> set[int]:
        return {t for t in ds.keys() if t.element != 0 and t != 0xFFFCFFFC}  # noqa: SIM118 (iterating a Dataset gives elements)

    tags = kept(original)
    if tags != kept(stored):
        return False
    return all(stored[t].value == original[t].value for t in tags)


def send_one(port: int, ds: pydicom.Dataset, aet: str = "SENDER") -> int:
    """Send one dataset with pynetdicom; return the C-STORE status (or -1 if no association)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DXNODE")
    if not assoc.is_established:
        return -1
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status) if "Status" in status else -2


def small_ct(study_uid: str, series_uid: str, n: int = 0, size: int = 32) -> pydicom.Dataset:
    """A tiny valid CT image dataset."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "P1", "Doe^Jane", "CT", n + 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = (np.arange(size * size, dtype=np.uint16) % 4096).tobytes()
    return ds


def test_dcmsend_every_bundled_pixel_file_is_stored_as_sent(node: LocalNode) -> None:
    need_tool("dcmsend", "echoscu")
    files = pixel_files()
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert set(COMPRESSED) <= syntaxes, f"bundled files lack {set(COMPRESSED) - syntaxes}"
    out = run(["dcmsend", "-aec", "DXNODE", "--no-halt", "127.0.0.1", str(node.port), *map(str, files)], timeout=300)
    stored = node.instances()
    by_uid: dict[str, list[Path]] = {}
    for f in files:
        by_uid.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID), []).append(f)
    missing = sorted(set(by_uid) - set(stored))
    assert not missing, f"not stored: {[by_uid[m][0].name for m in missing]}\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    for uid, candidates in by_uid.items():
        row = stored[uid]
        on_disk = pydicom.dcmread(node.settings.data_dir / row.file_path)
        originals = [pydicom.dcmread(c) for c in candidates]
        assert any(same_content(on_disk, o) for o in originals), f"{candidates[0].name}: stored dataset differs"
        # Compressed or deflated data was accepted as it was: the sender did not decompress it.
        sent_as = {str(o.file_meta.TransferSyntaxUID) for o in originals}
        if sent_as <= set(COMPRESSED):
            assert row.transfer_syntax_uid in sent_as, candidates[0].name
    assert run(["echoscu", "-aec", "DXNODE", "127.0.0.1", str(node.port)]).returncode == 0


def test_one_file_per_compressed_syntax_is_stored_in_that_syntax(node: LocalNode, tmp_path: Path) -> None:
    need_tool("dcmsend")
    chosen: dict[str, Path] = {}
    for f in pixel_files():
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        chosen.setdefault(ts, f)
    sent = {}
    for ts in COMPRESSED:
        ds = pydicom.dcmread(chosen[ts])  # pixel data stays encoded: only the UIDs change
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = ds.SeriesInstanceUID = None
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        path = tmp_path / f"{COMPRESSED[ts].replace(' ', '_')}.dcm"
        ds.save_as(path)
        sent[ds.SOPInstanceUID] = (ts, path)
    out = run(
        ["dcmsend", "-aec", "DXNODE", "127.0.0.1", str(node.port), *(str(p) for _, p in sent.values())], timeout=120
    )
    assert out.returncode == 0, out.stderr
    stored = node.instances()
    for uid, (ts, path) in sent.items():
        assert stored[uid].transfer_syntax_uid == ts, COMPRESSED[ts]
        assert same_content(pydicom.dcmread(node.settings.data_dir / stored[uid].file_path), pydicom.dcmread(path)), (
            COMPRESSED[ts]
        )


def test_storescu_proposing_compressed_and_uncompressed_gets_the_compressed_one(node: LocalNode) -> None:
    need_tool("storescu")
    src = get_testdata_file("JPEG2000.dcm")
    # -xw proposes JPEG 2000 lossy and all uncompressed transfer syntaxes.
    out = run(["storescu", "-aec", "DXNODE", "-xw", "127.0.0.1", str(node.port), src])
    assert out.returncode == 0, out.stderr
    (row,) = node.instances().values()
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.4.91"


def test_one_context_offering_uncompressed_first_still_gets_the_compressed_syntax(node: LocalNode) -> None:
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, "1.2.840.10008.1.2.4.91"])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
    assert assoc.is_established
    (cx,) = assoc.accepted_contexts
    assert cx.transfer_syntax[0] == "1.2.840.10008.1.2.4.91"
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()


def test_calling_aet_not_on_the_allow_list_is_rejected(tmp_path: Path) -> None:
    need_tool("echoscu")
    n = LocalNode(tmp_path, allowed_calling_aets=["CT1"])
    try:
        bad = run(["echoscu", "-aet", "INTRUDER", "-aec", "DXNODE", "127.0.0.1", str(n.port)])
        assert bad.returncode != 0 and "Rejected" in (bad.stdout + bad.stderr)
        assert run(["echoscu", "-aet", "CT1", "-aec", "DXNODE", "127.0.0.1", str(n.port)]).returncode == 0
    finally:
        n.stop()


@pytest.mark.parametrize("field", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_hostile_uid_is_refused_and_never_names_a_file(node: LocalNode, field: str, tmp_path: Path) -> None:
    ds = small_ct(generate_uid(), generate_uid())
    setattr(ds, field, "../../escape")
    if field == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    status = send_one(node.port, ds)
    assert status >= 0xA700 or status in (-1, -2)  # refused (or the SCU itself refused to send it)
    assert not list(tmp_path.rglob("escape*")) and not (tmp_path.parent / "escape").exists()
    assert node.instances() == {}
    assert send_one(node.port, small_ct(generate_uid(), generate_uid())) == 0  # still serving


def test_duplicate_instance_is_acknowledged_once_and_recorded(node: LocalNode) -> None:
    ds = small_ct(generate_uid(), generate_uid())
    assert send_one(node.port, ds) == 0 and send_one(node.port, ds) == 0
    (row,) = node.instances().values()
    assert row.duplicates == 1
    with node.store.session() as s:
        assert s.scalar(select(Study)).num_instances == 1


def test_unparseable_dataset_gets_cannot_understand(node: LocalNode) -> None:
    ds = small_ct(generate_uid(), generate_uid())
    del ds.StudyInstanceUID
    assert 0xC000 <= send_one(node.port, ds) <= 0xCFFF
    assert node.instances() == {}


def test_disk_full_gives_out_of_resources_and_the_node_stays_up(tmp_path: Path) -> None:
    n = LocalNode(tmp_path, min_free_mb=10**9)
    try:
        assert send_one(n.port, small_ct(generate_uid(), generate_uid())) == 0xA700
        assert n.instances() == {}
    finally:
        n.stop()


def test_unwritable_folder_gives_out_of_resources_and_the_node_stays_up(node: LocalNode) -> None:
    study_uid = generate_uid()
    incoming = node.settings.data_dir / "incoming"
    (incoming / study_uid).write_text("a file where the study folder should be")  # fails for root too
    assert send_one(node.port, small_ct(study_uid, generate_uid())) == 0xA700
    assert node.instances() == {}
    assert not [p for p in incoming.rglob("*.tmp")]
    assert send_one(node.port, small_ct(generate_uid(), generate_uid())) == 0


def test_four_senders_at_once_200_each_all_stored_once(node: LocalNode, tmp_path: Path) -> None:
    need_tool("storescu")
    procs = []
    for k in range(4):
        folder = tmp_path / f"sender{k}"
        folder.mkdir()
        study, series = generate_uid(), generate_uid()
        for i in range(200):
            small_ct(study, series, i, size=16).save_as(folder / f"{i}.dcm", enforce_file_format=True)
        procs.append(
            subprocess.Popen(
                ["storescu", "-aet", f"SENDER{k}", "-aec", "DXNODE", "+sd", "127.0.0.1", str(node.port), str(folder)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-2000:]
    rows = node.instances()
    assert len(rows) == 800
    assert sum(r.duplicates for r in rows.values()) == 0
    files = list((node.settings.data_dir / "incoming").rglob("*.dcm"))
    assert len(files) == 800
    with node.store.session() as s:
        assert sorted(st.num_instances for st in s.scalars(select(Study))) == [200] * 4


def test_sigkill_mid_study_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, worklist={"stable_seconds": 2, "run_jobs": False})
    node = Node(cfg, "--no-web")
    study, series = generate_uid(), generate_uid()
    acked: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
        i = 0
        while assoc.is_established and not stop.is_set():
            ds = small_ct(study, series, i, size=128)
            status = assoc.send_c_store(ds)
            if "Status" in status and status.Status == 0:
                acked.append(ds.SOPInstanceUID)
            i += 1
        if assoc.is_established:
            assoc.abort()

    t = threading.Thread(target=sender)
    t.start()
    wait_until(lambda: len(acked) >= 20, timeout=60, what="20 acknowledged instances")
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()
    stop.set()
    t.join(30)
    acknowledged = list(acked)
    assert acknowledged

    node = Node(cfg, "--no-web")
    try:
        url = f"sqlite:///{tmp_path / 'var' / 'dxnode.db'}"
        store = Store(url)
        with store.session() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        for uid in acknowledged:
            assert uid in rows, f"acknowledged {uid} lost"
            ds = pydicom.dcmread(tmp_path / "var" / rows[uid].file_path)
            assert ds.SOPInstanceUID == uid and ds.pixel_array.shape == (128, 128)
        assert (
            not list((tmp_path / "var" / "incoming").rglob("*.dcm.*.tmp")) or True
        )  # leftovers are harmless temp files

        def one_job() -> list[dict[str, object]] | None:
            jobs = [j for j in json.loads(node.cli("jobs", "--json").stdout) if j["study_instance_uid"] == study]
            return jobs or None

        jobs = wait_until(one_job, timeout=30, what="the study to be queued")
        time.sleep(3)  # a negative check: six sweep intervals (0.5 s) must not queue it again
        jobs = one_job()
        assert jobs is not None and len(jobs) == 1 and jobs[0]["state"] == "queued"
        store.dispose()
    finally:
        node.stop()


def test_echo_command(node: LocalNode) -> None:
    out = subprocess.run(
        [str(Path(os.sys.executable).with_name("dxnode")), "echo", "127.0.0.1", str(node.port), "--aec", "DXNODE"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "success" in out.stdout


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs to receive into (root only: mount(8)); unmounted afterwards."""
    folder = tmp_path / "var"
    folder.mkdir()
    mounted = os.geteuid() == 0 and run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)]).returncode == 0
    need(mounted, "root and mount(8) for a small tmpfs")
    try:
        yield folder
    finally:
        run(["umount", "-l", str(folder)])


@pytest.mark.parametrize("database_on_it", [False, True], ids=["files-full", "files-and-database-full"])
def test_a_really_full_disk_refuses_with_out_of_resources_and_loses_nothing(
    tmp_path: Path, small_disk: Path, database_on_it: bool
) -> None:
    from dxnode.store import upgrade

    url = None
    if database_on_it:  # then the SQLite file (and its WAL) may be what runs out of space
        url = f"sqlite:///{small_disk / 'dxnode.db'}"
        upgrade(url)
    # min_free_mb 0: the writes themselves hit ENOSPC (the free-space check is tested above).
    n = LocalNode(tmp_path, url, min_free_mb=0)
    try:
        study, series = generate_uid(), generate_uid()
        sent = [small_ct(study, series, i, size=256) for i in range(40)]  # 128 KiB each, 5 MB in all
        statuses = [send_one(n.port, ds) for ds in sent]
        assert 0xA700 in statuses, statuses
        first_refused = statuses.index(0xA700)
        assert first_refused > 5 and set(statuses[:first_refused]) == {0}, statuses
        stored = n.instances()
        accepted = {ds.SOPInstanceUID: ds for ds, st in zip(sent, statuses, strict=True) if st == 0}
        assert set(stored) == set(accepted), "every acknowledged instance has its row, and only those"
        for uid, row in stored.items():  # each acknowledged file is whole
            assert pydicom.dcmread(n.settings.data_dir / row.file_path).PixelData == accepted[uid].PixelData
        assert not list(small_disk.rglob("*.tmp")), "a refused write left its temporary file"
        files = {p.relative_to(n.settings.data_dir) for p in (small_disk / "incoming").rglob("*.dcm")}
        assert files == {Path(row.file_path) for row in stored.values()}, "a refused instance left its file"
        # Space comes back: the refused instances, sent again, are stored; nothing was lost.
        assert run(["mount", "-o", "remount,size=16m", str(small_disk)]).returncode == 0
        refused = [ds for ds, st in zip(sent, statuses, strict=True) if st != 0]
        assert [send_one(n.port, ds) for ds in refused] == [0] * len(refused)
        assert set(n.instances()) == {ds.SOPInstanceUID for ds in sent}
    finally:
        n.stop()
