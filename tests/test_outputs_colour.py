"""Presentation states on colour sources (a Color Softcopy Presentation State, not a GSPS), and one
object kind that cannot be built left out with a note while the study keeps its other objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_checks import dciodvfy_errors
from PIL import ImageCms
from pydicom.data import get_testdata_file
from sqlalchemy import select
from test_job_failures import any_modality_settings, receive
from test_outputs_frames import on_frames
from test_outputs_objects import ALL, CT, by_kind, dcmpschk, synthetic

from dxnode.config import Settings
from dxnode.jobs.body import run_job
from dxnode.outputs.attention import attention_outline
from dxnode.outputs.gsps import icc_profile, srgb_profile
from dxnode.outputs.report import write_outputs
from dxnode.states import JobState, OutputKind
from dxnode.store import Job, Output, Store
from dxnode.worklist import queue

US = Path(get_testdata_file("US1_UNCR.dcm"))  # US, RGB, 480 x 640, no ICC profile, no Frame of Reference
CSPS = "1.2.840.10008.5.1.4.1.1.11.2"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SR = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR


def colour_us(folder: Path, layout: str) -> Path:
    """A colour US header: RGB single-frame, YBR_FULL_422 (as a JPEG US is), or an RGB cine of 30 frames."""
    ds = pydicom.dcmread(US, stop_before_pixels=True)  # write_outputs reads no source pixels
    if layout == "ybr422":
        ds.PhotometricInterpretation = "YBR_FULL_422"
    if layout == "cine":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US Multi-frame
        ds.NumberOfFrames, ds.FrameTime = 30, 33.3
        ds.FrameIncrementPointer = pydicom.tag.Tag("FrameTime")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{layout}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def sr_evidence(sr: pydicom.Dataset) -> set[str]:
    """The instances the SR's evidence sequences name."""
    return {
        ref.ReferencedSOPInstanceUID
        for seq in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
        for study in sr.get(seq, [])
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


@pytest.mark.parametrize("layout", ["rgb", "ybr422", "cine"])
def test_a_colour_source_gets_a_color_presentation_state_and_every_other_object(tmp_path: Path, layout: str) -> None:
    path = colour_us(tmp_path, layout)
    result, sources = on_frames(path, {"Nodule": (17 if layout == "cine" else 0, (200, 300))})
    written = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=ALL)
    kinds = by_kind(written)
    assert {k: len(v) for k, v in kinds.items()} == {"sr": 1, "sc": 1, "seg": 1, "pmap": 1, "gsps": 1, "kos": 1}
    assert not any(n.startswith("no ") for n in written[0].notes), written[0].notes
    for w in written:
        assert dciodvfy_errors(w.path) == [], (w.kind, w.path)
    (state,) = kinds["gsps"]
    assert state.sop_class_uid == CSPS and state.summary.startswith("CSPS")
    check = dcmpschk(state.path)
    assert check.returncode == 0 and "Error" not in check.stdout + check.stderr, check.stdout + check.stderr
    ps = pydicom.dcmread(state.path)
    assert bytes(ps.ICCProfile) == srgb_profile()  # the source has none
    (annotation,) = ps.GraphicAnnotationSequence
    image = annotation.ReferencedImageSequence[0]
    assert image.ReferencedSOPInstanceUID == result.heatmaps[0].sop_instance_uid
    assert image.get("ReferencedFrameNumber") == (18 if layout == "cine" else None)
    outline = np.asarray(annotation.GraphicObjectSequence[0].GraphicData, dtype=np.float32).reshape(-1, 2)
    assert np.allclose(outline, attention_outline(result.heatmaps[0].cam, 480, 640), atol=0.01)
    assert annotation.TextObjectSequence[0].UnformattedTextValue == "Nodule 0.64 (AI, threshold 0.50)"
    assert state.sop_instance_uid in sr_evidence(pydicom.dcmread(kinds["sr"][0].path))


def test_a_series_of_grey_and_colour_images_gets_a_gsps_and_a_csps(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    grey = colour_us(tmp_path, "rgb")  # the same series as the CT, a grey image of it too
    us = pydicom.dcmread(grey, stop_before_pixels=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = us.StudyInstanceUID, us.SeriesInstanceUID, us.PatientID
    ds.save_as(tmp_path / "grey.dcm", enforce_file_format=True)
    result, sources = synthetic([tmp_path / "grey.dcm", grey], {"Nodule": (0, (40, 50)), "Mass": (1, (200, 300))})
    states = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=[OutputKind.GSPS])
    assert sorted(w.sop_class_uid for w in states) == [GSPS, CSPS]
    assert len({w.series_instance_uid for w in states}) == 1
    for w in states:
        assert dciodvfy_errors(w.path) == [], w.sop_class_uid


def test_a_source_icc_profile_is_kept_and_an_unusable_one_replaced_by_srgb(tmp_path: Path) -> None:
    scanner = srgb_profile()[:12] + b"scnr" + srgb_profile()[16:]  # the device class an input profile has
    display = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # "mntr": not for a CSPS
    ds = pydicom.dcmread(US, stop_before_pixels=True)
    for profile, kept, why in [(scanner, True, None), (display, False, "mntr"), (b"not ICC", False, "cannot be read")]:
        ds.ICCProfile = profile
        got, note = icc_profile([ds])
        assert got == (profile if kept else srgb_profile()), why
        assert (note is None) if kept else (note is not None and why in note and "sRGB used" in note), note
    ds.ICCProfile = scanner
    path = tmp_path / "profiled.dcm"
    ds.save_as(path, enforce_file_format=True)
    result, sources = on_frames(path, {"Nodule": (0, (200, 300))})
    (w,) = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=[OutputKind.GSPS])
    assert bytes(pydicom.dcmread(w.path).ICCProfile) == scanner and dciodvfy_errors(w.path) == []
    assert w.notes == ()


def test_a_kind_that_cannot_be_built_is_left_out_with_a_note_and_the_rest_written(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    ds.SamplesPerPixel = 2  # retired: neither a GSPS nor a CSPS may reference it
    ds.save_as(tmp_path / "two.dcm", enforce_file_format=True)
    result, sources = synthetic([tmp_path / "two.dcm"], {"Nodule": (0, (40, 50))})
    written = write_outputs(result, sources, Settings(), tmp_path / "out", kinds=ALL)
    kinds = by_kind(written)
    assert "gsps" not in kinds and {k: len(v) for k, v in kinds.items() if v} == {
        "sr": 1,
        "sc": 1,
        "seg": 1,
        "pmap": 1,
        "kos": 1,
    }
    (note,) = [n for n in written[0].notes if n.startswith("no GSPS")]
    assert "single sample per pixel" in note, note
    assert {w.sop_instance_uid for w in written if w.kind != "sr"} <= sr_evidence(pydicom.dcmread(kinds["sr"][0].path))
    # Asked for that kind alone, nothing can be written: the job fails with the reason.
    with pytest.raises(ValueError, match="no result object could be built: no GSPS: "):
        write_outputs(result, sources, Settings(), tmp_path / "alone", kinds=[OutputKind.GSPS])


def test_a_colour_us_job_is_done_with_a_csps_in_place_of_a_gsps(
    store: Store, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = any_modality_settings(db_url, tmp_path, monkeypatch)
    pacs = base.destinations[0].model_copy(update={"outputs": [OutputKind.SR, OutputKind.GSPS]})
    settings = base.model_copy(update={"destinations": [pacs]})
    receive(store, settings, [("US1_UNCR.dcm", lambda ds: None)])  # RGB: a GSPS failed the whole job before
    assert queue.sweep(store, settings)
    assert queue.drain(store, settings, run_job) == 1
    with store.session() as s:
        job = s.scalar(select(Job))
        outputs = list(s.scalars(select(Output)))
    assert job is not None and job.state == JobState.DONE, job.error if job else None
    assert sorted((o.kind, o.sop_class_uid) for o in outputs) == [("gsps", CSPS), ("sr", SR)], job.log
    assert "output GSPS -> 1 destination(s)" in job.log and "note: no " not in job.log, job.log
    for o in outputs:
        assert dciodvfy_errors(settings.data_dir / o.file_path) == [], o.kind
