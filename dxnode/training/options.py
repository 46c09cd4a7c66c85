"""What `dxnode train` was asked to do, shared by the orchestration (train.py) and the loop (loop.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

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
