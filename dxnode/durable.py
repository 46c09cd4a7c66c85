"""Durable files: the one way dxnode writes a file atomically (temporary file beside it, fsync,
rename, fsync of the folder), for received instances, outputs, bundles, exports and caches; a
received instance may be placed by a link instead of the rename (``place``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """A new hidden temporary name beside path (cleaned up at start if a killed writer left it)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def ensure_folder(folder: Path) -> None:
    """Create folder and any missing parents, fsyncing the parent of each one created: the fsync of a
    folder makes its entries durable, not its own entry in its parent (a new study's folder would
    otherwise be lost with every instance in it on a power cut, though each rename was fsynced)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer made it: its parent is fsynced all the same
            new.mkdir()
        fsync_path(new.parent)


def write_new_file(tmp: Path, data: bytes | Sequence[bytes | memoryview]) -> int:
    """Create tmp (and its folder), write data (or its parts in order), fsync and close it; returns its inode."""
    ensure_folder(tmp.parent)
    with open(tmp, "xb") as f:
        for part in (data,) if isinstance(data, bytes) else data:
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_ino


def write_temporary(path: Path, data: bytes | Sequence[bytes | memoryview]) -> Path:
    """Write data (or its parts in order), fsynced, to a temporary file beside path; returns the temporary file."""
    tmp = temporary_name(path)
    try:
        write_new_file(tmp, data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def publish(tmp: Path, path: Path) -> None:
    """Rename a written temporary file to its final name and fsync the folder (the rename is durable)."""
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def publish_all(pairs: Sequence[tuple[Path, Path]], pool: Executor | None = None) -> None:
    """Rename each written temporary file to its final name, then fsync each folder once (group commit:
    one folder fsync makes every rename in it durable), the folders in parallel on pool: concurrent
    fsyncs share the disk's flush, where one after another each waits for its own. On an error the
    renames done so far stay."""
    for tmp, path in pairs:
        os.replace(tmp, path)
    folders = list(dict.fromkeys(path.parent for _, path in pairs))
    if pool is not None and len(folders) > 1:
        list(pool.map(fsync_path, folders))
    else:
        for folder in folders:
            fsync_path(folder)


def place(tmp: Path, path: Path, synced: Future[int]) -> int | None:
    """Give a temporary file whose fsync is under way (synced: its inode once done) its final name as a
    second link, fsync the folder meanwhile (the two flushes overlap), and wait for both: its inode once
    durable under path. None, with nothing changed, where path exists already, tmp is not there yet or
    the file system cannot link: the caller then renames it the usual way. A link never replaces a
    file, so no other writer's file is lost to it; on any error the link is removed again."""
    try:
        inode = os.stat(tmp).st_ino
        os.link(tmp, path)
    except OSError:
        return None
    try:
        fsync_path(path.parent)
        return synced.result()
    except BaseException:
        withdraw(path, inode)
        raise


def fsync_path(path: Path, data_only: bool = False) -> None:
    """fsync a file or folder by its name (fdatasync with data_only): a flush of any descriptor of a file
    flushes the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def remove_stale(folder: Path, older_than_s: float) -> int:
    """Remove the temporary files (``.*.tmp``) under folder untouched for older_than_s; returns how many."""
    cutoff = time.time() - older_than_s
    removed = 0
    for tmp in folder.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
    return removed


def withdraw(path: Path, inode: int) -> None:
    """Remove a published file whose record did not commit, unless another writer has replaced it since."""
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


def write_durably(path: Path, data: bytes) -> None:
    """Write data to path atomically: temporary file, fsync, rename, fsync of the folder."""
    publish(write_temporary(path, data), path)


@contextmanager
def durable_path(path: Path) -> Iterator[Path]:
    """A temporary path beside path for a writer that wants a file name (torch.save, an ONNX export);
    on success its file is fsynced and published under path, on failure removed."""
    tmp = temporary_name(path)
    ensure_folder(tmp.parent)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sync_fd(fd: int) -> int:
    """fsync an open file descriptor; returns its inode."""
    os.fsync(fd)
    return os.fstat(fd).st_ino


def sync_file(src: Path, tmp: Path, folder: Path) -> int:
    """Make a file written by someone else durable as tmp, to be published into folder (made here):
    fsynced where it lies when tmp is src (then on folder's file system), else copied to tmp and the
    copy fsynced. Returns tmp's inode."""
    ensure_folder(folder)
    if src == tmp:
        fd = os.open(src, os.O_RDONLY)
        try:
            return sync_fd(fd)
        finally:
            os.close(fd)
    with open(src, "rb") as f, open(tmp, "xb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
        out.flush()
        return sync_fd(out.fileno())
