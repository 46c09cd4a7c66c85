"""The job body: a received study runs end to end into stored findings, outputs and outbox rows."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torchvision
from dicom_checks import dciodvfy_errors
from nodeproc import TEST_MODALITIES
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from dxnode.analysis.predict import predict_file
from dxnode.config import Settings
from dxnode.inference.bundle import write_bundle
from dxnode.jobs.body import run_job
from dxnode.model import load_classifier
from dxnode.pipeline import Preprocessing
from dxnode.store import Delivery, FindingRow, Instance, InstanceResult, Job, Output, Series, Store, Study, utcnow
from dxnode.worklist import queue


def receive(store: Store, settings: Settings, sources: list[str]) -> tuple[str, list[str]]:
    """Put files under the data dir with their rows, as the SCP would; returns (study UID, SOP UIDs)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    uids = []
    with store.session() as s:
        study = Study(
            study_instance_uid=study_uid,
            patient_id="P1",
            calling_aet="CT1",
            last_received_at=utcnow() - dt.timedelta(minutes=1),
            num_instances=len(sources),
        )
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=series_uid, modality="CT")
        s.add(series)
        s.flush()
        for i, name in enumerate(sources):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            rel = Path("incoming") / study_uid / series_uid / f"{ds.SOPInstanceUID}.dcm"
            (settings.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(settings.data_dir / rel, enforce_file_format=True)
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
    return study_uid, uids


@pytest.fixture
def node_settings(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no ImageNet file: the demo model
    return Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": db_url},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        report={"heatmap_for": "top1"},
        pipeline={"modalities": TEST_MODALITIES},
    )


def test_runner_turns_a_received_study_into_findings_outputs_and_deliveries(
    store: Store, node_settings: Settings
) -> None:
    study_uid, uids = receive(store, node_settings, ["CT_small.dcm", "CT_small.dcm", "reportsi.dcm"])
    assert queue.sweep(store, node_settings)
    assert queue.drain(store, node_settings, run_job) == 1
    with store.session() as s:
        job = s.scalar(select(Job))
        assert job.state == "done", job.error
        outcomes = {r.sop_instance_uid: r for r in s.scalars(select(InstanceResult))}
        findings = list(s.scalars(select(FindingRow).order_by(FindingRow.rank)))
        outputs = list(s.scalars(select(Output)))
        deliveries = list(s.scalars(select(Delivery)))
    assert outcomes[uids[0]].state == "done" and outcomes[uids[1]].state == "done"
    assert outcomes[uids[2]].state == "skipped" and outcomes[uids[2]].reason  # the SR never reaches the decoder
    labels = load_classifier(node_settings.model).manifest.labels
    assert sorted(f.label for f in findings) == sorted(labels)
    assert all(0.0 <= f.probability <= 1.0 for f in findings)
    assert findings[0].probability == max(f.probability for f in findings)
    assert all(f.model_demo for f in findings) and "UNTRAINED DEMO" in job.log
    assert sorted(o.kind for o in outputs) == ["sc", "sr"]
    for o in outputs:
        assert dciodvfy_errors(node_settings.data_dir / o.file_path) == [], o.kind
    assert len(deliveries) == 2 and {d.state for d in deliveries} == {"pending"}

    # Re-running the job writes the same objects and queues nothing new.
    with store.session() as s:
        queue.requeue_study(s, study_uid, actor="test")
    queue.drain(store, node_settings, run_job)
    with store.session() as s:
        assert sorted(o.sop_instance_uid for o in s.scalars(select(Output))) == sorted(
            o.sop_instance_uid for o in outputs
        )
        assert len(list(s.scalars(select(Delivery)))) == 2


def test_study_whose_only_image_is_broken_fails_with_the_reason(store: Store, node_settings: Settings) -> None:
    receive(store, node_settings, ["CT_small.dcm"])
    with store.session() as s:
        inst = s.scalar(select(Instance))
        path = node_settings.data_dir / inst.file_path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20000])  # truncate the pixel data
    queue.sweep(store, node_settings)
    queue.drain(store, node_settings, run_job)
    with store.session() as s:
        job = s.scalar(select(Job))
        outcome = s.scalar(select(InstanceResult))
    assert job.state == "failed" and "no instance could be analysed" in job.error
    assert outcome.state == "failed" and outcome.reason


def test_a_bundle_gives_the_runner_and_predict_the_same_probabilities(
    store: Store, node_settings: Settings, tmp_path: Path
) -> None:
    torch.manual_seed(7)
    net = torchvision.models.resnet18(num_classes=2)
    bundle = tmp_path / "bundle"
    write_bundle(
        bundle,
        net.state_dict(),
        name="test-net",
        version="1.0",
        labels=["nodule", "effusion"],
        task="multilabel",
        thresholds=[0.5, 0.5],
        preprocessing=Preprocessing(input_size=64),
    )
    settings = node_settings.model_copy(
        update={"model": node_settings.model.model_copy(update={"bundle": str(bundle)})}
    )
    receive(store, settings, ["CT_small.dcm"])
    queue.sweep(store, settings)
    queue.drain(store, settings, run_job)
    with store.session() as s:
        job = s.scalar(select(Job))
        assert job.state == "done", job.error
        runner = {f.label: f.probability for f in s.scalars(select(FindingRow))}
        path = settings.data_dir / s.scalar(select(Instance)).file_path
    direct = predict_file(path, load_classifier(settings.model), settings)
    assert direct.error is None
    for f in direct.findings:
        np.testing.assert_allclose(f.probability, runner[f.label], rtol=0, atol=1e-6)
    assert job.model_name == "test-net" and job.model_version == "1.0"
    shutil.rmtree(bundle)
