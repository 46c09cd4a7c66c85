"""The ONNX Runtime engine: same results as PyTorch on real images, model.onnx checked like the
weights, the fallback that says why, the built-in models' export cache, and int8 bundles."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import data_store
import numpy as np
import pytest
import torch
import torchvision
from test_train import make_dataset

from dxnode.cli import main
from dxnode.config import ModelSettings, Settings
from dxnode.inference.bundle import (
    BundleError,
    demo_manifest,
    demo_weights,
    load_manifest,
    read_state_dict,
    sha256_file,
    write_bundle,
)
from dxnode.inference.engine import OrtEngine, TorchEngine, export_bundle, ort_session
from dxnode.model import load_classifier, normalise_cam
from dxnode.pipeline import Preprocessing, read_frames, to_tensor

DXNODE = str(Path(sys.executable).with_name("dxnode"))
DATA = Path(data_store.__file__).parent / "data"
REAL = ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm"]  # CR x2, CT, MR, US (RGB)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no ImageNet file: the demo model


def make_bundle(path: Path, labels: tuple[str, ...] = ("effusion", "nodule", "mass"), size: int = 224) -> Path:
    torch.manual_seed(7)
    write_bundle(
        path,
        torchvision.models.resnet18(num_classes=len(labels)).state_dict(),
        name="test-net",
        version="3.0",
        labels=list(labels),
        task="multilabel",
        thresholds=[0.5] * len(labels),
        preprocessing=Preprocessing(input_size=size),
    )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = make_bundle(tmp_path_factory.mktemp("onnx") / "b")
    export_bundle(bundle)
    return bundle


def real_batch(prep: Preprocessing) -> np.ndarray:
    frames = [f for name in REAL for f in read_frames(DATA / name, Settings().pipeline, prep)]
    assert len(frames) == len(REAL)
    return np.stack([to_tensor(f, prep) for f in frames])


def test_both_engines_give_the_same_probabilities_and_cams_on_real_images(exported: Path) -> None:
    ort_clf = load_classifier(ModelSettings(bundle=str(exported), device="cpu"))
    torch_clf = load_classifier(ModelSettings(bundle=str(exported), device="cpu", engine="torch"))
    assert (ort_clf.engine.name, torch_clf.engine.name) == ("onnxruntime", "torch")
    assert "model.onnx sha256 matches" in ort_clf.engine_reason
    x = real_batch(ort_clf.manifest.preprocessing)
    p_ort, cam_ort = ort_clf.predict_with_cam(x)
    p_torch, cam_torch = torch_clf.predict_with_cam(x)
    assert p_ort.shape == p_torch.shape == (len(x), 3) and cam_ort.shape == cam_torch.shape == (len(x), 3, 7, 7)
    np.testing.assert_allclose(p_ort, p_torch, atol=1e-5, rtol=0)
    for i in range(len(x)):
        for j in range(3):
            np.testing.assert_allclose(normalise_cam(cam_ort[i, j]), normalise_cam(cam_torch[i, j]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ort_clf.predict(x), p_torch, atol=1e-5, rtol=0)  # the batch split (8) changes nothing
    # multiclass (softmax in NumPy for ONNX Runtime, in torch for PyTorch)
    ort_mc = OrtEngine(ort_session(exported / "model.onnx"), torch_clf.net.fc.weight.detach().numpy(), "multiclass")
    torch_mc = TorchEngine(torch_clf.net, "multiclass", torch.device("cpu"))
    np.testing.assert_allclose(ort_mc.forward(x, False)[0], torch_mc.forward(x, False)[0], atol=1e-5, rtol=0)


def test_a_tampered_or_missing_model_onnx_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_bundle(tmp_path / "b", size=32)
    m = export_bundle(bundle)
    assert m.onnx_file == "model.onnx" and m.onnx_sha256 == sha256_file(bundle / "model.onnx")
    assert load_manifest(bundle).onnx_sha256 == m.onnx_sha256
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-20] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match the manifest.*refusing"):
        load_classifier(ModelSettings(bundle=str(bundle)))
    with pytest.raises(BundleError, match=r"model\.onnx does not match"):  # also when torch would run it
        load_classifier(ModelSettings(bundle=str(bundle), engine="torch"))
    assert main(["model", "info", str(bundle)]) == 1
    assert "model.onnx" in capsys.readouterr().err
    (bundle / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"ONNX model missing: .*model\.onnx \(expected sha256"):
        load_classifier(ModelSettings(bundle=str(bundle)))


def test_an_older_bundle_runs_in_torch_says_why_and_model_export_adds_the_onnx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle(tmp_path / "b", size=32)
    with caplog.at_level(logging.WARNING, logger="dxnode.model"):
        clf = load_classifier(ModelSettings(bundle=str(bundle)))
    assert clf.engine.name == "torch" and "no model.onnx" in clf.engine_reason
    assert f"dxnode model export {bundle}" in caplog.text
    capsys.readouterr()
    assert main(["model", "info", str(bundle), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["engine"] == "torch" and "no model.onnx" in shown["engine_reason"]
    export = subprocess.run([DXNODE, "model", "export", str(bundle)], capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert "model.onnx" in export.stdout and (bundle / "model.onnx").is_file()
    assert main(["model", "info", str(bundle), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["engine"] == "onnxruntime" and shown["onnx_sha256"] == sha256_file(bundle / "model.onnx")


def test_the_demo_model_is_exported_once_to_the_cache_and_rebuilt_when_it_does_not_match(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    no_cache = load_classifier(ModelSettings())
    assert no_cache.engine.name == "torch" and "no data_dir" in no_cache.engine_reason
    clf = load_classifier(ModelSettings(), data_dir=tmp_path)
    assert clf.identity.demo and clf.engine.name == "onnxruntime"
    (onnx,) = (tmp_path / "model-cache").glob("dxnode-demo-*.onnx")
    meta = json.loads(onnx.with_suffix(".json").read_text())
    assert meta["onnx_sha256"] == sha256_file(onnx) and meta["weights_sha256"] == clf.manifest.weights_sha256
    first = onnx.stat().st_mtime_ns
    x = np.zeros((2, 3, 224, 224), np.float32)
    probs = clf.predict(x)
    assert load_classifier(ModelSettings(), data_dir=tmp_path).engine.name == "onnxruntime"
    assert onnx.stat().st_mtime_ns == first  # reused, not exported again
    onnx.write_bytes(onnx.read_bytes()[:-100])  # truncated
    with caplog.at_level(logging.WARNING, logger="dxnode.inference.engine"):
        again = load_classifier(ModelSettings(), data_dir=tmp_path)
    assert "does not match its checksum" in caplog.text
    assert json.loads(onnx.with_suffix(".json").read_text())["onnx_sha256"] == sha256_file(onnx)
    np.testing.assert_allclose(again.predict(x), probs, atol=1e-6)


def int8_against_fp32(root: Path) -> tuple[dict[str, Any], Path, Path]:
    """Train a small fp32 bundle on a synthetic set, quantise it, evaluate both on a separate
    held-out set: (metrics of the int8 bundle with "compare", fp32 bundle, int8 bundle).
    bench/infer.py reports the same figure."""
    data = make_dataset(root / "data", patients=60, seed=0)
    held_out = make_dataset(root / "held-out", patients=30, seed=11)
    fp32, int8 = root / "fp32", root / "int8"
    train = ["train", "--data", str(data), "--out", str(fp32), "--epochs", "6", "--input-size", "48"]
    assert main([*train, "--batch-size", "16", "--lr", "0.003", "--seed", "1", "--patience", "6"]) == 0
    quantize = ["model", "quantize", str(fp32), "--calibration", str(data), "--out", str(int8), "--max-images", "64"]
    assert main(quantize) == 0
    out = root / "ev"
    assert main(["evaluate", str(int8), "--data", str(held_out), "--out", str(out), "--compare", str(fp32)]) == 0
    return json.loads((out / "metrics.json").read_text()), fp32, int8


@pytest.mark.slow
def test_int8_bundle_keeps_auroc_within_0_01_of_fp32_on_a_held_out_set(tmp_path: Path) -> None:
    os.environ["TORCH_HOME"] = str(tmp_path / "torch-home")
    metrics, fp32, int8 = int8_against_fp32(tmp_path)
    assert load_manifest(fp32).onnx_sha256 == sha256_file(fp32 / "model.onnx")  # train writes it
    m = load_manifest(int8)
    assert m.version == "1.0.0-int8" and m.quantization["format"] == "QDQ"
    assert m.quantization["calibration"]["images"] == 64 and m.quantization["source"]["version"] == "1.0.0"
    assert (int8 / "model.onnx").stat().st_size < (fp32 / "model.onnx").stat().st_size / 3
    clf = load_classifier(ModelSettings(bundle=str(int8)))
    assert clf.engine.name == "onnxruntime" and "int8" in clf.engine_reason
    with pytest.raises(BundleError, match="int8"):
        load_classifier(ModelSettings(bundle=str(int8), engine="torch"))
    compare = metrics["compare"]
    assert set(compare["labels"]) == {"bar", "disc"}
    for label, c in compare["labels"].items():
        assert c["auroc"] > 0.8, (label, c)  # the fp32 model learned something
        assert c["auroc_diff"] == pytest.approx(metrics["labels"][label]["auroc"] - c["auroc"], abs=1e-5)
    assert abs(compare["mean_auroc_diff"]) <= 0.01, compare


def test_the_demo_onnx_graph_and_the_torch_demo_network_agree_on_real_images(tmp_path: Path) -> None:
    """The demo's ONNX graph is built from NumPy weights without torch; torch runs the same weights."""
    ort_clf = load_classifier(ModelSettings(device="cpu"), data_dir=tmp_path)
    torch_clf = load_classifier(ModelSettings(device="cpu", engine="torch"), data_dir=tmp_path)
    assert (ort_clf.engine.name, torch_clf.engine.name) == ("onnxruntime", "torch")
    assert ort_clf.identity == torch_clf.identity and ort_clf.identity.demo
    assert demo_manifest(demo_weights()).weights_sha256 == ort_clf.manifest.weights_sha256
    x = real_batch(ort_clf.manifest.preprocessing)
    p_ort, cam_ort = ort_clf.predict_with_cam(x)
    p_torch, cam_torch = torch_clf.predict_with_cam(x)
    assert p_ort.shape == (len(REAL), 5) and cam_ort.shape == (len(REAL), 5, 7, 7)
    np.testing.assert_allclose(p_ort, p_torch, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cam_ort, cam_torch, atol=1e-4 * float(np.abs(cam_torch).max()), rtol=0)
    assert p_ort.std() > 1e-3  # the inputs are told apart: not a constant network


def test_fc_weights_are_read_from_weights_pt_without_torch(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", size=32)
    reference = torch.load(bundle / "weights.pt", weights_only=True)
    ours = read_state_dict(bundle / "weights.pt")
    assert ours.keys() == reference.keys()
    for k, v in reference.items():
        np.testing.assert_array_equal(ours[k], v.numpy())
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": torch.nn.Linear(2, 2)}, other)  # a module, not a tensor
    with pytest.raises(Exception, match="not part of a state dict"):
        read_state_dict(other)
