"""Labelled images for training and evaluation: CSV formats, patient-level splits, model inputs.

Three CSV layouts are read (the format is detected from the header):
- generic: ``path``, ``patient_id`` and either ``labels`` ("A|B", multi-label), ``label`` (one class
  per row, multi-class) or one 0/1 column per label (multi-label); an optional ``split`` column
  (train/val/test) gives an explicit split;
- ChestX-ray14 ``Data_Entry_2017.csv``: ``Image Index``, ``Finding Labels`` ("A|B" or
  "No Finding"), ``Patient ID`` (multi-label);
- ISIC ground truth: ``image`` plus one 0/1 column per class (multi-class); the patient is the
  ``patient_id``/``lesion_id`` column when present, else the image itself.
Image paths are relative to the CSV's folder, or to ``--images DIR``; ChestX-ray14 and ISIC names
get their extension (.png, .jpg, .dcm) looked up. Images go through the same pipeline functions as
inference (dxnode.pipeline), so training and serving see identical pixels.
"""

from __future__ import annotations

import csv
import hashlib
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from dxnode.config import PipelineSettings
from dxnode.pipeline import (
    PipelineError,
    Preprocessing,
    is_image_file,
    model_inputs,
    read_dataset,
    skip_reason,
)
from dxnode.states import Task

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch
    from torch.utils.data import Dataset as TorchMapDataset

    _SampleDataset: TypeAlias = TorchMapDataset[tuple[torch.Tensor, torch.Tensor] | str]
else:
    _SampleDataset = object  # torch's Dataset only adds typing; torch is imported where training runs

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    labels: tuple[float, ...]
    patient_id: str
    split: str = ""  # explicit split from the CSV, if any


@dataclass
class Table:
    """A labelled data set as read from a CSV."""

    samples: list[Sample]
    labels: list[str]
    task: Task
    format: str
    sha256: str  # of the CSV file: recorded in the bundle
    unreadable: list[str]  # one line per image left out


def _find(base: Path, name: str) -> Path:
    """The image file for a name, trying common extensions when it has none that exists."""
    path = base / name
    if path.exists():
        return path
    for ext in (".png", ".jpg", ".jpeg", ".dcm"):
        if (alt := base / f"{name}{ext}").exists():
            return alt
    return path


def _binary(value: str) -> float:
    return 1.0 if float(value or 0) >= 0.5 else 0.0


def read_table(csv_path: Path, images: Path | None = None) -> Table:
    """Read a labelled CSV in any of the three layouts; unreadable images are listed and left out."""
    csv_path = Path(csv_path)
    base = Path(images) if images else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    cols = list(rows[0])
    if {"Image Index", "Finding Labels", "Patient ID"} <= set(cols):
        fmt, task = "chestxray14", Task.MULTILABEL
        labels = sorted({x for r in rows for x in r["Finding Labels"].split("|") if x and x != "No Finding"})
        items = [
            (
                r["Image Index"],
                r["Patient ID"],
                tuple(float(lab in r["Finding Labels"].split("|")) for lab in labels),
                "",
            )
            for r in rows
        ]
    elif cols[0].lower() in ("image", "image_name", "image_id") and "path" not in cols:
        fmt, task = "isic", Task.MULTICLASS
        patient_col = next((c for c in ("patient_id", "lesion_id") if c in cols), None)
        labels = [c for c in cols[1:] if c not in ("patient_id", "lesion_id", "split")]
        items = [
            (
                r[cols[0]],
                r[patient_col] if patient_col else r[cols[0]],
                tuple(_binary(r[c]) for c in labels),
                r.get("split", ""),
            )
            for r in rows
        ]
    elif "path" in cols and "patient_id" in cols:
        fmt = "generic"
        if "labels" in cols:
            task = Task.MULTILABEL
            labels = sorted({x for r in rows for x in r["labels"].split("|") if x})
            items = [
                (
                    r["path"],
                    r["patient_id"],
                    tuple(float(lab in r["labels"].split("|")) for lab in labels),
                    r.get("split", ""),
                )
                for r in rows
            ]
        elif "label" in cols:
            task = Task.MULTICLASS
            labels = sorted({r["label"] for r in rows})
            items = [
                (r["path"], r["patient_id"], tuple(float(r["label"] == lab) for lab in labels), r.get("split", ""))
                for r in rows
            ]
        else:
            task = Task.MULTILABEL
            labels = [c for c in cols if c not in ("path", "patient_id", "split")]
            items = [
                (r["path"], r["patient_id"], tuple(_binary(r[c]) for c in labels), r.get("split", "")) for r in rows
            ]
    else:
        raise ValueError(f"{csv_path}: unknown CSV layout (columns {cols[:8]}); see `dxnode train --help`")
    if not labels:
        raise ValueError(f"{csv_path}: no labels found")
    samples, unreadable = [], []
    for name, patient, y, split in items:
        path = _find(base, name)
        reason = check_image(path)
        if reason:
            unreadable.append(f"{path}: {reason}")
            continue
        if split and split not in SPLITS:
            raise ValueError(f"{csv_path}: split {split!r} for {name} is not one of {SPLITS}")
        samples.append(Sample(path, y, str(patient), split))
    sha = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    return Table(samples, labels, task, fmt, sha, unreadable)


def check_image(path: Path) -> str | None:
    """Why an image cannot be used (None if it looks usable); reads headers only."""
    if not path.is_file():
        return "no such file"
    try:
        if is_image_file(path):
            # start-up time: PIL loads only when this runs
            from PIL import Image

            with Image.open(path) as img:
                img.verify()
            return None
        ds = read_dataset(path)
        return skip_reason(ds, PipelineSettings())
    except PipelineError as exc:
        return str(exc)
    except Exception as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"[:200]


def split_by_patient(
    samples: list[Sample], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[Sample]]:
    """train/val/test with no patient in two splits; explicit splits win; stratified by each
    patient's rarest positive label (or 'negative'), shuffled with the seed."""
    out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient_id].append(s)
    free: dict[str, list[str]] = defaultdict(list)
    prevalence = np.asarray([s.labels for s in samples], dtype=float).sum(axis=0)
    for pid, items in sorted(by_patient.items()):
        explicit = {s.split for s in items if s.split}
        if len(explicit) > 1:
            raise ValueError(f"patient {pid} is in several explicit splits {sorted(explicit)}")
        if explicit:
            out[explicit.pop()].extend(items)
            continue
        positive = np.asarray([s.labels for s in items]).max(axis=0) > 0
        stratum = "negative" if not positive.any() else str(int(np.argmin(np.where(positive, prevalence, np.inf))))
        free[stratum].append(pid)
    rng = random.Random(seed)
    for stratum in sorted(free):
        pids = free[stratum]
        rng.shuffle(pids)
        n = len(pids)
        n_val = math.floor(n * fractions[1] + 0.5) if n >= 3 else 0
        n_test = math.floor(n * fractions[2] + 0.5) if n >= 3 else 0
        for k, pid in enumerate(pids):
            split = "val" if k < n_val else "test" if k < n_val + n_test else "train"
            out[split].extend(by_patient[pid])
    return out


@dataclass(frozen=True)
class Augment:
    """Augmentations in the pipeline's terms; no horizontal flip unless asked (laterality matters)."""

    rotate_deg: float = 7.0
    scale: float = 0.08
    translate: float = 0.05
    window_center_shift: float = 0.1  # fraction of the window width
    window_width_scale: float = 0.15
    noise_std: float = 0.03
    contrast: float = 0.1
    hflip: bool = False


def load_tensor(
    sample: Sample,
    settings: PipelineSettings,
    prep: Preprocessing,
    augment: Augment | None = None,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """The model input of a sample (first frame), optionally augmented; PipelineError if unusable.

    The input is pipeline.model_inputs', the node's own path (no train/serve skew), as a torch
    tensor. Augmentation jitters the LINEAR window the pipeline picks, then moves the tensor.
    """
    import torch  # training: dxnode[train]

    rng = rng or np.random.default_rng()
    jitter = None
    if augment is not None:
        a, draws = augment, list[float]()

        def jitter(center: float, width: float) -> tuple[float, float]:
            if not draws:  # one draw per sample: every frame of it gets the same jitter
                draws.extend((rng.uniform(-1, 1), rng.uniform(-1, 1)))
            return center + draws[0] * a.window_center_shift * width, width * (1 + draws[1] * a.window_width_scale)

    x = torch.from_numpy(model_inputs(sample.path, settings, prep, adjust_window=jitter)[0])
    return _augment_tensor(x, prep, augment, rng) if augment else x


def _augment_tensor(x: torch.Tensor, prep: Preprocessing, a: Augment, rng: np.random.Generator) -> torch.Tensor:
    """Small affine, contrast and noise on a normalised 3xSxS tensor."""
    import torch  # training: dxnode[train]
    import torch.nn.functional as F

    angle = math.radians(rng.uniform(-a.rotate_deg, a.rotate_deg))
    s = 1 + rng.uniform(-a.scale, a.scale)
    tx, ty = rng.uniform(-a.translate, a.translate, 2) * 2
    flip = -1.0 if a.hflip and rng.random() < 0.5 else 1.0
    theta = torch.tensor(
        [[flip * math.cos(angle) / s, -math.sin(angle) / s, tx], [flip * math.sin(angle) / s, math.cos(angle) / s, ty]],
        dtype=torch.float32,
    )[None]
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    img = x * std + mean  # back to [0, 1] so the border fill is black
    grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
    img = F.grid_sample(img[None], grid, padding_mode="zeros", align_corners=False)[0]
    img = (img - 0.5) * (1 + rng.uniform(-a.contrast, a.contrast)) + 0.5
    img = img + torch.from_numpy(rng.normal(0, a.noise_std, img.shape[1:]).astype(np.float32))[None]
    return (img.clamp(0, 1) - mean) / std


class TorchDataset(_SampleDataset):
    """Samples as (input, target) pairs; a sample that fails to load gives None (dropped by collate).

    (A map-style dataset for torch's DataLoader: __len__ and __getitem__.)
    """

    def __init__(
        self, samples: list[Sample], settings: PipelineSettings, prep: Preprocessing, augment: Augment | None, seed: int
    ) -> None:
        self.samples, self.settings, self.prep, self.augment, self.seed = samples, settings, prep, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | str:
        rng = np.random.default_rng([self.seed, self.epoch, i])  # deterministic per epoch and sample
        try:
            x = load_tensor(self.samples[i], self.settings, self.prep, self.augment, rng)
        except PipelineError as exc:
            return f"{self.samples[i].path}: {exc}"
        import torch  # training: dxnode[train]

        return x, torch.tensor(self.samples[i].labels, dtype=torch.float32)


class Batch(NamedTuple):
    """Stacked inputs and targets (None when every sample failed) and one line per sample that failed."""

    x: torch.Tensor | None
    y: torch.Tensor | None
    failed: list[str]


def collate(batch: list[tuple[torch.Tensor, torch.Tensor] | str]) -> Batch:
    """Stack a batch, leaving out (and naming) samples that failed to load."""
    import torch  # training: dxnode[train]

    items = [b for b in batch if not isinstance(b, str)]
    failed = [b for b in batch if isinstance(b, str)]
    if not items:
        return Batch(None, None, failed)
    return Batch(torch.stack([b[0] for b in items]), torch.stack([b[1] for b in items]), failed)
