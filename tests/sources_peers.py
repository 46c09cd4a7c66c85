"""Test peers for fetching: Orthanc as a Q/R SCP with its DICOMweb plugin, DCMTK dcmqrscp, studies to put in them."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
from conftest import free_port, need, need_tool, run
from nodeproc import StoreSCP, wait_port, wait_until
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def study_files(
    folder: Path, n: int, accession: str, patient_id: str, study_date: str = "20240105"
) -> tuple[str, list[Path]]:
    """n CT instances of one new study with its own accession and patient; (study UID, files)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.AccessionNumber = patient_id, "Fetch^Test", accession
        ds.StudyDate, ds.InstanceNumber = study_date, i + 1
        path = folder / f"{accession}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return study_uid, files


class Orthanc:
    """Orthanc with a DICOM Q/R SCP (C-FIND, C-MOVE, C-GET) and DICOMweb (QIDO-RS, WADO-RS) on free ports."""

    def __init__(self, tmp: Path, modalities: dict[str, tuple[str, int]]) -> None:
        need(shutil.which("Orthanc") is not None and ORTHANC_DICOMWEB.exists(), "orthanc + orthanc-dicomweb")
        tmp.mkdir(parents=True, exist_ok=True)
        self.http, self.dicom = free_port(), free_port()
        cfg = {
            "Name": "dxnode-source",
            "StorageDirectory": str(tmp / "storage"),
            "IndexDirectory": str(tmp / "index"),
            "HttpPort": self.http,
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom,
            "DicomModalities": {name.lower(): [aet, "127.0.0.1", port] for name, (aet, port) in modalities.items()},
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(ORTHANC_DICOMWEB)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (tmp / "orthanc.json").write_text(json.dumps(cfg))
        log = (tmp / "orthanc.log").open("wb")  # kept for the reader of a failing test
        self.proc = subprocess.Popen(
            ["Orthanc", "--verbose", str(tmp / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        wait_port(self.http, timeout=60)
        wait_port(self.dicom, timeout=60)
        self.base = f"http://127.0.0.1:{self.http}"

    def upload(self, files: list[Path]) -> None:
        for p in files:
            req = urllib.request.Request(f"{self.base}/instances", data=p.read_bytes(), method="POST")
            urllib.request.urlopen(req, timeout=30).read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Dcmqrscp:
    """DCMTK dcmqrscp as a second Q/R SCP (AE QRSCP), knowing the node's AE for C-MOVE."""

    def __init__(self, tmp: Path, node_aet: str, node_port: int) -> None:
        need_tool("dcmqrscp", "storescu")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "db").mkdir(exist_ok=True)
        self.port = free_port()
        (tmp / "dcmqrscp.cfg").write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
            f"HostTable BEGIN\ndxnode = ({node_aet}, 127.0.0.1, {node_port})\nHostTable END\n"
            "VendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nQRSCP {tmp / 'db'} RW (200, 1024mb) ANY\nAETable END\n"
        )
        log = (tmp / "dcmqrscp.log").open("wb")
        self.proc = subprocess.Popen(
            ["dcmqrscp", "-d", "-c", str(tmp / "dcmqrscp.cfg")], stdout=log, stderr=subprocess.STDOUT, cwd=tmp
        )
        wait_port(self.port)

    def upload(self, files: list[Path]) -> None:
        out = run(["storescu", "-aec", "QRSCP", "127.0.0.1", str(self.port), *map(str, files)])
        assert out.returncode == 0, out.stdout + out.stderr

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Silent:
    """A TCP port that accepts connections and never answers: a source that is down but does not refuse."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)  # never accepted: the kernel completes the handshake, nobody answers
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


def srs_for(pacs: StoreSCP, study_uid: str) -> list[Any]:
    """The SR objects the PACS holds for a study."""
    return [ds for ds in pacs.datasets() if ds.get("Modality") == "SR" and ds.StudyInstanceUID == study_uid]


def wait_sr(pacs: StoreSCP, study_uid: str, timeout: float = 120) -> list[Any]:
    return list(
        wait_until(lambda: srs_for(pacs, study_uid), timeout=timeout, what=f"an SR for {study_uid} at the PACS")
    )


def wait_outbox_idle(node: Any, timeout: float = 60) -> None:
    """Until the node's outbox has no pending delivery."""

    def idle() -> bool:
        rows = json.loads(node.cli("outbox", "--json").stdout)
        return bool(rows) and all(r["state"] != "pending" for r in rows)

    wait_until(idle, timeout=timeout, what="an idle outbox")
