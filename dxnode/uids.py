"""Validation of identifiers that arrive from the network before they name anything on disk."""

from __future__ import annotations

import re

# PS3.5 9.1: components of digits, no leading zero unless the component is "0", at most 64 chars.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(uid: object) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1), at most 64 characters."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID.fullmatch(uid) is not None


def safe_component(uid: object) -> str:
    """Return uid for use as a file or folder name; ValueError if it is not a valid DICOM UID."""
    if not is_valid_uid(uid):
        raise ValueError(f"not a valid DICOM UID: {str(uid)[:80]!r}")
    return str(uid)


def is_valid_ae_title(value: object) -> bool:
    """True for 1-16 printable ASCII characters without a backslash or control characters."""
    if not isinstance(value, str):
        return False
    stripped = value.strip()
    return 0 < len(stripped) <= 16 and all(32 <= ord(c) < 127 and c != "\\" for c in stripped)
