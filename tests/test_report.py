"""The SR and the heatmap SC: valid IODs (dciodvfy), TID 1500 (Pixelmed), readable (dsrdump), idempotent UIDs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import data_store
import pydicom
import pytest
import torch
import torchvision
from dicom_checks import dciodvfy_errors, dsrdump, pixelmed_sr_check
from pydicom.data import get_testdata_file

from dxnode import model as model_mod
from dxnode.config import ModelSettings, Settings
from dxnode.model import analyze_study, load_classifier, write_bundle
from dxnode.pipeline import Preprocessing
from dxnode.report import summary_line, write_outputs
from dxnode.results import StudyResult

SOURCES = {
    "ct": Path(get_testdata_file("CT_small.dcm")),
    "cr": Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm",  # CR, MONOCHROME1
    "mr": Path(get_testdata_file("MR_small.dcm")),
}


@pytest.fixture(autouse=True)
def no_imagenet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_mod._cache.clear()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def bundle(tmp_path: Path, version: str = "1.0") -> Path:
    torch.manual_seed(5)
    net = torchvision.models.resnet18(num_classes=3)
    write_bundle(
        tmp_path / f"b{version}",
        net.state_dict(),
        name="chest-net",
        version=version,
        labels=["Effusion", "Nodule", "Pneumothorax"],
        task="multilabel",
        thresholds=[0.3, 0.5, 0.9],
        preprocessing=Preprocessing(input_size=64),
    )
    return tmp_path / f"b{version}"


def result_for(
    name: str, settings: Settings, b: Path | None, heatmap_for: str = "all"
) -> tuple[StudyResult, dict[str, Path]]:
    src = SOURCES[name]
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    clf = load_classifier(ModelSettings(bundle=str(b) if b else ""))
    return analyze_study(ds.StudyInstanceUID, [(ds.SOPInstanceUID, src)], clf, settings, heatmap_for), {
        ds.SOPInstanceUID: src
    }


@pytest.mark.parametrize("name", ["ct", "cr", "mr"])
def test_sr_and_sc_pass_dciodvfy_pixelmed_and_dsrdump(tmp_path: Path, name: str) -> None:
    settings = Settings()
    result, sources = result_for(name, settings, bundle(tmp_path))
    written = write_outputs(result, sources, settings, tmp_path / "out")
    sr = [w for w in written if w.kind == "sr"]
    sc = [w for w in written if w.kind == "sc"]
    assert len(sr) == 1 and len(sc) == 3
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.path
    root, errors = pixelmed_sr_check(sr[0].path)
    assert root.startswith("TID_1500") and errors == []
    text = dsrdump(sr[0].path)
    for f in result.findings:
        assert f.label in text and f"{round(f.probability, 6):g}"[:6] in text
    assert "chest-net" in text and "1.0" in text and "AI-generated" in text

    source = pydicom.dcmread(SOURCES[name], stop_before_pixels=True)
    for w in written:
        ds = pydicom.dcmread(w.path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    sc_ds = pydicom.dcmread(sc[0].path)
    assert sc_ds.BurnedInAnnotation == "YES" and sc_ds.PhotometricInterpretation == "RGB" and sc_ds.BitsAllocated == 8
    assert sc_ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "AI GENERATED" in sc_ds.ImageComments
    if "BodyPartExamined" in source:
        assert sc_ds.BodyPartExamined == source.BodyPartExamined
    ce = pydicom.dcmread(sr[0].path).ContributingEquipmentSequence[0]
    assert ce.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1" and ce.DeviceUID


def test_demo_model_outputs_say_untrained(tmp_path: Path) -> None:
    settings = Settings()
    result, sources = result_for("ct", settings, None, heatmap_for="top1")
    assert result.model.demo
    written = write_outputs(result, sources, settings, tmp_path / "out")
    assert "UNTRAINED DEMO" in summary_line(result)
    assert "UNTRAINED DEMO" in dsrdump(next(w.path for w in written if w.kind == "sr"))
    sc = pydicom.dcmread(next(w.path for w in written if w.kind == "sc"))
    assert "UNTRAINED DEMO" in sc.ImageComments


def test_same_result_same_uids_changed_result_new_uids(tmp_path: Path) -> None:
    settings = Settings()
    b = bundle(tmp_path)
    result, sources = result_for("ct", settings, b)
    first = write_outputs(result, sources, settings, tmp_path / "a")
    again = write_outputs(result, sources, settings, tmp_path / "b")
    assert [w.sop_instance_uid for w in first] == [w.sop_instance_uid for w in again]
    assert [w.series_instance_uid for w in first] == [w.series_instance_uid for w in again]
    changed = dataclasses.replace(
        result, findings=[dataclasses.replace(result.findings[0], probability=0.123), *result.findings[1:]]
    )
    other = write_outputs(changed, sources, settings, tmp_path / "c")
    assert not {w.sop_instance_uid for w in other} & {w.sop_instance_uid for w in first}
    model_mod._cache.clear()
    newer, _ = result_for("ct", settings, bundle(tmp_path, version="1.1"))
    assert newer.model.version == "1.1"
    assert write_outputs(newer, sources, settings, tmp_path / "d")[0].sop_instance_uid != first[0].sop_instance_uid


def test_sr_series_number_and_description_come_from_config(tmp_path: Path) -> None:
    settings = Settings(
        report={"sr_series_description": "KI Ergebnisse", "sr_series_number": 777, "sc_series_number": 778}
    )
    result, sources = result_for("ct", settings, bundle(tmp_path), heatmap_for="top1")
    written = {w.kind: pydicom.dcmread(w.path) for w in write_outputs(result, sources, settings, tmp_path / "o")}
    assert written["sr"].SeriesDescription == "KI Ergebnisse" and written["sr"].SeriesNumber == 777
    assert written["sc"].SeriesNumber == 778
