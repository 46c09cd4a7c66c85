"""A received instance parsed and checked before anything is stored, whichever transport carried it.

The bounds (size, inflated size) and the UID rules are the same for C-STORE and STOW-RS: UIDs from the
network name files and folders only once they are valid (PS3.5 9.1, at most 64 characters).

Memory: only the attributes before Pixel Data are decoded (``read_header``), values over 64 KB are
skipped, and a Deflated dataset is inflated in 64 KB steps into an unnamed spool file, never whole in
memory; ``InflightBudget`` bounds the bytes of received datasets being handled at once in a process.
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from dxnode.bounds import MB
from dxnode.uids import is_valid_uid

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


class StoreRefused(Exception):
    """A C-STORE that must be answered with a failure status."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


@dataclass(frozen=True)
class Received:
    """The attributes of a received instance that the store keeps."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    study_description: str
    modality: str
    body_part_examined: str
    series_number: int | None
    series_description: str
    instance_number: int | None


_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
    "AccessionNumber", "StudyDate", "StudyDescription", "Modality", "BodyPartExamined", "SeriesNumber",
    "SeriesDescription", "InstanceNumber",
)  # fmt: skip
_TAGS = {keyword: Tag(keyword) for keyword in _KEYWORDS}


def _value(ds: Dataset, keyword: str) -> Any:
    """An attribute's value as pydicom converts it on access, None if absent: looked up by its tag,
    once (an access by keyword goes through the keyword table and converts again each time)."""
    element = ds.get(_TAGS[keyword])
    return None if element is None else element.value


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """An attribute as text, at most limit characters ('' if absent)."""
    value = _value(ds, keyword)
    return "" if value is None else str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    """An IS attribute as int, or None."""
    try:
        value = _value(ds, keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _uids(ds: Dataset) -> dict[str, str]:
    """The dataset's own UIDs (SOP Class, SOP Instance, Study, Series): each present, of VR UI."""
    found = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        element = ds.get(_TAGS[keyword])
        if element is None:
            raise StoreRefused(CANNOT_UNDERSTAND, f"missing {keyword}")
        if element.VR != "UI":
            raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} has VR {element.VR}, not UI")
        found[keyword] = str(element.value)
    return found


def parse_dataset(ds: Dataset, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> Received:
    """Validate a received dataset against the UIDs it came with (C-STORE request or STOW-RS file meta)."""
    try:
        own = _uids(ds)
        study_uid = own["StudyInstanceUID"]
        series_uid = own["SeriesInstanceUID"]
        rec = Received(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            patient_id=_text(ds, "PatientID", 64),
            patient_name=_text(ds, "PatientName", 324),
            accession_number=_text(ds, "AccessionNumber", 16),
            study_date=_text(ds, "StudyDate", 8),
            study_description=_text(ds, "StudyDescription", 64),
            modality=_text(ds, "Modality", 16),
            body_part_examined=_text(ds, "BodyPartExamined", 64),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 64),
            instance_number=_int(ds, "InstanceNumber"),
        )
    except AttributeError as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"missing attribute: {exc}"[:64]) from exc
    except StoreRefused:
        raise
    except Exception as exc:  # pydicom raises many kinds on a corrupt stream
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}"[:64]) from exc
    uids = {
        "SOPClassUID": sop_class_uid,
        "SOPInstanceUID": sop_instance_uid,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "TransferSyntaxUID": transfer_syntax_uid,
    }
    for name, value in uids.items():
        if not is_valid_uid(value):
            raise StoreRefused(CANNOT_UNDERSTAND, f"invalid {name}")
    if own["SOPInstanceUID"] != rec.sop_instance_uid:
        raise StoreRefused(CANNOT_UNDERSTAND, "SOPInstanceUID differs from request")
    return rec


_CHUNK = 64 * 1024
# Header values longer than this are skipped, not read: none that parse_dataset reads comes near it.
_DEFER = 64 * 1024
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float and Pixel Data


class InflightBudget:
    """Bytes of received datasets being checked, parsed and stored at once in one process, C-STORE and
    STOW-RS together: past [node] max_inflight_mb a further instance is refused with 0xA700. One
    instance alone is always let in (max_instance_mb bounds it), however large the budget."""

    def __init__(self, max_inflight_mb: float) -> None:
        self.max_inflight_mb = max_inflight_mb
        self.limit = int(max_inflight_mb * MB)
        self.used = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when nothing is held any more

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Count nbytes while the block runs; StoreRefused(0xA700) at once if they do not fit."""
        with self._lock:
            if self.used and self.used + nbytes > self.limit:
                raise StoreRefused(OUT_OF_RESOURCES, f"node busy: over [node] max_inflight_mb {self.max_inflight_mb:g}")
            self.used += nbytes
        try:
            yield
        finally:
            with self._lock:
                self.used -= nbytes
                if not self.used:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is held (the instances being handled are answered), at most timeout seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: not self.used, timeout)


def _over(max_instance_mb: float, what: str) -> StoreRefused:
    return StoreRefused(OUT_OF_RESOURCES, f"{what} over [node] max_instance_mb {max_instance_mb:g}")


def _inflate_to(raw: BinaryIO, out: BinaryIO, max_instance_mb: float) -> None:
    """Inflate the raw Deflate stream (no zlib header) read from raw into out, 64 KB at a time.

    StoreRefused(0xA700) as soon as the output passes max_instance_mb, 0xC000 if it is corrupt or cut short."""
    limit = int(max_instance_mb * MB)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, b""
    try:
        while not inflater.eof:
            ended = False
            if not pending:
                pending = raw.read(_CHUNK)
                ended = not pending
            data = inflater.decompress(pending, _CHUNK)
            pending = inflater.unconsumed_tail
            if ended and not data:
                raise StoreRefused(CANNOT_UNDERSTAND, "Deflate stream cut short")
            total += len(data)
            if total > limit:
                raise _over(max_instance_mb, "inflates")
            out.write(data)
    except zlib.error as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, "corrupt Deflate stream") from exc


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def read_header(raw: BinaryIO, size: int, transfer_syntax_uid: str, max_instance_mb: float, spool_dir: Path) -> Dataset:
    """The attributes before Pixel Data of an encoded dataset: size bytes of raw from its position.

    StoreRefused(0xA700) if it is, or inflates to, more than max_instance_mb; 0xC000 if it cannot be
    read. Memory stays small whatever the dataset declares: a Deflated one is inflated in steps into
    an unnamed file in spool_dir (gone when closed), values over 64 KB are skipped, not read."""
    if size > int(max_instance_mb * MB):
        raise _over(max_instance_mb, "dataset")
    try:
        syntax = UID(transfer_syntax_uid)
        implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    except ValueError:
        raise StoreRefused(CANNOT_UNDERSTAND, "unknown transfer syntax") from None
    with contextlib.ExitStack() as stack:
        end = raw.tell() + size
        if syntax.is_deflated:
            spool = stack.enter_context(tempfile.TemporaryFile(dir=spool_dir))
            _inflate_to(raw, spool, max_instance_mb)
            end = spool.tell()
            spool.seek(0)
            raw = spool
        try:
            ds = read_dataset(raw, implicit, little, stop_when=_at_pixels, defer_size=_DEFER)
        except Exception as exc:  # pydicom raises many kinds on a corrupt stream
            raise StoreRefused(CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}"[:64]) from exc
        _check_pixels_fit(raw, end, implicit, little)
        return ds


# Explicit VRs whose length has 4 bytes after 2 reserved ones (PS3.5 7.1.2), as pydicom lists them
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)


def _check_pixels_fit(raw: BinaryIO, end: int, implicit: bool, little: bool) -> None:
    """StoreRefused(0xC000) when the Pixel Data element raw is at (read_header stopped there) declares more
    bytes than the dataset has left: a dataset cut short in transit, not stored as if whole. An encapsulated
    one (undefined length) has its end checked by its decoder when a job reads it."""
    at = raw.tell()
    head = raw.read(12)
    if not head:  # no Pixel Data: the dataset ended before it
        return
    order = "<" if little else ">"
    if len(head) < 8 or (not implicit and head[4:6] in _LONG_VRS and len(head) < 12):
        raise StoreRefused(CANNOT_UNDERSTAND, "dataset cut short in its Pixel Data header")
    if implicit:
        header, length = 8, struct.unpack(order + "I", head[4:8])[0]
    elif head[4:6] in _LONG_VRS:
        header, length = 12, struct.unpack(order + "I", head[8:12])[0]
    else:
        header, length = 8, struct.unpack(order + "H", head[6:8])[0]
    if length != 0xFFFFFFFF and at + header + length > end:
        raise StoreRefused(CANNOT_UNDERSTAND, f"Pixel Data cut short: {max(0, end - at - header)} of {length} bytes")


def read_received(
    raw: BinaryIO,
    size: int,
    uids: tuple[str, str, str],
    max_instance_mb: float,
    spool_dir: Path,
) -> Received:
    """A received encoded dataset (C-STORE) checked and parsed: uids are the (SOP Class, SOP Instance,
    transfer syntax) it came with. See read_header for the bounds; StoreRefused with the status to send."""
    sop_class_uid, sop_instance_uid, syntax = uids
    ds = read_header(raw, size, syntax, max_instance_mb, spool_dir)
    return parse_dataset(ds, sop_class_uid, sop_instance_uid, syntax)


@dataclass(frozen=True)
class FileMeta:
    """What a Part 10 file's meta group says of its dataset."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def read_file_meta(f: BinaryIO) -> FileMeta:
    """The File Meta group of a Part 10 file, leaving f at the dataset; StoreRefused(0xC000) without one."""
    try:
        f.seek(0)
        read_preamble(f, False)
        meta = read_dataset(f, False, True, stop_when=lambda tag, vr, length: tag.group != 2, defer_size=_DEFER)
        return FileMeta(
            str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)
        )
    except Exception as exc:  # pydicom raises many kinds on a broken header
        raise StoreRefused(CANNOT_UNDERSTAND, f"not a DICOM Part 10 file: {type(exc).__name__}") from exc


def read_part10(f: BinaryIO, meta: FileMeta, max_instance_mb: float, spool_dir: Path) -> Received:
    """A received Part 10 file (STOW-RS part) checked and parsed under the same bounds as a C-STORE.

    f is positioned at the dataset (read_file_meta leaves it there)."""
    start = f.tell()
    size = f.seek(0, 2) - start
    f.seek(start)
    ds = read_header(f, size, meta.transfer_syntax_uid, max_instance_mb, spool_dir)
    try:
        sop_class = str(ds.get("SOPClassUID", meta.sop_class_uid))
    except Exception as exc:  # a value too long to have been read
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot read SOPClassUID: {type(exc).__name__}") from exc
    if sop_class != meta.sop_class_uid:
        raise StoreRefused(CANNOT_UNDERSTAND, "SOPClassUID differs from the file meta")
    return parse_dataset(ds, meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax_uid)
