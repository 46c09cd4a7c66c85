"""A runtime-only install (no dxnode[train]): the node serves, predicts and explains itself without torch.

Each check runs dxnode in a subprocess whose import system refuses torch, torchvision, sklearn,
matplotlib and tqdm, as an install without the extra would (scripts/runtime-smoke does the same
with a real runtime-only environment and a study received end to end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from pydicom.data import get_testdata_file

from dxnode.inference.bundle import write_bundle
from dxnode.inference.engine import export_bundle
from dxnode.pipeline import Preprocessing

BLOCK = """
import sys
class NoTrainExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "torchvision", "sklearn", "matplotlib", "tqdm", "onnxscript"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTrainExtra())
"""


def runtime_only(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a Python that cannot import the training extra, from tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DXNODE_")}
    env["TORCH_HOME"] = str(tmp_path / "torch-home")
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def dxnode(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`dxnode argv` without the training extra."""
    return runtime_only(tmp_path, f"from dxnode.cli import main; sys.exit(main({list(argv)!r}))")


def make_bundle(path: Path, onnx: bool) -> Path:
    torch.manual_seed(3)
    write_bundle(
        path,
        torchvision.models.resnet18(num_classes=2).state_dict(),
        name="rt-net",
        version="1.0",
        labels=["a", "b"],
        task="multilabel",
        thresholds=[0.5, 0.5],
        preprocessing=Preprocessing(input_size=64),
    )
    if onnx:
        export_bundle(path)
    return path


def test_the_node_imports_without_the_training_extra(tmp_path: Path) -> None:
    r = runtime_only(
        tmp_path,
        "import dxnode.cli, dxnode.daemon, dxnode.model, dxnode.web.app, dxnode.outputs.report, dxnode.training.dataset\n"
        "dxnode.cli.build_parser()\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'sklearn', 'matplotlib') if m in sys.modules))",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_demo_model_and_an_exported_bundle_predict_without_torch(tmp_path: Path) -> None:
    ct = get_testdata_file("CT_small.dcm")
    demo = dxnode(tmp_path, "predict", ct, "--json", "--heatmap-dir", str(tmp_path / "heat"))
    assert demo.returncode == 0, demo.stderr
    (result,) = json.loads(demo.stdout)
    assert result["error"] is None and result["model"]["demo"] and len(result["findings"]) == 3
    assert result["heatmap"] and Path(result["heatmap"]).stat().st_size > 0
    assert "engine onnxruntime" in demo.stderr and list((tmp_path / "var" / "model-cache").glob("*.onnx"))
    # a bundle with model.onnx: the same probabilities as the full install gives
    bundle = make_bundle(tmp_path / "b", onnx=True)
    ran = dxnode(tmp_path, "predict", ct, "--json", "--model", str(bundle))
    assert ran.returncode == 0, ran.stderr
    full = subprocess.run(
        [str(Path(sys.executable).with_name("dxnode")), "predict", ct, "--json", "--model", str(bundle)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TORCH_HOME=str(tmp_path / "torch-home")),
    )
    assert full.returncode == 0, full.stderr
    probs = [[f["probability"] for f in json.loads(out)[0]["findings"]] for out in (ran.stdout, full.stdout)]
    assert probs[0] == pytest.approx(probs[1], abs=1e-6)


def test_what_needs_the_training_extra_says_so_in_one_line(tmp_path: Path) -> None:
    old = make_bundle(tmp_path / "old", onnx=False)  # no model.onnx: only torch could run it
    info = dxnode(tmp_path, "model", "info", str(old))
    assert info.returncode == 1
    (line,) = info.stderr.strip().splitlines()
    assert "pip install 'dxnode[train]'" in line and f"dxnode model export {old}" in line
    cases = [
        ("train", "--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "out")),
        ("evaluate", str(old), "--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "ev")),
        ("model", "export", str(old)),
        ("model", "init-imagenet", str(tmp_path / "imagenet")),
    ]
    for argv in cases:
        r = dxnode(tmp_path, *argv)
        assert r.returncode == 1, (argv, r.stderr)
        (line,) = r.stderr.strip().splitlines()
        assert "pip install 'dxnode[train]'" in line, (argv, line)
    env_torch = runtime_only(
        tmp_path,
        "import os; os.environ['DXNODE_MODEL__ENGINE'] = 'torch'\n"
        f"from dxnode.cli import main; sys.exit(main(['predict', {get_testdata_file('CT_small.dcm')!r}]))",
    )
    assert env_torch.returncode != 0 and "[model] engine = 'torch' needs PyTorch" in env_torch.stderr
    pth = tmp_path / "resnet18-f37072fd.pth"
    pth.write_bytes(b"stand-in")
    imagenet = runtime_only(
        tmp_path,
        f"import os; os.environ['DXNODE_MODEL__IMAGENET_WEIGHTS'] = {str(pth)!r}\n"
        "from dxnode.cli import main; sys.exit(main(['model', 'info']))",
    )
    assert imagenet.returncode == 1
    (line,) = imagenet.stderr.strip().splitlines()
    assert "ImageNet weights file" in line and "pip install 'dxnode[train]'" in line


def test_the_attention_region_is_scipys_connected_component_without_scipy() -> None:
    """attention.connected_region (NumPy, for the runtime install) labels as scipy.ndimage.label does."""
    from scipy import ndimage  # the test environment has dxnode[train] (scipy comes with scikit-learn)

    from dxnode.outputs.attention import connected_region

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        if not mask.any():
            continue
        cells = np.argwhere(mask)
        seed = tuple(int(v) for v in cells[rng.integers(len(cells))])
        labels, _ = ndimage.label(mask)
        np.testing.assert_array_equal(connected_region(mask, seed), labels == labels[seed])
