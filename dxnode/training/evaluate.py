"""`dxnode evaluate`: per-label AUROC with bootstrap CI, operating-point metrics, tables and plots.

Metrics come from scikit-learn (roc_auc_score, roc_curve, calibration_curve). The table follows
the layout of the CheXNet paper's per-pathology AUROC table, with the operating point of the
bundle's threshold beside it. ``metrics.json`` has the layout ``{"mean_auroc": x, "labels":
{label: {"auroc", "auroc_ci", "sensitivity", "specificity", "ppv", "npv", "prevalence", "n",
"threshold"}}}``; `dxnode train` writes the same for its validation split into the bundle.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dxnode.states import Task

if TYPE_CHECKING:
    from dxnode.config import Settings
    from dxnode.model import Classifier
    from dxnode.training.dataset import Sample

BOOTSTRAP = 1000
# Fewer positives (or negatives) of a label than this in a split and its AUROC, CI and operating
# point say next to nothing (a handful of images easily give "AUROC 1.000 (1.000-1.000)").
MIN_PER_CLASS = 10


def _safe(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC, or nan when only one class is present."""
    # start-up time: sklearn loads only when this runs
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def bootstrap_ci(y: np.ndarray, p: np.ndarray, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the AUROC (resampling images)."""
    if n <= 0:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == 2:
            values.append(auroc(y[idx], p[idx]))
    if len(values) < n // 2:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on these scores, placed
    midway between the lowest score called positive and the next lower score."""
    # start-up time: sklearn loads only when this runs
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    # Every threshold in (next lower score, thr[best]] gives the same J here; the lowest positive
    # score itself (what roc_curve returns) leaves no margin on new images.
    high = min(float(thr[best]), 1.0)
    low = float(thr[best + 1]) if best + 1 < len(thr) else 0.0
    return float(min(max((high + low) / 2, 0.0), 1.0))


def sensitivity_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches the target."""
    positives = np.sort(p[y > 0.5])[::-1]
    if len(positives) == 0:
        return 0.5
    k = max(0, math.ceil(target * len(positives)) - 1)
    return float(positives[min(k, len(positives) - 1)])


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    thresholds: list[float],
    seed: int = 0,
    bootstrap: int = BOOTSTRAP,
    task: Task = Task.MULTILABEL,
) -> dict[str, Any]:
    """Per-label and mean metrics in the metrics.json layout; the operating point is the node's call."""
    out: dict[str, Any] = {"labels": {}}
    aucs = []
    # start-up time: loaded only when this runs
    from dxnode.model import positive_call

    called = positive_call(probs, thresholds, task)
    for j, label in enumerate(labels):
        y, p, t = y_true[:, j] > 0.5, probs[:, j], thresholds[j]
        pred = called[:, j]
        tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
        fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
        a = auroc(y.astype(int), p)
        ci = bootstrap_ci(y.astype(int), p, bootstrap, seed) if not math.isnan(a) else None
        if not math.isnan(a):
            aucs.append(a)
        div = lambda n, d: _safe(n / d) if d else None  # noqa: E731
        out["labels"][label] = {
            "auroc": _safe(a),
            "auroc_ci": [round(ci[0], 6), round(ci[1], 6)] if ci else None,
            "sensitivity": div(tp, tp + fn),
            "specificity": div(tn, tn + fp),
            "ppv": div(tp, tp + fp),
            "npv": div(tn, tn + fn),
            "prevalence": div(tp + fn, len(y)),
            "n": len(y),
            "positives": tp + fn,
            "threshold": round(float(t), 6),
        }
    out["mean_auroc"] = _safe(float(np.mean(aucs))) if aucs else None
    out["warnings"] = small_split_warnings(out)
    return out


def small_split_warnings(metrics: dict[str, Any], min_per_class: int = MIN_PER_CLASS) -> list[str]:
    """One line per label with too few positive or negative images for its metrics to mean anything."""
    lines = []
    for label, m in metrics["labels"].items():
        n = int(m.get("n") or 0)
        pos = m.get("positives")
        pos = int(pos) if pos is not None else round((m.get("prevalence") or 0.0) * n)
        if pos < min_per_class or n - pos < min_per_class:
            lines.append(
                f"{label}: {pos} positive and {n - pos} negative images (fewer than {min_per_class} of either): "
                "its AUROC, CI and operating point mean little"
            )
    return lines


def table(metrics: dict[str, Any]) -> str:
    """CheXNet-style per-pathology table with the operating point of the threshold."""
    lines = [
        f"{'Pathology':<24} {'AUROC':>6} {'95% CI':>15} {'Sens':>6} {'Spec':>6} {'PPV':>6} {'NPV':>6} {'Prev':>6} {'n':>6}"
    ]
    fmt = lambda v: f"{v:6.3f}" if isinstance(v, float) else f"{'-':>6}"  # noqa: E731
    for label, m in metrics["labels"].items():
        ci = f"({m['auroc_ci'][0]:.3f}-{m['auroc_ci'][1]:.3f})" if m["auroc_ci"] else "-"
        lines.append(
            f"{label[:24]:<24} {fmt(m['auroc'])} {ci:>15} {fmt(m['sensitivity'])} {fmt(m['specificity'])} {fmt(m['ppv'])} "
            f"{fmt(m['npv'])} {fmt(m['prevalence'])} {m['n']:>6}"
        )
    mean = metrics["mean_auroc"]
    lines.append(f"{'Mean AUROC':<24} {fmt(mean)}")
    return "\n".join(lines)


def roc_plot(y_true: np.ndarray, probs: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    """ROC curve per label in one PNG."""
    # start-up time: matplotlib loads only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # start-up time: matplotlib loads only when this runs
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    for j, label in enumerate(labels):
        y = y_true[:, j] > 0.5
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, probs[:, j])
            ax.plot(fpr, tpr, label=f"{label} (AUROC {auroc(y.astype(int), probs[:, j]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def calibration_plot(y_true: np.ndarray, probs: np.ndarray, labels: list[str], path: Path) -> None:
    """Reliability diagram per label (10 quantile bins)."""
    # start-up time: matplotlib loads only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # start-up time: matplotlib loads only when this runs
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    for j, label in enumerate(labels):
        y = y_true[:, j] > 0.5
        if len(np.unique(y)) == 2:
            frac, mean = calibration_curve(y, probs[:, j], n_bins=min(10, max(2, len(y) // 10)), strategy="quantile")
            ax.plot(mean, frac, "o-", label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(
        xlabel="mean predicted probability", ylabel="fraction positive", title="Calibration", xlim=(0, 1), ylim=(0, 1)
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def predict_samples(
    classifier: Classifier, samples: list[Sample], settings: Settings
) -> tuple[np.ndarray, list[Sample]]:
    """Probabilities of each sample as the node computes them (dxnode.analysis.predict.predict_file); failures left out."""
    # start-up time: loaded only when this runs
    from dxnode.analysis.predict import predict_file

    labels = classifier.manifest.labels
    rows, kept = [], []
    for s in samples:
        pred = predict_file(s.path, classifier, settings)
        if pred.error:
            print(f"skipped {s.path}: {pred.error}")
            continue
        by_label = {f.label: f.probability for f in pred.findings}
        rows.append([by_label[lab] for lab in labels])
        kept.append(s)
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(labels)), kept


def write_report(
    out: Path, metrics: dict[str, Any], y: np.ndarray, probs: np.ndarray, labels: list[str], title: str
) -> None:
    """metrics.json, metrics.csv, roc.png and calibration.png in out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "label",
                "auroc",
                "auroc_ci_low",
                "auroc_ci_high",
                "sensitivity",
                "specificity",
                "ppv",
                "npv",
                "prevalence",
                "n",
                "threshold",
            ]
        )
        for label, m in metrics["labels"].items():
            ci = m["auroc_ci"] or [None, None]
            w.writerow(
                [
                    label,
                    m["auroc"],
                    ci[0],
                    ci[1],
                    m["sensitivity"],
                    m["specificity"],
                    m["ppv"],
                    m["npv"],
                    m["prevalence"],
                    m["n"],
                    m["threshold"],
                ]
            )
        w.writerow(["mean", metrics["mean_auroc"]])
    roc_plot(y, probs, labels, out / "roc.png", title)
    calibration_plot(y, probs, labels, out / "calibration.png")


def evaluate(
    bundle: Path,
    data: Path,
    out: Path,
    settings: Settings,
    images: Path | None = None,
    split: str | None = None,
    seed: int = 0,
    compare: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a bundle on a labelled CSV (optionally one split of the bundle's splits.csv), and
    optionally a second bundle on the same images (metrics["compare"]: its AUROC and the difference)."""
    # start-up time: loaded only when this runs
    from dxnode.model import load_classifier
    from dxnode.training.dataset import read_table

    classifier = load_classifier(settings.model, bundle, settings.data_dir)
    table_ = read_table(data, images)
    for line in table_.unreadable:
        print(f"left out {line}")
    samples = table_.samples
    if split:
        chosen = _split_members(Path(bundle) / "splits.csv", split)
        samples = [s for s in samples if str(s.path.resolve()) in chosen]
        if not samples:
            raise ValueError(f"no sample of {data} is in the {split!r} split of {bundle}/splits.csv")
    labels = classifier.manifest.labels
    order = label_columns(table_.labels, labels, _labels_from_values(Path(data)), data)
    probs, kept = predict_samples(classifier, samples, settings)
    y = np.asarray([[s.labels[k] if k >= 0 else 0.0 for k in order] for s in kept], dtype=np.float64).reshape(
        -1, len(labels)
    )
    metrics = compute_metrics(y, probs, labels, classifier.manifest.thresholds, seed, task=classifier.manifest.task)
    metrics["model"] = {
        "name": classifier.manifest.name,
        "version": classifier.manifest.version,
        "sha256": classifier.manifest.weights_sha256,
    }
    metrics["data"] = {"csv": str(data), "split": split or "all", "n": len(kept)}
    if compare is not None:
        metrics["compare"] = compare_bundles(
            load_classifier(settings.model, compare, settings.data_dir), compare, kept, y, probs, metrics, settings
        )
    write_report(Path(out), metrics, y, probs, labels, f"{classifier.manifest.name} {classifier.manifest.version}")
    return metrics


def compare_bundles(
    other: Any, path: Path, samples: list[Any], y: np.ndarray, probs: np.ndarray, metrics: dict[str, Any], settings: Any
) -> dict[str, Any]:
    """The other bundle's AUROC per label on the same images, and this bundle's AUROC minus it."""
    labels = list(metrics["labels"])
    if other.manifest.labels != labels:
        raise ValueError(f"--compare {path}: its labels {other.manifest.labels} are not {labels}")
    ref, kept = predict_samples(other, samples, settings)
    if len(kept) != len(samples):
        raise ValueError(f"--compare {path}: {len(samples) - len(kept)} images failed with it but not with the bundle")
    out: dict[str, Any] = {
        "bundle": str(path),
        "model": {"name": other.manifest.name, "version": other.manifest.version},
    }
    out["labels"] = {}
    diffs = []
    for j, label in enumerate(labels):
        a = auroc((y[:, j] > 0.5).astype(int), ref[:, j])
        ours = metrics["labels"][label]["auroc"]
        diff = None if math.isnan(a) or ours is None else ours - a
        if diff is not None:
            diffs.append(diff)
        out["labels"][label] = {
            "auroc": _safe(a),
            "auroc_diff": (_safe(diff) or 0.0) if diff is not None else None,  # never -0.0
            "max_probability_diff": _safe(float(np.abs(probs[:, j] - ref[:, j]).max())) if len(ref) else None,
        }
    out["mean_auroc_diff"] = _safe(float(np.mean(diffs))) if diffs else None
    out["max_abs_auroc_diff"] = _safe(float(np.max(np.abs(diffs)))) if diffs else None
    return out


def compare_table(metrics: dict[str, Any]) -> str:
    """Per-label AUROC of the compared bundle and the difference (this bundle minus it)."""
    c = metrics["compare"]
    lines = [f"compared with {c['model']['name']} {c['model']['version']} ({c['bundle']}) on the same images:"]
    lines.append(f"{'Pathology':<24} {'AUROC':>6} {'other':>6} {'diff':>8} {'max |dp|':>9}")
    num = lambda v, spec, w: f"{v:{spec}}" if isinstance(v, float) else f"{'-':>{w}}"  # noqa: E731
    for label, m in c["labels"].items():
        lines.append(
            f"{label[:24]:<24} {num(metrics['labels'][label]['auroc'], '6.3f', 6)} {num(m['auroc'], '6.3f', 6)} "
            f"{num(m['auroc_diff'], '+8.4f', 8)} {num(m['max_probability_diff'], '9.4f', 9)}"
        )
    lines.append(f"{'Mean AUROC difference':<24} {'':>6} {'':>6} {num(c['mean_auroc_diff'], '+8.4f', 8)}")
    return "\n".join(lines)


def label_columns(csv_labels: list[str], bundle_labels: list[str], from_values: bool, data: Path) -> list[int]:
    """For each bundle label, its index in the CSV's label vector (-1: never named, so negative).

    A CSV whose labels come from values (ChestX-ray14 Finding Labels, generic labels/label) names
    only the labels present; one with a column per label must have every column.
    """
    unknown = [lab for lab in csv_labels if lab not in bundle_labels]
    missing = [lab for lab in bundle_labels if lab not in csv_labels]
    if unknown or (missing and not from_values):
        raise ValueError(
            f"labels of {data} {csv_labels} do not match the bundle's {bundle_labels}"
            + (f": unknown {unknown}" if unknown else "")
            + (f": no column for {missing}" if missing and not from_values else "")
        )
    return [csv_labels.index(lab) if lab in csv_labels else -1 for lab in bundle_labels]


def _labels_from_values(csv_path: Path) -> bool:
    """True when the CSV's labels are values of one column rather than one column each."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return bool({"Finding Labels", "labels", "label"} & set(header))


def _split_members(path: Path, split: str) -> set[str]:
    if not path.is_file():
        raise ValueError(f"{path} not found: --split needs a bundle written by `dxnode train`")
    with open(path, newline="") as f:
        return {r["path"] for r in csv.DictReader(f) if r["split"] == split}
