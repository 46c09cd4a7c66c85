"""`dxnode train`: fine-tune ResNet-18 on labelled images and write a model bundle the node serves.

Start from torchvision's ImageNet weights file when it is on disk (``--imagenet-weights`` or
``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth``; never downloaded), else from scratch with
a warning. The data is split by patient (dxnode.training.dataset), images go through the inference
pipeline (no train/serve skew), the loss is BCE with per-label pos_weight or focal loss, the
optimiser AdamW/Adam with a cosine schedule; the checkpoint kept is the one with the lowest
validation loss, and training stops early when that stops improving. Every epoch is checkpointed (``--resume`` continues). Per-label thresholds
are chosen on the validation split by Youden's J (default) or a target sensitivity. The manifest
says what the model is for (intended_use): the modalities and body parts of the training DICOM
files, or ``--intended-modalities`` / ``--intended-body-parts`` where given.

This module imports torch and friends inside functions, so `dxnode --help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dxnode.states import Task
from dxnode.training.options import IMAGENET, SCRATCH, TrainOptions

if TYPE_CHECKING:
    from dxnode.config import Settings
    from dxnode.inference.intended import IntendedUse
    from dxnode.pipeline import Preprocessing
    from dxnode.training.dataset import Sample, Table
    from dxnode.training.loop import Trainer

log = logging.getLogger("dxnode.training.train")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `dxnode train`."""
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="labelled CSV (generic, ChestX-ray14 Data_Entry_2017.csv or ISIC ground truth)",
    )
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--images", type=Path, help="image folder (default: the CSV's folder)")
    p.add_argument("--name", default="", help="model name in the manifest (default: the bundle folder's name)")
    p.add_argument("--version", default="1.0.0", help="model version in the manifest (default 1.0.0)")
    p.add_argument("--epochs", type=int, default=20, help="at most this many epochs (default 20)")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"images per step (default {SCRATCH['batch_size']} from scratch, {IMAGENET['batch_size']} from ImageNet weights)",
    )
    p.add_argument(
        "--lr",
        type=float,
        help=f"peak learning rate of the cosine schedule (default {SCRATCH['lr']:g} from scratch, {IMAGENET['lr']:g} from ImageNet weights)",
    )
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw", help="default adamw")
    p.add_argument(
        "--loss",
        choices=["bce", "focal"],
        default="bce",
        help="BCE with per-label pos_weight, or focal loss (gamma 2) (default bce)",
    )
    p.add_argument(
        "--input-size", type=int, default=224, help="model input size (default 224; e.g. 64 for quick CPU runs)"
    )
    p.add_argument("--resize", choices=["letterbox", "center_crop"], default="letterbox", help="default letterbox")
    p.add_argument(
        "--freeze-epochs", type=int, default=0, help="train only fc for this many epochs, then everything (default 0)"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop after this many epochs without a lower validation loss, the checkpoint criterion (default 5)",
    )
    p.add_argument("--threshold-rule", choices=["youden", "sensitivity"], default="youden", help="default youden")
    p.add_argument("--target-sensitivity", type=float, default=0.9, help="default 0.9")
    p.add_argument("--val-fraction", type=float, default=0.15, help="patients held out for validation (default 0.15)")
    p.add_argument("--test-fraction", type=float, default=0.15, help="patients held out for testing (default 0.15)")
    p.add_argument(
        "--hflip", action="store_true", help="also augment with horizontal flips (off by default: laterality matters)"
    )
    p.add_argument("--no-augment", action="store_true", help="train on the inference input as is (no augmentation)")
    p.add_argument(
        "--imagenet-weights", type=Path, help="resnet18-f37072fd.pth (default: the torch hub cache, if it has it)"
    )
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", default="", help="cpu, cuda, auto (default: [model] device)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument(
        "--intended-modalities",
        metavar="LIST",
        help="modalities the model is for, e.g. CR,DX (default: those of the training DICOM files; '' = any)",
    )
    p.add_argument(
        "--intended-body-parts",
        metavar="LIST",
        help="body parts the model is for, e.g. CHEST (default: those of the training DICOM files; '' = any)",
    )


def intended_use_of(
    samples: list[Sample], modalities: str | None = None, body_parts: str | None = None, data_format: str = ""
) -> tuple[IntendedUse | None, str]:
    """What a model trained on these samples is for: the Modality and BodyPartExamined values of the
    DICOM files among them (ChestX-ray14 PNGs: DX/CR CHEST), each replaced by its flag where given
    (a comma-separated list, "" = any). Returns the declaration (None: any image) and where it came from."""
    # start-up time: loaded only when this runs
    import pydicom
    from pydicom.errors import InvalidDicomError

    from dxnode.inference.intended import IntendedUse, split_list
    from dxnode.pipeline import is_image_file

    found: tuple[set[str], set[str]] = (set(), set())
    dicom = 0
    for sample in samples if modalities is None or body_parts is None else []:
        try:
            if is_image_file(sample.path):
                continue
            ds = pydicom.dcmread(sample.path, stop_before_pixels=True, specific_tags=["Modality", "BodyPartExamined"])
        except (InvalidDicomError, OSError, ValueError):
            continue
        dicom += 1
        for value, into in zip((ds.get("Modality"), ds.get("BodyPartExamined")), found, strict=True):
            if str(value or "").strip():
                into.add(str(value).strip().upper())
    source = f"the modalities and body parts of {dicom} DICOM training file(s)"
    if not dicom and data_format == "chestxray14":  # frontal chest radiographs (PA/AP), shipped as PNG
        found, source = ({"CR", "DX"}, {"CHEST"}), "ChestX-ray14: chest radiographs"
    if modalities is not None or body_parts is not None:
        source = f"--intended-modalities/--intended-body-parts, else {source}"
    use = IntendedUse(
        modalities=tuple(split_list(modalities) if modalities is not None else sorted(found[0])),
        body_parts=tuple(split_list(body_parts) if body_parts is not None else sorted(found[1])),
    )
    if not use.modalities and not use.body_parts:
        return None, f"intended use: none declared (from {source}): the model takes any image"
    return use, f"intended use: {use.describe()} (from {source})"


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `dxnode evaluate`."""
    p.add_argument("bundle", type=Path, help="model bundle folder")
    p.add_argument("--data", required=True, type=Path, help="labelled CSV")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json, metrics.csv and plots")
    p.add_argument("--images", type=Path, help="image folder (default: the CSV's folder)")
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],
        help="only this split of the bundle's splits.csv (the held-out test split)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--compare",
        type=Path,
        metavar="BUNDLE",
        help="also evaluate this bundle (e.g. the fp32 source of an int8 bundle) and report the AUROC difference per label",
    )


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs, and deterministic kernels where torch has them."""
    # start-up time: loaded only when this runs
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def initial_network(num_labels: int, weights: Path | None) -> tuple[Any, str]:
    """ResNet-18 with fc for the labels, from the ImageNet file when there is one."""
    # start-up time, and torch is the optional dxnode[train] extra
    import torch

    from dxnode.inference.bundle import resnet18

    net = resnet18(num_labels)
    if weights is None or not weights.is_file():
        log.warning(
            "no ImageNet weights file (%s): training from scratch, which needs far more data",
            weights or "resnet18-f37072fd.pth",
        )
        return net, "scratch"
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
        )
    except Exception as exc:
        raise ValueError(
            f"ImageNet weights {weights}: not a ResNet-18 state dict: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    if set(missing) - {"fc.weight", "fc.bias"} or unexpected:
        raise ValueError(
            f"ImageNet weights {weights}: not a ResNet-18 state dict (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return net, f"imagenet:{weights.name}"


def run_train(opts: TrainOptions, settings: Settings) -> Path:
    """Train and write the bundle; returns its folder."""
    # start-up time, and torch is the optional dxnode[train] extra
    from dxnode.inference.bundle import imagenet_weights_path
    from dxnode.inference.engine import choose_device
    from dxnode.pipeline import Preprocessing
    from dxnode.training.dataset import read_table, split_by_patient
    from dxnode.training.loop import Trainer

    seed_everything(opts.seed)
    out: Path = opts.out
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    table = read_table(opts.data, opts.images)
    for line in table.unreadable:
        print(f"left out {line}", file=sys.stderr)
    splits = split_by_patient(
        table.samples, (1 - opts.val_fraction - opts.test_fraction, opts.val_fraction, opts.test_fraction), opts.seed
    )
    if not splits["train"] or not splits["val"]:
        raise ValueError(f"not enough patients to split: train {len(splits['train'])}, val {len(splits['val'])} images")
    write_splits(splits, out / "splits.csv")
    intended_use, said = intended_use_of(
        table.samples, opts.intended_modalities, opts.intended_body_parts, table.format
    )
    print(said, file=sys.stderr)
    prep = Preprocessing(input_size=opts.input_size, resize=opts.resize)  # ImageNet mean/std, as the backbone expects
    device = choose_device(opts.device or settings.model.device)
    net, start = initial_network(len(table.labels), opts.imagenet_weights or imagenet_weights_path(settings.model))
    defaults = SCRATCH if start == "scratch" else IMAGENET
    opts = replace(  # the manifest records the values used
        opts,
        lr=defaults["lr"] if opts.lr is None else opts.lr,
        batch_size=defaults["batch_size"] if opts.batch_size is None else opts.batch_size,
    )
    trainer = Trainer(net, opts, settings.pipeline, prep, splits, table.labels, table.task, device)
    if opts.resume:
        trainer.resume()
    trainer.fit()
    y_val, p_val = trainer.best()
    thresholds = choose_thresholds(table.task, opts, y_val, p_val)
    write_trained_bundle(opts, table, splits, start, trainer, thresholds, prep, intended_use)
    return out


def write_splits(splits: dict[str, list[Sample]], path: Path) -> None:
    """splits.csv: each image's path, patient and split, so an evaluation can take the test split."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "split"])
        for name, items in splits.items():
            w.writerows([str(s.path.resolve()), s.patient_id, name] for s in items)


def choose_thresholds(task: Task, opts: TrainOptions, y_val: Any, p_val: Any) -> list[float]:
    """Per-label thresholds on the validation split: Youden's J or a target sensitivity (argmax: none)."""
    # start-up time: loaded only when this runs
    from dxnode.training.evaluate import sensitivity_threshold, youden_threshold

    n = y_val.shape[1]
    if task == Task.MULTICLASS:
        return [0.0] * n
    if opts.threshold_rule == "sensitivity":
        return [sensitivity_threshold(y_val[:, j], p_val[:, j], opts.target_sensitivity) for j in range(n)]
    return [youden_threshold(y_val[:, j], p_val[:, j]) for j in range(n)]


def write_trained_bundle(
    opts: TrainOptions,
    table: Table,
    splits: dict[str, list[Sample]],
    start: str,
    trainer: Trainer,
    thresholds: list[float],
    prep: Preprocessing,
    intended_use: IntendedUse | None,
) -> None:
    """The bundle (weights, manifest, model.onnx) with metrics.json, roc.png and curves.png beside it."""
    # start-up time: loaded only when this runs
    from dxnode.inference.bundle import write_bundle
    from dxnode.inference.engine import export_bundle
    from dxnode.training.evaluate import compute_metrics, roc_plot

    out, labels, task = opts.out, table.labels, table.task
    y_val, p_val = trainer.y_val, trainer.p_val
    metrics = compute_metrics(y_val, p_val, labels, thresholds, opts.seed, task=task)
    metrics["split"] = "val"
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    extra = {
        "training": {
            "data": str(opts.data),
            "data_sha256": table.sha256,
            "format": table.format,
            "start": start,
            "parameters": params,
            "split_sizes": {k: len(v) for k, v in splits.items()},
            "best_epoch": trainer.state["best_epoch"] + 1,
            "history": trainer.state["history"],
            "threshold_rule": opts.threshold_rule if task == Task.MULTILABEL else "argmax",
        },
        "validation": {"mean_auroc": metrics["mean_auroc"]},
    }
    write_bundle(
        out,
        trainer.net.cpu().state_dict(),
        name=opts.name or out.name,
        version=opts.version,
        labels=labels,
        task=task,
        thresholds=thresholds,
        preprocessing=prep,
        description=f"ResNet-18 fine-tuned by dxnode train on {opts.data.name}",
        extra=extra,
        intended_use=intended_use,
    )
    export_bundle(out)  # model.onnx for the ONNX Runtime engine
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    roc_plot(y_val, p_val, labels, out / "roc.png", f"{opts.name or out.name} {opts.version} (validation)")
    curves_plot(trainer.state["history"], out / "curves.png")


def curves_plot(history: list[dict[str, float]], path: Path) -> None:
    """Training loss and validation AUROC per epoch."""
    # start-up time: matplotlib loads only when this runs
    import matplotlib

    matplotlib.use("Agg")
    # start-up time: matplotlib loads only when this runs
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(epochs, [h["loss"] for h in history], "o-", color="tab:blue", label="training loss")
    ax.set(xlabel="epoch", ylabel="loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, [h["val_mean_auroc"] for h in history], "s-", color="tab:red", label="validation mean AUROC")
    ax2.set(ylabel="mean AUROC", ylim=(0.4, 1.0))
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)
