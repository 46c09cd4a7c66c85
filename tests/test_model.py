"""Model bundles, inference, CAM = Grad-CAM, and `dxnode predict` / `dxnode model` on real files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import torch
import torchvision
from pydicom.data import get_testdata_file

from dxnode.analysis.predict import predict_file
from dxnode.config import ModelSettings, Settings
from dxnode.inference.bundle import BundleError, load_manifest, sha256_file, write_bundle
from dxnode.model import ModelRegistry, load_classifier
from dxnode.pipeline import Preprocessing, read_frames, to_tensor
from dxnode.results import Finding

DXNODE = str(Path(sys.executable).with_name("dxnode"))


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache: never the real one


def make_bundle(
    path: Path, labels: list[str] | None = None, task: str = "multilabel", seed: int = 1, size: int = 64
) -> tuple[Path, torch.nn.Module]:
    if labels is None:
        labels = ["effusion", "nodule"]
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=len(labels))
    write_bundle(
        path,
        net.state_dict(),
        name="test-net",
        version="2.1",
        labels=labels,
        task=task,
        thresholds=[0.5] * len(labels),
        preprocessing=Preprocessing(input_size=size),
    )
    return path, net.eval()


def test_bundle_loads_checks_its_checksum_and_matches_torchvision(tmp_path: Path) -> None:
    bundle, net = make_bundle(tmp_path / "b")
    m = load_manifest(bundle)
    assert m.weights_sha256 == sha256_file(bundle / "weights.pt") and m.labels == ["effusion", "nodule"]
    clf = load_classifier(ModelSettings(bundle=str(bundle), device="cpu"))
    assert clf.identity.name == "test-net" and not clf.identity.demo
    frame = read_frames(get_testdata_file("CT_small.dcm"), Settings().pipeline, m.preprocessing)[0]
    x = to_tensor(frame, m.preprocessing)[None]
    with torch.no_grad():
        direct = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(clf.predict(x), direct, atol=1e-6)


def test_tampered_weights_are_refused_naming_the_file(tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b")
    weights = bundle / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights\.pt does not match the manifest"):
        load_classifier(ModelSettings(bundle=str(bundle)))
    weights.unlink()
    with pytest.raises(BundleError, match=r"missing.*expected sha256"):
        load_classifier(ModelSettings(bundle=str(bundle)))


def test_without_bundle_or_imagenet_file_the_demo_model_says_so() -> None:
    registry = ModelRegistry()
    clf = registry.get(ModelSettings())
    assert clf.identity.demo and "UNTRAINED" in clf.manifest.description
    assert registry.get(ModelSettings()) is clf  # loaded once per registry (one per serving process)
    p1 = predict_file(Path(get_testdata_file("CT_small.dcm")), clf, Settings())
    fresh = ModelRegistry().get(ModelSettings())
    assert fresh is not clf
    p2 = predict_file(Path(get_testdata_file("CT_small.dcm")), fresh, Settings())
    assert [f.probability for f in p1.findings] == [f.probability for f in p2.findings]  # fixed seed


def test_imagenet_file_in_the_torch_hub_cache_is_offered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "torch-home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), ckpt / "resnet18-f37072fd.pth")
    with caplog.at_level(logging.WARNING):
        clf = load_classifier(ModelSettings())
    assert clf.manifest.task == "multiclass" and len(clf.manifest.labels) == 1000 and clf.manifest.labels[0] == "tench"
    assert not clf.identity.demo
    assert "does not start with torchvision's published" in caplog.text  # our stand-in file is not the real one
    pred = predict_file(Path(get_testdata_file("CT_small.dcm")), clf, Settings(), top_k=3)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match=r"broken\.pth is not torchvision's ResNet-18"):
        load_classifier(ModelSettings(imagenet_weights=str(broken)))
    assert len(pred.findings) == 3 and sum(f.positive for f in pred.findings) <= 1
    assert pred.findings[0].probability >= pred.findings[1].probability >= pred.findings[2].probability


def test_fc_cam_equals_backward_pass_grad_cam(tmp_path: Path) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    bundle, net = make_bundle(tmp_path / "b", labels=["a", "b", "c"], size=224)
    clf = load_classifier(ModelSettings(bundle=str(bundle), device="cpu"))
    prep = clf.manifest.preprocessing
    frame = read_frames(get_testdata_file("CT_small.dcm"), Settings().pipeline, prep)[0]
    x = to_tensor(frame, prep)[None]
    _, raw = clf.predict_with_cam(x)
    ref_net = torchvision.models.resnet18(num_classes=3)
    ref_net.load_state_dict(net.state_dict())
    ref_net.eval()
    for label in range(3):
        with GradCAM(model=ref_net, target_layers=[ref_net.layer4[-1]]) as cam:
            reference = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(label)])[0]
        # The library min-max normalises per layer after resizing, then again after averaging layers.
        ours = scale_cam_image(scale_cam_image(np.maximum(raw[:, label], 0), (224, 224)))[0]
        np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_every_bundled_pixel_file_predicts_or_gives_a_specific_reason(tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b", size=32)
    clf = load_classifier(ModelSettings(bundle=str(bundle)))
    outcomes = {}
    for f in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")):
        pred = predict_file(f, clf, Settings(), top_k=2)  # must never raise
        if pred.error is None:
            assert len(pred.findings) == 2 and all(0 <= x.probability <= 1 for x in pred.findings)
            assert pred.heatmap is not None and pred.heatmap.dtype == np.uint8
        else:
            assert len(pred.error) > 10 and "\n" not in pred.error.strip()
        outcomes[f.name] = pred.error
    assert sum(e is None for e in outcomes.values()) >= 45
    assert (
        outcomes["CT_small.dcm"] is None and outcomes["JPEG2000.dcm"] is None and outcomes["MR_small_RLE.dcm"] is None
    )
    assert outcomes["reportsi.dcm"] == "not an image: Structured Report"


def test_analyze_study_keeps_going_past_a_broken_instance(tmp_path: Path) -> None:
    from dxnode.analysis.streaming import analyze_study

    bundle, _ = make_bundle(tmp_path / "b", size=32)
    clf = load_classifier(ModelSettings(bundle=str(bundle)))
    good = Path(get_testdata_file("CT_small.dcm"))
    bad = Path(get_testdata_file("MR_truncated.dcm"))
    result = analyze_study(
        "1.2.3",
        [("1.1", good), ("1.2", bad), ("1.3", Path(get_testdata_file("reportsi.dcm")))],
        clf,
        Settings(),
        heatmap_for="all",
    )
    states = {o.sop_instance_uid: o.state for o in result.instances}
    assert states == {"1.1": "done", "1.2": "failed", "1.3": "skipped"}
    assert [f.label for f in result.findings] and all(isinstance(f, Finding) for f in result.findings)
    assert all(f.source_sop_instance_uid == "1.1" for f in result.findings)
    assert len(result.heatmaps) == 2 and result.heatmaps[0].overlay.shape == (128, 128, 3)
    assert result.heatmaps[0].cam.min() >= 0 and result.heatmaps[0].cam.max() <= 1


def test_a_registry_loads_each_model_once_and_keeps_its_decoding_threads(tmp_path: Path) -> None:
    from dxnode.analysis.streaming import analyze_study

    bundle, _ = make_bundle(tmp_path / "b", size=32)
    settings = ModelSettings(bundle=str(bundle), decode_threads=2)
    registry = ModelRegistry()
    clf = registry.get(settings)
    assert registry.get(settings) is clf and ModelRegistry().get(settings) is not clf
    pool = registry.decode_pool(2)
    assert registry.decode_pool(2) is pool
    study = [("1.1", Path(get_testdata_file("CT_small.dcm"))), ("1.2", Path(get_testdata_file("MR_small.dcm")))]
    shared = analyze_study("1.2.3", study, clf, Settings(), pool=pool)
    own = analyze_study("1.2.3", study, clf, Settings())  # threads of its own, stopped afterwards
    assert [(f.label, f.probability, f.source_sop_instance_uid) for f in shared.findings] == [
        (f.label, f.probability, f.source_sop_instance_uid) for f in own.findings
    ]
    registry.close()
    with pytest.raises(RuntimeError):
        pool.submit(print)
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "weights.pt"]  # no temporary file left


def test_predict_cli_json_contract_and_per_file_errors(tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b", size=32)
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    files = [get_testdata_file("CT_small.dcm"), str(not_image), get_testdata_file("reportsi.dcm")]
    out = subprocess.run(
        [DXNODE, "predict", *files, "--model", str(bundle), "--json", "--heatmap-dir", str(tmp_path / "h")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1  # some files failed
    rows = json.loads(out.stdout)
    assert [r["file"] for r in rows] == files
    ok, txt, sr = rows
    assert ok["error"] is None and ok["model"] == {"name": "test-net", "version": "2.1", "demo": False}
    assert [f["label"] for f in ok["findings"]] and ok["findings"][0]["probability"] >= ok["findings"][-1][
        "probability"
    ]
    assert Path(ok["heatmap"]).is_file() and Path(ok["heatmap"]).suffix == ".png"
    assert txt["error"] and txt["heatmap"] is None and sr["error"] == "not an image: Structured Report"
    human = subprocess.run(
        [DXNODE, "predict", files[0]],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TORCH_HOME": str(tmp_path / "th"), "PATH": "/usr/bin:/bin"},
    )
    assert human.returncode == 0 and "UNTRAINED DEMO" in human.stdout


def test_model_info_and_init_imagenet_cli(tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path / "b")
    info = subprocess.run([DXNODE, "model", "info", str(bundle), "--json"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and json.loads(info.stdout)["weights_check"] == "sha256 matches"
    (bundle / "weights.pt").write_bytes(b"tampered")
    bad = subprocess.run([DXNODE, "model", "info", str(bundle)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "weights.pt" in bad.stderr
    pth = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), pth)
    made = subprocess.run(
        [DXNODE, "model", "init-imagenet", str(tmp_path / "imagenet"), "--weights", str(pth)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    m = load_manifest(tmp_path / "imagenet")
    assert len(m.labels) == 1000 and m.preprocessing.resize == "center_crop" and m.task == "multiclass"
