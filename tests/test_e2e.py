"""End to end with real peers: storescu -> dxnode serve -> SR + heatmap SC -> storescp / Orthanc."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, need, need_tool, run
from dicom_checks import dciodvfy_errors
from nodeproc import Node, StoreSCP, make_study, node_config, storescu, wait_port, wait_until

SR_STORAGE = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.34"}
SC_STORAGE = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}


@pytest.fixture
def pacs(tmp_path: Path) -> StoreSCP:
    need_tool("storescp", "storescu", "dciodvfy")
    scp = StoreSCP(tmp_path / "pacs", free_port())
    yield scp
    scp.stop()


def test_study_comes_back_to_the_pacs_as_sr_and_heatmap_sc(tmp_path: Path, pacs: StoreSCP) -> None:
    cfg = node_config(
        tmp_path, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]
    )
    node = Node(cfg, "--no-web")
    try:
        study_uid, files = make_study(tmp_path / "study", n=3)
        sent_at = time.monotonic()
        storescu(node.port, files)
        objs = wait_until(
            lambda: ds if len(ds := pacs.datasets()) >= 2 else None, timeout=90, what="SR and SC at the PACS"
        )
        elapsed = time.monotonic() - sent_at
        sr = [d for d in objs if d.SOPClassUID in SR_STORAGE]
        sc = [d for d in objs if d.SOPClassUID in SC_STORAGE]
        assert len(sr) == 1 and len(sc) == 1, [d.SOPClassUID for d in objs]
        for d in objs:
            assert d.StudyInstanceUID == study_uid and d.PatientID == "PAT-E2E"
        assert elapsed < 60, f"results took {elapsed:.1f} s"
        for path in pacs.folder.iterdir():
            assert dciodvfy_errors(path) == [], path

        jobs = json.loads(node.cli("jobs", "--json").stdout)
        assert [j["state"] for j in jobs] == ["done"]
        outbox = json.loads(node.cli("outbox", "--json").stdout)
        assert sorted(d["state"] for d in outbox) == ["sent", "sent"]

        # Re-running the finished job makes no second, different SR at the receiver.
        before = sorted(p.name for p in pacs.folder.iterdir())
        assert node.cli("requeue", study_uid).returncode == 0
        wait_until(
            lambda: [j for j in json.loads(node.cli("jobs", "--json").stdout) if j["state"] == "done"][1:],
            timeout=60,
            what="second run",
        )
        # Deliveries are only ever created by a job, so the outbox after the second run is the whole story.
        outbox = json.loads(node.cli("outbox", "--json").stdout)
        assert sorted(d["state"] for d in outbox) == ["sent", "sent"]
        after = sorted(p.name for p in pacs.folder.iterdir())
        assert after == before
        assert len({d.SOPInstanceUID for d in pacs.datasets() if d.SOPClassUID in SR_STORAGE}) == 1
    finally:
        node.stop()


def test_pacs_down_then_up_gets_everything_exactly_once(tmp_path: Path) -> None:
    need_tool("storescp", "storescu")
    pacs_port = free_port()
    cfg = node_config(
        tmp_path, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]
    )
    node = Node(cfg, "--no-web")
    pacs = None
    try:
        _, files = make_study(tmp_path / "study", n=2)
        storescu(node.port, files)
        wait_until(
            lambda: any(d["attempts"] >= 1 for d in json.loads(node.cli("outbox", "--json").stdout)),
            timeout=90,
            what="a failed attempt",
        )
        pacs = StoreSCP(tmp_path / "pacs", pacs_port)
        wait_until(
            lambda: all(d["state"] == "sent" for d in json.loads(node.cli("outbox", "--json").stdout)),
            timeout=60,
            what="delivery",
        )
        # A row is "sent" only after storescp answered, and storescp answers after writing the file.
        names = [p.name for p in pacs.folder.iterdir()]
        assert len(names) == 2 and len(set(names)) == 2
    finally:
        node.stop()
        if pacs:
            pacs.stop()


def _orthanc(tmp: Path, dicom_port: int, http_port: int, dxnode_port: int) -> subprocess.Popen[bytes]:
    cfg = {
        "Name": "dxnode-test",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "Plugins": [],
        "DicomModalities": {"dxnode": ["DXNODE", "127.0.0.1", dxnode_port]},
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "StableAge": 1,
        "HttpTimeout": 30,
    }
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    return subprocess.Popen(
        ["Orthanc", str(tmp / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _rest(url: str, data: bytes | None = None) -> object:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_orthanc_forwards_a_study_and_receives_sr_and_sc(tmp_path: Path) -> None:
    need(shutil.which("Orthanc") is not None or Path("/usr/sbin/Orthanc").exists(), "orthanc")
    if shutil.which("Orthanc") is None:
        import os

        os.environ["PATH"] += ":/usr/sbin"
    o_dicom, o_http = free_port(), free_port()
    cfg = node_config(
        tmp_path, destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": o_dicom}]
    )
    node = Node(cfg, "--no-web")
    (tmp_path / "orthanc").mkdir()
    orthanc = _orthanc(tmp_path / "orthanc", o_dicom, o_http, node.port)
    base = f"http://127.0.0.1:{o_http}"
    try:
        wait_port(o_http, 60)
        study_uid, files = make_study(tmp_path / "study", n=2, patient_id="PAT-ORTHANC")
        for f in files:
            _rest(f"{base}/instances", f.read_bytes())
        orthanc_study = _rest(f"{base}/tools/lookup", study_uid.encode())[0]["ID"]
        _rest(
            f"{base}/modalities/dxnode/store", json.dumps({"Resources": [orthanc_study], "Synchronous": True}).encode()
        )

        def series_modalities() -> list[str] | None:
            series = _rest(f"{base}/studies/{orthanc_study}/series")
            mods = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
            return mods if len(series) >= 3 else None

        mods = wait_until(series_modalities, timeout=120, what="SR and SC series in Orthanc")
        assert len(mods) == 3 and "SR" in mods, mods
        sop_classes = set()
        for series in _rest(f"{base}/studies/{orthanc_study}/series"):
            first = series["Instances"][0]
            sop_classes.add(_rest(f"{base}/instances/{first}/simplified-tags")["SOPClassUID"])
        assert sop_classes & SR_STORAGE and sop_classes & SC_STORAGE, sop_classes
        study = _rest(f"{base}/studies/{orthanc_study}")
        assert study["PatientMainDicomTags"]["PatientID"] == "PAT-ORTHANC"
    finally:
        node.stop()
        if orthanc is not None:
            orthanc.terminate()
            orthanc.wait(20)


def test_full_disk_when_writing_results_retries_and_delivers_each_once(tmp_path: Path, pacs: StoreSCP) -> None:
    import os

    outputs = tmp_path / "var" / "outputs"
    outputs.mkdir(parents=True)
    # A 64 KiB tmpfs where the SR and SC are written: the heatmap SC (over 512 px wide) cannot fit.
    mounted = (
        os.geteuid() == 0 and run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(outputs)]).returncode == 0
    )
    need(mounted, "root and mount(8) for a small tmpfs")
    cfg = node_config(
        tmp_path,
        worklist={"stable_seconds": 1, "retry_backoff_seconds": 1, "retry_backoff_max_seconds": 2, "max_attempts": 20},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    node = Node(cfg, "--no-web")
    try:
        study_uid, files = make_study(tmp_path / "study", n=2)
        storescu(node.port, files)
        failed = wait_until(
            lambda: [j for j in json.loads(node.cli("jobs", "--json").stdout) if j["attempts"] >= 1 and j["error"]],
            timeout=120,
            what="an attempt failed on the full disk",
        )
        assert "No space left on device" in failed[0]["error"], failed[0]
        assert failed[0]["state"] == "queued", "a full disk is transient: the job waits for its retry"
        assert not pacs.datasets(), "nothing was sent from the failed attempt"
        assert run(["mount", "-o", "remount,size=64m", str(outputs)]).returncode == 0
        wait_until(
            lambda: (
                (outbox := json.loads(node.cli("outbox", "--json").stdout))
                and all(d["state"] == "sent" for d in outbox)
            ),
            timeout=120,
            what="the SR and SC sent after space returned",
        )
        # Deliveries are only ever created by a job and this one is done: what the PACS has is final.
        objs = pacs.datasets()
        assert sorted(d.SOPClassUID in SR_STORAGE for d in objs) == [False, True], [d.SOPClassUID for d in objs]
        assert all(d.StudyInstanceUID == study_uid for d in objs)
        (job,) = json.loads(node.cli("jobs", "--json").stdout)
        assert job["state"] == "done" and job["attempts"] >= 2
    finally:
        node.stop()
        run(["umount", "-l", str(outputs)])
