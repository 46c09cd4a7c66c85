"""dxnode.training.dataset: CSV layouts, patient splits, and training inputs made by the inference pipeline."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import data_store
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from test_train import make_dataset, synthetic_image

from dxnode.analysis.streaming import _decode_instance
from dxnode.config import PipelineSettings, Settings
from dxnode.pipeline import Preprocessing, model_inputs, read_frames, to_tensor
from dxnode.training.dataset import Augment, Sample, TorchDataset, collate, load_tensor, read_table, split_by_patient

DATA_STORE = Path(data_store.__file__).parent / "data"
PREP = Preprocessing(input_size=64)
NO_AUGMENT = Augment(
    rotate_deg=0, scale=0, translate=0, window_center_shift=0, window_width_scale=0, noise_std=0, contrast=0
)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _ct(tmp_path: Path, name: str, **attrs: object) -> Path:
    """CT_small.dcm with some attributes set (None deletes one), saved under tmp_path."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name


def _input(case: str, tmp_path: Path) -> tuple[Path, PipelineSettings]:
    """An input file of the given kind and the settings to read it with."""
    if case == "png":
        Image.fromarray((np.random.default_rng(1).random((80, 60)) * 255).astype(np.uint8)).save(tmp_path / "gray.png")
        return tmp_path / "gray.png", PipelineSettings()
    files = {"MONOCHROME1": DATA_STORE / "RG1_UNCR.dcm", "VOI LUT sequence": DATA_STORE / "vlut_04.dcm"}
    if case in files:
        return files[case], PipelineSettings()
    lung = PipelineSettings(windows=[{"modality": "CT", "center": -600, "width": 1500}])
    attrs: dict[str, object] = {"WindowCenter": 40, "WindowWidth": 400}
    if case == "sigmoid window":
        attrs["VOILUTFunction"] = "SIGMOID"
    if case == "auto window":
        attrs = {"WindowCenter": None, "WindowWidth": None}
    return _ct(tmp_path, "ct.dcm", **attrs), lung if case == "preset window" else PipelineSettings()


@pytest.mark.parametrize(
    "case", ["own window", "sigmoid window", "preset window", "auto window", "MONOCHROME1", "VOI LUT sequence", "png"]
)
def test_training_input_without_augmentation_is_the_inference_input(case: str, tmp_path: Path) -> None:
    """No train/serve skew: a zero-strength augmentation gives exactly the tensor the node feeds the model."""
    path, settings = _input(case, tmp_path)
    served = torch.from_numpy(to_tensor(read_frames(path, settings, PREP)[0], PREP))
    sample = Sample(path, (1.0,), "P1")
    plain = load_tensor(sample, settings, PREP)
    augmented = load_tensor(sample, settings, PREP, NO_AUGMENT, np.random.default_rng(0))
    assert torch.equal(plain, served)
    torch.testing.assert_close(augmented, served, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "case", ["own window", "sigmoid window", "preset window", "auto window", "MONOCHROME1", "VOI LUT sequence"]
)
def test_training_loader_and_the_node_give_bitwise_the_same_tensor(case: str, tmp_path: Path) -> None:
    """One path from file to tensor: the training loader's input is byte for byte the one the node serves."""
    path, pipeline = _input(case, tmp_path)
    settings = Settings(pipeline=pipeline)
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    decoded = _decode_instance(uid, path, settings, PREP)  # what a job feeds the model
    assert decoded.outcome is None and decoded.inputs
    served = decoded.inputs[0][1]
    item = TorchDataset([Sample(path, (1.0,), "P1")], pipeline, PREP, None, seed=0)[0]
    assert not isinstance(item, str)
    trained = item[0].numpy()
    assert trained.dtype == served.dtype == np.float32 and trained.shape == served.shape
    assert trained.tobytes() == served.tobytes()
    assert model_inputs(path, pipeline, PREP)[0].tobytes() == served.tobytes()  # what calibration reads


@pytest.mark.parametrize(
    ("case", "jittered"),
    [
        ("own window", True),
        ("preset window", True),
        ("auto window", True),
        ("sigmoid window", False),
        ("VOI LUT sequence", False),
        ("png", False),
    ],
)
def test_window_jitter_moves_only_the_linear_window_the_node_picks(case: str, jittered: bool, tmp_path: Path) -> None:
    """The jitter goes through the pipeline's own window choice: a LINEAR window moves, a SIGMOID or VOI LUT does not."""
    path, settings = _input(case, tmp_path)
    sample = Sample(path, (1.0,), "P1")
    served = load_tensor(sample, settings, PREP)
    window_only = dataclasses.replace(NO_AUGMENT, window_center_shift=0.3, window_width_scale=0.3)
    moved = load_tensor(sample, settings, PREP, window_only, np.random.default_rng(3))
    assert (float((moved - served).abs().max()) > 1e-3) is jittered


def test_augmentation_is_seeded_small_and_flips_only_when_asked(tmp_path: Path) -> None:
    path, settings = _input("own window", tmp_path)
    sample = Sample(path, (1.0,), "P1")
    served = load_tensor(sample, settings, PREP)
    a = load_tensor(sample, settings, PREP, Augment(), np.random.default_rng(5))
    assert torch.equal(a, load_tensor(sample, settings, PREP, Augment(), np.random.default_rng(5)))
    assert not torch.equal(a, load_tensor(sample, settings, PREP, Augment(), np.random.default_rng(6)))
    assert 0.6 < np.corrcoef(a.flatten(), served.flatten())[0, 1] < 0.9999  # a perturbation, not a different image
    only_flip = Augment(
        rotate_deg=0,
        scale=0,
        translate=0,
        window_center_shift=0,
        window_width_scale=0,
        noise_std=0,
        contrast=0,
        hflip=True,
    )
    mirrored = served.flip(-1)
    flips = [
        torch.allclose(load_tensor(sample, settings, PREP, only_flip, np.random.default_rng(s)), mirrored, atol=2e-5)
        for s in range(12)
    ]
    assert 0 < sum(flips) < 12
    default = [load_tensor(sample, settings, PREP, Augment(), np.random.default_rng(s)) for s in range(12)]
    assert all((d - mirrored).abs().mean() > (d - served).abs().mean() for d in default)  # never mirrored by default


def test_generic_layouts_images_folder_and_extension_lookup(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.jpg"):
        Image.fromarray(np.full((16, 16), 128, np.uint8)).save(images / name)
    t = read_table(
        _write_csv(
            tmp_path / "multi.csv",
            ["path", "patient_id", "labels"],
            [["a.png", "P1", "Mass|Nodule"], ["b", "P2", ""], ["c", "P2", "Nodule"]],
        ),
        images,
    )
    assert (t.format, t.task, t.labels) == ("generic", "multilabel", ["Mass", "Nodule"])
    assert [s.labels for s in t.samples] == [(1.0, 1.0), (0.0, 0.0), (0.0, 1.0)] and t.samples[
        2
    ].path == images / "c.jpg"
    t = read_table(
        _write_csv(
            tmp_path / "class.csv",
            ["path", "patient_id", "label"],
            [["a.png", "P1", "nevus"], ["b.png", "P2", "melanoma"]],
        ),
        images,
    )
    assert (t.task, t.labels, [s.labels for s in t.samples]) == (
        "multiclass",
        ["melanoma", "nevus"],
        [(0.0, 1.0), (1.0, 0.0)],
    )
    t = read_table(
        _write_csv(
            images / "cols.csv",
            ["path", "patient_id", "effusion", "split"],
            [["a.png", "P1", "1", "test"], ["zzz.png", "P2", "0", ""]],
        )
    )
    assert t.labels == ["effusion"] and t.samples[0].split == "test" and len(t.samples) == 1
    assert t.unreadable == [f"{images / 'zzz.png'}: no such file"]
    t = read_table(
        _write_csv(
            tmp_path / "isic.csv",
            ["image", "MEL", "NV", "lesion_id"],
            [["a", "1.0", "0.0", "L1"], ["b", "0.0", "1.0", "L1"]],
        ),
        images,
    )
    assert (t.format, t.task, t.labels) == ("isic", "multiclass", ["MEL", "NV"]) and {
        s.patient_id for s in t.samples
    } == {"L1"}


def test_bad_csvs_give_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("path,patient_id,x\n")
    with pytest.raises(ValueError, match="no rows"):
        read_table(tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="unknown CSV layout"):
        read_table(_write_csv(tmp_path / "odd.csv", ["file", "who"], [["a.png", "P1"]]))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="split 'holdout'"):
        read_table(
            _write_csv(tmp_path / "split.csv", ["path", "patient_id", "x", "split"], [["a.png", "P1", "1", "holdout"]])
        )
    with pytest.raises(ValueError, match="no labels"):
        read_table(_write_csv(tmp_path / "nolab.csv", ["path", "patient_id", "labels"], [["a.png", "P1", ""]]))
    with pytest.raises(ValueError, match="several explicit splits"):
        split_by_patient(
            [Sample(tmp_path / "a.png", (1.0,), "P1", "train"), Sample(tmp_path / "a.png", (0.0,), "P1", "test")]
        )


def test_every_unusable_image_gets_one_line_with_its_reason(tmp_path: Path) -> None:
    csv_path = make_dataset(tmp_path, patients=3, seed=2)  # includes broken.dcm (not DICOM)
    sr = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.save_as(tmp_path / "sr.dcm")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerows([["sr.dcm", "P100", 0, 1], ["bad.png", "P101", 1, 1], ["gone.dcm", "P102", 0, 0]])
    t = read_table(csv_path)
    assert len(t.samples) == 6 and len(t.unreadable) == 4
    reasons = dict(line.split(": ", 1) for line in t.unreadable)
    assert set(reasons) == {str(tmp_path / n) for n in ("broken.dcm", "sr.dcm", "bad.png", "gone.dcm")}
    assert (
        "not a readable DICOM" in reasons[str(tmp_path / "broken.dcm")]
        and "Structured Report" in reasons[str(tmp_path / "sr.dcm")]
    )
    assert reasons[str(tmp_path / "gone.dcm")] == "no such file" and all("\n" not in line for line in t.unreadable)


def test_image_whose_pixels_break_only_at_load_is_reported_and_skipped(tmp_path: Path) -> None:
    """A header that reads fine over truncated Pixel Data: the batch goes on without it, and says which."""
    good, bad = tmp_path / "good.dcm", tmp_path / "bad.dcm"
    synthetic_image(good, disc=True, bar=False, monochrome1=False, rng=np.random.default_rng(0), size=48)
    synthetic_image(bad, disc=True, bar=False, monochrome1=False, rng=np.random.default_rng(0), size=48)
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(bad)
    t = read_table(
        _write_csv(tmp_path / "l.csv", ["path", "patient_id", "disc"], [["good.dcm", "P1", 1], ["bad.dcm", "P2", 1]])
    )
    assert len(t.samples) == 2  # the header alone looks fine
    data = TorchDataset(t.samples, PipelineSettings(), PREP, Augment(), seed=0)
    batch = collate([data[0], data[1]])
    assert batch.x is not None and batch.x.shape == (1, 3, 64, 64) and batch.y.tolist() == [[1.0]]
    assert len(batch.failed) == 1 and batch.failed[0].startswith(f"{bad}: cannot decode pixel data")
    assert collate([data[1]]).x is None


def _patients(split: list[Sample]) -> set[str]:
    return {s.patient_id for s in split}


def test_patient_split_has_no_leakage_and_keeps_a_rare_label_in_every_split() -> None:
    rng = np.random.default_rng(0)
    samples = []
    for p in range(80):
        rare = p % 10 == 0  # 8 patients of 80
        common = bool(rng.random() < 0.4)
        for k in range(int(rng.integers(1, 4))):
            samples.append(Sample(Path(f"/x/p{p}_{k}.dcm"), (float(common), float(rare)), f"P{p}"))
    for seed in range(8):
        splits = split_by_patient(samples, (0.7, 0.15, 0.15), seed)
        train, val, test = (_patients(splits[s]) for s in ("train", "val", "test"))
        assert not (train & val) and not (train & test) and not (val & test)
        assert sorted(s.path for part in splits.values() for s in part) == sorted(s.path for s in samples)
        for part in (val, test):
            assert 8 <= len(part) <= 16  # about 15% of 80 patients
            assert any(s.labels[1] for s in splits["val" if part is val else "test"])  # the rare label is in each split
    assert _patients(split_by_patient(samples, seed=1)["val"]) != _patients(split_by_patient(samples, seed=2)["val"])
