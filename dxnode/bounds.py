"""Declared sizes are untrusted: checks made before anything is decoded or inflated.

A 620-byte RLE file can declare 65535 x 65535 pixels, a J2K codestream can declare a larger
image than its dataset, and a 1 MB Deflated dataset can inflate to gigabytes. The pixel
attributes are checked against ``[pipeline] max_decoded_mb`` before any decoder runs, JPEG and
JPEG 2000 frame headers must agree with the dataset, and a Deflated stream is inflated in
bounded chunks (the output thrown away) to learn its size before anything keeps it.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import IO

import numpy as np
from pydicom import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import UID

MB = 1024 * 1024
_CHUNK = 64 * 1024
# Values beyond this are not windows or rescale factors of any real image; they overflow float math.
ABSURD = 1e9


class DeclaredSizeError(ValueError):
    """What an instance declares cannot or must not be decoded; the message says why."""


def inflated_size_exceeds(stream: IO[bytes], limit: int) -> bool:
    """True if a raw Deflate stream (no zlib header) inflates to more than limit bytes.

    Inflates in 64 KB steps and discards the output, so memory stays a few hundred KB whatever
    the stream declares. A corrupt stream counts what it inflated before the error.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        pending = stream.read(_CHUNK)
        while pending:
            data = inflater.decompress(pending, _CHUNK)
            total += len(data)
            if total > limit:
                return True
            if inflater.eof:
                break
            pending = inflater.unconsumed_tail
            if not pending or not data:
                more = stream.read(_CHUNK)
                if not more and not data:
                    break
                pending += more
    except zlib.error:
        pass
    return total > limit


def file_meta_end(f: IO[bytes]) -> tuple[int, str] | None:
    """(offset of the dataset, transfer syntax) of a Part 10 file, from its File Meta group only."""
    f.seek(0)
    head = f.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return None
    (group_length,) = struct.unpack("<I", head[140:144])
    end = 144 + group_length
    f.seek(144)
    meta = f.read(min(group_length, 4096))
    pos = 0
    while pos + 8 <= len(meta):
        group, element = struct.unpack("<HH", meta[pos : pos + 4])
        vr = meta[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            (length,) = struct.unpack("<I", meta[pos + 8 : pos + 12])
            start = pos + 12
        else:
            (length,) = struct.unpack("<H", meta[pos + 6 : pos + 8])
            start = pos + 8
        if (group, element) == (0x0002, 0x0010):
            return end, meta[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return end, ""


def check_deflated_file(f: IO[bytes], limit: int) -> None:
    """DeclaredSizeError if the open file is Deflated Explicit VR Little Endian inflating beyond limit bytes."""
    try:
        found = file_meta_end(f)
        deflated = found is not None and UID(found[1]).is_deflated
    except (ValueError, struct.error):  # not a transfer syntax, a broken meta group: dcmread says why
        return
    if not deflated or found is None:
        return
    f.seek(found[0])
    if inflated_size_exceeds(f, limit):
        raise DeclaredSizeError(f"Deflated dataset inflates to more than {limit // MB} MB")


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute, DeclaredSizeError if absent (without default) or not an integer."""
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise DeclaredSizeError(f"no {keyword} in the Image Pixel module")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DeclaredSizeError(f"{keyword} {str(value)[:20]!r} is not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise DeclaredSizeError(f"{keyword} {str(value)[:20]!r} is not an integer")
    return int(number)


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames (1 when absent); DeclaredSizeError unless it is a positive integer."""
    n = _int_attr(ds, "NumberOfFrames", 1)
    if n < 1:
        raise DeclaredSizeError(f"Number of Frames {n} is not a positive integer")
    return n


def check_pixel_attributes(ds: Dataset, frames_decoded: int, max_decoded_mb: float) -> None:
    """Image Pixel attributes sane, and the decoded size of the frames to decode within the limit."""
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    if rows < 1 or cols < 1:
        raise DeclaredSizeError(f"Rows x Columns {rows} x {cols} is not an image")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if samples not in (1, 3):
        raise DeclaredSizeError(f"unsupported Samples per Pixel {samples}")
    bits = _int_attr(ds, "BitsAllocated")
    if bits not in (1, 8, 16, 32, 64):
        raise DeclaredSizeError(f"Bits Allocated {bits} is not 1, 8, 16, 32 or 64")
    stored = _int_attr(ds, "BitsStored", bits)
    if not 1 <= stored <= bits:
        raise DeclaredSizeError(f"Bits Stored {stored} is not between 1 and Bits Allocated {bits}")
    size = rows * cols * frames_decoded * samples * max(1, bits // 8)
    if size > max_decoded_mb * MB:
        raise DeclaredSizeError(
            f"declared size {rows} x {cols} x {frames_decoded} frame(s) x {samples} sample(s) x {bits} bits"
            f" = {size / MB:.0f} MB is over [pipeline] max_decoded_mb = {max_decoded_mb:g}"
        )


def check_rescale(ds: Dataset) -> None:
    """Rescale Slope and Intercept finite, the slope non-zero, neither absurd."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DeclaredSizeError(f"{keyword} {str(value)[:20]!r} is not a number") from None
        if not math.isfinite(number) or abs(number) > ABSURD or (keyword == "RescaleSlope" and number == 0):
            raise DeclaredSizeError(f"{keyword} {number!r} is not a usable number")


def usable_window(center: float, width: float) -> bool:
    """A Window Center/Width pair that is finite and within any real pixel range."""
    return all(math.isfinite(v) and abs(v) <= ABSURD for v in (center, width)) and width > 0


def j2k_size(frame: bytes) -> tuple[int, int, int, int] | None:
    """(columns, rows, components, max bit depth) from a JPEG 2000 codestream's SIZ marker."""
    at = frame.find(b"\xff\x4f\xff\x51", 0, 65536)  # SOC then SIZ, after any JP2 boxes
    if at < 0 or len(frame) < at + 6 + 38:
        return None
    p = at + 6  # Lsiz(2) then Rsiz(2)
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[p + 2 : p + 18])
    (csiz,) = struct.unpack(">H", frame[p + 34 : p + 36])
    depths = [(b & 0x7F) + 1 for b in frame[p + 36 : p + 36 + 3 * csiz : 3]]
    return xsiz - xo, ysiz - yo, csiz, max(depths or [0])


def jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) from a JPEG or JPEG-LS frame's SOF marker."""
    pos = 2 if frame[:2] == b"\xff\xd8" else -1
    if pos < 0:
        return None
    while pos + 4 <= len(frame) and pos < 1 << 20:
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        (length,) = struct.unpack(">H", frame[pos + 2 : pos + 4])
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if pos + 10 > len(frame):
                return None
            rows, cols = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return cols, rows, frame[pos + 9]
        if marker == 0xDA:
            return None
        pos += 2 + length
    return None


def check_codestreams(ds: Dataset, indices: list[int], n_frames: int) -> None:
    """JPEG / JPEG 2000 frame headers of the frames to decode must agree with Rows, Columns and samples."""
    ts = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""))
    name = ts.keyword or str(ts)
    j2k = name.startswith(("JPEG2000", "HTJ2K"))
    jpeg = name.startswith(("JPEGBaseline", "JPEGExtended", "JPEGLossless", "JPEGLS"))
    if not (j2k or jpeg) or "PixelData" not in ds:
        return
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    for i in indices:
        try:
            frame = get_frame(ds.PixelData, i, number_of_frames=n_frames)
        except Exception as exc:
            raise DeclaredSizeError(f"cannot find frame {i + 1} in the encapsulated pixel data: {exc}") from exc
        header: tuple[int, ...] | None = j2k_size(frame) if j2k else jpeg_size(frame)
        if header is None:
            raise DeclaredSizeError(f"frame {i + 1} has no readable {'JPEG 2000' if j2k else 'JPEG'} header")
        h_cols, h_rows, h_samples = header[:3]
        if (h_cols, h_rows) != (cols, rows) and not (jpeg and h_rows == 0 and h_cols == cols):
            raise DeclaredSizeError(
                f"frame {i + 1} codestream is {h_cols} x {h_rows}, the dataset says {cols} x {rows}"
            )
        if h_samples != samples:
            raise DeclaredSizeError(f"frame {i + 1} codestream has {h_samples} components, the dataset says {samples}")
        if j2k and header[3] > int(ds.get("BitsAllocated", 16)):
            raise DeclaredSizeError(f"frame {i + 1} codestream has {header[3]}-bit samples, over Bits Allocated")


def all_finite(values: np.ndarray) -> bool:
    """True when no value is NaN or infinite (a broadcast axis, stride 0, is looked at once)."""
    values = values[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in values.strides)]
    return bool(np.isfinite(values).all())
