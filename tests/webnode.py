"""A node with a processed study, for the web tests: real files, real rows, the real job body."""

from __future__ import annotations

from pathlib import Path

import pydicom
from nodeproc import TEST_MODALITIES
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dxnode.config import Settings
from dxnode.jobs.body import run_job
from dxnode.store import Instance, Series, Store, Study, upgrade, utcnow
from dxnode.worklist import queue

ADMIN, READER = "admin-token-0123456789", "read-token-0123456789"
BROWSER = {"Origin": "http://testserver"}  # what a browser adds to a POST from the node's own pages (TestClient's host)


def node_settings(tmp: Path, url: str | None = None, **web: object) -> Settings:
    url = url or f"sqlite:///{tmp / 'dxnode.db'}"
    return Settings(
        node={"data_dir": tmp / "var"},
        database={"url": url},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        report={"heatmap_for": "top1"},
        pipeline={"modalities": TEST_MODALITIES},
        web={
            "tokens": [
                {"name": "alice", "token": ADMIN, "role": "admin"},
                {"name": "bob", "token": READER, "role": "read"},
            ],
            **web,
        },
    )


def processed_study(store: Store, settings: Settings, patient_id: str = "PID-WEB-1", accession: str = "ACC-9") -> str:
    """Receive CT_small as a new study (files + rows), then run the real job body on it."""
    study_uid, series_uid = generate_uid(), generate_uid()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.AccessionNumber, ds.PatientName = patient_id, accession, "Web^Patient"
    rel = Path("incoming") / study_uid / series_uid / f"{ds.SOPInstanceUID}.dcm"
    (settings.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(settings.data_dir / rel, enforce_file_format=True)
    with store.session() as s:
        study = Study(
            study_instance_uid=study_uid,
            patient_id=patient_id,
            patient_name="Web^Patient",
            accession_number=accession,
            study_date="20240102",
            modalities="CT",
            calling_aet="CT1",
            num_instances=1,
            last_received_at=utcnow(),
        )
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=series_uid, modality="CT")
        s.add(series)
        s.flush()
        s.add(
            Instance(
                series_id=series.id,
                study_id=study.id,
                sop_class_uid=ds.SOPClassUID,
                sop_instance_uid=ds.SOPInstanceUID,
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                file_path=str(rel),
                size_bytes=(settings.data_dir / rel).stat().st_size,
            )
        )
    with store.session() as s:
        queue.requeue_study(s, study_uid, actor="test", action="study.force_complete")
    assert queue.drain(store, settings, run_job) == 1
    return study_uid


def make_store(settings: Settings) -> Store:
    upgrade(settings.database.url)
    return Store(settings.database.url)
