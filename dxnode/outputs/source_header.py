"""Source headers made safe to copy into the objects the node writes (SR and SC).

Real and de-identified studies lack Type 2 attributes, use any character set, and carry values
longer than their VR allows. highdicom copies patient and study attributes from a source image
and raises on what it cannot use, and dciodvfy rejects over-long values. `reference_header`
returns a copy of a source header that has every Type 2 patient/study attribute (empty where the
source has none), its text decoded and re-encoded as UTF-8 (ISO_IR 192), and every value
within its VR's length; what it changed comes back as notes (they name attributes, never values).
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# Type 2 attributes of the Patient and General Study modules that highdicom reads unconditionally.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

# Maximum value lengths (bytes) of the text VRs (PS3.5 Table 6.2-1); PN is per component group.
MAX_LENGTH = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_CS = re.compile(r"^[A-Z0-9_ ]*$")
PATIENT_SEX = {"M", "F", "O", ""}
UTF8 = "ISO_IR 192"


def truncate_bytes(text: str, limit: int) -> str:
    """The longest prefix of text whose UTF-8 encoding fits in limit bytes."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore").rstrip()


def _fit_value(value: Any, vr: str) -> tuple[Any, bool]:
    """One value of a text VR fitted to the VR's maximum length; (value, changed)."""
    limit = MAX_LENGTH[vr]
    if vr == "PN":
        groups = str(value).split("=")
        fitted = [truncate_bytes(g, limit) for g in groups]
        return ("=".join(fitted), True) if fitted != groups else (value, False)
    text = str(value)
    fitted_text = truncate_bytes(text, limit)
    return (fitted_text, True) if fitted_text != text else (value, False)


def _fit_element(elem: DataElement, where: str, notes: list[str]) -> None:
    """Truncate each value of a text element to its VR's maximum, noting it."""
    if elem.VR not in MAX_LENGTH or elem.value is None or elem.value == "":
        return
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    changed = False
    fitted = []
    for v in values:
        new, c = _fit_value(v, elem.VR)
        fitted.append(new)
        changed |= c
    if changed:
        elem.value = fitted if len(fitted) > 1 else fitted[0]
        notes.append(f"{where}{elem.keyword or elem.tag} truncated to {MAX_LENGTH[elem.VR]} bytes ({elem.VR})")


def _valid_or_empty(ds: Dataset, notes: list[str]) -> None:
    """Empty the top-level DA, TM, CS and Patient's Sex values that are not valid for their VR."""
    for elem in ds:
        if elem.VR not in ("DA", "TM", "CS") or elem.value in (None, ""):
            continue
        pattern = {"DA": _DA, "TM": _TM, "CS": _CS}[elem.VR]
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        if all(pattern.match(str(v).strip()) for v in values):
            continue
        elem.value = ""
        notes.append(f"{elem.keyword or elem.tag} emptied: not a valid {elem.VR} value")
    if str(ds.get("PatientSex", "") or "") not in PATIENT_SEX:
        ds.PatientSex = ""
        notes.append("PatientSex emptied: not M, F or O")


def _decode_to_utf8(ds: Dataset, notes: list[str]) -> None:
    """Decode every text value with the source's character set and mark the copy as UTF-8."""
    declared = ds.get("SpecificCharacterSet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds.decode()
    if any("charset" in str(w.message).lower() or "encoding" in str(w.message).lower() for w in caught):
        notes.append(f"Specific Character Set {declared!r} is not fully known; decoded with pydicom's fallback")
    ds.SpecificCharacterSet = UTF8


def _fit_all(ds: Dataset, notes: list[str], where: str = "") -> None:
    """Fit every text element, recursing into sequences."""
    for elem in ds:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                _fit_all(item, notes, f"{where}{elem.keyword}[{i}].")
        else:
            _fit_element(elem, where, notes)


def reference_header(source: Dataset) -> tuple[Dataset, list[str]]:
    """A copy of a source header that SR and SC builders can copy from, and notes on what changed."""
    ds = copy.deepcopy(source)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            del ds[keyword]
    notes: list[str] = []
    _decode_to_utf8(ds, notes)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    _valid_or_empty(ds, notes)
    _fit_all(ds, notes)
    if isinstance(ds.PatientName, PersonName) and not str(ds.PatientName):
        ds.PatientName = ""
    _deidentification_method(ds, notes)
    return ds, notes


# De-identification Method when a de-identified source states none (Type 1C: needed once identity is removed).
UNSTATED_DEIDENTIFICATION = "Not stated by the source (its Patient Identity Removed is YES)"


def _deidentification_method(ds: Dataset, notes: list[str]) -> None:
    """A de-identified source's method, which the written objects carry: its own, else a statement that it has none."""
    if str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() != "YES":
        return
    if str(ds.get("DeidentificationMethod", "") or "").strip() or ds.get("DeidentificationMethodCodeSequence"):
        return
    ds.DeidentificationMethod = UNSTATED_DEIDENTIFICATION
    notes.append("DeidentificationMethod added: the source has Patient Identity Removed YES but states no method")
