"""A result for every accepted instance (issue 24): values a VR does not allow reach the PACS made valid,
failures are classified where their stage ends, and library tracebacks stay out of the INFO log."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import torch
import torchvision
from conftest import free_port, need_tool
from dicom_checks import dciodvfy_errors
from hostile import IR149_SO_SI_NAME, raw, rle_truncated, truncated_frame
from nodeproc import Node, StoreSCP, make_study, node_config, storescu, wait_until
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
    return Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": db_url},
        model={"bundle": str(any_net(tmp_path / "bundle"))},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        report={"heatmap_for": "top1"},
        worklist={"max_attempts": 3, "retry_backoff_seconds": 0},
    )


def any_net(folder: Path) -> Path:
    """A bundle of a seeded untrained ResNet-18 with no intended modality; its first label is always positive."""
    torch.manual_seed(24)
    write_bundle(
        folder,
        torchvision.models.resnet18(num_classes=2).state_dict(),
        name="any-net",
        version="1.0",
        labels=["nodule", "effusion"],
        task="multilabel",
        thresholds=[0.0, 0.5],  # nodule always positive: an attention ROI and a heatmap
        preprocessing=Preprocessing(input_size=64),
    )
    return folder


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


# --- one bad instance does not cost the study its results -------------------------------------------------


def nan_window(ds: Dataset) -> None:
    """A window the pixel chain does not use (noted), which highdicom cannot copy into a GSPS: a ValueError."""
    ds.WindowCenter, ds.WindowWidth = "NaN", "NaN"


def with_gsps(settings: Settings) -> Settings:
    """The destination also wants the attention GSPS (which copies each source's VOI window)."""
    return settings.model_copy(
        update={"destinations": [d.model_copy(update={"outputs": ["sr", "sc", "gsps"]}) for d in settings.destinations]}
    )


def test_an_instance_whose_outputs_fail_is_left_out_and_the_others_are_reported(
    store: Store, any_modality: Settings
) -> None:
    """Four copies of one CT: the same probabilities, so the first (the bad one) drives every finding at first."""
    settings = with_gsps(any_modality)
    bad, *good = receive(store, settings, [("CT_small.dcm", nan_window)] + [("CT_small.dcm", lambda ds: None)] * 3)
    queue.sweep(store, settings)
    assert queue.drain(store, settings, run_job) == 1
    with store.session() as s:
        job = s.scalar(select(Job))
        results = {r.sop_instance_uid: r for r in s.scalars(select(InstanceResult))}
        outputs = list(s.scalars(select(Output)))
    assert job.state == JobState.DONE and job.attempts == 1, job.error
    assert results[bad].state == "failed", results[bad].reason
    assert results[bad].reason.startswith("outputs: its results cannot be written: ValueError: "), results[bad].reason
    assert all(results[uid].state == "done" for uid in good), [(r.state, r.reason) for r in results.values()]
    assert f"left out of the results: instance 1 of 4 ({bad}): outputs: " in job.log, job.log
    assert sorted(o.kind for o in outputs) == ["gsps", "sc", "sr"]
    for o in outputs:
        text = (settings.data_dir / o.file_path).read_bytes()
        assert bad.encode() not in text, o.kind  # no object references the instance left out
        assert dciodvfy_errors(settings.data_dir / o.file_path) == [], o.kind
    sr = pydicom.dcmread(settings.data_dir / next(o.file_path for o in outputs if o.kind == "sr"))
    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert bad not in evidence and evidence & set(good), evidence  # the evidence also lists the SC and GSPS


def test_a_kind_that_fails_on_every_instance_is_a_note_and_the_rest_is_reported(
    store: Store, any_modality: Settings
) -> None:
    """Every instance's GSPS fails alone, so no instance is to blame: nothing is left out, the SR and SC
    are written and the job log says why there is no GSPS (not a failed job without results)."""
    settings = with_gsps(any_modality)
    receive(store, settings, [("CT_small.dcm", nan_window)] * 2)
    queue.sweep(store, settings)
    queue.run_one(store, settings, run_job)
    with store.session() as s:
        job = s.scalar(select(Job))
        states = [r.state for r in s.scalars(select(InstanceResult))]
        outputs = list(s.scalars(select(Output)))
    assert job.state == JobState.DONE and job.attempts == 1, (job.state, job.error)
    assert states == ["done", "done"]
    assert sorted(o.kind for o in outputs) == ["sc", "sr"]
    assert "no GSPS: " in job.log and "left out of the results" not in job.log, job.log
    for o in outputs:
        assert dciodvfy_errors(settings.data_dir / o.file_path) == [], o.kind


def test_a_deterministic_error_decoding_one_instance_fails_it_alone() -> None:
    from dxnode.jobs.isolate import fails_alone

    assert fails_alone(IndexError("index 4097 is out of bounds")) == (
        "analyze: cannot analyse this instance: IndexError: index 4097 is out of bounds"
    )
    assert fails_alone(OSError(5, "Input/output error")) is None  # the machine, not the data: the job is retried
    assert fails_alone(MemoryError()) is None


READER = "reader-token-0123456789"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


def _study_page(web: str, study_uid: str) -> dict[str, object]:
    req = urllib.request.Request(f"{web}/api/studies/{study_uid}", headers={"Authorization": f"Bearer {READER}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read()))


@pytest.mark.slow
def test_serve_delivers_the_others_findings_when_one_instance_fails_at_the_output_stage(tmp_path: Path) -> None:
    """storescu -> dxnode serve -> storescp: 3 good CTs and 1 whose NaN window fails the GSPS, sent first."""
    need_tool("storescp", "storescu", "dciodvfy")
    pacs = StoreSCP(tmp_path / "pacs", free_port())
    cfg = node_config(
        tmp_path,
        model={"bundle": str(any_net(tmp_path / "bundle"))},
        worklist={"max_attempts": 3, "retry_backoff_seconds": 0},
        web={
            "enabled": True,
            "host": "127.0.0.1",
            "port": 0,
            "tokens": [{"name": "r", "token": READER, "role": "read"}],
        },
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "outputs": ["sr", "sc", "gsps"],
            }
        ],
    )
    node = Node(cfg)
    try:
        web = node.wait_for(r"dxnode web: (http://\S+)").group(1).rstrip("/")
        study_uid, files = make_study(tmp_path / "study", n=4)  # InstanceNumber 1..4: the bad one is analysed first
        ds = pydicom.dcmread(files[0])
        nan_window(ds)
        ds.save_as(files[0], enforce_file_format=True)
        bad = str(ds.SOPInstanceUID)
        good = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[1:]}
        storescu(node.port, files)

        def delivered() -> dict[str, object] | None:
            page = _study_page(web, study_uid)
            jobs, deliveries = page["jobs"], page["deliveries"]
            assert isinstance(jobs, list) and isinstance(deliveries, list)
            if jobs and jobs[0]["state"] == "failed":
                raise AssertionError(jobs[0]["error"])
            sent = deliveries and all(d["state"] == "sent" for d in deliveries)
            return page if jobs and jobs[0]["state"] == "done" and sent else None

        page = wait_until(delivered, timeout=180, what="the job done and its outputs sent")
        (job,) = page["jobs"]
        assert job["attempts"] == 1, job  # a deterministic failure: never retried
        assert f"left out of the results: instance 1 of 4 ({bad}): outputs: " in job["log"], job["log"]
        results = {r["sop_instance_uid"]: r for r in page["instance_results"]}
        assert results[bad]["state"] == "failed" and "ValueError" in results[bad]["reason"], results[bad]
        assert {uid for uid, r in results.items() if r["state"] == "done"} == good
        node.wait_for(r"job \d+: instance 1 of 4 failed: outputs: its results cannot be written: ValueError")

        objs = wait_until(
            lambda: ds if len(ds := pacs.datasets()) >= 3 else None, timeout=30, what="3 objects at the PACS"
        )
        assert sorted(str(d.Modality) for d in objs) == ["OT", "PR", "SR"], [d.SOPClassUID for d in objs]
        (sr,) = [d for d in objs if d.Modality == "SR"]
        assert sr.StudyInstanceUID == study_uid and sr.SOPClassUID == SR_STORAGE
        assert "nodule" in str(sr.ContentSequence) and "effusion" in str(sr.ContentSequence)  # the findings
        evidence = {
            i.ReferencedSOPInstanceUID
            for e in sr.CurrentRequestedProcedureEvidenceSequence
            for se in e.ReferencedSeriesSequence
            for i in se.ReferencedSOPSequence
        }
        assert bad not in evidence and evidence & good, evidence
        for path in pacs.folder.iterdir():
            assert bad.encode() not in path.read_bytes(), path.name
            assert dciodvfy_errors(path) == [], path.name
    finally:
        node.stop()
        pacs.stop()
