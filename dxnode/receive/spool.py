"""A received dataset written to disk as it arrives (pynetdicom's temporary file of a C-STORE: chunked.py).

The bytes gather in a page-aligned buffer and go to disk a whole buffer (1 MiB) at a time, with
O_DIRECT where the file system allows it: past the page cache. The last buffer (a whole instance of
up to 1 MiB, a CT slice) is written by the pool thread that then fsyncs the file, while the
receiving thread parses the header: that thread only copies bytes. A buffered write copies every
received byte into page-cache pages allocated for it; on a VM whose free memory goes back to the
host, each such page first touched costs a fault in the host: writing a new 512 KiB file and its
fsync took 0.8-1.3 ms of system CPU that way against 0.2 ms direct (docs/benchmarks.md). The file's
end is written padded to a block (zeros) and the file cut to its length. The buffers are reused,
for the same reason. A file system without direct I/O (EINVAL at open or at a write) gets the
same writes, buffered.

The file's first 64 KiB stay in memory for the parse (``reader``): read back from disk, bytes
written past the page cache would be read from the device.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import mmap
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from pathlib import Path
from typing import Any

from dxnode.durable import sync_fd

_CHUNK = 1024 * 1024  # bytes gathered before they are written (a multiple of _BLOCK)
_BLOCK = 4096  # direct I/O's alignment of offsets and lengths (a page: every file system's block or less)
_HEAD = 64 * 1024  # a received file's first bytes kept in memory for its parse
_KEEP = 16  # buffers kept for reuse per process (more are unmapped once used)
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; 0 elsewhere: buffered writes
_buffered: set[Path] = set()  # folders whose file system refused direct I/O: not asked again


class _Buffers:
    """Page-aligned buffers for direct writes, reused: a page first touched costs far more than one
    written again (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, _CHUNK)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < _KEEP:
                self._free.append(buf)
                return
        buf.close()


_buffers = _Buffers()


class SpoolFile:
    """One received dataset being written (preamble, file meta, P-DATA fragments), in place of
    pynetdicom's NamedTemporaryFile: the same name, write, file.flush and close it uses.

    The bytes gather in a page-aligned buffer and go to disk a whole buffer at a time, with O_DIRECT
    where the file system allows it (past the page cache). Bytes past limit are counted in
    ``received`` but not written; the first OSError is kept in ``error`` and later writes are
    dropped. The handler checks both before it trusts the file."""

    def __init__(self, folder: Path, limit: int, pool: Executor | None = None) -> None:
        self.limit, self.received = limit, 0
        self.error: OSError | None = None
        self._pool = pool
        self.synced: Future[int] | None = None  # the fsync started by finished(): the file's inode
        # Hashed as written, on pynetdicom's reader thread (hashlib lets go of the GIL), while the bytes are
        # in the CPU's cache: the handler then need not read the file back.
        self.digest = hashlib.sha256()
        self.head = b""  # the file's first bytes, kept for the parse (reader())
        self._fd = -1
        self._buf: mmap.mmap | None = None
        self._fill = 0  # bytes in _buf
        self._offset = 0  # bytes of the file written to disk
        self._direct = False
        self.name = str(folder / f".{uuid.uuid4().hex}.dcm.tmp")  # the stale-temporary sweep's pattern
        self.file = self  # pynetdicom calls file.flush() after each fragment
        self._folder = folder
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            try:
                direct = 0 if folder in _buffered else _O_DIRECT
                self._fd = os.open(self.name, flags | direct, 0o666)
                self._direct = direct != 0
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a file system without direct I/O says EINVAL
                    raise
                _buffered.add(folder)
                self._fd = os.open(self.name, flags, 0o666)
        except OSError as exc:  # no file: pynetdicom's unlink of the name after the handler fails quietly
            self.error = exc
            return
        self._buf = _buffers.take()

    def write(self, data: bytes) -> int:
        """Write data unless over the limit or failed before; never raises."""
        self.received += len(data)
        if self.error is None and self.received <= self.limit:
            self.digest.update(data)
            buf, view, at = self._buf, memoryview(data), 0
            assert buf is not None
            while at < len(view):
                n = min(len(view) - at, _CHUNK - self._fill)
                buf[self._fill : self._fill + n] = view[at : at + n]
                self._fill += n
                at += n
                if self._fill == _CHUNK and not self._out(_CHUNK):
                    break
        return len(data)

    def flush(self) -> None:
        """pynetdicom's, after each fragment: nothing to do (whole buffers are written as they fill)."""

    def _out(self, length: int) -> bool:
        """Write the buffer's first length bytes (a multiple of the block size, or the file's end) at
        the file's end; False, with error kept, where that failed."""
        buf = self._buf
        assert buf is not None
        self._keep_head()
        try:
            try:
                written = os.pwrite(self._fd, memoryview(buf)[:length], self._offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct:
                    raise
                # the file system refused direct I/O after all: buffered writes from here on
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
                self._direct = False
                _buffered.add(self._folder)
                written = os.pwrite(self._fd, memoryview(buf)[:length], self._offset)
            if written != length:
                raise OSError(errno.EIO, "short write")
        except OSError as exc:
            self.error = exc
            return False
        self._offset += min(length, self._fill)
        self._fill = 0
        return True

    def _complete(self) -> None:
        """Write what is left in the buffer (padded to a block for direct I/O, then the file cut to its
        length) and give the buffer back; OSError if that fails."""
        if self._fill:
            end, length = self._offset + self._fill, self._fill
            if self._direct:
                length = -(-self._fill // _BLOCK) * _BLOCK
                assert self._buf is not None
                self._buf[self._fill : length] = bytes(length - self._fill)  # no other file's bytes on disk
            padded = length > self._fill
            if not self._out(length):
                assert self.error is not None
                raise self.error
            if padded:  # (also where the write fell back to buffered: the padding went too)
                os.ftruncate(self._fd, end)
        self._release()

    def _keep_head(self) -> None:
        """Keep the file's first bytes (once: the first buffer, before it is written or reused)."""
        if not self.head and self._buf is not None:
            self.head = self._buf[: min(_HEAD, self._fill)]

    def _release(self) -> None:
        if self._buf is not None:
            _buffers.give(self._buf)
            self._buf = None

    def finished(self) -> None:
        """The last fragment is in: write the rest and start the file's fsync on the pool (unless it
        cannot be used: then the rest is written here)."""
        if self.synced is not None or self.error is not None or self.over:
            return
        self._keep_head()
        if self._pool is not None:
            with contextlib.suppress(RuntimeError):  # the pool shut down (the node stopping): the handler's way
                self.synced = self._pool.submit(self._sync)
                return
        try:
            self._complete()
        except OSError as exc:
            self.error = exc

    def _sync(self) -> int:
        self._complete()
        return sync_fd(self._fd)

    def reader(self, path: Path) -> io.BufferedReader:
        """The written file open for reading (call once finished): its first bytes from memory, the rest
        from disk once its last bytes are written (rare: a header longer than the bytes kept)."""
        return io.BufferedReader(_HeadReader(self.head, path, self._written), 16384)

    def _written(self) -> None:
        if self.synced is not None:
            wait([self.synced])  # its last buffer is written on the pool, before the fsync

    def close(self) -> None:
        self._written()  # never close the descriptor under its fsync
        self._release()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    @property
    def over(self) -> bool:
        """True when more than limit bytes came (the file holds only the first ones)."""
        return self.received > self.limit


class _HeadReader(io.RawIOBase):
    """A received file read from its first bytes in memory and, past them, from disk."""

    def __init__(self, head: bytes, path: Path, written: Callable[[], None]) -> None:
        super().__init__()
        self._head, self._path, self._pos, self._fd = head, path, 0, -1
        self._written = written  # returns once the whole file is on disk

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._pos < len(self._head):
            n = min(len(b), len(self._head) - self._pos)
            b[:n] = self._head[self._pos : self._pos + n]
        else:
            n = os.preadv(self.fileno(), [b], self._pos)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._pos
        elif whence == 2:
            offset += os.fstat(self.fileno()).st_size
        self._pos = max(0, offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def fileno(self) -> int:
        if self._fd < 0:
            self._written()
            self._fd = os.open(self._path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()
