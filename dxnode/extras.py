"""Optional parts of the install: whether the dxnode[train] extra (PyTorch and friends) is there."""

from __future__ import annotations

import importlib.util

TRAIN_EXTRA = "pip install 'dxnode[train]'"


TRAIN_MODULES = ("torch", "torchvision", "sklearn", "matplotlib", "tqdm")  # what dxnode[train] adds, as imported


class MissingExtra(RuntimeError):
    """A command needs the dxnode[train] extra, which this install does not have (one line for the CLI)."""


def installed(module: str) -> bool:
    """Whether a top-level module can be imported, without importing it."""

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def has_torch() -> bool:
    """Whether PyTorch (the dxnode[train] extra) is installed, without importing it."""
    return installed("torch")


def require_train_extra(what: str = "") -> None:
    """MissingExtra naming the extra to install, unless everything dxnode[train] adds is installed.

    The CLI prints it after "dxnode COMMAND: "; what names the subcommand where that is not enough.
    """
    missing = [m for m in TRAIN_MODULES if not installed(m)]
    if missing:
        who = f"{what} " if what else ""
        raise MissingExtra(f"{who}needs the training extra ({', '.join(missing)} not installed): {TRAIN_EXTRA}")
