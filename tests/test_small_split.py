"""Metrics on a handful of images come with a warning, and train's closing hint is an absolute path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_train import make_dataset

from dxnode.cli import main
from dxnode.training.evaluate import MIN_PER_CLASS, compute_metrics, small_split_warnings


def test_too_few_positives_or_negatives_per_label_are_named() -> None:
    rng = np.random.default_rng(0)
    y = np.array([[1, 0], [0, 1], [1, 0], [0, 0], [1, 1]], dtype=float)  # a perfect score, meaningless
    m = compute_metrics(y, y * 0.8 + 0.1, ["a", "b"], [0.5, 0.5], bootstrap=50)
    assert m["labels"]["a"]["auroc"] == 1.0
    assert m["warnings"] == small_split_warnings(m)
    assert [w.split(":")[0] for w in m["warnings"]] == ["a", "b"]
    assert m["warnings"][0].startswith("a: 3 positive and 2 negative images (fewer than 10 of either)")
    n = 4 * MIN_PER_CLASS
    y = np.zeros((n, 1))
    y[: n // 2] = 1
    m = compute_metrics(y, rng.random((n, 1)), ["c"], [0.5], bootstrap=0)
    assert m["warnings"] == []
    y[: n - MIN_PER_CLASS + 1] = 1  # one negative short
    assert len(small_split_warnings(compute_metrics(y, rng.random((n, 1)), ["c"], [0.5], bootstrap=0))) == 1


@pytest.mark.timeout(900)
def test_train_on_a_handful_warns_and_prints_an_absolute_bundle_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no ImageNet file: from scratch
    data = make_dataset(tmp_path / "data", patients=8)
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", str(data), "--out", "bundles/tiny", "--input-size", "32", "--epochs", "1"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    bundle = tmp_path / "bundles" / "tiny"
    assert f"[model] bundle = {json.dumps(str(bundle))}" in out
    assert "dxnode train: warning: the validation split is too small for these metrics to mean much" in err
    assert re.search(r"^  (bar|disc): \d+ positive and \d+ negative images", err, re.M), err
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["warnings"]
