"""SR and SC from sources beyond single-frame CT/CR: multi-frame frames, laterality, rerun identity, bad input.

Results are built directly from the dataclasses of dxnode.results (no model), so every check here
is about the outputs alone (dxnode/outputs/report.py, sr.py, sc.py). Each of these once failed against them (enhanced
multi-frame and ultrasound sources, laterality of unpaired body parts, colliding label codes,
heatmaps not matching the result) and pins the fix.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_checks import dciodvfy_errors, dsrdump, pixelmed_sr_check
from pydicom import Dataset
from pydicom.data import get_testdata_file

from dxnode.config import Settings
from dxnode.outputs.report import write_outputs
from dxnode.results import Finding, Heatmap, InstanceOutcome, ModelIdentity, StudyResult

MODEL = ModelIdentity(name="probe-net", version="2.3", sha256="ab" * 32, demo=False, task="multilabel")
TIMESTAMPS = {
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "DateOfSecondaryCapture",
    "TimeOfSecondaryCapture",
    "ContributingEquipmentSequence",
}  # the SC's item carries highdicom's ContributionDateTime


def make_result(
    source: Path,
    frame: int = 0,
    labels: tuple[str, ...] = ("Effusion", "Nodule"),
    model: ModelIdentity = MODEL,
    heatmaps: tuple[str, ...] | None = None,
) -> StudyResult:
    """A result on one source instance: the first label positive, each label on `frame`, heatmaps for `heatmaps` (default all)."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    findings = [
        Finding(label, round(0.9 - 0.3 * i, 3), 0.5, i == 0, ds.SOPInstanceUID, frame) for i, label in enumerate(labels)
    ]
    rng = np.random.default_rng(7)
    maps = [
        Heatmap(
            label,
            ds.SOPInstanceUID,
            frame,
            rng.integers(0, 256, (ds.Rows, ds.Columns, 3), dtype=np.uint8),
            rng.random((ds.Rows, ds.Columns), dtype=np.float32),
        )
        for label in (labels if heatmaps is None else heatmaps)
    ]
    return StudyResult(ds.StudyInstanceUID, model, findings, [InstanceOutcome(ds.SOPInstanceUID, "done")], maps)


def write(result: StudyResult, source: Path, out: Path, settings: Settings | None = None) -> dict[str, Dataset]:
    """write_outputs for one source; the written datasets by kind and label ("sr", "sc:<label>")."""
    written = write_outputs(result, {result.instances[0].sop_instance_uid: source}, settings or Settings(), out)
    return {w.kind + (f":{w.label}" if w.label else ""): pydicom.dcmread(w.path) for w in written}


def content_items(items: list[Dataset]) -> Iterator[Dataset]:
    """Every content item of an SR content tree, depth first."""
    for item in items:
        yield item
        yield from content_items(list(item.get("ContentSequence") or []))


def variant(tmp_path: Path, name: str, **attributes: str | None) -> Path:
    """CT_small with a new SOP Instance UID and the given attributes set (None deletes one)."""
    ds = copy.deepcopy(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path)
    return path


MULTIFRAME = [
    pytest.param("emri_small.dcm", id="enhanced-mr"),  # Pixel Spacing only in functional groups
    pytest.param("examples_ybr_color.dcm", id="ultrasound"),  # no Patient Orientation nor Image Orientation
]


@pytest.mark.parametrize("name", MULTIFRAME)
def test_multiframe_source_frame_is_referenced_by_sr_and_sc(tmp_path: Path, name: str) -> None:
    source = Path(get_testdata_file(name))
    frame = 4
    out = write(make_result(source, frame=frame, heatmaps=("Effusion",)), source, tmp_path / "out")
    paths = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(paths) == 2
    for path in paths:
        assert dciodvfy_errors(path) == [], path
    sr_path = next(
        p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == out["sr"].SOPInstanceUID
    )
    root, errors = pixelmed_sr_check(sr_path)
    assert root.startswith("TID_1500") and errors == []
    images = [
        i
        for i in content_items(list(out["sr"].ContentSequence))
        if i.ValueType == "IMAGE" and "ReferencedFrameNumber" in i.ReferencedSOPSequence[0]
    ]
    assert images and all(int(i.ReferencedSOPSequence[0].ReferencedFrameNumber) == frame + 1 for i in images)
    assert int(out["sc:Effusion"].SourceImageSequence[0].ReferencedFrameNumber) == frame + 1


LATERALITY = [
    pytest.param({"BodyPartExamined": "KNEE", "Laterality": "R"}, "R", id="paired-with-laterality"),
    pytest.param({"BodyPartExamined": "CHEST", "Laterality": None}, None, id="unpaired-without"),
    pytest.param({"BodyPartExamined": "CHEST", "Laterality": ""}, None, id="unpaired-empty"),
    pytest.param({"BodyPartExamined": "KNEE", "Laterality": None}, "", id="paired-unknown"),
]


@pytest.mark.parametrize(("attributes", "expected"), LATERALITY)
def test_sc_body_part_and_laterality_follow_the_source(
    tmp_path: Path, attributes: dict[str, str | None], expected: str | None
) -> None:
    source = variant(tmp_path, "src", **attributes)
    out = write(make_result(source, heatmaps=("Effusion",)), source, tmp_path / "out")
    sc = out["sc:Effusion"]
    assert sc.BodyPartExamined == attributes["BodyPartExamined"]
    assert sc.get("Laterality") == expected
    assert dciodvfy_errors(next((tmp_path / "out").rglob(f"{sc.SOPInstanceUID}.dcm"))) == []


def test_rerun_rewrites_the_same_objects_in_place(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    result = make_result(source)
    first = write_outputs(result, {result.instances[0].sop_instance_uid: source}, Settings(), tmp_path / "out")
    before = {w.path: pydicom.dcmread(w.path) for w in first}
    again = write_outputs(result, {result.instances[0].sop_instance_uid: source}, Settings(), tmp_path / "out")
    assert again == first
    folder = tmp_path / "out" / result.study_instance_uid
    assert sorted(folder.iterdir()) == sorted(w.path for w in first)  # nothing else: no temp files, no second version
    for w in again:
        old, new = before[w.path], pydicom.dcmread(w.path)
        assert {
            e.keyword for e in new if e.keyword not in TIMESTAMPS and (e.tag not in old or old[e.tag].value != e.value)
        } == set()
        assert set(old.keys()) == set(new.keys())
    uids = [w.sop_instance_uid for w in first] + list({w.series_instance_uid for w in first})
    assert len(uids) == len(set(uids)) == 5  # SR, two SCs, SR series, SC series
    assert len({w.series_instance_uid for w in first if w.kind == "sc"}) == 1
    assert all(u.startswith("2.25.") and len(u) <= 64 for u in uids)


@pytest.mark.parametrize("change", ["weights", "instances", "positive", "label"])
def test_any_change_of_the_result_gives_new_uids(tmp_path: Path, change: str) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    result = make_result(source)
    if change == "weights":
        changed = dataclasses.replace(result, model=dataclasses.replace(MODEL, sha256="cd" * 32))
    elif change == "instances":
        changed = dataclasses.replace(result, instances=[*result.instances, InstanceOutcome("1.2.3.4.5", "done")])
    elif change == "positive":
        changed = dataclasses.replace(
            result, findings=[dataclasses.replace(f, positive=not f.positive) for f in result.findings]
        )
    else:
        changed = make_result(source, labels=("Effusion", "Mass"))
    old = write_outputs(result, {result.instances[0].sop_instance_uid: source}, Settings(), tmp_path / "a")
    new = write_outputs(changed, {result.instances[0].sop_instance_uid: source}, Settings(), tmp_path / "b")
    assert not {w.sop_instance_uid for w in old} & {w.sop_instance_uid for w in new}
    assert not {w.series_instance_uid for w in old} & {w.series_instance_uid for w in new}


def test_sr_names_the_node_the_algorithm_and_each_evaluation(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    settings = Settings(node={"ae_title": "DXNODE_T5"}, report={"manufacturer": "Test Hospital AI"})
    result = make_result(source, labels=("Effusion", "Nodule", "Pneumothorax"), heatmaps=())
    sr = write(result, source, tmp_path / "out", settings)["sr"]
    text = dsrdump(next((tmp_path / "out").rglob(f"{sr.SOPInstanceUID}.dcm")))
    for needle in ("DXNODE_T5", "Test Hospital AI", MODEL.sha256, "Image Library", "probe-net", "2.3"):
        assert needle in text, needle
    items = list(content_items(list(sr.ContentSequence)))
    evaluations = {
        i.ConceptNameCodeSequence[0].CodeMeaning: i.ConceptCodeSequence[0].CodeMeaning
        for i in items
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99DXNODE"
    }
    assert evaluations == {f.label: ("Present" if f.positive else "Absent") for f in result.findings}
    measured = {
        name: sorted(
            float(i.MeasuredValueSequence[0].NumericValue)
            for i in items
            if i.ValueType == "NUM"
            and i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
            and i.ConceptNameCodeSequence[0].CodeMeaning == name
        )
        for name in ("Probability", "Threshold Value")
    }
    assert measured["Probability"] == sorted(f.probability for f in result.findings)
    assert measured["Threshold Value"] == sorted(f.threshold for f in result.findings)
    assert sr.SeriesDescription == settings.report.sr_series_description and sr.Manufacturer == "Test Hospital AI"


def test_sc_caption_is_burned_into_the_pixels(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    result = make_result(source, heatmaps=("Effusion",))
    sc = write(result, source, tmp_path / "out")["sc:Effusion"]
    pixels = sc.pixel_array
    height = round(result.heatmaps[0].overlay.shape[0] * sc.Columns / result.heatmaps[0].overlay.shape[1])
    panel = pixels[height:]
    text = (panel > 200).all(axis=-1)  # white (anti-aliased) caption text on the black panel below the image
    assert panel.shape[0] > 20 and text.sum() > 100 and not text.all()
    assert "probe-net 2.3" in sc.ImageComments and "Effusion" in sc.ImageComments


def test_distinct_labels_get_distinct_codes(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    labels = ("Consolidation left lower lobe", "Consolidation left upper lobe", "Effusion-L", "Effusion_L")
    sr = write(make_result(source, labels=labels, heatmaps=()), source, tmp_path / "out")["sr"]
    codes = {
        (i.ConceptNameCodeSequence[0].CodeValue, i.ConceptNameCodeSequence[0].CodeMeaning)
        for i in content_items(list(sr.ContentSequence))
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == "99DXNODE"
    }
    assert len({meaning for _, meaning in codes}) == len(labels)
    assert len({code for code, _ in codes}) == len(labels)
    assert all(len(code) <= 16 for code, _ in codes)


def test_unreadable_source_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    result = make_result(source)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a DICOM file at all" * 10)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        write_outputs(result, {result.instances[0].sop_instance_uid: broken}, Settings(), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


@pytest.mark.parametrize("field", ["sop_instance_uid", "label"])
def test_heatmap_not_matching_the_result_is_a_clear_error_and_writes_nothing(tmp_path: Path, field: str) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    result = make_result(source)
    stray = dataclasses.replace(
        result.heatmaps[0], **{field: "1.2.3.4.5.6" if field == "sop_instance_uid" else "Atelectasis"}
    )
    with pytest.raises(ValueError, match="Atelectasis" if field == "label" else "1.2.3.4.5.6"):
        write_outputs(
            dataclasses.replace(result, heatmaps=[stray]),
            {result.instances[0].sop_instance_uid: source},
            Settings(),
            tmp_path / "out",
        )
    assert not any((tmp_path / "out").rglob("*.dcm"))
