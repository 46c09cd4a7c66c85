"""dxnode/durable.py on a real file system: what gets fsynced when a file lands in a new folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dxnode import durable


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths os.fsync is called on (read from /proc/self/fd), the real fsync still done."""
    seen: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", spy)
    return seen


def test_a_file_in_new_folders_makes_each_new_folders_entry_durable(tmp_path: Path, fsynced: list[Path]) -> None:
    target = tmp_path / "studies" / "1.2.3" / "1.2.3.4" / "x.dcm"
    durable.write_durably(target, b"DICM")
    assert target.read_bytes() == b"DICM"
    # The file, its folder (the rename), and the parent of every folder made (their entries).
    for folder in (tmp_path, tmp_path / "studies", tmp_path / "studies" / "1.2.3", target.parent):
        assert folder in fsynced, (folder, fsynced)
    fsynced.clear()
    durable.write_durably(target.with_name("y.dcm"), b"DICM")  # folders exist: the file and its folder only
    assert [p for p in fsynced if p.is_dir()] == [target.parent]


def test_folders_made_by_another_writer_meanwhile_are_fine(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    durable.ensure_folder(folder)  # nothing to make
    durable.ensure_folder(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
