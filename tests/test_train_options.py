"""`dxnode train` options on a tiny synthetic set: determinism, crash + resume, ImageNet start, losses, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torchvision
from test_train import make_dataset, synthetic_image

from dxnode.cli import main
from dxnode.inference.bundle import load_manifest


class Crash(BaseException):
    """A simulated kill of the training process."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"), patients=14, seed=4)


@pytest.fixture(autouse=True)
def _no_imagenet_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(
        [
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
            "3",
            "--patience",
            "9",
            *extra,
        ]
    )


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    return torch.load(bundle / "weights.pt", weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_whatever_the_worker_count(data: Path, tmp_path: Path) -> None:
    assert _train(data, tmp_path / "a", "--epochs", "1") == 0
    assert _train(data, tmp_path / "b", "--epochs", "1", "--workers", "2") == 0
    assert _train(data, tmp_path / "c", "--epochs", "1", "--seed", "4") == 0
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    assert load_manifest(tmp_path / "a").thresholds == load_manifest(tmp_path / "b").thresholds


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _train(data, tmp_path / "straight", "--epochs", "2") == 0
    real_save, saves = torch.save, []

    def save_then_die(obj: object, f: object, *a: object, **kw: object) -> None:
        real_save(obj, f, *a, **kw)
        if "last.pt" in Path(str(f)).name:  # its temporary file (dxnode.durable), then renamed
            saves.append(f)
            if len(saves) == 2:  # killed while the second epoch's checkpoint was being written
                raise Crash

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(Crash):
        _train(data, tmp_path / "crashed", "--epochs", "2")
    monkeypatch.setattr(torch, "save", real_save)
    assert (
        torch.load(tmp_path / "crashed" / "checkpoints" / "last.pt", weights_only=False)["state"]["epoch"] == 0
    )  # epoch 1's survives
    assert _train(data, tmp_path / "crashed", "--epochs", "2", "--resume") == 0
    assert _same(_weights(tmp_path / "straight"), _weights(tmp_path / "crashed"))
    straight, resumed = (load_manifest(tmp_path / n).extra["training"]["history"] for n in ("straight", "crashed"))
    assert resumed == straight and [h["epoch"] for h in resumed] == [1, 2]


def test_starts_from_the_imagenet_file_and_freezes_the_backbone(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stand-in for torchvision's file (same keys and shapes) in $TORCH_HOME/hub/checkpoints; nothing downloaded."""
    torch.manual_seed(11)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(imagenet, hub / "resnet18-f37072fd.pth")
    assert _train(data, tmp_path / "frozen", "--epochs", "1", "--freeze-epochs", "1") == 0
    assert "from scratch" not in caplog.text
    w = _weights(tmp_path / "frozen")
    assert load_manifest(tmp_path / "frozen").extra["training"]["start"] == "imagenet:resnet18-f37072fd.pth"
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight"):
        assert torch.equal(w[key], imagenet[key]), key  # loaded and left alone while frozen
    assert w["fc.weight"].shape == (2, 512)
    assert _train(data, tmp_path / "tuned", "--epochs", "1") == 0
    assert not torch.equal(_weights(tmp_path / "tuned")["conv1.weight"], imagenet["conv1.weight"])


def test_focal_loss_with_thresholds_for_a_target_sensitivity(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "focal"
    assert (
        _train(
            data,
            out,
            "--epochs",
            "1",
            "--loss",
            "focal",
            "--threshold-rule",
            "sensitivity",
            "--target-sensitivity",
            "0.9",
        )
        == 0
    )
    manifest = load_manifest(out)
    assert (
        manifest.extra["training"]["threshold_rule"] == "sensitivity"
        and manifest.extra["training"]["parameters"]["loss"] == "focal"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for label, m in metrics["labels"].items():
        assert m["sensitivity"] >= 0.9, (label, m)
        assert m["threshold"] == pytest.approx(manifest.thresholds[manifest.labels.index(label)], abs=1e-6)


def test_multiclass_label_column_trains_a_softmax_bundle(data: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(data.read_text().splitlines()))
    with open(data.parent / "classes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "label"])
        w.writerows(
            [r["path"], r["patient_id"], "disc" if r["disc"] == "1" else "bar" if r["bar"] == "1" else "clear"]
            for r in rows
        )
    out = tmp_path / "mc"
    assert _train(data.parent / "classes.csv", out, "--epochs", "1") == 0
    manifest = load_manifest(out)
    assert (manifest.task, manifest.labels) == ("multiclass", ["bar", "clear", "disc"])
    metrics = json.loads((out / "metrics.json").read_text())
    n = {m["n"] for m in metrics["labels"].values()}
    assert len(n) == 1 and sum(m["positives"] for m in metrics["labels"].values()) == n.pop()  # one class per image


def test_image_failing_at_pixel_load_is_named_once_and_training_goes_on(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = data.parent / "truncated.dcm"
    synthetic_image(bad, disc=True, bar=False, monochrome1=False, rng=np.random.default_rng(0), size=48)
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[:64]
    ds.save_as(bad)
    rows = list(csv.DictReader(data.read_text().splitlines()))
    with open(data.parent / "with_bad.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([*rows, {"path": "truncated.dcm", "patient_id": "P000", "bar": 0, "disc": 1}])
    assert _train(data.parent / "with_bad.csv", tmp_path / "b", "--epochs", "2") == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "left out" in line]
    assert [line for line in lines if "truncated.dcm" in line] == [
        f"left out {bad}: cannot decode pixel data" + lines[-1].split("cannot decode pixel data", 1)[1]
    ]
    assert sum("broken.dcm" in line for line in lines) == 1  # the unreadable header: one line too
    bad.unlink()


def test_bad_input_gives_a_clear_error_and_exit_2(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train(tmp_path / "nope.csv", tmp_path / "x", "--epochs", "1") == 2
    assert "nope.csv" in capsys.readouterr().err
    assert _train(data, tmp_path / "fresh", "--epochs", "1", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "one.csv").write_text(
        "path,patient_id,disc\n"
        + "".join(
            f"{r['path']},P1,{r['disc']}\n"
            for r in csv.DictReader(data.read_text().splitlines())
            if r["path"] != "broken.dcm"
        )
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "one.csv"),
                "--out",
                str(tmp_path / "y"),
                "--images",
                str(data.parent),
                "--epochs",
                "1",
            ]
        )
        == 2
    )
    assert "not enough patients" in capsys.readouterr().err
    bad = tmp_path / "truncated.dcm"
    synthetic_image(bad, disc=True, bar=True, monochrome1=False, rng=np.random.default_rng(0), size=48)
    ds = pydicom.dcmread(bad)
    ds.PixelData = ds.PixelData[:64]
    ds.save_as(bad)
    with open(tmp_path / "badval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "bar", "disc", "split"])
        w.writerows(
            [data.parent / r["path"], r["patient_id"], r["bar"], r["disc"], "train"]
            for r in csv.DictReader(data.read_text().splitlines())
            if r["path"] != "broken.dcm"
        )
        w.writerow([bad, "PV", 1, 1, "val"])
    assert _train(tmp_path / "badval.csv", tmp_path / "z", "--epochs", "1") == 2
    assert "none of the 1 validation images could be loaded" in capsys.readouterr().err
