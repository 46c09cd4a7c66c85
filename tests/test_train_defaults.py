"""`dxnode train` with its default options converges from scratch: held-out AUROC on a separate CSV."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
from test_train import LABELS, make_dataset

from dxnode.cli import main

CPU_BUDGET_S = 240  # user + system over both cores; about 40-60 s on an idle 2-core machine


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the bound is CPU time (below); wall time stretches on a shared machine
def test_default_options_from_scratch_reach_auroc_0_95_on_a_separate_held_out_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no ImageNet file: from scratch
    train_csv = make_dataset(tmp_path / "train", patients=90, seed=0)
    held_out = make_dataset(tmp_path / "held-out", patients=40, seed=7)  # other patients, other draws
    bundle = tmp_path / "bundle"
    start = _cpu_seconds()
    # The run's size is chosen here (64 px input for 96 px images, 8 epochs of CPU time); every
    # training option (learning rate, batch, schedule, augmentation, loss, checkpoint choice) is the default.
    args = ["train", "--data", str(train_csv), "--out", str(bundle), "--input-size", "64", "--epochs", "8"]
    assert main(args) == 0
    cpu = _cpu_seconds() - start
    training = json.loads((bundle / "manifest.json").read_text())["extra"]["training"]
    assert training["start"] == "scratch"
    assert training["parameters"]["lr"] == 1e-3 and training["parameters"]["batch_size"] == 16
    assert main(["evaluate", str(bundle), "--data", str(held_out), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    aurocs = {label: metrics["labels"][label]["auroc"] for label in LABELS}
    with capsys.disabled():
        print(f"\nheld-out AUROC {aurocs}, {len(training['history'])} epochs, {cpu:.0f} s CPU")
    assert all(a >= 0.95 for a in aurocs.values()), aurocs
    assert cpu < CPU_BUDGET_S, cpu
