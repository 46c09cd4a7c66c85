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
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dxnode.states import Task

if TYPE_CHECKING:
    from dxnode.config import Settings
    from dxnode.inference.intended import IntendedUse
    from dxnode.training.dataset import Sample

log = logging.getLogger("dxnode.training.train")


# Defaults that depend on where training starts (docs/training.md says why).
SCRATCH: dict[str, Any] = {"lr": 1e-3, "batch_size": 16}
IMAGENET: dict[str, Any] = {"lr": 3e-4, "batch_size": 32}


@dataclass(frozen=True)
class TrainOptions:
    """What `dxnode train` was asked to do (its options; add_train_arguments documents each).
    batch_size and lr of None take the default of where training starts (SCRATCH or IMAGENET)."""

    data: Path
    out: Path
    images: Path | None = None
    name: str = ""
    version: str = "1.0.0"
    epochs: int = 20
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    loss: str = "bce"
    input_size: int = 224
    resize: str = "letterbox"
    freeze_epochs: int = 0
    patience: int = 5
    threshold_rule: str = "youden"
    target_sensitivity: float = 0.9
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    hflip: bool = False
    no_augment: bool = False
    imagenet_weights: Path | None = None
    seed: int = 0
    workers: int = 0
    device: str = ""
    resume: bool = False
    intended_modalities: str | None = None
    intended_body_parts: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainOptions:
        """The options of a parsed `dxnode train` command line."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


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


def focal_loss(logits: Any, target: Any, gamma: float = 2.0) -> Any:
    """Binary focal loss (Lin et al. 2017), mean over labels and images."""
    # start-up time, and torch is the optional dxnode[train] extra
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = (-bce).exp()
    return ((1 - p_t) ** gamma * bce).mean()


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


def run_train(opts: TrainOptions, settings: Settings) -> Path:  # noqa: C901, PLR0912, PLR0915  the training loop, to split into stages with the training folder (issue 20)
    """Train and write the bundle; returns its folder."""
    # start-up time: loaded only when this runs
    import numpy as np
    import torch
    from tqdm import tqdm

    from dxnode.durable import durable_path
    from dxnode.inference.bundle import imagenet_weights_path, write_bundle
    from dxnode.inference.engine import choose_device
    from dxnode.model import probabilities
    from dxnode.pipeline import Preprocessing
    from dxnode.training.dataset import Augment, TorchDataset, collate, read_table, split_by_patient
    from dxnode.training.evaluate import compute_metrics, roc_plot, sensitivity_threshold, youden_threshold

    seed_everything(opts.seed)
    out: Path = opts.out
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    table = read_table(opts.data, opts.images)
    for line in table.unreadable:
        print(f"left out {line}", file=sys.stderr)
    splits = split_by_patient(
        table.samples, (1 - opts.val_fraction - opts.test_fraction, opts.val_fraction, opts.test_fraction), opts.seed
    )
    if not splits["train"] or not splits["val"]:
        raise ValueError(f"not enough patients to split: train {len(splits['train'])}, val {len(splits['val'])} images")
    with open(out / "splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "split"])
        for name, items in splits.items():
            w.writerows([str(s.path.resolve()), s.patient_id, name] for s in items)
    labels, task = table.labels, table.task
    intended_use, said = intended_use_of(
        table.samples, opts.intended_modalities, opts.intended_body_parts, table.format
    )
    print(said, file=sys.stderr)
    prep = Preprocessing(input_size=opts.input_size, resize=opts.resize)  # ImageNet mean/std, as the backbone expects
    device = choose_device(opts.device or settings.model.device)
    weights_file = opts.imagenet_weights or imagenet_weights_path(settings.model)
    net, start = initial_network(len(labels), weights_file)
    net.to(device)
    defaults = SCRATCH if start == "scratch" else IMAGENET
    lr: float = defaults["lr"] if opts.lr is None else opts.lr
    batch_size: int = defaults["batch_size"] if opts.batch_size is None else opts.batch_size
    opts = replace(opts, lr=lr, batch_size=batch_size)  # the manifest records the values used

    y_train = np.asarray([s.labels for s in splits["train"]], dtype=np.float64)
    pos = y_train.sum(axis=0)
    pos_weight = torch.tensor(
        np.clip((len(y_train) - pos) / np.maximum(pos, 1), 1.0, 100.0), dtype=torch.float32, device=device
    )
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if task == Task.MULTICLASS:

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits, y.argmax(dim=1))
    elif opts.loss == "focal":
        loss_fn = focal_loss
    else:
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    augment = None if opts.no_augment else Augment(hflip=opts.hflip)
    train_ds = TorchDataset(splits["train"], settings.pipeline, prep, augment, opts.seed)
    val_ds = TorchDataset(splits["val"], settings.pipeline, prep, None, opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    train_dl = torch.utils.data.DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=opts.workers,
        collate_fn=collate,
        generator=gen,
        # A last batch of one or two images gives BatchNorm statistics of a couple of values.
        drop_last=len(train_ds) > batch_size,
    )
    val_dl = torch.utils.data.DataLoader(
        val_ds, batch_size=batch_size, shuffle=False, num_workers=opts.workers, collate_fn=collate
    )
    opt_cls = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(net.parameters(), lr=lr, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, opts.epochs))
    state: dict[str, Any] = {
        "epoch": -1,
        "best_loss": float("inf"),
        "best_auroc": -1.0,
        "best_epoch": -1,
        "history": [],
        "stale": 0,
    }
    last = ckpt_dir / "last.pt"
    if opts.resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {last}")
        ck = torch.load(last, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = ck["state"]
        gen.set_state(ck["generator"])
        print(f"resuming after epoch {state['epoch'] + 1}", file=sys.stderr)

    reported: set[str] = set()

    def report(failed: list[str]) -> None:
        """One line per image that failed to load (the header looked fine), the first time only."""
        for line in failed:
            if line not in reported:
                reported.add(line)
                tqdm.write(f"left out {line}", file=sys.stderr)

    def validate() -> tuple[np.ndarray, np.ndarray, float]:
        """Labels, probabilities and the mean training loss on the validation split."""
        net.eval()
        ps, ys = [], []
        loss_sum = 0.0
        with torch.inference_mode():
            for batch in val_dl:
                report(batch.failed)
                if batch.x is None:
                    continue
                x, y = batch.x, batch.y
                logits = net(x.to(device))
                loss_sum += float(loss_fn(logits, y.to(device))) * len(x)
                ps.append(probabilities(logits, task).float().cpu().numpy())
                ys.append(y.numpy())
        if not ys:
            raise ValueError(f"none of the {len(val_ds)} validation images could be loaded (see the 'left out' lines)")
        y_all = np.concatenate(ys)
        return y_all, np.concatenate(ps), loss_sum / len(y_all)

    for epoch in range(state["epoch"] + 1, opts.epochs):
        train_ds.epoch = epoch
        frozen = epoch < opts.freeze_epochs
        for name, p in net.named_parameters():
            p.requires_grad = (not frozen) or name.startswith("fc.")
        net.train()
        total, count = 0.0, 0
        bar = tqdm(
            train_dl,
            desc=f"epoch {epoch + 1}/{opts.epochs}" + (" (fc only)" if frozen else ""),
            file=sys.stderr,
            leave=False,
        )
        for batch in bar:
            report(batch.failed)
            if batch.x is None:
                continue
            x, y = batch.x, batch.y
            opt.zero_grad()
            loss = loss_fn(net(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(x), count + len(x)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        sched.step()
        y_val, p_val, val_loss = validate()
        m = compute_metrics(y_val, p_val, labels, [0.5] * len(labels), bootstrap=0)
        mean_auc = m["mean_auroc"] if m["mean_auroc"] is not None else 0.0
        state["history"].append(
            {"epoch": epoch + 1, "loss": total / max(count, 1), "val_loss": val_loss, "val_mean_auroc": mean_auc}
        )
        print(
            f"epoch {epoch + 1}/{opts.epochs}  loss {total / max(count, 1):.4f}  val loss {val_loss:.4f}"
            f"  val mean AUROC {mean_auc:.4f}",
            file=sys.stderr,
        )
        # The checkpoint with the lowest validation loss: on a small validation split the AUROC
        # saturates (often at 1.0) within a few epochs and would keep the first, undertrained one.
        if val_loss < state.get("best_loss", float("inf")):
            state.update(best_loss=val_loss, best_auroc=mean_auc, best_epoch=epoch, stale=0)
            with durable_path(ckpt_dir / "best.pt") as tmp:
                torch.save(net.state_dict(), tmp)
        else:
            state["stale"] += 1
        state["epoch"] = epoch
        with durable_path(last) as tmp:  # a crash while saving must not destroy the previous checkpoint
            torch.save(
                {
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "state": state,
                    "generator": gen.get_state(),
                },
                tmp,
            )
        if state["stale"] >= opts.patience:
            print(f"early stop: no lower validation loss for {opts.patience} epochs", file=sys.stderr)
            break

    net.load_state_dict(torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=True))
    y_val, p_val, _ = validate()
    if task == Task.MULTICLASS:
        thresholds = [0.0] * len(labels)
    elif opts.threshold_rule == "sensitivity":
        thresholds = [
            sensitivity_threshold(y_val[:, j], p_val[:, j], opts.target_sensitivity) for j in range(len(labels))
        ]
    else:
        thresholds = [youden_threshold(y_val[:, j], p_val[:, j]) for j in range(len(labels))]
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
            "best_epoch": state["best_epoch"] + 1,
            "history": state["history"],
            "threshold_rule": opts.threshold_rule if task == Task.MULTILABEL else "argmax",
        },
        "validation": {"mean_auroc": metrics["mean_auroc"]},
    }
    write_bundle(
        out,
        net.cpu().state_dict(),
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
    # start-up time: loaded only when this runs
    from dxnode.inference.engine import export_bundle

    export_bundle(out)  # model.onnx for the ONNX Runtime engine
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    roc_plot(y_val, p_val, labels, out / "roc.png", f"{opts.name or out.name} {opts.version} (validation)")
    curves_plot(state["history"], out / "curves.png")
    return out


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
