"""SEG, Parametric Map, GSPS and KOS beside the SR: valid (dciodvfy, dcmpschk, Pixelmed), read back by
highdicom with the source's geometry and references, one outline everywhere, idempotent UIDs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import data_store
import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import need_tool
from dicom_checks import dciodvfy_errors, pixelmed_sr_check
from pydicom.data import get_testdata_file

from dxnode.config import Settings
from dxnode.outputs.attention import attention_outline, attention_region, to_source_grid
from dxnode.outputs.report import WrittenOutput, wanted_kinds, write_outputs
from dxnode.results import Finding, Heatmap, InstanceOutcome, ModelIdentity, StudyResult
from dxnode.states import OutputKind, Task

CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))
CR = Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm"  # CR, MONOCHROME1, no Frame of Reference
ALL = list(OutputKind)
MODEL = ModelIdentity("chest-net", "1.0", "ab" * 32, demo=False, task=Task.MULTILABEL)


def blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    """A Gaussian map in [0, 1] peaking at centre (row, column)."""
    r, c = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.exp(-((r - centre[0]) ** 2 + (c - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def ct_series(folder: Path, n: int, rows: int = 0) -> list[Path]:
    """n single-frame CT slices of one series from CT_small (1 mm apart); rows: resize the header only."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(CT)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SeriesInstanceUID}.{i + 1}"
        ds.InstanceNumber = i + 1
        x, y, z = (float(v) for v in pydicom.dcmread(CT, stop_before_pixels=True).ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + i]
        if rows:
            ds.Rows = ds.Columns = rows
        paths.append(folder / f"{i + 1}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def synthetic(
    files: list[Path], positives: dict[str, tuple[int, tuple[float, float]]], scale: float = 0.5
) -> tuple[StudyResult, dict[str, Path]]:
    """A result with a positive finding per label (on files[index], its map peaking at a centre in
    source pixels), a negative one, and maps at `scale` of the source's size."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    findings, heatmaps = [], []
    for i, (label, (index, (row, col))) in enumerate(positives.items()):
        src = headers[index]
        shape = (round(int(src.Rows) * scale), round(int(src.Columns) * scale))
        cam = blob(shape, (row * scale, col * scale), sigma=shape[0] / 10)
        findings.append(Finding(label, 0.64 - i / 100, 0.5, True, str(src.SOPInstanceUID)))
        heatmaps.append(Heatmap(label, str(src.SOPInstanceUID), 0, np.zeros((*shape, 3), np.uint8), cam))
    findings.append(Finding("Effusion", 0.1, 0.3, False, str(headers[0].SOPInstanceUID)))
    result = StudyResult(
        str(headers[0].StudyInstanceUID),
        MODEL,
        findings,
        [InstanceOutcome(str(ds.SOPInstanceUID), "done") for ds in headers],
        heatmaps,
    )
    return result, {str(ds.SOPInstanceUID): p for ds, p in zip(headers, files, strict=True)}


def by_kind(written: list[WrittenOutput]) -> dict[str, list[WrittenOutput]]:
    kinds: dict[str, list[WrittenOutput]] = {"pmap": []}  # a kind a result can lack (a geometry highdicom refuses)
    for w in written:
        kinds.setdefault(w.kind, []).append(w)
    return kinds


def pixelmed_errors(path: Path) -> tuple[str, list[str]]:
    """Pixelmed's SR validator's errors, less those of its TID 1411 rule on the TID 1501 groups.

    Its TID 1500 rule includes TID 1411 once any group references a segment, and then checks
    every measurement group against TID 1411 (DicomSRDescriptionsCompiled.xsl, row "TID_1411"):
    the whole-image TID 1501 groups then lack 1411's Image Region / Referenced Segment / Volume
    Surface. Those errors are dropped here, only for groups that are TID 1501 ones.
    """
    root, errors = pixelmed_sr_check(path)
    container = next(
        i for i in pydicom.dcmread(path).ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    )
    whole_image = {
        n
        for n, group in enumerate(container.ContentSequence, start=1)
        if not any(
            c.ValueType == "SCOORD" or c.ConceptNameCodeSequence[0].CodeValue == "121191" for c in group.ContentSequence
        )
    }
    rest = []
    for e in errors:
        where = re.search(r"Template 1411 .* within 1\.\d+\.(\d+): .*Missing conditional content item$", e)
        if where is None or int(where.group(1)) not in whole_image:
            rest.append(e)
    return root, rest


def dcmpschk(path: Path) -> subprocess.CompletedProcess[str]:
    need_tool("dcmpschk")
    return subprocess.run(["dcmpschk", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["ct", "cr", "mr"])
def test_every_kind_passes_dciodvfy_and_gsps_passes_dcmpschk(tmp_path: Path, name: str) -> None:
    path = {"ct": CT, "cr": CR, "mr": MR}[name]
    rows = int(pydicom.dcmread(path, stop_before_pixels=True).Rows)
    result, sources = synthetic(
        [path], {"Nodule": (0, (rows * 0.3, rows * 0.4)), "Mass": (0, (rows * 0.7, rows * 0.6))}
    )
    written = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=ALL)
    kinds = by_kind(written)
    # The CR has no Frame of Reference and no spacing: its maps are in their own frame, 1 mm per pixel
    assumed = [n for n in written[0].notes if "1 mm per pixel assumed" in n]  # the job log shows them
    assert written[0].kind == "sr" and len(assumed) == (2 if name == "cr" else 0), written[0].notes
    assert not any(n.startswith(("no SEG", "no Parametric Map")) for n in written[0].notes), written[0].notes
    assert {k: len(v) for k, v in kinds.items()} == {"sr": 1, "sc": 2, "seg": 1, "pmap": 2, "gsps": 1, "kos": 1}
    for w in written:
        assert dciodvfy_errors(w.path) == [], (w.kind, w.path)
    check = dcmpschk(kinds["gsps"][0].path)
    assert check.returncode == 0 and "Error" not in check.stdout + check.stderr, check.stdout + check.stderr
    root, errors = pixelmed_errors(kinds["sr"][0].path)
    assert root.startswith("TID_1500") and errors == []
    source = pydicom.dcmread(path, stop_before_pixels=True)
    for w in written:
        ds = pydicom.dcmread(w.path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID, w.kind


def test_fractional_seg_carries_the_map(tmp_path: Path) -> None:
    result, sources = synthetic([CT], {"Nodule": (0, (40, 50))})
    settings = Settings(report={"seg_type": "fractional"})
    (seg_out,) = write_outputs(result, sources, settings, tmp_path, kinds=[OutputKind.SEG])
    assert dciodvfy_errors(seg_out.path) == []
    seg = hd.seg.segread(seg_out.path)
    assert seg.SegmentationType == "FRACTIONAL"
    stored = np.asarray(pydicom.dcmread(seg_out.path).pixel_array, dtype=np.float32) / int(seg.MaximumFractionalValue)
    expected = to_source_grid(result.heatmaps[0].cam, 128, 128)
    assert np.abs(stored - expected).max() <= 1 / 255 + 1e-6


def test_seg_and_parametric_map_read_back_with_the_sources_geometry_and_references(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", 20)
    result, sources = synthetic(files, {"Nodule": (4, (40, 50)), "Mass": (12, (80, 70)), "Cyst": (4, (90, 30))})
    kinds = by_kind(write_outputs(result, sources, Settings(), tmp_path / "out", kinds=ALL))
    seg = hd.seg.segread(kinds["seg"][0].path)
    assert seg.SegmentationType == "BINARY" and seg.number_of_segments == 3
    assert seg.NumberOfFrames == 3  # a frame per segment and image holding it; none for the 18 other slices
    by_label = {h.label: h for h in result.heatmaps}
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert description.algorithm_identification[0].AlgorithmName == "chest-net"
        label = description.segment_label.removeprefix("AI attention ")
        h = by_label[label]
        src = pydicom.dcmread(sources[h.sop_instance_uid], stop_before_pixels=True)
        mask = seg.get_pixels_by_source_instance([h.sop_instance_uid], segment_numbers=[number])[0, :, :, 0]
        assert np.array_equal(mask.astype(bool), to_source_grid(attention_region(h.cam), 128, 128))
        frame = next(
            f
            for f in seg.PerFrameFunctionalGroupsSequence
            if f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == h.sop_instance_uid
            and f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number
        )
        assert np.allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in src.ImagePositionPatient],
            atol=1e-4,
        )
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], ct.PixelSpacing)
    assert np.allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient], ct.ImageOrientationPatient
    )

    assert len(kinds["pmap"]) == 3
    for w in kinds["pmap"]:
        pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(w.path))
        h = by_label[w.label]
        assert pm.FrameOfReferenceUID == ct.FrameOfReferenceUID
        frame = pm.PerFrameFunctionalGroupsSequence[0]
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == h.sop_instance_uid
        mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert (
            "not a probability" in mapping.LUTExplanation and mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        )
        values = pm.pixel_array.astype(np.float64) * float(mapping.RealWorldValueSlope) + float(
            mapping.RealWorldValueIntercept
        )
        assert values.max() == pytest.approx(1.0, abs=1e-4) and values.min() >= 0
        assert np.abs(values - to_source_grid(h.cam, 128, 128)).max() < 1e-4
        assert "WindowCenter" in pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]


def _sr_outlines(sr: pydicom.Dataset) -> dict[str, list[np.ndarray]]:
    """SCOORD graphic data of the SR by the tracking identifier of its group."""
    found: dict[str, list[np.ndarray]] = {}

    def walk(items: pydicom.Sequence, tracking: str) -> None:
        for item in items:
            here = tracking
            for child in item.get("ContentSequence", []):
                if child.ConceptNameCodeSequence[0].CodeValue == "112039":  # Tracking Identifier
                    here = str(child.TextValue)
            if item.get("ValueType") == "SCOORD":
                found.setdefault(here, []).append(np.asarray(item.GraphicData, dtype=np.float32).reshape(-1, 2))
            walk(item.get("ContentSequence", []), here)

    walk(sr.ContentSequence, "")
    return found


def test_the_outline_agrees_in_the_gsps_the_sr_and_the_seg(tmp_path: Path) -> None:
    rows = int(pydicom.dcmread(CR, stop_before_pixels=True).Rows)
    result, sources = synthetic([CR], {"Nodule": (0, (600, 900))}, scale=0.25)
    kinds = by_kind(write_outputs(result, sources, Settings(), tmp_path, kinds=ALL))
    h = result.heatmaps[0]
    expected = attention_outline(h.cam, rows, rows)

    gsps = pydicom.dcmread(kinds["gsps"][0].path)
    annotation = gsps.GraphicAnnotationSequence[0]
    in_gsps = np.asarray(annotation.GraphicObjectSequence[0].GraphicData, dtype=np.float32).reshape(-1, 2)
    assert np.allclose(in_gsps, expected, atol=0.01)
    assert annotation.TextObjectSequence[0].UnformattedTextValue == "Nodule 0.64 (AI, threshold 0.50)"
    assert gsps.SoftcopyVOILUTSequence[0].WindowCenter == pydicom.dcmread(CR, stop_before_pixels=True).WindowCenter

    sr = pydicom.dcmread(kinds["sr"][0].path)
    outline = next(v for k, v in _sr_outlines(sr).items() if "outline" in k and "Nodule" in k)[0]
    assert np.allclose(outline, expected, atol=0.01)

    seg = hd.seg.segread(kinds["seg"][0].path)
    mask = seg.get_pixels_by_source_instance([h.sop_instance_uid], segment_numbers=[1])[0, :, :, 0].astype(bool)
    r, c = np.nonzero(mask)
    (x0, y0), (x1, y1) = in_gsps.min(axis=0), in_gsps.max(axis=0)
    step = rows / h.cam.shape[0]  # one map pixel in source pixels: the outline cuts corners of the map's pixels
    assert abs(c.min() - x0) <= step and abs(c.max() + 1 - x1) <= step
    assert abs(r.min() - y0) <= step and abs(r.max() + 1 - y1) <= step
    edge = (
        mask
        ^ np.pad(mask, 1)[2:, 1:-1]
        & np.pad(mask, 1)[:-2, 1:-1]
        & np.pad(mask, 1)[1:-1, 2:]
        & np.pad(mask, 1)[1:-1, :-2]
    )
    er, ec = np.nonzero(edge)
    for x, y in in_gsps:  # every vertex lies on the mask's edge, within a map pixel
        assert np.min(np.hypot(ec + 0.5 - x, er + 0.5 - y)) <= step


def test_sr_references_every_object_and_the_seg_segments(tmp_path: Path) -> None:
    result, sources = synthetic([CT], {"Nodule": (0, (40, 50)), "Mass": (0, (90, 80))})
    written = write_outputs(result, sources, Settings(), tmp_path, kinds=ALL)
    kinds = by_kind(written)
    sr = pydicom.dcmread(kinds["sr"][0].path)
    referenced = {
        ref.ReferencedSOPInstanceUID
        for seq in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
        for study in sr.get(seq, [])
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert {w.sop_instance_uid for w in written if w.kind != "sr"} <= referenced
    seg_uid = kinds["seg"][0].sop_instance_uid
    segments = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                if ref.ReferencedSOPInstanceUID == seg_uid:
                    segments.append(int(ref.ReferencedSegmentNumber))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert sorted(segments) == [1, 2]
    root, errors = pixelmed_errors(kinds["sr"][0].path)
    assert root.startswith("TID_1500") and errors == []


def test_a_rerun_writes_the_same_uids_and_a_changed_result_new_ones(tmp_path: Path) -> None:
    result, sources = synthetic([CT], {"Nodule": (0, (40, 50))})
    first = write_outputs(result, sources, Settings(), tmp_path / "a", kinds=ALL)
    again = write_outputs(result, sources, Settings(), tmp_path / "b", kinds=ALL)
    assert [(w.kind, w.sop_instance_uid, w.series_instance_uid) for w in first] == [
        (w.kind, w.sop_instance_uid, w.series_instance_uid) for w in again
    ]
    assert len({w.sop_instance_uid for w in first}) == len(first)
    result.findings[0] = Finding("Nodule", 0.7, 0.5, True, result.findings[0].source_sop_instance_uid)
    other = write_outputs(result, sources, Settings(), tmp_path / "c", kinds=ALL)
    assert not {w.sop_instance_uid for w in other} & {w.sop_instance_uid for w in first}


def test_no_positive_finding_writes_no_region_objects(tmp_path: Path) -> None:
    result, sources = synthetic([CT], {})
    kinds = by_kind(write_outputs(result, sources, Settings(), tmp_path, kinds=ALL))
    assert {k for k, v in kinds.items() if v} == {"sr"}


def test_the_kinds_written_are_those_some_destination_wants() -> None:
    assert wanted_kinds(Settings()) == {OutputKind.SR, OutputKind.SC}
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    settings = Settings(
        destinations=[{"name": "a", **dest}, {"name": "b", **dest, "outputs": ["seg", "gsps"]}],
    )
    assert settings.destinations[0].outputs == [OutputKind.SR, OutputKind.SC]
    assert wanted_kinds(settings) == {OutputKind.SR, OutputKind.SC, OutputKind.SEG, OutputKind.GSPS}
    with pytest.raises(ValueError, match="outputs"):
        Settings(destinations=[{"name": "c", **dest, "outputs": ["sr", "png"]}])


@pytest.mark.parametrize("centres", [((40, 50), (90, 80)), ((60, 60), (64, 66))], ids=["apart", "overlapping"])
def test_two_regions_on_one_image_read_back_as_their_own_segments(tmp_path: Path, centres: tuple) -> None:
    result, sources = synthetic([CT], {"Nodule": (0, centres[0]), "Mass": (0, centres[1])})
    (seg_out,) = write_outputs(result, sources, Settings(), tmp_path, kinds=[OutputKind.SEG])
    assert dciodvfy_errors(seg_out.path) == []
    seg = hd.seg.segread(seg_out.path)
    masks = {h.label: to_source_grid(attention_region(h.cam), 128, 128) for h in result.heatmaps}
    assert (masks["Nodule"] & masks["Mass"]).any() == (centres[1][0] - centres[0][0] < 10)
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label.removeprefix("AI attention ")
        uid = result.heatmaps[0].sop_instance_uid
        got = seg.get_pixels_by_source_instance([uid], segment_numbers=[number], skip_overlap_checks=True)
        assert np.array_equal(got[0, :, :, 0].astype(bool), masks[label])
