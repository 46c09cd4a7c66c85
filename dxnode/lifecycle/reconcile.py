"""The reconcile: finish purges a crash interrupted, and find files without rows and rows without files.

A purge's marks (``instance.purging``, ``study.expiring``) name exactly the work a crash left:
finishing it is the purge's own second half. The scan then compares the instance and output rows
with the files under incoming/ and outputs/; it only reports (an admin decides), skipping
temporary files and files younger than ``min_age_s`` (a receive renames its file just before its
rows commit).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from dxnode.config import Settings
from dxnode.lifecycle.purge import BATCH, Purged, finish, finish_expiry
from dxnode.store import Instance, Output, Store, Study

FOLDERS = ("incoming", "outputs")  # where the rows' files live, under the data dir


@dataclass
class Reconciled:
    """What a reconcile finished and found."""

    finished: list[Purged] = field(default_factory=list)  # interrupted purges, now complete
    expired: int = 0  # interrupted results removals, now complete
    rows_without_files: list[str] = field(default_factory=list)  # data-dir relative paths
    files_without_rows: list[str] = field(default_factory=list)
    scanned: bool = False

    @property
    def consistent(self) -> bool:
        return not self.rows_without_files and not self.files_without_rows


def finish_interrupted(store: Store, settings: Settings, actor: str, into: Reconciled | None = None) -> Reconciled:
    """Complete every purge and results removal whose marks a crash left."""
    out = into or Reconciled()
    with store.session() as s:
        studies = sorted(set(s.scalars(select(Instance.study_id).where(Instance.purging.is_(True)))))
        expiring = list(s.scalars(select(Study.id).where(Study.expiring.is_(True))))
    for i in range(0, len(studies), BATCH):
        out.finished += finish(store, settings, dict.fromkeys(studies[i : i + BATCH], "reconcile"), actor)
    for sid in expiring:
        finish_expiry(store, settings, sid, actor)
    out.expired += len(expiring)
    return out


def _files(data_dir: Path, min_age_s: float) -> set[str]:
    """Data-dir relative paths of the files under FOLDERS older than min_age_s, temporaries left out."""
    cutoff = time.time() - min_age_s
    found: set[str] = set()
    for name in FOLDERS:
        for root, _dirs, files in os.walk(data_dir / name):
            for f in files:
                if f.startswith("."):
                    continue  # a receive's or writer's temporary file (removed by their own sweep)
                path = Path(root) / f
                try:
                    if path.stat().st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue
                found.add(str(path.relative_to(data_dir)))
    return found


def _rows(store: Store) -> set[str]:
    """File paths of the instance and output rows that are not being removed."""
    with store.session() as s:
        rows = set(s.scalars(select(Instance.file_path).where(Instance.purging.is_(False))))
        rows |= set(
            s.scalars(
                select(Output.file_path).join(Study, Study.id == Output.study_id).where(Study.expiring.is_(False))
            )
        )
    return rows


def scan(
    store: Store, settings: Settings, min_age_s: float | None = None, into: Reconciled | None = None
) -> Reconciled:
    """Compare rows and files; the rows are read first, so a file committed since is not counted."""
    out = into or Reconciled()
    age = settings.node.dimse_timeout + settings.database.busy_timeout_s if min_age_s is None else min_age_s
    data_dir = settings.data_dir
    rows = _rows(store)
    files = _files(data_dir, age)
    out.files_without_rows = sorted(files - rows)
    missing = {p for p in rows if not (data_dir / p).exists()}
    if missing:  # a purge may have marked and removed some meanwhile: ask again
        missing &= _rows(store)
        missing = {p for p in missing if not (data_dir / p).exists()}
    out.rows_without_files = sorted(missing)
    out.scanned = True
    return out


def reconcile(store: Store, settings: Settings, actor: str, min_age_s: float | None = None) -> Reconciled:
    """Finish interrupted purges, then scan for files and rows apart."""
    out = finish_interrupted(store, settings, actor)
    return scan(store, settings, min_age_s, out)
