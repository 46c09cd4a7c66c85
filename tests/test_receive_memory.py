"""C-STORE datasets go to disk as they arrive: concurrent large instances do not cost their size in memory.

pynetdicom's chunked receive (dxnode/receive/chunked.py) writes each dataset's fragments to a file in
incoming/, which is then fsynced and renamed into place. A real `dxnode serve`, in a child of the
cgroup v1 memory controller, takes SENDERS concurrent associations of a SIZE_MB instance each; the
peak RSS (VmHWM) of every node process stays within GROWTH_LIMIT_MB of its resting RSS, where
buffering each dataset whole (pynetdicom's default) costs at least SENDERS x SIZE_MB.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from nodeproc import InProcessNode, Node, c_store, node_config, wait_until
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, text
from test_bounds_receive import _status_kb, memory_cgroup

SENDERS = 8
SIZE_MB = 60
CGROUP_LIMIT_MB = 1024  # the whole node; page cache of the written files is charged too, and reclaimed
GROWTH_LIMIT_MB = (
    64  # peak RSS over resting RSS per node process, for 8 x 60 MB = 480 MB in flight at once (main: +433 MB)
)


def big_ct(study: str, pixels: bytes) -> pydicom.Dataset:
    """A multi-frame CT-sized instance of len(pixels) bytes of Pixel Data (512 x 512 x 16 bit frames)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "MEM", "Memory^Test"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = len(pixels) // (512 * 512 * 2)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels
    return ds


def _node_pids(pid: int) -> list[int]:
    """pid and its child processes (job runners), as /proc lists them now."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def _settled(pid: int) -> tuple[list[int], dict[int, int]] | None:
    """(the node's processes, their RSS in kB) once none has grown by 1 MB in the last second (start-up done)."""
    pids = _node_pids(pid)
    before = {p: _status_kb(p, "VmRSS") for p in pids}
    time.sleep(1)  # the interval the growth is measured over, not a wait for something to happen
    after = {p: _status_kb(p, "VmRSS") for p in _node_pids(pid)}
    if set(after) != set(before) or any(after[p] - before[p] > 1024 for p in pids):
        return None
    return pids, after


@pytest.mark.slow
def test_eight_concurrent_60_mb_instances_keep_the_receiver_memory_bounded(tmp_path: Path) -> None:
    with memory_cgroup(CGROUP_LIMIT_MB) as cgroup:
        cfg = node_config(
            tmp_path,
            node={"max_instance_mb": 128, "max_associations": SENDERS},
            pipeline={"modalities": ["DX"]},  # the CTs get no job: this measures the receive path
        )
        node = Node(cfg)
        try:
            (cgroup / "cgroup.procs").write_text(str(node.proc.pid))
            assert str(cgroup.name) in Path(f"/proc/{node.proc.pid}/cgroup").read_text()
            rng = np.random.default_rng(0)
            pixels = rng.integers(0, 4096, SIZE_MB << 19, dtype=np.uint16).tobytes()  # noise: nothing to share
            study = generate_uid()
            sent = [big_ct(study, pixels) for _ in range(SENDERS)]
            pids, resting = wait_until(lambda: _settled(node.proc.pid), 120, "the node's processes to settle")
            for pid in pids:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := the resting RSS
            t0 = time.monotonic()
            with ThreadPoolExecutor(SENDERS) as pool:
                statuses = list(pool.map(lambda ds: c_store(node.port, ds, aet="BIG", max_pdu=262144), sent))
            elapsed = time.monotonic() - t0
            assert statuses == [0] * SENDERS
            assert node.proc.poll() is None, "\n".join(node.lines[-40:])
            growth = {pid: (_status_kb(pid, "VmHWM") - resting[pid]) / 1024 for pid in pids}
            names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[-60:].decode() for pid in pids}
            print(
                f"{SENDERS} x {SIZE_MB} MB in {elapsed:.1f} s; peak RSS growth per node process (MB):"
                f" {', '.join(f'{names[pid]}: {g:.1f}' for pid, g in growth.items())} (cgroup {CGROUP_LIMIT_MB} MB)"
            )
            engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'dxnode.db'}")
            with engine.connect() as conn:
                rows = {
                    uid: path for uid, path in conn.execute(text("SELECT sop_instance_uid, file_path FROM instance"))
                }
            engine.dispose()
            assert set(rows) == {ds.SOPInstanceUID for ds in sent}
            for ds in sent:  # each file whole, as sent
                stored = pydicom.dcmread(tmp_path / "var" / rows[ds.SOPInstanceUID])
                assert stored.PixelData == pixels and stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert not list((tmp_path / "var" / "incoming").glob(".*.tmp")), "a spool file was left"
            assert max(growth.values()) < GROWTH_LIMIT_MB, (
                f"a node process's peak RSS grew {max(growth.values()):.0f} MB for {SENDERS} concurrent"
                f" {SIZE_MB} MB instances (cgroup limit {CGROUP_LIMIT_MB} MB)"
            )
        finally:
            node.stop()


def test_a_dataset_over_max_instance_mb_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    """The spool file stops growing at the limit; the instance gets 0xA700 and nothing stays in incoming/."""
    node = InProcessNode(tmp_path, max_instance_mb=1)
    try:
        big = big_ct(generate_uid(), bytes(4 << 20))  # 4 MB of Pixel Data
        ae = AE(ae_title="BIG")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DXNODE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(big)
            small = big_ct(generate_uid(), bytes(512 * 512 * 2))  # one frame: under the limit
            assert int(assoc.send_c_store(small).Status) == 0
        finally:
            assoc.release()
        assert int(status.Status) == 0xA700 and status.ErrorComment == "dataset over [node] max_instance_mb 1"
        assert set(node.instances()) == {small.SOPInstanceUID}
        incoming = node.settings.data_dir / "incoming"
        assert not list(incoming.rglob(".*.tmp")), "a spool file was left"
    finally:
        node.stop()


def test_spool_files_a_crash_left_are_removed_at_start_and_a_live_one_is_kept(tmp_path: Path) -> None:
    incoming = tmp_path / "var" / "incoming"
    incoming.mkdir(parents=True)
    stale, live = incoming / ".0123abcd.dcm.tmp", incoming / ".4567ef01.dcm.tmp"
    stale.write_bytes(b"\0" * 132)
    live.write_bytes(b"\0" * 132)
    hour_ago = time.time() - 3600  # older than dimse_timeout and network_timeout
    os.utime(stale, (hour_ago, hour_ago))
    node = InProcessNode(tmp_path)
    try:
        assert not stale.exists() and live.exists()  # a live receiver may still be writing the young one
    finally:
        node.stop()
