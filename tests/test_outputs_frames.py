"""SEG and Parametric Map where the source lacks a Frame of Reference (a radiograph) or has many frames
(an enhanced CT, a legacy multi-frame MR): dciodvfy 0 errors, highdicom reads them back with the
references and geometry the source gives, or the map's own where it gives none."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_checks import dciodvfy_errors
from pydicom.data import get_testdata_file
from pydicom.sequence import Sequence
from test_outputs_objects import ALL, CR, MODEL, blob, by_kind, ct_series, dcmpschk, pixelmed_errors, synthetic

from dxnode.config import Settings
from dxnode.outputs.attention import attention_region, to_source_grid
from dxnode.outputs.geometry import own_frame_of_reference_uid, own_geometry
from dxnode.outputs.report import write_outputs
from dxnode.outputs.source_header import reference_header
from dxnode.results import Finding, Heatmap, InstanceOutcome, StudyResult
from dxnode.states import OutputKind

EMRI = Path(
    get_testdata_file("emri_small.dcm")
)  # Enhanced MR, 10 frames, a Frame of Reference but no functional groups


def enhanced_ct(folder: Path, frames: int) -> Path:
    """An Enhanced (legacy converted) CT of `frames` frames 1 mm apart, made from CT_small by highdicom."""
    slices = [pydicom.dcmread(p) for p in ct_series(folder / "slices", frames)]
    series = slices[0].SeriesInstanceUID
    ct = hd.legacy.LegacyConvertedEnhancedCTImage(slices, f"{series}.100", 100, f"{series}.100.1", 1)
    path = folder / "enhanced.dcm"
    ct.save_as(path, enforce_file_format=True)
    return path


def long_enhanced_ct(folder: Path, frames: int, rows: int = 512) -> Path:
    """A header-only Enhanced CT of `frames` frames of rows x rows (write_outputs reads no source pixels)."""
    ds = pydicom.dcmread(enhanced_ct(folder, 2), stop_before_pixels=True)
    item = ds.PerFrameFunctionalGroupsSequence[0]
    items = []
    for k in range(frames):
        frame = copy.deepcopy(item)
        frame.PlanePositionSequence[0].ImagePositionPatient[2] = float(k)
        frame.FrameContentSequence[0].DimensionIndexValues = k + 1
        items.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = rows
    path = folder / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def on_frames(path: Path, positives: dict[str, tuple[int, tuple[float, float]]]) -> tuple[StudyResult, dict[str, Path]]:
    """A result with a positive finding per label on one frame (0-based) of one source, its map peaking
    at a centre (source pixels) at half the source's size, and a negative finding."""
    src = pydicom.dcmread(path, stop_before_pixels=True)
    uid = str(src.SOPInstanceUID)
    shape = (int(src.Rows) // 2, int(src.Columns) // 2)
    findings, heatmaps = [], []
    for i, (label, (frame, (row, col))) in enumerate(positives.items()):
        cam = blob(shape, (row / 2, col / 2), sigma=shape[0] / 10)
        findings.append(Finding(label, 0.64 - i / 100, 0.5, True, uid, frame))
        heatmaps.append(Heatmap(label, uid, frame, np.zeros((*shape, 3), np.uint8), cam))
    findings.append(Finding("Effusion", 0.1, 0.3, False, uid))
    result = StudyResult(str(src.StudyInstanceUID), MODEL, findings, [InstanceOutcome(uid, "done")], heatmaps)
    return result, {uid: path}


def frame_reference(item: pydicom.Dataset) -> tuple[str, int | None]:
    """(instance, frame number) a derived frame's Derivation Image Sequence names."""
    ref = item.DerivationImageSequence[0].SourceImageSequence[0]
    return str(ref.ReferencedSOPInstanceUID), ref.get("ReferencedFrameNumber")


def position(item: pydicom.Dataset) -> list[float]:
    return [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]


def mapped(pm: hd.pm.ParametricMap) -> np.ndarray:
    """The Parametric Map's real-world values (attention 0..1)."""
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    slope, intercept = float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)
    return np.asarray(pm.pixel_array, dtype=np.float64) * slope + intercept


@pytest.mark.parametrize("spacing", [None, [0.143, 0.15]], ids=["no-spacing", "imager-spacing"])
def test_a_radiograph_without_frame_of_reference_gets_a_map_in_its_own_frame(tmp_path: Path, spacing: list) -> None:
    path = CR
    if spacing:
        ds = pydicom.dcmread(CR)
        ds.ImagerPixelSpacing = spacing
        path = tmp_path / "cr.dcm"
        ds.save_as(path, enforce_file_format=True)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in source
    rows, columns = int(source.Rows), int(source.Columns)
    result, sources = on_frames(path, {"Nodule": (0, (600, 900)), "Mass": (0, (1200, 700))})
    written = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=ALL)
    kinds = by_kind(written)
    assert len(kinds["pmap"]) == 2 and len(kinds["seg"]) == 1
    spacing_notes = [n for n in written[0].notes if "1 mm per pixel assumed" in n]
    assert len(spacing_notes) == (0 if spacing else 2), written[0].notes
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.kind
    by_label = {h.label: h for h in result.heatmaps}
    for w in kinds["pmap"]:
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(w.path))
        assert pm.FrameOfReferenceUID == own_frame_of_reference_uid(source) and pm.PositionReferenceIndicator == ""
        frame = pm.PerFrameFunctionalGroupsSequence[0]
        assert frame_reference(frame) == (str(source.SOPInstanceUID), None)
        assert position(frame) == [0.0, 0.0, 0.0]
        shared = pm.SharedFunctionalGroupsSequence[0]
        assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == (spacing or [1.0, 1.0])
        assert (pm.Rows, pm.Columns) == (rows, columns)
        assert np.abs(mapped(pm) - to_source_grid(by_label[w.label].cam, rows, columns)).max() < 1e-4
    # The SEG keeps the radiograph's plane without a Frame of Reference (the SEG IOD allows that).
    assert "FrameOfReferenceUID" not in pydicom.dcmread(kinds["seg"][0].path, stop_before_pixels=True)
    again = write_outputs(result, sources, Settings(), tmp_path / "again", kinds=[OutputKind.PMAP])
    assert {pydicom.dcmread(w.path).FrameOfReferenceUID for w in again} == {own_frame_of_reference_uid(source)}


def test_an_own_geometry_leaves_the_source_header_as_it_was() -> None:
    source = pydicom.dcmread(EMRI, stop_before_pixels=True)
    before = copy.deepcopy(source)
    header, note = own_geometry(source)
    assert source == before and note is not None and "1 mm" in note  # emri_small names no Pixel Spacing
    assert header.FrameOfReferenceUID != source.FrameOfReferenceUID
    assert [position(item)[2] for item in header.PerFrameFunctionalGroupsSequence] == [float(k) for k in range(10)]


def test_seg_and_maps_on_an_enhanced_ct_reference_their_frames_with_the_sources_geometry(tmp_path: Path) -> None:
    path = enhanced_ct(tmp_path, 8)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    result, sources = on_frames(path, {"Nodule": (2, (40, 50)), "Mass": (5, (80, 70)), "Cyst": (2, (100, 30))})
    written = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=ALL)
    kinds = by_kind(written)
    assert {k: len(v) for k, v in kinds.items()} == {"sr": 1, "sc": 3, "seg": 1, "pmap": 3, "gsps": 1, "kos": 1}
    assert not any(n.startswith(("no SEG", "no Parametric Map")) for n in written[0].notes), written[0].notes
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.kind
    frames = source.PerFrameFunctionalGroupsSequence
    by_label = {h.label: h for h in result.heatmaps}

    seg = hd.seg.segread(kinds["seg"][0].path)
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and seg.number_of_segments == 3
    assert seg.NumberOfFrames == 3  # a frame per segment and source frame holding it; none for the other 6 frames
    for number in seg.segment_numbers:
        h = by_label[seg.get_segment_description(number).segment_label.removeprefix("AI attention ")]
        item = next(
            f
            for f in seg.PerFrameFunctionalGroupsSequence
            if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number
        )
        assert frame_reference(item) == (h.sop_instance_uid, h.frame + 1)
        assert np.allclose(position(item), position(frames[h.frame]), atol=1e-4)
        mask = seg.get_pixels_by_source_frame(h.sop_instance_uid, [h.frame + 1], segment_numbers=[number])[0, :, :, 0]
        assert np.array_equal(mask.astype(bool), to_source_grid(attention_region(h.cam), 128, 128))
    shared = seg.SharedFunctionalGroupsSequence[0]
    ours = source.SharedFunctionalGroupsSequence[0]
    assert np.allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
        [float(v) for v in ours.PixelMeasuresSequence[0].PixelSpacing],
    )

    # The SR's TID 1411 groups name the source frame each segment lies on.
    sr = pydicom.dcmread(kinds["sr"][0].path)
    segment_sources = set()

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ConceptNameCodeSequence[0].CodeValue == "121233":  # Source image for segmentation
                ref = item.ReferencedSOPSequence[0]
                segment_sources.add((str(ref.ReferencedSOPInstanceUID), ref.get("ReferencedFrameNumber")))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert segment_sources == {(h.sop_instance_uid, h.frame + 1) for h in result.heatmaps}
    root, errors = pixelmed_errors(kinds["sr"][0].path)
    assert root.startswith("TID_1500") and errors == []

    for w in kinds["pmap"]:
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(w.path))
        h = by_label[w.label]
        assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID and pm.NumberOfFrames == 1
        item = pm.PerFrameFunctionalGroupsSequence[0]
        assert frame_reference(item) == (h.sop_instance_uid, h.frame + 1)
        assert np.allclose(position(item), position(frames[h.frame]), atol=1e-4)
        assert np.abs(mapped(pm) - to_source_grid(h.cam, 128, 128)).max() < 1e-4


def test_a_multi_frame_source_without_per_frame_geometry_gets_seg_and_map_in_their_own_frame(tmp_path: Path) -> None:
    source = pydicom.dcmread(EMRI, stop_before_pixels=True)
    result, sources = on_frames(EMRI, {"Nodule": (3, (30, 20)), "Mass": (7, (40, 40))})
    written = write_outputs(result, sources, Settings(), tmp_path, kinds=ALL)
    kinds = by_kind(written)
    assert {k: len(v) for k, v in kinds.items()} == {"sr": 1, "sc": 2, "seg": 1, "pmap": 2, "gsps": 1, "kos": 1}
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.kind
    own = own_frame_of_reference_uid(source)
    seg = hd.seg.segread(kinds["seg"][0].path)
    assert seg.FrameOfReferenceUID == own != source.FrameOfReferenceUID
    got = {frame_reference(item) for item in seg.PerFrameFunctionalGroupsSequence}
    assert got == {(str(source.SOPInstanceUID), 4), (str(source.SOPInstanceUID), 8)}
    for item in seg.PerFrameFunctionalGroupsSequence:  # frame k of the source at (0, 0, k - 1) mm
        assert position(item) == [0.0, 0.0, float(frame_reference(item)[1] - 1)]
    for w in kinds["pmap"]:
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(w.path))
        h = next(h for h in result.heatmaps if h.label == w.label)
        assert pm.FrameOfReferenceUID == own
        assert frame_reference(pm.PerFrameFunctionalGroupsSequence[0]) == (h.sop_instance_uid, h.frame + 1)
    check = dcmpschk(kinds["gsps"][0].path)  # the GSPS, as before, references the frames
    assert check.returncode == 0, check.stdout + check.stderr
    annotations = pydicom.dcmread(kinds["gsps"][0].path).GraphicAnnotationSequence
    assert {a.ReferencedImageSequence[0].ReferencedFrameNumber for a in annotations} == {4, 8}


def test_an_ultrasound_cine_without_frame_of_reference_gets_seg_and_map_on_its_frame(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"), stop_before_pixels=True)  # RGB, no Frame of Reference
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US Multi-frame
    ds.NumberOfFrames, ds.FrameTime = 30, 33.3
    ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    path = tmp_path / "cine.dcm"  # a header (write_outputs reads no source pixels)
    ds.save_as(path, enforce_file_format=True)
    result, sources = on_frames(path, {"Nodule": (17, (200, 300))})
    kinds = by_kind(
        write_outputs(result, sources, Settings(), tmp_path / "out", kinds=[OutputKind.SEG, OutputKind.PMAP])
    )
    for w in kinds["seg"] + kinds["pmap"]:
        assert dciodvfy_errors(w.path) == [], w.kind
    seg = hd.seg.segread(kinds["seg"][0].path)
    (pm_path,) = [w.path for w in kinds["pmap"]]
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(pm_path))
    for obj in (seg, pm):
        assert obj.FrameOfReferenceUID == own_frame_of_reference_uid(ds) and obj.NumberOfFrames == 1
        item = obj.PerFrameFunctionalGroupsSequence[0]
        assert frame_reference(item) == (str(ds.SOPInstanceUID), 18) and position(item) == [0.0, 0.0, 17.0]


def test_two_radiographs_of_one_series_get_a_seg_each(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CR)
    paths = []
    for i in range(2):  # highdicom takes one source image without a Frame of Reference per SEG
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SeriesInstanceUID}.{i + 1}"
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    result, sources = synthetic(paths, {"Nodule": (0, (600, 900)), "Mass": (1, (1200, 700))}, scale=0.25)
    segs = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=[OutputKind.SEG])
    assert len({w.sop_instance_uid for w in segs}) == 2
    for w, h in zip(segs, result.heatmaps, strict=True):
        assert dciodvfy_errors(w.path) == []
        seg = hd.seg.segread(w.path)
        assert seg.number_of_segments == 1 and seg.get_segment_description(1).segment_label.endswith(h.label)
        assert frame_reference(seg.PerFrameFunctionalGroupsSequence[0]) == (h.sop_instance_uid, None)


def test_a_seg_highdicom_cannot_place_is_left_out_with_a_note(tmp_path: Path) -> None:
    ds = pydicom.dcmread(enhanced_ct(tmp_path, 8))
    frames = ds.PerFrameFunctionalGroupsSequence  # frames 3 and 6 at one position (e.g. two time points)
    frames[5].PlanePositionSequence[0].ImagePositionPatient = frames[2].PlanePositionSequence[0].ImagePositionPatient
    path = tmp_path / "repeated.dcm"
    ds.save_as(path, enforce_file_format=True)
    result, sources = on_frames(path, {"Nodule": (2, (40, 50)), "Mass": (5, (80, 70))})
    written = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=ALL)
    kinds = by_kind(written)
    assert "seg" not in kinds and len(kinds["pmap"]) == 2  # a map per frame still places
    (note,) = [n for n in written[0].notes if n.startswith("no SEG")]
    assert note.startswith("no SEG for Nodule, Mass: ") and "duplicate" in note, note
    for w in kinds["pmap"]:
        assert dciodvfy_errors(w.path) == []


def late(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the reference header logged (the notes of per-frame items made valid after it was made)."""
    return [r for r in caplog.records if r.name == "dxnode.outputs.source_header"]


def test_a_reference_header_makes_the_region_frames_valid_now_and_the_others_when_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = pydicom.dcmread(enhanced_ct(tmp_path, 4), stop_before_pixels=True)
    for item in source.PerFrameFunctionalGroupsSequence:
        item.FrameContentSequence[0].FrameLabel = "L" * 80  # LO: 64 at most
    before = copy.deepcopy(source)
    header, notes = reference_header(source, frames=[2])
    assert notes == [
        "PerFrameFunctionalGroupsSequence[2].FrameContentSequence[0].FrameLabel truncated to 64 bytes (LO)"
    ]
    assert not late(caplog)
    frames = header.PerFrameFunctionalGroupsSequence
    assert len(frames) == 4 and len(frames[1:3]) == 2
    with caplog.at_level("WARNING", logger="dxnode.outputs.source_header"):
        labels = [str(item.FrameContentSequence[0].FrameLabel) for item in frames]  # the others made valid as read
    assert labels == ["L" * 64] * 4
    assert sorted(r.getMessage().split(": ")[1].split(".")[0] for r in late(caplog)) == [
        f"PerFrameFunctionalGroupsSequence[{i}]" for i in (0, 1, 3)
    ]
    assert [position(item) for item in frames] == [position(item) for item in source.PerFrameFunctionalGroupsSequence]
    assert source == before  # the source header is left as it was


def test_the_gsps_of_an_enhanced_ct_keeps_its_shared_modality_lut_and_voi(tmp_path: Path) -> None:
    path = enhanced_ct(tmp_path, 6)
    source = pydicom.dcmread(path, stop_before_pixels=True)
    result, sources = on_frames(path, {"Nodule": (4, (40, 50))})
    (w,) = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=[OutputKind.GSPS])
    assert dciodvfy_errors(w.path) == []
    check = dcmpschk(w.path)
    assert check.returncode == 0 and "Error" not in check.stdout + check.stderr, check.stdout + check.stderr
    ours = pydicom.dcmread(w.path)
    layer = hd.pr.GraphicLayer(layer_name="AI", order=1)
    theirs = hd.pr.GrayscaleSoftcopyPresentationState(  # highdicom reading every frame's functional groups
        [source], "1.2.3", 1, "1.2.3.4", 1, "m", "m", "1", "1", "L", graphic_layers=[layer]
    )
    voi = ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction")
    for a, b in zip(ours.SoftcopyVOILUTSequence, theirs.SoftcopyVOILUTSequence, strict=True):
        assert [a.get(k) for k in voi] == [b.get(k) for k in voi] and "ReferencedImageSequence" not in a
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
        assert ours.get(keyword) == theirs.get(keyword), keyword
