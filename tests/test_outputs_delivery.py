"""Each destination gets only the kinds it names; Orthanc stores every kind in the source's study (C-STORE and STOW-RS)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port, need, need_tool
from nodeproc import wait_port
from sqlalchemy import select
from test_dicomweb_out import ORTHANC_DICOMWEB, rest
from test_outputs_objects import ALL, CT, synthetic

from dxnode.config import Settings
from dxnode.outbox import dispatch
from dxnode.outputs.report import WrittenOutput, write_outputs
from dxnode.states import DeliveryState, OutputKind
from dxnode.store import Delivery, Output, Store, Study

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def record(store: Store, settings: Settings, written: list[WrittenOutput]) -> None:
    """Output rows of the written objects, and their deliveries queued."""
    with store.session() as s:
        study = Study(study_instance_uid=pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID, patient_id="")
        s.add(study)
        s.flush()
        for w in written:
            out = Output(
                study_id=study.id,
                kind=OutputKind(w.kind),
                label=w.label,
                sop_class_uid=w.sop_class_uid,
                sop_instance_uid=w.sop_instance_uid,
                series_instance_uid=w.series_instance_uid,
                file_path=str(w.path.relative_to(settings.data_dir.resolve())),
            )
            s.add(out)
            s.flush()
            dispatch.enqueue(s, out, settings)


def test_each_destination_is_queued_only_the_kinds_it_names(store: Store, tmp_path: Path) -> None:
    settings = Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": store.url},
        destinations=[
            {"name": "sr-only", **DEST, "outputs": ["sr"]},
            {"name": "viewer", **DEST, "outputs": ["gsps", "kos"]},
        ],
    )
    result, sources = synthetic([CT], {"Nodule": (0, (40, 50))})
    written = write_outputs(result, sources, settings, settings.data_dir / "outputs")
    assert sorted(w.kind for w in written) == ["gsps", "kos", "sr"]  # no SC, SEG or map: nobody wants them
    record(store, settings, written)
    with store.session() as s:
        queued = s.execute(select(Output.kind, Delivery.destination).join(Delivery, Delivery.output_id == Output.id))
        assert sorted((str(k), d) for k, d in queued) == [("gsps", "viewer"), ("kos", "viewer"), ("sr", "sr-only")]


def _orthanc(tmp: Path, dicom_port: int, http_port: int) -> subprocess.Popen[bytes]:
    """Orthanc on free ports: a DICOM listener (ORTHANC, accepting any caller) and DICOMweb."""
    need(shutil.which("Orthanc") is not None and ORTHANC_DICOMWEB.exists(), "orthanc + orthanc-dicomweb")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "Name": "dxnode-objects",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "DicomServerEnabled": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    log = (tmp / "orthanc.log").open("wb")  # kept for the reader of a failing test
    proc = subprocess.Popen(["Orthanc", str(tmp / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    wait_port(http_port, timeout=60)
    wait_port(dicom_port, timeout=60)
    return proc


@pytest.mark.parametrize("transport", ["dimse", "dicomweb"])
def test_orthanc_stores_every_kind_in_the_sources_study(store: Store, tmp_path: Path, transport: str) -> None:
    need_tool("storescu")
    dicom_port, http_port = free_port(), free_port()
    orthanc = _orthanc(tmp_path / "orthanc", dicom_port, http_port)
    base = f"http://127.0.0.1:{http_port}"
    try:
        sent = subprocess.run(["storescu", "-aec", "ORTHANC", "127.0.0.1", str(dicom_port), str(CT)], timeout=60)
        assert sent.returncode == 0
        if transport == "dimse":
            dest = {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}
        else:
            dest = {"name": "orthanc", "kind": "dicomweb", "url": f"{base}/dicom-web"}
        settings = Settings(
            node={"data_dir": tmp_path / "var"},
            database={"url": store.url},
            destinations=[{**dest, "outputs": [k.value for k in ALL]}],
            dispatch={"timeout_seconds": 30},
        )
        result, sources = synthetic([CT], {"Nodule": (0, (40, 50)), "Mass": (0, (90, 80))})
        written = write_outputs(result, sources, settings, settings.data_dir / "outputs")
        assert {w.kind for w in written} == {k.value for k in ALL}
        record(store, settings, written)
        assert dispatch.send_due(store, settings) == len(written)
        with store.session() as s:
            states = {d.state for d in s.scalars(select(Delivery))}
            assert states == {DeliveryState.SENT}, [d.last_error for d in s.scalars(select(Delivery))]
        source_study = rest(f"{base}/tools/lookup", str(result.study_instance_uid).encode())[0]["ID"]
        for w in written:
            hit = rest(f"{base}/tools/lookup", w.sop_instance_uid.encode())
            assert hit and hit[0]["Type"] == "Instance", w.kind
            assert rest(f"{base}/instances/{hit[0]['ID']}/study")["ID"] == source_study, w.kind
            assert rest(f"{base}/instances/{hit[0]['ID']}/simplified-tags")["SOPClassUID"] == w.sop_class_uid
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)
