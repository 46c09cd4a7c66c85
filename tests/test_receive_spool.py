"""The spool file a C-STORE dataset is written to as it arrives: whole buffers, direct I/O where the file
system has it, the end padded and cut, the first bytes read back from memory (receive/spool.py)."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import need

from dxnode.receive import spool
from dxnode.receive.spool import SpoolFile

CHUNK = spool._CHUNK
SIZES = [1, 4095, 4096, 4097, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def received(folder: Path, data: bytes, pool: ThreadPoolExecutor | None, fragment: int = 16_000) -> SpoolFile:
    """data written to a spool file in fragments, as pynetdicom writes them, and finished."""
    file = SpoolFile(folder, limit=10 * CHUNK, pool=pool)
    for at in range(0, len(data), fragment):
        file.write(data[at : at + fragment])
        file.flush()
    file.finished()
    return file


@pytest.mark.parametrize("size", SIZES)
def test_the_file_on_disk_is_every_byte_written_and_no_more(
    tmp_path: Path, pool: ThreadPoolExecutor, size: int
) -> None:
    data = os.urandom(size)
    file = received(tmp_path, data, pool)
    assert file.synced is not None
    inode = file.synced.result()
    file.close()
    path = Path(file.name)
    assert path.stat().st_ino == inode
    assert path.read_bytes() == data
    assert file.digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_without_a_pool_the_rest_is_written_at_the_end(tmp_path: Path) -> None:
    data = os.urandom(CHUNK + 5000)
    file = received(tmp_path, data, None)
    assert file.synced is None and file.error is None
    assert Path(file.name).read_bytes() == data  # before close: finished() wrote it
    file.close()


def test_direct_io_where_the_file_system_has_it(tmp_path: Path) -> None:
    """The spool folder of the tests is on the machine's disk (ext4 here): opened O_DIRECT."""
    need(spool._O_DIRECT != 0, "O_DIRECT (Linux)")
    file = SpoolFile(tmp_path, limit=CHUNK)
    try:
        flags = fcntl.fcntl(file._fd, fcntl.F_GETFL)
        need(bool(flags & spool._O_DIRECT) or file._direct, f"direct I/O on the file system of {tmp_path}")
        assert flags & spool._O_DIRECT and file._direct
    finally:
        file.close()


def test_a_disk_that_refuses_a_direct_write_gets_it_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write the device refuses with EINVAL (here: a length of no whole sectors) goes again without
    O_DIRECT, and the file still ends up exactly the bytes written."""
    need(spool._O_DIRECT != 0, "O_DIRECT (Linux)")
    monkeypatch.setattr(spool, "_BLOCK", 1000)
    monkeypatch.setattr(spool, "_buffered", set())
    data = os.urandom(CHUNK + 777)
    file = received(tmp_path, data, None)
    assert not file._direct and file.error is None
    assert Path(file.name).read_bytes() == data
    file.close()
    later = SpoolFile(tmp_path, limit=CHUNK)  # that folder's file system is not asked again
    assert not later._direct and not fcntl.fcntl(later._fd, fcntl.F_GETFL) & spool._O_DIRECT
    later.close()


def test_without_o_direct_the_same_bytes_are_written_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool, "_O_DIRECT", 0)  # a platform without it
    data = os.urandom(2 * CHUNK + 3)
    file = received(tmp_path, data, None)
    assert not file._direct and file.error is None
    assert Path(file.name).read_bytes() == data
    file.close()


def test_the_reader_gives_the_first_bytes_from_memory_and_the_rest_from_disk(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    data = os.urandom(CHUNK + 12345)  # the head kept in memory is 64 KiB: the reads below cross it
    file = received(tmp_path, data, pool)
    with file.reader(Path(file.name)) as f:
        assert f.read(144) == data[:144]
        f.seek(spool._HEAD - 10)
        assert f.read(100) == data[spool._HEAD - 10 : spool._HEAD + 90]
        f.seek(-5, 2)
        assert f.read() == data[-5:]
        f.seek(3)
        assert f.read() == data[3:]
    file.close()


def test_past_its_limit_a_spool_file_stops_writing_and_says_so(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    file = SpoolFile(tmp_path, limit=CHUNK + 100, pool=pool)
    for _ in range(5):
        file.write(os.urandom(CHUNK // 2))
    file.finished()
    assert file.over and file.synced is None  # nothing to make durable: the handler refuses it
    assert file.received == 5 * CHUNK // 2
    assert Path(file.name).stat().st_size <= file.limit
    file.close()


def test_a_write_that_fails_is_kept_and_raises_nothing(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    """A disk that fails a write (as a full one would): the error is kept for the handler (0xA700)."""
    file = SpoolFile(tmp_path, limit=4 * CHUNK, pool=pool)
    os.close(file._fd)
    file._fd = os.open(os.devnull, os.O_RDONLY)  # any write to it fails with EBADF
    file.write(os.urandom(CHUNK + 1))
    file.finished()
    assert isinstance(file.error, OSError) and file.synced is None
    file.close()


def test_buffers_are_reused(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    first = received(tmp_path, os.urandom(1000), pool)
    first.close()
    buffer = spool._buffers._free[-1]
    second = SpoolFile(tmp_path, limit=CHUNK, pool=pool)
    assert second._buf is buffer
    second.close()
