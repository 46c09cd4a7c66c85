"""`dxnode train` / `dxnode evaluate` on a learnable synthetic DICOM data set made here."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sklearn.metrics import roc_auc_score

from dxnode.analysis.predict import predict_file
from dxnode.analysis.streaming import analyze_study
from dxnode.cli import main
from dxnode.config import ModelSettings, Settings
from dxnode.inference.bundle import load_manifest
from dxnode.model import load_classifier
from dxnode.training.dataset import read_table, split_by_patient

LABELS = ["bar", "disc"]


def synthetic_image(
    path: Path, disc: bool, bar: bool, monochrome1: bool, rng: np.random.Generator, size: int = 96
) -> None:
    """A 12-bit CR-like image: noise, plus a bright disc and/or a bright bar; MONOCHROME1 stored inverted."""
    img = rng.normal(1000, 90, (size, size))
    yy, xx = np.mgrid[:size, :size]
    if disc:
        cy, cx = rng.integers(20, size - 20, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(9, 14) ** 2] += 700
    if bar:
        y0 = rng.integers(10, size - 16)
        img[y0 : y0 + 6, 8 : size - 8] += 700
    img = np.clip(img, 0, 4095).astype(np.uint16)
    center, width = 1350, 1700
    if monochrome1:
        img, center = 4095 - img, 4095 - center
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()  # CR Image Storage
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = (
        generate_uid(),
        generate_uid(),
        "CR",
        path.stem,
    )
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = img.tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_dataset(folder: Path, patients: int = 90, seed: int = 0) -> Path:
    """Two images per patient; labels drawn independently; one broken file listed too."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(patients):
        for k in range(2):
            disc, bar = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            name = f"p{p:03d}_{k}.dcm"
            synthetic_image(folder / name, disc, bar, monochrome1=(p + k) % 2 == 1, rng=rng)
            rows.append({"path": name, "patient_id": f"P{p:03d}", "bar": int(bar), "disc": int(disc)})
    (folder / "broken.dcm").write_bytes(b"this is not DICOM")
    rows.append({"path": "broken.dcm", "patient_id": "P999", "bar": 1, "disc": 0})
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "patient_id", "bar", "disc"])
        w.writeheader()
        w.writerows(rows)
    return folder / "labels.csv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train")
    import os

    os.environ["TORCH_HOME"] = str(root / "torch-home")  # no ImageNet file: from scratch
    data = make_dataset(root / "data")
    bundle = root / "bundle"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(bundle),
            "--epochs",
            "8",
            "--input-size",
            "64",
            "--batch-size",
            "16",
            "--lr",
            "0.003",
            "--seed",
            "1",
            "--patience",
            "8",
            "--name",
            "shapes",
            "--version",
            "0.1",
        ]
    )
    assert code == 0
    return data, bundle


def test_training_reaches_auroc_above_0_9_for_every_label(trained: tuple[Path, Path]) -> None:
    _, bundle = trained
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert set(metrics["labels"]) == set(LABELS)
    for label, m in metrics["labels"].items():
        assert m["auroc"] > 0.9, (label, m)
        assert m["auroc_ci"][0] <= m["auroc"] <= m["auroc_ci"][1]
    manifest = load_manifest(bundle)
    assert manifest.labels == LABELS and manifest.task == "multilabel" and manifest.preprocessing.input_size == 64
    assert all(0 < t < 1 for t in manifest.thresholds)
    assert manifest.intended_use is not None and manifest.intended_use.modalities == ("CR",)  # its DICOM files
    training = manifest.extra["training"]
    assert training["data_sha256"] and training["start"] == "scratch" and training["threshold_rule"] == "youden"
    assert (bundle / "roc.png").stat().st_size > 5000 and (bundle / "curves.png").stat().st_size > 5000


def test_split_is_by_patient_without_leakage(trained: tuple[Path, Path]) -> None:
    _, bundle = trained
    with open(bundle / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    patients: dict[str, set[str]] = {}
    for r in rows:
        patients.setdefault(r["split"], set()).add(r["patient_id"])
    assert patients["train"] and patients["val"] and patients["test"]
    assert (
        not (patients["train"] & patients["val"])
        and not (patients["train"] & patients["test"])
        and not (patients["val"] & patients["test"])
    )
    assert "P999" not in set().union(*patients.values())  # the unreadable image was left out


def test_evaluate_on_the_held_out_split_agrees_with_sklearn(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, bundle = trained
    assert main(["evaluate", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev"), "--split", "test"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    with open(bundle / "splits.csv", newline="") as f:
        test_paths = [Path(r["path"]) for r in csv.DictReader(f) if r["split"] == "test"]
    table = {s.path.resolve(): s for s in read_table(data).samples}
    clf = load_classifier(ModelSettings(bundle=str(bundle)))
    for j, label in enumerate(LABELS):
        y = [table[p].labels[j] for p in test_paths]
        p = [
            next(f.probability for f in predict_file(path, clf, Settings()).findings if f.label == label)
            for path in test_paths
        ]
        assert metrics["labels"][label]["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        assert metrics["labels"][label]["n"] == len(test_paths)
    for name in ("metrics.csv", "roc.png", "calibration.png"):
        assert (tmp_path / "ev" / name).is_file()


def test_bundle_gives_the_same_probabilities_in_predict_and_in_the_runner(trained: tuple[Path, Path]) -> None:
    data, bundle = trained
    clf = load_classifier(ModelSettings(bundle=str(bundle)))
    image = data.parent / "p000_1.dcm"
    direct = {f.label: f.probability for f in predict_file(image, clf, Settings()).findings}
    ds = pydicom.dcmread(image, stop_before_pixels=True)
    runner = analyze_study(ds.StudyInstanceUID, [(ds.SOPInstanceUID, image)], clf, Settings())
    assert {f.label: f.probability for f in runner.findings} == direct


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", patients=12, seed=3)
    out = tmp_path / "b"
    common = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--input-size",
        "32",
        "--batch-size",
        "8",
        "--seed",
        "2",
        "--patience",
        "9",
    ]
    assert main([*common, "--epochs", "2"]) == 0
    first = load_manifest(out).extra["training"]["history"]
    assert [h["epoch"] for h in first] == [1, 2]
    assert main([*common, "--epochs", "3", "--resume"]) == 0
    history = load_manifest(out).extra["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[:2] == first


def test_chestxray14_and_isic_layouts(tmp_path: Path) -> None:
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png", "ISIC_0000000.jpg", "ISIC_0000001.jpg"):
        Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(tmp_path / name)
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,58\n00000001_001.png,No Finding,1,1,58\n00000002_000.png,Effusion,0,2,81\n"
    )
    t = read_table(tmp_path / "Data_Entry_2017.csv")
    assert (t.format, t.task, t.labels) == ("chestxray14", "multilabel", ["Cardiomegaly", "Effusion"])
    assert [s.labels for s in t.samples] == [(1.0, 1.0), (0.0, 0.0), (0.0, 1.0)] and t.samples[0].patient_id == "1"
    (tmp_path / "ISIC_GroundTruth.csv").write_text(
        "image,MEL,NV,BCC\nISIC_0000000,0.0,1.0,0.0\nISIC_0000001,1.0,0.0,0.0\nISIC_0000002,0,0,1\n"
    )
    t = read_table(tmp_path / "ISIC_GroundTruth.csv")
    assert (t.format, t.task, t.labels) == ("isic", "multiclass", ["MEL", "NV", "BCC"])
    assert len(t.samples) == 2 and len(t.unreadable) == 1 and "ISIC_0000002" in t.unreadable[0]


def test_split_is_seeded_and_respects_explicit_splits(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", patients=40, seed=5)
    t = read_table(data)
    a = split_by_patient(t.samples, seed=7)
    b = split_by_patient(t.samples, seed=7)
    assert [s.path for s in a["val"]] == [s.path for s in b["val"]]
    assert [s.path for s in split_by_patient(t.samples, seed=8)["val"]] != [s.path for s in a["val"]]
    rows = list(csv.DictReader(data.read_text().splitlines()))
    with open(tmp_path / "d" / "explicit.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "split"])
        w.writeheader()
        w.writerows({**r, "split": "test" if r["patient_id"] == "P000" else ""} for r in rows)
    explicit = split_by_patient(read_table(tmp_path / "d" / "explicit.csv").samples, seed=7)
    assert {s.patient_id for s in explicit["test"]} >= {"P000"}
    shutil.rmtree(tmp_path / "d")
