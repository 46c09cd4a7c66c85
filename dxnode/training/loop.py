"""The training loop of `dxnode train`: epochs, validation, a checkpoint every epoch (resumable), early stop.

The checkpoint kept as best is the one with the lowest validation loss: on a small validation split
the AUROC saturates (often at 1.0) within a few epochs and would keep the first, undertrained one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dxnode.config import PipelineSettings
from dxnode.durable import durable_path
from dxnode.model import probabilities
from dxnode.pipeline import Preprocessing
from dxnode.states import Task
from dxnode.training.dataset import Augment, Sample, TorchDataset, collate
from dxnode.training.evaluate import compute_metrics
from dxnode.training.options import TrainOptions

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over labels and images."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = (-bce).exp()
    return ((1 - p_t) ** gamma * bce).mean()


def loss_function(task: Task, loss: str, train: list[Sample], device: torch.device) -> LossFn:
    """Cross-entropy for one class per image; else focal loss, or BCE with per-label pos_weight."""
    if task == Task.MULTICLASS:

        def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits, y.argmax(dim=1))

        return cross_entropy
    if loss == "focal":
        return focal_loss
    y_train = np.asarray([s.labels for s in train], dtype=np.float64)
    pos = y_train.sum(axis=0)
    weight = np.clip((len(y_train) - pos) / np.maximum(pos, 1), 1.0, 100.0)
    return torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weight, dtype=torch.float32, device=device))


class Trainer:
    """One network trained on the train split and judged on the validation split."""

    def __init__(
        self,
        net: torch.nn.Module,
        opts: TrainOptions,
        pipeline: PipelineSettings,
        prep: Preprocessing,
        splits: dict[str, list[Sample]],
        labels: list[str],
        task: Task,
        device: torch.device,
    ) -> None:
        assert opts.batch_size is not None and opts.lr is not None  # run_train chose them
        self.net, self.opts, self.labels, self.task, self.device = net.to(device), opts, labels, task, device
        self.loss_fn = loss_function(task, opts.loss, splits["train"], device)
        augment = None if opts.no_augment else Augment(hflip=opts.hflip)
        self.train_ds = TorchDataset(splits["train"], pipeline, prep, augment, opts.seed)
        self.val_ds = TorchDataset(splits["val"], pipeline, prep, None, opts.seed)
        self.gen = torch.Generator().manual_seed(opts.seed)
        self.train_dl = torch.utils.data.DataLoader(
            self.train_ds,
            batch_size=opts.batch_size,
            shuffle=True,
            num_workers=opts.workers,
            collate_fn=collate,
            generator=self.gen,
            # A last batch of one or two images gives BatchNorm statistics of a couple of values.
            drop_last=len(self.train_ds) > opts.batch_size,
        )
        self.val_dl = torch.utils.data.DataLoader(
            self.val_ds, batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers, collate_fn=collate
        )
        opt_cls = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.Adam
        self.opt = opt_cls(self.net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, opts.epochs))
        self.state: dict[str, Any] = {
            "epoch": -1,
            "best_loss": float("inf"),
            "best_auroc": -1.0,
            "best_epoch": -1,
            "history": [],
            "stale": 0,
        }
        self.ckpt_dir: Path = opts.out / "checkpoints"
        self.last = self.ckpt_dir / "last.pt"
        self._reported: set[str] = set()
        self.y_val = self.p_val = np.zeros((0, len(labels)))

    def resume(self) -> None:
        """Continue from checkpoints/last.pt: network, optimiser, schedule, history and the RNG."""
        if not self.last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.last}")
        ck = torch.load(self.last, map_location="cpu", weights_only=False)
        self.net.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.state = ck["state"]
        self.gen.set_state(ck["generator"])
        print(f"resuming after epoch {self.state['epoch'] + 1}", file=sys.stderr)

    def report(self, failed: list[str]) -> None:
        """One line per image that failed to load (the header looked fine), the first time only."""
        for line in failed:
            if line not in self._reported:
                self._reported.add(line)
                tqdm.write(f"left out {line}", file=sys.stderr)

    def validate(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Labels, probabilities and the mean training loss on the validation split."""
        self.net.eval()
        ps, ys = [], []
        loss_sum = 0.0
        with torch.inference_mode():
            for batch in self.val_dl:
                self.report(batch.failed)
                if batch.x is None:
                    continue
                logits = self.net(batch.x.to(self.device))
                loss_sum += float(self.loss_fn(logits, batch.y.to(self.device))) * len(batch.x)
                ps.append(probabilities(logits, self.task).float().cpu().numpy())
                ys.append(batch.y.numpy())
        if not ys:
            raise ValueError(
                f"none of the {len(self.val_ds)} validation images could be loaded (see the 'left out' lines)"
            )
        y_all = np.concatenate(ys)
        return y_all, np.concatenate(ps), loss_sum / len(y_all)

    def train_epoch(self, epoch: int) -> float:
        """One pass over the train split (fc only while frozen); the mean loss."""
        self.train_ds.epoch = epoch
        frozen = epoch < self.opts.freeze_epochs
        for name, p in self.net.named_parameters():
            p.requires_grad = (not frozen) or name.startswith("fc.")
        self.net.train()
        total, count = 0.0, 0
        desc = f"epoch {epoch + 1}/{self.opts.epochs}" + (" (fc only)" if frozen else "")
        bar = tqdm(self.train_dl, desc=desc, file=sys.stderr, leave=False)
        for batch in bar:
            self.report(batch.failed)
            if batch.x is None:
                continue
            self.opt.zero_grad()
            loss = self.loss_fn(self.net(batch.x.to(self.device)), batch.y.to(self.device))
            loss.backward()
            self.opt.step()
            total, count = total + loss.item() * len(batch.x), count + len(batch.x)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        self.sched.step()
        return total / max(count, 1)

    def fit(self) -> None:
        """Epochs from the last one done until opts.epochs, or until the validation loss stops falling."""
        for epoch in range(self.state["epoch"] + 1, self.opts.epochs):
            loss = self.train_epoch(epoch)
            y_val, p_val, val_loss = self.validate()
            m = compute_metrics(y_val, p_val, self.labels, [0.5] * len(self.labels), bootstrap=0)
            mean_auc = m["mean_auroc"] if m["mean_auroc"] is not None else 0.0
            self.state["history"].append(
                {"epoch": epoch + 1, "loss": loss, "val_loss": val_loss, "val_mean_auroc": mean_auc}
            )
            print(
                f"epoch {epoch + 1}/{self.opts.epochs}  loss {loss:.4f}  val loss {val_loss:.4f}"
                f"  val mean AUROC {mean_auc:.4f}",
                file=sys.stderr,
            )
            self.checkpoint(epoch, val_loss, mean_auc)
            if self.state["stale"] >= self.opts.patience:
                print(f"early stop: no lower validation loss for {self.opts.patience} epochs", file=sys.stderr)
                break

    def checkpoint(self, epoch: int, val_loss: float, mean_auc: float) -> None:
        """best.pt when the validation loss fell; last.pt always (a crash while saving keeps the previous one)."""
        if val_loss < self.state.get("best_loss", float("inf")):
            self.state.update(best_loss=val_loss, best_auroc=mean_auc, best_epoch=epoch, stale=0)
            with durable_path(self.ckpt_dir / "best.pt") as tmp:
                torch.save(self.net.state_dict(), tmp)
        else:
            self.state["stale"] += 1
        self.state["epoch"] = epoch
        with durable_path(self.last) as tmp:
            torch.save(
                {
                    "model": self.net.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "state": self.state,
                    "generator": self.gen.get_state(),
                },
                tmp,
            )

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """Load the best checkpoint; its validation labels and probabilities (kept as y_val, p_val)."""
        self.net.load_state_dict(torch.load(self.ckpt_dir / "best.pt", map_location="cpu", weights_only=True))
        self.y_val, self.p_val, _ = self.validate()
        return self.y_val, self.p_val
