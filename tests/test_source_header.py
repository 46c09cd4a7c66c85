"""SR and SC for any accepted instance: missing Type 2 attributes, every character set, over-long values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from dicom_checks import dciodvfy_errors
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dxnode.analysis.streaming import analyze_study
from dxnode.config import ModelSettings, Settings
from dxnode.model import load_classifier
from dxnode.outputs.report import WrittenOutput, write_outputs
from dxnode.outputs.source_header import TYPE2_PATIENT_STUDY, reference_header, valid_date_time

CHARACTER_SETS = {
    "latin1": ("ISO_IR 100", "Müller^Jürgen"),
    "utf8": ("ISO_IR 192", "Δημήτρης^Ωμέγα=李^小龙"),
    "gb18030": ("GB18030", "王^小明"),
    "iso2022_ir87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "unknown": ("ISO_IR 999", "Plain^Name"),
}


@pytest.fixture(autouse=True)
def no_imagenet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def outputs_for(tmp_path: Path, mutate: Callable[[Dataset], None]) -> list[WrittenOutput]:
    """CT_small changed by mutate, run through the model and written as SR + SC."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mutate(ds)
    path = tmp_path / "src.dcm"
    ds.save_as(path, enforce_file_format=True)
    settings = Settings(node={"data_dir": tmp_path})
    result = analyze_study(
        ds.StudyInstanceUID, [(ds.SOPInstanceUID, path)], load_classifier(ModelSettings()), settings, "top1"
    )
    written = write_outputs(result, {ds.SOPInstanceUID: path}, settings, tmp_path / "out")
    assert sorted(w.kind for w in written) == ["sc", "sr"]
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.path
    return written


@pytest.mark.parametrize("name", sorted(CHARACTER_SETS))
def test_every_character_set_survives_into_sr_and_sc(tmp_path: Path, name: str) -> None:
    charset, patient_name = CHARACTER_SETS[name]

    def mutate(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = patient_name
        ds.StudyDescription = patient_name.split("^")[0]

    for w in outputs_for(tmp_path, mutate):
        out = pydicom.dcmread(w.path)
        assert out.SpecificCharacterSet == "ISO_IR 192"
        assert str(out.PatientName) == patient_name
        assert out.get("StudyDescription", patient_name.split("^")[0]) == patient_name.split("^")[0]


def test_missing_type2_patient_and_study_attributes_are_written_empty(tmp_path: Path) -> None:
    def mutate(ds: Dataset) -> None:
        for keyword in TYPE2_PATIENT_STUDY:
            if keyword in ds:
                del ds[keyword]

    for w in outputs_for(tmp_path, mutate):
        out = pydicom.dcmread(w.path)
        for keyword in TYPE2_PATIENT_STUDY:
            assert keyword in out and not out[keyword].value, keyword


def test_over_long_and_invalid_values_are_truncated_or_emptied_and_noted(tmp_path: Path) -> None:
    def mutate(ds: Dataset) -> None:
        ds.PatientName = "A" * 20000
        ds.StudyDescription = "B" * 300
        ds.AccessionNumber = "C" * 40
        ds.StudyDate, ds.PatientSex = "notadate", "X"

    written = outputs_for(tmp_path, mutate)
    for w in written:
        out = pydicom.dcmread(w.path)
        assert str(out.PatientName) == "A" * 64
        assert out.get("StudyDescription", "B" * 64) == "B" * 64 and out.AccessionNumber == "C" * 16
        assert out.StudyDate == "" and out.PatientSex == ""
        assert any("PatientName truncated to 64" in n for n in w.notes), w.notes
        assert any("StudyDate emptied" in n for n in w.notes)
        assert not any("AAAA" in n for n in w.notes)  # notes name attributes, never values


def test_reference_header_leaves_the_source_alone() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ds.PatientName = "X" * 100
    copy, notes = reference_header(ds)
    assert str(ds.PatientName) == "X" * 100 and str(copy.PatientName) == "X" * 64 and notes


@pytest.mark.parametrize(
    ("vr", "value", "valid"),
    [
        ("DA", "20240229", True),
        ("DA", "20230229", False),
        ("DA", "20251399", False),
        ("DA", "20241331", False),
        ("DA", "2024-01-01", False),
        ("TM", "235959.123456", True),
        ("TM", "235960", False),
        ("TM", "2359", True),
        ("TM", "256100", False),
        ("TM", "12:30", False),
        ("DT", "20240101123000.5+0100", True),
        ("DT", "2024", True),
        ("DT", "20241331", False),
        ("DT", "2024010125", False),
        ("DT", "20240101+1500", False),
    ],
)
def test_dates_and_times_are_valid_in_form_and_in_the_calendar(vr: str, value: str, valid: bool) -> None:
    assert valid_date_time(vr, value) is valid


def test_values_a_vr_does_not_allow_are_emptied_cleaned_or_cut_and_noted() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ds.PatientBirthDate, ds.StudyDate, ds.AcquisitionDateTime = "20251399", "20241331", "20240230120000"
    ds.PatientName = "Kim\x0e^Min\x0fsu=" + "Z" * 70
    ds.StudyDescription = "line\x1bone"
    ds.ImageComments = "first\r\nsecond\x00"
    ds.ReferringPhysicianName = "a^b^c^d^e^f^g=h=i=j"
    ds.Laterality, ds.PatientOrientation = "X", ["Q", "F"]
    ds.ImageOrientationPatient = ["nan", 0, 0, 0, 1, 0]
    del ds.Modality
    out, notes = reference_header(ds)
    assert out.PatientBirthDate == "" and out.StudyDate == "" and out.AcquisitionDateTime == ""
    assert str(out.PatientName) == "Kim^Minsu"  # the second group, cut to 64 bytes, made the whole too long
    assert out.StudyDescription == "lineone" and out.ImageComments == "first\r\nsecond"
    assert str(out.ReferringPhysicianName) == "a^b^c^d^e f g=h=i"
    assert out.Laterality == "" and not out.PatientOrientation and "ImageOrientationPatient" not in out
    assert out.Modality == "OT"
    for expected in (
        "PatientBirthDate emptied: not a valid DA value",
        "AcquisitionDateTime emptied: not a valid DT value",
        "PatientName: characters not allowed in PN removed (control characters)",
        "PatientName truncated to 64 bytes per component group and in all (PN)",
        "StudyDescription: characters not allowed in LO removed (control characters)",
        "Laterality emptied: not L, R",
        "PatientOrientation emptied: not patient direction letters (A, P, R, L, H, F)",
        "ImageOrientationPatient left out: not 6 finite numbers",
        "Modality missing: OT (other) used for the SR's image library entry",
    ):
        assert expected in notes, notes
    assert not any("Kim" in n or "ZZZ" in n for n in notes)
