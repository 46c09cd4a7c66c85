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

from dxnode.analysis.streaming import analyze_study
from dxnode.config import ModelSettings, Settings
from dxnode.inference.bundle import write_bundle
from dxnode.model import load_classifier
from dxnode.outputs.report import write_outputs
from dxnode.outputs.sr import PROBABILITY, summary_line
from dxnode.pipeline import Preprocessing
from dxnode.results import StudyResult

SOURCES = {
    "ct": Path(get_testdata_file("CT_small.dcm")),
    "cr": Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm",  # CR, MONOCHROME1
    "mr": Path(get_testdata_file("MR_small.dcm")),
}


@pytest.fixture(autouse=True)
def no_imagenet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def bundle(tmp_path: Path, version: str = "1.0", size: int = 64) -> Path:
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
        preprocessing=Preprocessing(input_size=size),
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


@pytest.mark.parametrize("name", ["cr", "enhanced"])
def test_attention_roi_is_a_tid1410_group_on_the_source_image(tmp_path: Path, name: str) -> None:
    """Each positive finding gets a planar ROI (Grad-CAM >= half peak) that highdicom reads back with its image."""
    import highdicom as hd
    import numpy as np

    settings = Settings()
    if name == "enhanced":
        src = Path(get_testdata_file("emri_small.dcm"))
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        clf = load_classifier(ModelSettings(bundle=str(bundle(tmp_path))))
        result = analyze_study(ds.StudyInstanceUID, [(ds.SOPInstanceUID, src)], clf, settings, "all")
        sources = {ds.SOPInstanceUID: src}
    else:
        result, sources = result_for(name, settings, bundle(tmp_path))
    # Thresholds of an untrained bundle decide nothing here: make every finding positive.
    result = dataclasses.replace(result, findings=[dataclasses.replace(f, positive=True) for f in result.findings])
    written = write_outputs(result, sources, settings, tmp_path / "out")
    sr_path = next(w.path for w in written if w.kind == "sr")
    assert dciodvfy_errors(sr_path) == []
    root, errors = pixelmed_sr_check(sr_path)
    assert root.startswith("TID_1500") and errors == []

    sr = hd.sr.srread(sr_path)
    groups = hd.sr.MeasurementReport.from_sequence([sr]).get_planar_roi_measurement_groups()
    source = pydicom.dcmread(next(iter(sources.values())), stop_before_pixels=True)
    assert len(groups) == 2 * len(result.findings)  # outline and bounding box of each
    assert sorted(g.tracking_identifier.split(",")[0] for g in groups) == sorted(
        ["AI attention box", "AI attention outline"] * len(result.findings)
    )
    assert len(hd.sr.MeasurementReport.from_sequence([sr]).get_image_measurement_groups()) == len(result.findings)
    for g in groups:
        assert "attention" in g.tracking_identifier and "not a lesion" in g.tracking_identifier
        region = g.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        data = region.value
        assert np.array_equal(data[0], data[-1]) and len(data) >= 4
        if "box" in g.tracking_identifier:
            assert len(data) == 5 and len(set(data[:, 0])) == 2 and len(set(data[:, 1])) == 2
        assert (data[:, 0] >= 0).all() and (data[:, 0] <= source.Columns).all()
        assert (data[:, 1] >= 0).all() and (data[:, 1] <= source.Rows).all()
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM: the source image
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        if name == "enhanced":
            assert ref.ReferencedFrameNumber >= 1
        prob = g.get_measurements(name=PROBABILITY)[0]
        assert prob.value == pytest.approx(
            next(f.probability for f in result.findings if f.label in g.tracking_identifier), abs=1e-5
        )
    # The SR references every heatmap SC with an IMAGE content item.
    sc_uids = {w.sop_instance_uid for w in written if w.kind == "sc"}
    flat = pydicom.dcmread(sr_path)
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in _walk(flat)
        if item.get("ValueType") == "IMAGE"
    }
    assert sc_uids and sc_uids <= referenced

    off = Settings(report={"attention_roi": False})
    plain = write_outputs(result, sources, off, tmp_path / "off")
    sr_off = hd.sr.srread(next(w.path for w in plain if w.kind == "sr"))
    assert hd.sr.MeasurementReport.from_sequence([sr_off]).get_planar_roi_measurement_groups() == []


def _walk(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from _walk(item)


def test_attention_outline_follows_the_hot_region() -> None:
    import numpy as np

    from dxnode.outputs.attention import attention_outline

    cam = np.zeros((10, 20), dtype=np.float32)
    cam[2:5, 4:9] = 1.0  # rows 2-4, columns 4-8
    cam[8, 15] = 0.9  # a second, separate hot spot is not the peak's region
    xy = attention_outline(cam, rows=100, columns=200)  # the source is 10x larger than the map
    assert np.array_equal(xy[0], xy[-1])
    assert xy[:, 0].min() == pytest.approx(40, abs=6) and xy[:, 0].max() == pytest.approx(90, abs=6)
    assert xy[:, 1].min() == pytest.approx(20, abs=6) and xy[:, 1].max() == pytest.approx(50, abs=6)


def test_heatmap_sc_of_a_large_radiograph_is_reduced_and_its_attention_roi_stays_on_the_source(tmp_path: Path) -> None:
    """[report] sc_max_side on a real 1955x1841 CR: the SC fits 1024 px, the model and the ROIs do not change."""
    import re

    import highdicom as hd
    import numpy as np

    src = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    source = pydicom.dcmread(src, stop_before_pixels=True)
    rows, columns = int(source.Rows), int(source.Columns)
    assert (rows, columns) == (1955, 1841) and "PixelSpacing" in source
    clf = load_classifier(ModelSettings(bundle=str(bundle(tmp_path, size=224))))  # a 7x7 Grad-CAM
    results, written = {}, {}
    for side in (1024, 0):
        settings = Settings(report={"sc_max_side": side})
        result = analyze_study(source.StudyInstanceUID, [(source.SOPInstanceUID, src)], clf, settings, "all")
        # Thresholds of an untrained bundle decide nothing here: make every finding positive (every ROI written).
        results[side] = dataclasses.replace(
            result, findings=[dataclasses.replace(f, positive=True) for f in result.findings]
        )
        written[side] = write_outputs(results[side], {source.SOPInstanceUID: src}, settings, tmp_path / f"o{side}")

    # The model's input is the same: identical probabilities, drivers and per-instance results.
    reduced, full = results[1024], results[0]
    assert [(f.label, f.probability, f.source_sop_instance_uid) for f in reduced.findings] == [
        (f.label, f.probability, f.source_sop_instance_uid) for f in full.findings
    ]
    assert reduced.instances[0].probabilities == full.instances[0].probabilities
    assert {h.overlay.shape for h in reduced.heatmaps} == {(1024, 964, 3)}  # longest side 1024, aspect kept
    assert {h.cam.shape for h in reduced.heatmaps} == {(1024, 964)}
    assert {h.overlay.shape for h in full.heatmaps} == {(rows, columns, 3)}

    for side, outputs in written.items():
        scs = [w for w in outputs if w.kind == "sc"]
        assert len(scs) == 3
        for w in outputs:
            assert dciodvfy_errors(w.path) == [], w.path
        for w in scs:
            sc = pydicom.dcmread(w.path)
            assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID
            assert sc.SeriesInstanceUID != source.SeriesInstanceUID
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
            # No spacing attribute: none is true of resampled, captioned pixels.
            assert not {"PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"} & set(sc.dir())
            if side == 0:  # the source's size; the caption panel adds rows below
                assert sc.Columns == columns and sc.Rows > rows
                assert "reduced" not in sc.DerivationDescription
                continue
            assert max(sc.Rows, sc.Columns) <= 1024  # caption included
            found = re.search(r"reduced from the source's 1955x1841 to (\d+)x(\d+)", sc.DerivationDescription)
            assert found, sc.DerivationDescription
            height, width = int(found[1]), int(found[2])
            assert width == sc.Columns and height < sc.Rows  # the image on top, the caption panel below
            assert abs(height * columns / width - rows) <= 3  # aspect kept, within a few source pixels
            image, panel = sc.pixel_array[:height], sc.pixel_array[height:]
            assert image.mean() > 20 and (panel == 0).all(axis=-1).mean() > 0.5  # the picture, then a black panel

    # The TID 1410 ROIs: source pixel coordinates either way, the reduced CAM's within a few source pixels.
    boxes = {}
    for side, outputs in written.items():
        sr = hd.sr.srread(next(w.path for w in outputs if w.kind == "sr"))
        groups = hd.sr.MeasurementReport.from_sequence([sr]).get_planar_roi_measurement_groups()
        assert len(groups) == 2 * len(reduced.findings)
        for g in groups:
            data = g.roi.value
            assert g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert (data >= 0).all() and (data[:, 0] <= columns).all() and (data[:, 1] <= rows).all()
            boxes[side, g.tracking_identifier] = np.r_[data.min(axis=0), data.max(axis=0)]
    for (side, name), box in boxes.items():
        if side == 1024:
            np.testing.assert_allclose(box, boxes[0, name], rtol=0, atol=3, err_msg=name)
