"""Several models with routing rules: real C-STORE in, the real job body, one SR per (study, model)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import data_store
import pydicom
import pytest
from conftest import need_tool
from dicom_checks import dciodvfy_errors
from nodeproc import InProcessNode
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from dxnode.config import Settings
from dxnode.jobs.body import run_job
from dxnode.queries import JobFilter, list_jobs
from dxnode.store import Job, Output
from dxnode.worklist import queue

CR_CHEST = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"  # CR CHEST, MONOCHROME1
MODELS = [
    {"name": "chest-cr", "bundle": "demo", "modalities": ["CR", "DX"], "heatmap_for": "top1"},
    {"name": "ct", "bundle": "demo", "modalities": ["CT"], "min_instances": 2, "heatmap_for": "top1"},
]


def copy_as_new_study(src: Path, folder: Path, n: int = 1, **attrs: Any) -> tuple[str, list[Path]]:
    """n instances of a source image as a new study (new UIDs), with some attributes changed."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        for k, v in attrs.items():
            setattr(ds, k, v)
        path = folder / f"{src.stem}-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return study, out


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessNode]:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    n = InProcessNode(tmp_path)
    yield n
    n.stop()


@pytest.fixture
def node_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str) -> Iterator[InProcessNode]:
    """The same on SQLite and on PostgreSQL (the routing queries run on both)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    n = InProcessNode(tmp_path, url=db_url)
    yield n
    n.stop()


def with_models(node: InProcessNode, models: list[dict[str, Any]], **sections: Any) -> Settings:
    return Settings(
        node={"data_dir": node.settings.node.data_dir},
        database={"url": node.store.url},
        models=models,
        worklist={"stable_seconds": 0},
        **sections,
    )


def storescu(port: int, files: list[Path]) -> None:
    need_tool("storescu")
    out = subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", "DXNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def run_all(node: InProcessNode, settings: Settings) -> None:
    queue.sweep(node.store, settings)
    queue.drain(node.store, settings, run_job)


def jobs_by_study(node: InProcessNode) -> dict[str, list[dict[str, Any]]]:
    with node.store.session() as s:
        rows = list_jobs(s, JobFilter(limit=100))
    out: dict[str, list[dict[str, Any]]] = {}
    for j in (r.model_dump(mode="json") for r in rows):
        out.setdefault(j["study_instance_uid"], []).append(j)
    return out


def srs(node: InProcessNode, study_uid: str) -> list[pydicom.Dataset]:
    with node.store.session() as s:
        paths = [o.file_path for o in s.scalars(select(Output).where(Output.kind == "sr"))]
    found = [pydicom.dcmread(node.settings.data_dir / p) for p in paths]
    return [d for d in found if d.StudyInstanceUID == study_uid]


def test_cr_chest_and_ct_in_one_association_go_to_different_models(node: InProcessNode, tmp_path: Path) -> None:
    cr_study, cr_files = copy_as_new_study(CR_CHEST, tmp_path / "cr")
    ct_study, ct_files = copy_as_new_study(Path(get_testdata_file("CT_small.dcm")), tmp_path / "ct", n=2)
    mr_study, mr_files = copy_as_new_study(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr")
    storescu(node.port, cr_files + ct_files + mr_files)  # one association
    settings = with_models(node, MODELS)
    run_all(node, settings)
    jobs = jobs_by_study(node)
    assert [(j["routed_model"], j["state"]) for j in jobs[cr_study]] == [("chest-cr", "done")]
    assert [(j["routed_model"], j["state"]) for j in jobs[ct_study]] == [("ct", "done")]
    assert "model ct for 1 of 1 series" in jobs[ct_study][0]["routing"][0]
    assert any("modality CT not in ['CR', 'DX']" in line for line in jobs[ct_study][0]["routing"])
    # A study no model takes is recorded as skipped, with each model's reason.
    (mr_job,) = jobs[mr_study]
    assert mr_job["state"] == "skipped" and mr_job["routed_model"] == ""
    assert mr_job["routing"][0] == "no model matches this study"
    assert any("modality MR not in ['CT']" in line for line in mr_job["routing"])
    from dxnode.queries import study_detail  # what the study page and /api/studies/{uid} show

    with node.store.session() as s:
        page = study_detail(s, ct_study)
    assert page is not None and page.jobs[0].routed_model == "ct" and "routing: model ct" in page.jobs[0].log
    cr_sr, ct_sr = srs(node, cr_study), srs(node, ct_study)
    assert len(cr_sr) == 1 and len(ct_sr) == 1
    assert cr_sr[0].SeriesNumber == 9901 and ct_sr[0].SeriesNumber == 9911  # series numbers per model
    assert "chest-cr" in cr_sr[0].SeriesDescription and "(ct)" in ct_sr[0].SeriesDescription
    assert dciodvfy_errors(node.settings.data_dir / "outputs" / ct_study / f"{ct_sr[0].SOPInstanceUID}.dcm") == []


def test_a_study_matching_two_models_gets_two_srs_and_rerouting_follows_the_rules(
    node_db: InProcessNode, tmp_path: Path
) -> None:
    node = node_db
    study, files = copy_as_new_study(
        Path(get_testdata_file("CT_small.dcm")), tmp_path / "ct", n=2, SeriesDescription="CHEST AXIAL"
    )
    storescu(node.port, files)
    chest_any = {"name": "chest-any", "bundle": "demo", "modalities": ["CT"], "series_description": "chest"}
    two = [*MODELS, {**chest_any, "heatmap_for": "top1"}]
    settings = with_models(node, two)
    run_all(node, settings)
    jobs = jobs_by_study(node)[study]
    assert sorted((j["routed_model"], j["state"]) for j in jobs) == [("chest-any", "done"), ("ct", "done")]
    first = srs(node, study)
    assert len(first) == 2 and len({d.SOPInstanceUID for d in first}) == 2  # same bundle, two models: two SRs
    assert sorted(int(d.SeriesNumber) for d in first) == [9911, 9921]

    # Re-running with the same rules writes the same objects again (deterministic UIDs per study and model).
    with node.store.session() as s:
        queue.requeue_study(s, study, actor="test")
    queue.drain(node.store, settings, run_job)
    assert {d.SOPInstanceUID for d in srs(node, study)} == {d.SOPInstanceUID for d in first}

    # Tighten the CT rule: re-queueing routes the study to the other model only.
    changed = with_models(node, [{**two[1], "min_instances": 3}, two[2]])
    with node.store.session() as s:
        queue.requeue_study(s, study, actor="test")
    queue.drain(node.store, changed, run_job)
    with node.store.session() as s:
        newest = s.scalars(select(Job).order_by(Job.id.desc())).first()
        assert newest is not None and newest.routed_model == "chest-any"
        assert "not model ct: series" in newest.log and "2 instance(s) < min_instances 3" in newest.log
        assert s.scalar(select(Job).where(Job.state == "queued")) is None


def test_without_models_the_model_section_takes_what_pipeline_names(node: InProcessNode, tmp_path: Path) -> None:
    study, files = copy_as_new_study(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr")
    storescu(node.port, files)
    settings = with_models(node, [], pipeline={"modalities": ["MR"]})  # beyond the demo's CR/DX, as written
    run_all(node, settings)
    (job,) = jobs_by_study(node)[study]
    assert job["state"] == "done" and job["routed_model"] == "" and job["routing"] == []
    assert srs(node, study)[0].SeriesNumber == 9901


def test_model_names_and_rules_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unique"):
        Settings(models=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValidationError, match="needs a name"):
        Settings(models=[{"modalities": ["CT"]}])
    with pytest.raises(ValidationError, match="not a regular expression"):
        Settings(models=[{"name": "a", "series_description": "("}])
    with pytest.raises(ValidationError, match="at least 512"):
        Settings(models=[{"name": "a", "sc_max_side": 100}])


def test_an_entry_may_set_its_own_sc_size() -> None:
    from dxnode.worklist.routing import entry, job_settings

    settings = Settings(
        report={"sc_max_side": 768},
        models=[{"name": "as-report"}, {"name": "full", "sc_max_side": 0}, {"name": "big", "sc_max_side": 2048}],
    )
    sides = {}
    for name in ("as-report", "full", "big"):
        e = entry(settings, name)
        assert e is not None
        sides[name] = job_settings(settings, e).report.sc_max_side
    assert sides == {"as-report": 768, "full": 0, "big": 2048}


def test_builtin_bundles_of_an_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dxnode.worklist.routing import entry, model_settings

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    settings = Settings(models=[{"name": "d", "bundle": "demo"}, {"name": "i", "bundle": "imagenet"}])
    assert model_settings(settings, entry(settings, "d")).bundle == "demo"  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"resnet18-f37072fd\.pth"):
        model_settings(settings, entry(settings, "i"))  # type: ignore[arg-type]
    weights = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"x")
    assert model_settings(settings, entry(settings, "i")).bundle == f"imagenet:{weights}"  # type: ignore[arg-type]
