"""The SR's content as IHE AIR and a radiologist ask: standard codes of findings, the threshold of each
finding, the study's procedure, a device UID per model, and de-identified sources carried as such.

Every SR and SC here passes dciodvfy; the SRs pass Pixelmed's TID 1500 validator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import data_store
import highdicom as hd
import pydicom
import pytest
import torch
import torchvision
from conftest import need_tool
from dicom_checks import dciodvfy_errors, pixelmed_sr_check
from nodeproc import DXNODE
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import Collection

from dxnode.analysis.streaming import analyze_study
from dxnode.config import ModelSettings, Settings
from dxnode.inference.bundle import BundleError, load_manifest, write_bundle
from dxnode.inference.codes import CHEST_CODES, PRIVATE_SCHEME
from dxnode.model import load_classifier
from dxnode.outputs.report import WrittenOutput, write_outputs
from dxnode.outputs.source_header import UNSTATED_DEIDENTIFICATION
from dxnode.outputs.sr import PROBABILITY, THRESHOLD, device_uid, procedure_reported
from dxnode.pipeline import Preprocessing
from dxnode.results import StudyResult

DATA = Path(data_store.__file__).parent / "data"
CT = Path(get_testdata_file("CT_small.dcm"))
CR = DATA / "RG3_UNCR.dcm"  # a real computed radiograph
DEIDENTIFIED_CT = DATA / "693_UNCR.dcm"  # Patient Identity Removed YES, no method stated
LABELS = ["Effusion", "Nodule", "Pneumothorax"]


@pytest.fixture(autouse=True)
def no_imagenet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def dciodvfy_warnings(path: Path) -> list[str]:
    """The Warning lines dciodvfy prints for a file."""
    need_tool("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Warning")]


def walk(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence") or []:
        yield item
        yield from walk(item)


def finding_codes(sr: Dataset) -> dict[str, tuple[str, str, str]]:
    """Meaning -> (value, scheme, meaning) of the concepts evaluated present or absent (the findings)."""
    return {
        i.ConceptNameCodeSequence[0].CodeMeaning: (
            i.ConceptNameCodeSequence[0].CodeValue,
            i.ConceptNameCodeSequence[0].CodingSchemeDesignator,
            i.ConceptNameCodeSequence[0].CodeMeaning,
        )
        for i in walk(sr)
        if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning in ("Present", "Absent")
    }


def chest_bundle(tmp_path: Path, codes: dict[str, tuple[str, str, str]] | None = None) -> Path:
    """A (random-weight) bundle with the demo's chest labels, coded as given."""
    torch.manual_seed(5)
    write_bundle(
        tmp_path / "bundle",
        torchvision.models.resnet18(num_classes=len(LABELS)).state_dict(),
        name="chest-net",
        version="1.0",
        labels=LABELS,
        task="multilabel",
        thresholds=[0.3, 0.5, 0.9],
        preprocessing=Preprocessing(input_size=64),
        codes=codes,
    )
    return tmp_path / "bundle"


def run(source: Path, out: Path, bundle: Path | None = None) -> tuple[StudyResult, list[WrittenOutput]]:
    """Analyse one file with the bundle (the demo model without one) and write its SR and SCs."""
    settings = Settings()
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    clf = load_classifier(ModelSettings(bundle=str(bundle) if bundle else ""))
    result = analyze_study(ds.StudyInstanceUID, [(ds.SOPInstanceUID, source)], clf, settings, "all")
    return result, write_outputs(result, {ds.SOPInstanceUID: source}, settings, out)


def the_sr(written: list[WrittenOutput]) -> Path:
    return next(w.path for w in written if w.kind == "sr")


def test_demo_findings_carry_snomed_codes_and_no_private_code_warning(tmp_path: Path) -> None:
    result, written = run(CR, tmp_path / "out")
    assert result.model.demo
    sr_path = the_sr(written)
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.path
    private = [line for line in dciodvfy_warnings(sr_path) if PRIVATE_SCHEME in line]
    assert private == []
    root, errors = pixelmed_sr_check(sr_path)
    assert root.startswith("TID_1500") and errors == []
    sr = pydicom.dcmread(sr_path)
    codes = finding_codes(sr)
    assert set(codes.values()) == set(CHEST_CODES.values())
    assert codes["Pleural effusion"] == ("60046008", "SCT", "Pleural effusion")  # "Effusion" says which
    assert "CodingSchemeIdentificationSequence" not in sr  # no private scheme to describe
    assert not [
        i
        for i in walk(sr)
        for c in i.get("ConceptNameCodeSequence") or []
        if c.CodingSchemeDesignator == PRIVATE_SCHEME
    ]


def test_each_finding_states_the_threshold_that_decided_it(tmp_path: Path) -> None:
    coded = {"Effusion": CHEST_CODES["Effusion"], "Nodule": CHEST_CODES["Nodule"]}  # Pneumothorax left uncoded
    result, written = run(CT, tmp_path / "out", chest_bundle(tmp_path, coded))
    sr_path = the_sr(written)
    assert dciodvfy_errors(sr_path) == []
    root, errors = pixelmed_sr_check(sr_path)
    assert root.startswith("TID_1500") and errors == []
    report = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(sr_path)])
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(result.findings) == 3
    by_code = {code[0]: label for label, code in coded.items()}
    for g in groups:
        finding = g.finding_type
        label = by_code.get(finding.value, finding.meaning)
        f = next(f for f in result.findings if f.label == label)
        probability = g.get_measurements(name=PROBABILITY)[0].value
        threshold = g.get_measurements(name=THRESHOLD)[0].value
        assert float(threshold) == pytest.approx(f.threshold) and float(probability) == pytest.approx(
            f.probability, abs=1e-5
        )
        present = next(e for e in g.get_qualitative_evaluations() if e.name == finding).value.meaning
        assert present == ("Present" if float(probability) >= float(threshold) else "Absent")
    codes = finding_codes(pydicom.dcmread(sr_path))
    assert codes["Pleural effusion"][1] == "SCT" and codes["Nodule"][1] == "SCT"
    assert codes["Pneumothorax"][1] == PRIVATE_SCHEME  # no standard code in the manifest: the private one
    declared = pydicom.dcmread(sr_path).CodingSchemeIdentificationSequence  # and the SR says what 99DXNODE is
    assert [i.CodingSchemeDesignator for i in declared] == [PRIVATE_SCHEME]


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_procedure_reported_is_the_studys_else_the_modalitys() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    assert procedure_reported(ds).value == "25045-6"  # LOINC "CT unspecified body region"
    ds.RequestedProcedureCodeSequence = [code("RPID16", "RADLEX", "CT Chest wo IV Contrast")]
    assert (procedure_reported(ds).value, procedure_reported(ds).scheme_designator) == ("RPID16", "RADLEX")
    ds.ProcedureCodeSequence = [code("24627-2", "LN", "CT Chest")]
    assert procedure_reported(ds).meaning == "CT Chest"  # the performed procedure before the requested one
    cid100 = {(c.value, c.scheme_designator) for c in Collection("CID100").concepts.values()}
    generic = {}
    for modality in ("CR", "DX", "MR", "US", "MG", "PT", "NM", "XA", "XC"):
        plain = Dataset()
        plain.Modality = modality
        concept = procedure_reported(plain)
        assert (concept.value, concept.scheme_designator) in cid100, modality  # the current standard's CID 100
        generic[modality] = concept.value
    assert generic["CR"] == generic["DX"] == "43468-8"  # LOINC "XR unspecified body region"
    assert generic["MR"] == "25056-3" and generic["XA"] == "77343006"
    assert generic["US"] == generic["XC"] == "363679005"  # no generic one in CID 100: "Imaging procedure"
    assert len(set(generic.values())) == 6  # not one code for every study


def test_sr_reports_the_source_procedure_end_to_end(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    ds.ProcedureCodeSequence = [code("39142-5", "LN", "CT perfusion head with contrast IV")]
    source = tmp_path / "ct-with-procedure.dcm"
    ds.save_as(source, enforce_file_format=True)
    _, written = run(source, tmp_path / "out")
    sr_path = the_sr(written)
    assert dciodvfy_errors(sr_path) == []
    root, errors = pixelmed_sr_check(sr_path)
    assert root.startswith("TID_1500") and errors == []
    procedure = [i for i in walk(pydicom.dcmread(sr_path)) if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert [(p.ConceptCodeSequence[0].CodeValue, p.ConceptCodeSequence[0].CodeMeaning) for p in procedure] == [
        ("39142-5", "CT perfusion head with contrast IV")
    ]
    _, plain = run(CR, tmp_path / "cr")
    procedure = [i for i in walk(pydicom.dcmread(the_sr(plain))) if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "43468-8"


def test_device_uid_changes_with_the_models_version_or_weights(tmp_path: Path) -> None:
    result, written = run(CT, tmp_path / "a")
    sr = pydicom.dcmread(the_sr(written))
    uid = sr.ContributingEquipmentSequence[0].DeviceUID
    assert uid == device_uid(result.model)
    observer = [i for i in walk(sr) if i.ConceptNameCodeSequence[0].CodeValue == "121012"]  # Device Observer UID
    assert [o.UID for o in observer] == [uid]
    again = pydicom.dcmread(the_sr(write_outputs(result, *_sources_settings(result), tmp_path / "b")))
    assert again.ContributingEquipmentSequence[0].DeviceUID == uid  # the same model: the same device
    uids = {uid}
    for change in ({"version": "0-untrained-2"}, {"sha256": "0" * 64}):
        other = dataclasses.replace(result, model=dataclasses.replace(result.model, **change))
        out = write_outputs(other, *_sources_settings(result), tmp_path / next(iter(change)))
        uids.add(pydicom.dcmread(the_sr(out)).ContributingEquipmentSequence[0].DeviceUID)
    assert len(uids) == 3


def _sources_settings(result: StudyResult) -> tuple[dict[str, Path], Settings]:
    return {result.findings[0].source_sop_instance_uid or "": CT}, Settings()


def test_deidentified_ct_sr_and_sc_carry_the_deidentification_and_pass_dciodvfy(tmp_path: Path) -> None:
    source = pydicom.dcmread(DEIDENTIFIED_CT, stop_before_pixels=True)
    assert source.PatientIdentityRemoved == "YES" and "DeidentificationMethod" not in source
    _, written = run(DEIDENTIFIED_CT, tmp_path / "out")
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.path
        ds = pydicom.dcmread(w.path, stop_before_pixels=True)
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == UNSTATED_DEIDENTIFICATION
    root, errors = pixelmed_sr_check(the_sr(written))
    assert root.startswith("TID_1500") and errors == []


def test_a_stated_deidentification_method_and_its_codes_are_carried_as_they_are(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Hospital pseudonymiser 4.2"
    ds.DeidentificationMethodCodeSequence = [code("113100", "DCM", "Basic Application Confidentiality Profile")]
    source = tmp_path / "pseudonymised.dcm"
    ds.save_as(source, enforce_file_format=True)
    _, written = run(source, tmp_path / "out")
    for w in written:
        assert dciodvfy_errors(w.path) == [], w.path
        out = pydicom.dcmread(w.path, stop_before_pixels=True)
        assert out.DeidentificationMethod == "Hospital pseudonymiser 4.2"
        assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def test_manifest_codes_round_trip_and_malformed_codes_are_refused(tmp_path: Path) -> None:
    bundle = chest_bundle(tmp_path, {"Effusion": CHEST_CODES["Effusion"]})
    assert load_manifest(bundle).codes == {"Effusion": ("60046008", "SCT", "Pleural effusion")}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["codes"] == {"Effusion": ["60046008", "SCT", "Pleural effusion"]}
    for bad, said in (
        ({"Edema": ["19242006", "SCT", "Pulmonary edema"]}, "not one of the labels"),
        ({"Effusion": ["60046008", "SCT"]}, "[value, scheme, meaning]"),
        ({"Effusion": ["60046008", "snomed ct!", "Pleural effusion"]}, "coding scheme designator"),
        (["60046008"], "must map labels"),
    ):
        (bundle / "manifest.json").write_text(json.dumps(manifest | {"codes": bad}))
        with pytest.raises(BundleError, match=r"manifest\.json is invalid") as caught:
            load_manifest(bundle)
        assert said in str(caught.value) and "\n" not in str(caught.value)


def test_model_info_warns_about_labels_without_a_standard_code(tmp_path: Path) -> None:
    bundle = chest_bundle(tmp_path, {"Effusion": CHEST_CODES["Effusion"], "Nodule": CHEST_CODES["Nodule"]})
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch-home"))
    info = subprocess.run(
        [DXNODE, "model", "info", str(bundle), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["uncoded_labels"] == ["Pneumothorax"]
    warning = [line for line in info.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "Pneumothorax" in warning[0] and PRIVATE_SCHEME in warning[0]
    assert "Effusion" not in warning[0]
    demo = subprocess.run([DXNODE, "model", "info"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert demo.returncode == 0 and "warning" not in demo.stderr and "60046008" in demo.stdout
