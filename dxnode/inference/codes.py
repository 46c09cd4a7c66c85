"""Standard codes of model labels: what a finding is called in the SR (SNOMED CT, RadLex, ...).

A bundle's manifest maps each label to [code value, coding scheme designator, code meaning]
(``"codes"``); a label it leaves out gets a private 99DXNODE code, and `dxnode model info`
warns about it. The built-in demo model's chest labels carry their SNOMED CT codes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

PRIVATE_SCHEME = "99DXNODE"  # private coding scheme, for labels with no standard code

# (code value, coding scheme designator, code meaning)
LabelCode = tuple[str, str, str]

# The demo's labels are the NIH ChestX-ray14 findings: SNOMED CT (the DICOM designator SCT).
# "Effusion" there means pleural effusion.
CHEST_CODES: dict[str, LabelCode] = {
    "Atelectasis": ("46621007", "SCT", "Atelectasis"),
    "Cardiomegaly": ("8186001", "SCT", "Cardiomegaly"),
    "Effusion": ("60046008", "SCT", "Pleural effusion"),
    "Nodule": ("27925004", "SCT", "Nodule"),
    "Pneumothorax": ("36118008", "SCT", "Pneumothorax"),
}

_DESIGNATOR = re.compile(r"^[A-Z0-9_ .-]{1,16}$")


class CodeError(ValueError):
    """A manifest's codes are malformed."""


def parse_codes(raw: Any, labels: Iterable[str]) -> dict[str, LabelCode]:
    """The manifest's "codes" object checked: label -> [value, scheme, meaning], labels of the bundle only."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise CodeError(f'"codes" must map labels to [value, scheme, meaning], not {type(raw).__name__}')
    known = set(labels)
    codes: dict[str, LabelCode] = {}
    for label, code in raw.items():
        if label not in known:
            raise CodeError(f'"codes" names {label!r}, which is not one of the labels')
        if (
            not isinstance(code, list | tuple)
            or len(code) != 3
            or not all(isinstance(part, str) and part.strip() for part in code)
        ):
            raise CodeError(f'"codes" of {label!r} must be [value, scheme, meaning] (three non-empty strings)')
        value, scheme, meaning = (part.strip() for part in code)
        if len(value) > 16 or len(meaning) > 64 or not _DESIGNATOR.match(scheme):
            raise CodeError(
                f'"codes" of {label!r}: value at most 16 characters, scheme a coding scheme designator'
                f" (e.g. SCT, RADLEX), meaning at most 64 characters; got {[value, scheme, meaning]}"
            )
        codes[label] = (value, scheme, meaning)
    return codes


def private_code(label: str) -> LabelCode:
    """The 99DXNODE code of a label: the label itself when it fits a code value, else a digest.

    Code values are at most 16 characters; labels that differ only past that or in punctuation
    must still get different codes.
    """
    code = "".join(c if c.isalnum() else "_" for c in label.upper())
    if not code or code != label.upper() or len(code) > 16:
        code = f"{code[:7]}_{hashlib.sha256(label.encode()).hexdigest()[:8]}".lstrip("_")
    return code, PRIVATE_SCHEME, label[:64]


def label_code(label: str, codes: Mapping[str, LabelCode] | Iterable[tuple[str, str, str, str]]) -> LabelCode:
    """The standard code of a label from the manifest's codes (a map, or (label, value, scheme, meaning) rows),
    else its private one."""
    table = codes if isinstance(codes, Mapping) else {row[0]: (row[1], row[2], row[3]) for row in codes}
    return table.get(label) or private_code(label)


def uncoded(labels: Iterable[str], codes: Mapping[str, LabelCode]) -> list[str]:
    """The labels that have no standard code (they get a private 99DXNODE one)."""
    return [label for label in labels if label not in codes]
