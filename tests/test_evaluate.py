"""dxnode.training.evaluate: metrics against scikit-learn, threshold rules, multiclass calls, the evaluate CLI on an untrained bundle."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from test_train import make_dataset

from dxnode.analysis.predict import predict_file
from dxnode.cli import main
from dxnode.config import ModelSettings, Settings
from dxnode.inference.bundle import resnet18, write_bundle
from dxnode.model import load_classifier
from dxnode.pipeline import Preprocessing
from dxnode.training.evaluate import (
    bootstrap_ci,
    compute_metrics,
    label_columns,
    sensitivity_threshold,
    table,
    write_report,
    youden_threshold,
)


def _scores(n: int = 300, labels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with prevalence 10-50% and scores that separate them imperfectly."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < np.linspace(0.1, 0.5, labels)).astype(float)
    p = 1 / (1 + np.exp(-(2.0 * y - 1 + rng.normal(0, 1.2, y.shape))))
    return y, p


def test_metrics_agree_with_sklearn_at_the_threshold() -> None:
    y, p = _scores()
    labels, thresholds = ["a", "b", "c"], [0.3, 0.5, 0.62]
    m = compute_metrics(y, p, labels, thresholds, seed=1, bootstrap=200)
    aucs = []
    for j, label in enumerate(labels):
        tn, fp, fn, tp = confusion_matrix(y[:, j], p[:, j] >= thresholds[j]).ravel()
        got = m["labels"][label]
        aucs.append(roc_auc_score(y[:, j], p[:, j]))
        assert got["auroc"] == pytest.approx(aucs[-1], abs=1e-6)
        assert got["sensitivity"] == pytest.approx(tp / (tp + fn), abs=1e-6)
        assert got["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-6)
        assert got["ppv"] == pytest.approx(tp / (tp + fp), abs=1e-6)
        assert got["npv"] == pytest.approx(tn / (tn + fn), abs=1e-6)
        assert got["prevalence"] == pytest.approx(y[:, j].mean(), abs=1e-6)
        assert (got["n"], got["positives"], got["threshold"]) == (300, int(y[:, j].sum()), thresholds[j])
        lo, hi = got["auroc_ci"]
        assert lo < got["auroc"] < hi and hi - lo < 0.3
    assert m["mean_auroc"] == pytest.approx(np.mean(aucs), abs=1e-6)


def test_bootstrap_ci_is_seeded_and_narrows_with_more_images() -> None:
    y, p = _scores(n=100)
    assert bootstrap_ci(y[:, 2], p[:, 2], 200, seed=3) == bootstrap_ci(y[:, 2], p[:, 2], 200, seed=3)
    assert bootstrap_ci(y[:, 2], p[:, 2], 200, seed=3) != bootstrap_ci(y[:, 2], p[:, 2], 200, seed=4)
    y_big, p_big = _scores(n=1500)
    small, big = bootstrap_ci(y[:, 2], p[:, 2], 200), bootstrap_ci(y_big[:, 2], p_big[:, 2], 200)
    assert big[1] - big[0] < small[1] - small[0]
    assert bootstrap_ci(y[:, 2], p[:, 2], 0) is None


def test_a_label_without_positives_has_no_auroc_and_stays_out_of_the_mean() -> None:
    y, p = _scores()
    y[:, 1] = 0
    m = compute_metrics(y, p, ["a", "b", "c"], [0.5] * 3, bootstrap=50)
    assert (
        m["labels"]["b"]["auroc"] is None
        and m["labels"]["b"]["auroc_ci"] is None
        and m["labels"]["b"]["sensitivity"] is None
    )
    assert m["mean_auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in (0, 2)]), abs=1e-6)
    text = table(m)
    assert text.splitlines()[0].split()[:3] == ["Pathology", "AUROC", "95%"]
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["a", "b", "c", "Mean"]


def test_youden_threshold_maximises_j() -> None:
    y, p = _scores(seed=5)
    for j in range(3):
        t = youden_threshold(y[:, j], p[:, j])
        fpr, tpr, _ = roc_curve(y[:, j], p[:, j])
        pred = p[:, j] >= t
        j_at_t = pred[y[:, j] > 0].mean() - pred[y[:, j] == 0].mean()
        assert j_at_t == pytest.approx((tpr - fpr).max(), abs=1e-9)


def test_youden_threshold_on_separable_scores_sits_in_the_gap() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.1, 0.3, 0.9, 0.95, 0.999])
    assert youden_threshold(y, p) == pytest.approx(0.6)  # midway between 0.3 and 0.9, not 0.9 itself
    assert youden_threshold(np.zeros(4), np.linspace(0, 1, 4)) == 0.5  # one class: no ROC


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_sensitivity_threshold_is_the_highest_that_reaches_the_target(target: float) -> None:
    y, p = _scores(seed=6)
    y, p = y[:, 1], p[:, 1]
    t = sensitivity_threshold(y, p, target)
    assert (p[y > 0] >= t).mean() >= target
    higher = np.unique(p[p > t])
    assert not len(higher) or (p[y > 0] >= higher[0]).mean() < target


def test_multiclass_operating_point_is_the_top_class() -> None:
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, 200)
    logits = rng.normal(0, 1, (200, 3))
    logits[np.arange(200), truth] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.eye(3)[truth]
    m = compute_metrics(y, probs, ["MEL", "NV", "BCC"], [0.0] * 3, bootstrap=0, task="multiclass")
    called = probs.argmax(axis=1)
    for j, label in enumerate(["MEL", "NV", "BCC"]):
        tn, fp, fn, tp = confusion_matrix(truth == j, called == j).ravel()
        assert m["labels"][label]["sensitivity"] == pytest.approx(tp / (tp + fn), abs=1e-6)
        assert m["labels"][label]["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-6)
        assert m["labels"][label]["specificity"] > 0.5


def test_write_report_files(tmp_path: Path) -> None:
    y, p = _scores()
    m = compute_metrics(y, p, ["a", "b", "c"], [0.5] * 3, bootstrap=50)
    write_report(tmp_path / "r", m, y, p, ["a", "b", "c"], "test")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == m
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows] == ["label", "a", "b", "c", "mean"] and float(rows[1][1]) == m["labels"]["a"]["auroc"]
    for name in ("roc.png", "calibration.png"):
        assert (tmp_path / "r" / name).read_bytes()[:4] == b"\x89PNG"


def test_label_columns() -> None:
    assert label_columns(["disc", "bar"], ["bar", "disc"], False, Path("x.csv")) == [1, 0]
    assert label_columns(["disc"], ["bar", "disc"], True, Path("x.csv")) == [-1, 0]
    with pytest.raises(ValueError, match="no column for \\['bar'\\]"):
        label_columns(["disc"], ["bar", "disc"], False, Path("x.csv"))
    with pytest.raises(ValueError, match="unknown \\['mass'\\]"):
        label_columns(["disc", "mass"], ["bar", "disc"], True, Path("x.csv"))


@pytest.fixture(scope="module")
def untrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random-weight bundle for labels bar/disc and a small labelled DICOM set."""
    root = tmp_path_factory.mktemp("ev")
    torch.manual_seed(0)
    write_bundle(
        root / "bundle",
        resnet18(2).state_dict(),
        name="random",
        version="0",
        labels=["bar", "disc"],
        task="multilabel",
        thresholds=[0.45, 0.55],
        preprocessing=Preprocessing(input_size=32),
    )
    return root / "bundle", make_dataset(root / "data", patients=15, seed=2)


def test_evaluate_cli_matches_predict_and_sklearn(
    untrained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, data = untrained
    assert main(["evaluate", str(bundle), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert "left out" in printed and "broken.dcm" in printed  # the unreadable row, in one line
    assert "Pathology" in printed and "Mean AUROC" in printed
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["data"]["n"] == 30 and m["model"]["name"] == "random"
    clf = load_classifier(ModelSettings(bundle=str(bundle)))
    images = sorted(data.parent.glob("p*.dcm"))
    with open(data, newline="") as f:
        truth = {r["path"]: r for r in csv.DictReader(f)}
    for label, t in (("bar", 0.45), ("disc", 0.55)):
        y = np.array([int(truth[i.name][label]) for i in images])
        p = np.array(
            [next(f.probability for f in predict_file(i, clf, Settings()).findings if f.label == label) for i in images]
        )
        assert m["labels"][label]["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        tn, fp, fn, tp = confusion_matrix(y, p >= t, labels=[0, 1]).ravel()
        assert m["labels"][label]["sensitivity"] == (pytest.approx(tp / (tp + fn), abs=1e-6) if tp + fn else None)
        assert m["labels"][label]["specificity"] == (pytest.approx(tn / (tn + fp), abs=1e-6) if tn + fp else None)


def test_evaluate_subset_csv_naming_only_some_labels(untrained: tuple[Path, Path], tmp_path: Path) -> None:
    """A ChestX-ray14-style subset where one bundle label never occurs: that label is all negative."""
    bundle, data = untrained
    with open(data, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["path"] != "broken.dcm"]
    (tmp_path / "sub.csv").write_text(
        "path,patient_id,labels\n"
        + "".join(f"{data.parent / r['path']},{r['patient_id']},{'disc' if r['disc'] == '1' else ''}\n" for r in rows)
    )
    assert main(["evaluate", str(bundle), "--data", str(tmp_path / "sub.csv"), "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["labels"]["bar"]["positives"] == 0 and m["labels"]["bar"]["auroc"] is None
    assert m["labels"]["disc"]["positives"] == sum(r["disc"] == "1" for r in rows)


def test_evaluate_bad_input_is_a_clear_error(
    untrained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, data = untrained
    assert main(["evaluate", str(bundle), "--data", str(data), "--out", str(tmp_path / "a"), "--split", "test"]) == 2
    assert "splits.csv not found" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("path,patient_id,mass\n" + f"{data.parent / 'p000_0.dcm'},P1,1\n")
    assert main(["evaluate", str(bundle), "--data", str(tmp_path / "other.csv"), "--out", str(tmp_path / "b")]) == 2
    assert "do not match the bundle" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nobundle"), "--data", str(data), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith("dxnode evaluate:")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_building_the_cli_parser_imports_no_torch_sklearn_or_matplotlib() -> None:
    """dxnode.training.train / dxnode.training.evaluate add their options at parser build time; `dxnode --help` must stay fast."""
    code = "import sys, dxnode.cli; dxnode.cli.build_parser(); print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip() == "[]"
