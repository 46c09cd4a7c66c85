"""A result for every accepted instance (issue 24): values a VR does not allow reach the PACS made valid,
failures are classified where their stage ends, and library tracebacks stay out of the INFO log."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import torch
import torchvision
from dicom_checks import dciodvfy_errors
from hostile import IR149_SO_SI_NAME, raw, rle_truncated, truncated_frame
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from dxnode.config import Settings
from dxnode.inference.bundle import write_bundle
from dxnode.jobs.body import run_job
from dxnode.pipeline import Preprocessing
from dxnode.states import JobState
from dxnode.store import Instance, InstanceResult, Job, Output, Series, Store, Study, upgrade, utcnow
from dxnode.worklist import queue

Mutate = Callable[[Dataset], None]


def receive(store: Store, settings: Settings, sources: list[tuple[str, Mutate]]) -> list[str]:
    """Files under the data dir with their rows, as the SCP stores them; returns the SOP Instance UIDs."""
    study_uid, series_uid = generate_uid(), generate_uid()
    uids = []
    with store.session() as s:
        study = Study(
            study_instance_uid=study_uid,
            patient_id="P24",
            calling_aet="MOD",
            last_received_at=utcnow() - dt.timedelta(minutes=1),
            num_instances=len(sources),
        )
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=series_uid, modality="")
        s.add(series)
        s.flush()
        for i, (name, mutate) in enumerate(sources):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            mutate(ds)
            rel = Path("incoming") / study_uid / f"{ds.SOPInstanceUID}.dcm"
            (settings.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(settings.data_dir / rel)
            s.add(
                Instance(
                    series_id=series.id,
                    study_id=study.id,
                    sop_class_uid=ds.SOPClassUID,
                    sop_instance_uid=ds.SOPInstanceUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    instance_number=i,
                    file_path=str(rel),
                    size_bytes=(settings.data_dir / rel).stat().st_size,
                )
            )
            uids.append(ds.SOPInstanceUID)
    return uids


@pytest.fixture
def any_modality(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A node whose model declares no intended modality, so an instance without Modality is analysed."""
    return any_modality_settings(db_url, tmp_path, monkeypatch)


def any_modality_settings(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings of the any_modality fixture, for a database of the test's own."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.manual_seed(24)
    write_bundle(
        tmp_path / "bundle",
        torchvision.models.resnet18(num_classes=2).state_dict(),
        name="any-net",
        version="1.0",
        labels=["nodule", "effusion"],
        task="multilabel",
        thresholds=[0.0, 0.5],  # nodule always positive: an attention ROI and a heatmap
        preprocessing=Preprocessing(input_size=64),
    )
    return Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": db_url},
        model={"bundle": str(tmp_path / "bundle")},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        report={"heatmap_for": "top1"},
        worklist={"max_attempts": 3, "retry_backoff_seconds": 0},
    )


def issue_24_header(ds: Dataset) -> None:
    """The header values the second hostile sweep found failing jobs or dciodvfy (issue 24)."""
    raw(ds, "PatientBirthDate", "DA", b"20251399")
    raw(ds, "StudyDate", "DA", b"20241331")
    raw(ds, "StudyTime", "TM", b"256100")
    raw(ds, "ReferringPhysicianName", "PN", b"R" * 68 + b"^Given")
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    raw(ds, "PatientName", "PN", IR149_SO_SI_NAME)
    del ds.Modality


def test_impossible_dates_long_pn_control_bytes_and_no_modality_reach_the_pacs_valid(
    store: Store, any_modality: Settings
) -> None:
    receive(store, any_modality, [("CT_small.dcm", issue_24_header)])
    assert queue.sweep(store, any_modality)
    assert queue.drain(store, any_modality, run_job) == 1
    with store.session() as s:
        job = s.scalar(select(Job))
        outputs = list(s.scalars(select(Output)))
    assert job.state == JobState.DONE and job.attempts == 1, job.error
    assert sorted(o.kind for o in outputs) == ["sc", "sr"]
    for o in outputs:
        path = any_modality.data_dir / o.file_path
        assert dciodvfy_errors(path) == [], o.kind
        out = pydicom.dcmread(path)
        assert out.PatientBirthDate == "" and out.StudyDate == "" and out.StudyTime == ""
        assert str(out.ReferringPhysicianName) == "R" * 64
        assert "\x0e" not in str(out.PatientName) and "\x0f" not in str(out.PatientName)
        assert str(out.PatientName).startswith("Hong^Gildong=")
    for note in (
        "note: PatientBirthDate emptied: not a valid DA value",
        "note: StudyDate emptied: not a valid DA value",
        "note: StudyTime emptied: not a valid TM value",
        "note: ReferringPhysicianName truncated to 64 bytes per component group and in all (PN)",
        "note: PatientName: characters not allowed in PN removed (control characters)",
        "note: Modality missing",
    ):
        assert note in job.log, job.log
    assert "Gildong" not in job.log and "RRRR" not in job.log  # notes name attributes, never values


def _failing_at(stage: str, exc: Exception) -> queue.JobBody:
    def body(store: Store, settings: Settings, job_id: int, heartbeat: Callable[[str], None]) -> JobState:
        heartbeat(stage)
        raise exc

    return body


@pytest.mark.parametrize(
    ("exc", "state", "attempts", "error"),
    [
        (ValueError("month must be\nin 1..12"), "failed", 1, "outputs: ValueError: month must be"),
        (AttributeError("'FileDataset' object has no attribute 'Modality'"), "failed", 1, "outputs: AttributeError: "),
        (OSError(28, "No space left on device"), "queued", 1, "outputs: OSError: [Errno 28] No space left on device"),
        (
            RuntimeError("onnxruntime: bad allocation"),
            "queued",
            1,
            "outputs: RuntimeError: onnxruntime: bad allocation",
        ),
        (queue.JobFailure("analyze", "no instance could be analysed: x", True), "failed", 1, "analyze: no instance"),
    ],
)
def test_a_failure_is_one_line_naming_its_stage_and_bad_input_is_not_retried(
    store: Store, tmp_path: Path, exc: Exception, state: str, attempts: int, error: str
) -> None:
    settings = Settings(node={"data_dir": tmp_path / "var"}, worklist={"max_attempts": 3})
    receive(store, settings, [("CT_small.dcm", lambda ds: None)])
    queue.sweep(store, settings)
    queue.run_one(store, settings, _failing_at("outputs", exc))
    with store.session() as s:
        job = s.scalar(select(Job))
    assert job.state == state and job.attempts == attempts, (job.state, job.error)
    assert job.error.startswith(error) and "\n" not in job.error, job.error


def test_an_output_stage_failure_is_classified_by_the_job_body(store: Store, any_modality: Settings) -> None:
    """The real body: an output folder that is a file fails the SR write (transient: OSError), named by stage."""
    receive(store, any_modality, [("CT_small.dcm", lambda ds: None)])
    any_modality.data_dir.mkdir(parents=True, exist_ok=True)
    (any_modality.data_dir / "outputs").write_text("not a folder")
    queue.sweep(store, any_modality)
    queue.run_one(store, any_modality, run_job)
    with store.session() as s:
        job = s.scalar(select(Job))
    assert job.state == "queued" and job.attempts == 1, job.error
    assert job.error.startswith("outputs: cannot write or queue the SR/SC: ") and "Error" in job.error, job.error


DRAIN = """
import json, sys
from dxnode.config import Settings
from dxnode.jobs.body import run_job
from dxnode.logs import setup_logging
from dxnode.store import Store
from dxnode.worklist import queue
setup_logging("INFO")
settings = Settings.model_validate(json.loads(sys.argv[1]))
store = Store(settings.database.url)
queue.sweep(store, settings)
queue.drain(store, settings, run_job)
"""


def test_corrupt_rle_and_j2k_log_one_line_per_instance_and_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'logs.db'}"  # the log policy does not depend on the database
    upgrade(url)
    store = Store(url)
    any_modality = any_modality_settings(url, tmp_path, monkeypatch)
    # Headers that pass the bounds, data the decoders fail on: pydicom logs each plugin's failure with a traceback.
    receive(store, any_modality, [("MR_small_RLE.dcm", rle_truncated), ("MR_small_jp2klossless.dcm", truncated_frame)])
    receive(store, any_modality, [("CT_small.dcm", lambda ds: None)])  # a second study that succeeds
    env = {**os.environ, "TORCH_HOME": os.environ.get("TORCH_HOME", "")}
    out = subprocess.run(
        [sys.executable, "-c", DRAIN, json.dumps(any_modality.model_dump(mode="json"))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    log = out.stderr
    assert out.returncode == 0, log
    assert "Traceback" not in log and "  File " not in log, log
    failed = [line for line in log.splitlines() if "failed: " in line and "dxnode.jobs.body" in line]
    assert len(failed) == 2, log
    assert any(" instance 1 of 2 failed: " in line for line in failed), failed
    assert any(" instance 2 of 2 failed: " in line for line in failed), failed
    library = [line for line in log.splitlines() if line.split()[3:4] and line.split()[3].startswith("pydicom")]
    assert library, "the decoders' failures were not logged: the corrupt data did not reach them\n" + log
    for line in library:  # date time LEVEL name: message
        assert " WARNING " in line and line.endswith("(traceback at DEBUG)"), line
    with store.session() as s:
        reasons = [r.reason for r in s.scalars(select(InstanceResult)) if r.state == "failed"]
        states = sorted(j.state for j in s.scalars(select(Job)))
    store.dispose()
    assert len(reasons) == 2 and all(reasons), reasons
    assert states == ["done", "failed"], states
