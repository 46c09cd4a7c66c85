"""Removing files durably: unlink, fsync each folder that lost an entry, drop folders left empty."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from dxnode.durable import fsync_path


def remove_durably(data_dir: Path, relative: Iterable[str], keep: Iterable[Path]) -> int:
    """Remove the files (paths relative to data_dir), missing ones being fine; returns how many were there.

    Each folder that lost an entry is fsynced, so a removal survives a power cut before the rows
    that named the files are deleted. Folders left empty go, up to (not including) those in keep.
    """
    removed = 0
    folders: set[Path] = set()
    for rel in relative:
        path = data_dir / rel
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        folders.add(path.parent)
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            fsync_path(folder)
    stop = {p.resolve() for p in keep}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _remove_empty(folder, stop)
    return removed


def _remove_empty(folder: Path, stop: set[Path]) -> None:
    """Remove folder and its parents while they are empty, stopping at a folder in stop.

    A receiver making a file in one of them at that moment fails that one store (0xA700, retried
    by the sender): the window is one rmdir, on a study that has been quiet for its stable time."""
    if not any(folder.resolve().is_relative_to(s) for s in stop):
        return
    while folder.resolve() not in stop:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone already
            return
        folder = folder.parent
