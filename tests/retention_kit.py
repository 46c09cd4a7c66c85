"""Helpers of the retention tests: tiny studies, studies finished (or left in flight) through the
store as a job process and the outbox would leave them, and the files-versus-rows check."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from dxnode.states import DeliveryState, JobState, OutputKind
from dxnode.store import Delivery, FindingRow, Instance, Job, Output, Store, Study, utcnow

CR = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


def tiny_instance(path: Path, study: str, series: str, number: int, rows: int = 32, columns: int = 64) -> None:
    """A small CR image (16-bit, rows x columns) written as a Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CR, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "RET", "Retention^Test", "CR", number
    ds.StudyDate, ds.AccessionNumber, ds.BodyPartExamined = "20260101", "A1", "CHEST"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * columns, dtype=np.uint16) % 4096).tobytes()
    ds.save_as(path, enforce_file_format=True)


def tiny_studies(folder: Path, count: int, per_study: int = 2, **size: int) -> tuple[list[str], list[Path]]:
    """count studies of per_study tiny instances each; returns their UIDs and files."""
    folder.mkdir(parents=True, exist_ok=True)
    uids, files = [], []
    for i in range(count):
        study, series = generate_uid(), generate_uid()
        uids.append(study)
        for n in range(per_study):
            path = folder / f"s{i:05d}_{n}.dcm"
            tiny_instance(path, study, series, n + 1, **size)
            files.append(path)
    return uids, files


def settle(session: Session, data_dir: Path, study: Study, role: str, at: dt.datetime | None = None) -> None:
    """Leave a received study as the job and the outbox would: role "done" (results delivered),
    "committed", "cancelled", "pending" (a delivery not yet sent), "queued", "running" (a job in
    flight), "ignored" (marked ignored, no job) or "uncovered" (no job yet)."""
    at = at or utcnow()
    if role == "uncovered":
        return
    if role == "ignored":
        study.ignored = True
        return
    study.queued_through = study.last_received_at
    job = session.scalar(select(Job).where(Job.study_id == study.id))
    state = {"queued": JobState.QUEUED, "running": JobState.RUNNING}.get(role, JobState.DONE)
    if job is None:
        job = Job(study_id=study.id, state=state)
        session.add(job)
    job.state = state
    if state != JobState.DONE:
        return
    job.finished_at = at
    session.flush()
    session.add(
        FindingRow(
            job_id=job.id,
            study_id=study.id,
            label="x",
            probability=0.5,
            threshold=0.5,
            positive=True,
            model_name="m",
            model_version="1",
        )
    )
    sop = generate_uid()
    rel = Path("outputs") / study.study_instance_uid / f"SR.{sop}.dcm"
    (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / rel).write_bytes(b"a stand-in for the SR a job writes")
    output = Output(
        job_id=job.id,
        study_id=study.id,
        kind=OutputKind.SR,
        sop_class_uid=SR,
        sop_instance_uid=sop,
        series_instance_uid=generate_uid(),
        file_path=str(rel),
    )
    session.add(output)
    session.flush()
    delivery = {"done": DeliveryState.SENT, "pending": DeliveryState.PENDING, "cancelled": DeliveryState.CANCELLED}
    session.add(
        Delivery(
            output_id=output.id,
            destination="pacs",
            state=delivery.get(role, "committed"),
            sent_at=at if role in ("done", "committed") else None,
        )
    )


def incoming_files(data_dir: Path) -> set[str]:
    """Data-dir relative paths of the received files (temporaries left out)."""
    found = set()
    for root, _dirs, files in os.walk(data_dir / "incoming"):
        found |= {str((Path(root) / f).relative_to(data_dir)) for f in files if not f.startswith(".")}
    return found


def apart(store: Store, data_dir: Path) -> tuple[set[str], set[str], set[str]]:
    """(files without a row, rows not being purged without a file, rows being purged) of incoming/."""
    with store.session() as s:
        rows = dict(s.execute(select(Instance.file_path, Instance.purging)).all())
    files = incoming_files(data_dir)
    live = {p for p, purging in rows.items() if not purging}
    return files - set(rows), {p for p in live if p not in files}, set(rows) - live
