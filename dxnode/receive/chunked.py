"""C-STORE datasets received straight to disk, into the node's incoming/ folder, never whole in memory.

pynetdicom's chunked receive (``_config.STORE_RECV_CHUNKED_DATASET``) writes each C-STORE request's
P-DATA fragments, after a preamble and file meta group, to a temporary file and gives the handler
its path (``event.dataset_path``) instead of a BytesIO of the whole dataset. It makes that file with
``tempfile.NamedTemporaryFile`` in the system's temporary folder; ``enable`` puts ``SpoolFile`` in
that name's place in ``pynetdicom.dimse_messages``, so that for an AE registered here the file is a
hidden ``.*.tmp`` file in the node's incoming/ folder, on the store's file system: the durable path
fsyncs and renames that very file instead of copying it (``Ingest.store_c_store``). A SpoolFile
counts what it is given and stops writing past the node's max_instance_mb, and a write error (disk
full) is kept for the handler to answer 0xA700: nothing raises in pynetdicom's reader thread. The
file meta group is the receiver's own encoding (part10.file_header, the same bytes as pydicom's).
Its fsync starts on the node's writer pool as soon as the last fragment is in (``SpoolFile.synced``),
while the message goes on to the handler and its header is parsed.

These are process-wide switches of pynetdicom: every C-STORE received in the process comes as a
file while a registered AE exists (an unregistered one gets pynetdicom's own temporary file).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider

from dxnode.bounds import MB
from dxnode.durable import ensure_folder, sync_file
from dxnode.receive.command import StoreCommand
from dxnode.receive.parse import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, StoreRefused
from dxnode.receive.part10 import file_header
from dxnode.receive.spool import SpoolFile

_lock = threading.Lock()
# AE -> (folder, limit, the pool that fsyncs a received file)
_folders: weakref.WeakKeyDictionary[AE, tuple[Path, int, Executor]] = weakref.WeakKeyDictionary()
_HEADER_ROOM = 1024  # the preamble and file meta group, beyond the dataset's own limit
_ORIGINAL = (
    dimse_messages.NamedTemporaryFile,
    dimse_messages.create_file_meta,
    dimse_messages.write_file_meta_info,
    dimse_messages.DIMSEMessage.message_to_primitive,
)


def _spool_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile call: a SpoolFile for an association of a registered AE."""
    thread = threading.current_thread()  # pynetdicom decodes P-DATA on the association's DUL thread
    if isinstance(thread, DULServiceProvider):
        found = _folders.get(thread.assoc.ae)
        if found is not None:
            return SpoolFile(*found)
    return _ORIGINAL[0](*args, **kwargs)


def _message_to_primitive(self: dimse_messages.DIMSEMessage) -> Any:
    """pynetdicom's, called once a message is whole: a dataset received to a SpoolFile starts its fsync;
    a command set read by command.store_request (inline.py) gives its primitive as pynetdicom would."""
    spool = self._data_set_file
    if isinstance(spool, SpoolFile):
        spool.finished()
    command = self.command_set
    return command.primitive(self) if isinstance(command, StoreCommand) else _ORIGINAL[3](self)


def _create_file_meta(*, sop_class_uid: UID, sop_instance_uid: UID, transfer_syntax: UID) -> tuple[str, str, str]:
    return str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax)


def _write_file_meta_info(fp: Any, meta: tuple[str, str, str]) -> None:
    """The file meta group after the preamble and 'DICM' that pynetdicom has written."""
    try:
        head = file_header(*meta)
    except (UnicodeEncodeError, ValueError):  # a UID that is not ASCII: pydicom's encoder, and the parse refuses it
        original_create, original_write = _ORIGINAL[1], _ORIGINAL[2]
        sop_class, instance, syntax = meta
        file_meta = original_create(
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(instance), transfer_syntax=UID(syntax)
        )
        original_write(fp, file_meta)
        return
    fp.write(head[132:])


@dataclass(frozen=True)
class Spooled:
    """A received instance's whole Part 10 file on disk, open for reading (at its dataset, at first)."""

    path: Path
    file: BufferedReader
    size: int  # the whole file's
    spool: SpoolFile | None = None  # what wrote it, when it was a SpoolFile

    def durable(self, tmp: Path, folder: Path, pool: Executor) -> Future[int]:
        """The file fsynced as tmp, to be renamed into folder (made here): its inode once done. The fsync
        started with its last fragment where tmp is the file itself, else durable.sync_file's on pool."""
        if self.spool is not None and self.spool.synced is not None and tmp == self.path:
            ensure_folder(folder)
            return self.spool.synced
        return pool.submit(sync_file, self.path, tmp, folder)

    def sha256(self) -> str:
        """The SHA-256 of the file: as the SpoolFile hashed it while writing, else read back."""
        if self.spool is not None:
            return self.spool.digest.hexdigest()
        self.file.seek(0)
        return hashlib.file_digest(self.file, "sha256").hexdigest()


@contextlib.contextmanager
def _opened(path: Path, spool: SpoolFile | None) -> Iterator[tuple[Spooled, int]]:
    """(the file open at its dataset, the dataset's size as received); StoreRefused if it cannot be used."""
    if spool is not None and spool.error is not None:
        raise StoreRefused(OUT_OF_RESOURCES, f"cannot write file: {spool.error.strerror or spool.error}"[:64])
    with spool.reader(path) if spool is not None else open(path, "rb") as f:
        head = f.read(144)
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
            raise StoreRefused(CANNOT_UNDERSTAND, "received file has no file meta group")
        start = 144 + int(struct.unpack("<I", head[140:144])[0])
        f.seek(start)
        end = spool.received if spool is not None else os.fstat(f.fileno()).st_size
        yield Spooled(path, f, end, spool), end - start


def received_file(req: C_STORE) -> contextlib.AbstractContextManager[tuple[Spooled, int]] | None:
    """The file pynetdicom received req's dataset to, opened as a context (the file, the dataset's size),
    or None where it received the dataset into memory (req.DataSet)."""
    path = req._dataset_path  # pynetdicom's: set when it received the dataset to a file
    if path is None or isinstance(path, tuple):  # a tuple is a file of a request being sent
        return None
    spool = getattr(req, "_dataset_file", None)
    return _opened(path, spool if isinstance(spool, SpoolFile) else None)


def register(ae: AE, folder: Path, max_instance_mb: float, pool: Executor) -> None:
    """Receive the C-STOREs of ae's associations into folder, at most max_instance_mb each (then dropped),
    each file's fsync started on pool once its last fragment is in."""
    with _lock:
        _folders[ae] = (folder, int(max_instance_mb * MB) + _HEADER_ROOM, pool)
        dimse_messages.DIMSEMessage.message_to_primitive = _message_to_primitive  # type: ignore[method-assign]
        dimse_messages.NamedTemporaryFile = _spool_file
        dimse_messages.create_file_meta = _create_file_meta  # type: ignore[assignment]
        dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[assignment]
        _config.STORE_RECV_CHUNKED_DATASET = True


def limit(ae: AE) -> int | None:
    """The most bytes one C-STORE of ae's associations may bring (max_instance_mb and its file meta);
    None where ae is not registered (not a listener's AE)."""
    found = _folders.get(ae)
    return found[1] if found is not None else None


def unregister(ae: AE) -> None:
    """ae's C-STOREs no longer go to its folder; with no AE left, pynetdicom receives in memory again."""
    with _lock:
        _folders.pop(ae, None)
        if not _folders:
            _config.STORE_RECV_CHUNKED_DATASET = False
            (
                dimse_messages.NamedTemporaryFile,
                dimse_messages.create_file_meta,
                dimse_messages.write_file_meta_info,
                dimse_messages.DIMSEMessage.message_to_primitive,  # type: ignore[method-assign]
            ) = _ORIGINAL
