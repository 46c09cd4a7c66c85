"""The DICOM file header (PS3.10 7.1) of a received instance: preamble, prefix and file meta group.

Encoded directly, not through pydicom: the receiver writes one per instance, and this is the same
bytes as ``pydicom.filewriter.write_file_meta_info`` for the same values (a test checks it) at a
tenth of the cost.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

_PREAMBLE = b"\x00" * 128 + b"DICM"
_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"


def even(value: str, pad: bytes) -> bytes:
    """A text value's bytes padded to even length (PS3.5 7.1.1): NUL for UI, space for other text."""
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _short(element: int, vr: bytes, value: str, pad: bytes) -> bytes:
    """One group 2 element with a 2-byte length (Explicit VR Little Endian), padded to even length."""
    raw = even(value, pad)
    return struct.pack("<HH2sH", 0x0002, element, vr, len(raw)) + raw


# The same for every file: built once.
_IMPLEMENTATION = _short(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID), b"\x00") + _short(
    0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION, b" "
)


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, 'DICM' and the file meta group for one instance (UIDs already validated as UIDs)."""
    body = b"".join(
        (
            _VERSION,
            _short(0x0002, b"UI", sop_class_uid, b"\x00"),
            _short(0x0003, b"UI", sop_instance_uid, b"\x00"),
            _short(0x0010, b"UI", transfer_syntax_uid, b"\x00"),
            _IMPLEMENTATION,
        )
    )
    return _PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body
