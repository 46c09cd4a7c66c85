"""Source headers made safe to copy into the objects the node writes (SR and SC).

Real and de-identified studies lack Type 2 attributes, use any character set, and carry values
longer than their VR allows. highdicom copies patient and study attributes from a source image
and raises on what it cannot use, and dciodvfy rejects over-long values. `reference_header`
returns a copy of a source header that has every Type 2 patient/study attribute (empty where the
source has none), its text decoded and re-encoded as UTF-8 (ISO_IR 192), every value valid for its
VR (dates and times that are not in the calendar emptied, characters the VR does not allow removed)
and within its VR's length (PN per component group); what it changed comes back as notes (they name
attributes, never values). This is the one place where copied values are made valid.

The per-frame functional groups of a multi-frame header (a 1,000-frame Enhanced CT has 1,000
items) are made valid one item at a time, on first use (`FrameItems`): the frames named (those
holding a finding or heatmap) at once, with their notes; the rest only if a writer reads them. A
1,000-frame source so costs what its region frames cost, not about half a second per header.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import math
import re
import warnings
from collections.abc import Collection, Iterator
from typing import Any, overload

from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

log = logging.getLogger("dxnode.outputs.source_header")

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
_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})((\d{2})((\d{2})(\.\d{1,6})?)?)?$")
_DT = re.compile(r"^(\d{4})((\d{2})((\d{2})((\d{2})((\d{2})((\d{2})(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
# Characters no text VR allows (PS3.5 6.1.2, 6.2): C0 controls (ESC too: the copy is UTF-8, not ISO 2022),
# DEL and C1 controls. LT, ST and UT also allow TAB, LF, FF and CR; PN, LO, SH and the rest none.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
# Text VRs whose characters are cleaned; numbers (DS, IS) and UIDs are only truncated, as before.
_CHARACTER_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
PN_GROUPS, PN_COMPONENTS = 3, 5  # alphabetic, ideographic, phonetic; family^given^middle^prefix^suffix
_CS = re.compile(r"^[A-Z0-9_ ]*$")
# Enumerated values the SR/SC builders check (highdicom raises on others); empty means unknown.
ENUMERATED = {
    "PatientSex": frozenset({"M", "F", "O", ""}),
    "Laterality": frozenset({"R", "L", ""}),
    "ImageLaterality": frozenset({"R", "L", "U", "B", ""}),
}
_ORIENTATION = re.compile(r"^[APRLHF]{1,3}$")
# Geometry the SR's image library and the SC read as numbers: how many values each must have.
GEOMETRY = {
    "ImageOrientationPatient": 6,
    "ImagePositionPatient": 3,
    "PixelSpacing": 2,
    "ImagerPixelSpacing": 2,
    "SliceThickness": 1,
}
# Single-frame image SOP classes (PS3.4 B.5): a reference to them names no frame (dciodvfy).
SINGLE_FRAME_SOP_CLASSES = frozenset(
    "1.2.840.10008.5.1.4.1.1." + suffix
    for suffix in ("1", "1.1", "1.1.1", "1.2", "1.2.1", "1.3", "1.3.1", "2", "4", "6.1", "7", "128")
)
_SIGNED_GEOMETRY = frozenset({"ImageOrientationPatient", "ImagePositionPatient"})
UTF8 = "ISO_IR 192"


def truncate_bytes(text: str, limit: int) -> str:
    """The longest prefix of text whose UTF-8 encoding fits in limit bytes."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore").rstrip()


def _fit_person_name(text: str) -> str:
    """A PN value of at most three component groups of at most five components, each group and the whole
    value within 64 bytes: dciodvfy reads a UTF-8 PN's length whole, so the phonetic and then the
    ideographic group are left out when the value would be longer."""
    groups = []
    for group in text.split("=")[:PN_GROUPS]:
        components = group.split("^")
        if len(components) > PN_COMPONENTS:  # the surplus joins the last (suffix) component
            components = [*components[: PN_COMPONENTS - 1], " ".join(components[PN_COMPONENTS - 1 :])]
        groups.append(truncate_bytes("^".join(components), MAX_LENGTH["PN"]))
    while len(groups) > 1 and len("=".join(groups).encode("utf-8")) > MAX_LENGTH["PN"]:
        groups.pop()
    return "=".join(groups)


def _fit_value(text: str, vr: str) -> str:
    """One value of a text VR fitted to the VR's maximum length (PN: per component group)."""
    if vr == "PN":
        return _fit_person_name(text)
    return truncate_bytes(text, MAX_LENGTH[vr]) if vr in MAX_LENGTH else text


def _allowed(text: str, vr: str) -> str:
    """text without the characters its VR does not allow (control characters)."""
    if vr not in _CHARACTER_VRS:
        return text
    return (_CONTROL_IN_TEXT if vr in _TEXT_VRS else _CONTROL).sub("", text)


def _single_valued(elem: DataElement) -> bool:
    """Whether the data dictionary allows the element one value only (VM 1)."""
    try:
        return bool(dictionary_VM(elem.tag) == "1")
    except KeyError:  # private or unknown: no rule to apply
        return False


def _fit_element(elem: DataElement, where: str, notes: list[str]) -> None:
    """Remove the characters a text element's VR does not allow and truncate each value to its VR's maximum, noting it."""
    if elem.VR not in MAX_LENGTH and elem.VR not in _CHARACTER_VRS:
        return
    if elem.value is None or elem.value == "":
        return
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    name = f"{where}{elem.keyword or elem.tag}"
    if len(values) > 1 and _single_valued(elem):  # a backslash in a one-value attribute: the first value kept
        notes.append(f"{name}: {len(values)} values where one is allowed; the first kept")
        values = values[:1]
        elem.value = values[0]
    texts = [str(v) for v in values]
    allowed = [_allowed(t, elem.VR) for t in texts]
    fitted = [_fit_value(t, elem.VR) for t in allowed]
    if allowed != texts:
        notes.append(f"{name}: characters not allowed in {elem.VR} removed (control characters)")
    if fitted != allowed:
        limit = f"{MAX_LENGTH[elem.VR]} bytes" + (" per component group and in all" if elem.VR == "PN" else "")
        notes.append(f"{name} truncated to {limit} ({elem.VR})")
    if fitted != texts:
        elem.value = fitted if len(fitted) > 1 else fitted[0]


def _calendar(year: str, month: str | None, day: str | None) -> bool:
    """Whether a year, month and day (the latter two optional) name a day of the calendar."""
    try:
        dt.date(int(year), int(month or 1), int(day or 1))
    except ValueError:
        return False
    return True


def _clock(hour: str | None, minute: str | None, second: str | None) -> bool:
    """Whether hour, minute and second (optional) are on the clock (no leap second 60: dciodvfy refuses it)."""
    return int(hour or 0) <= 23 and int(minute or 0) <= 59 and int(second or 0) <= 59


def valid_date_time(vr: str, value: str) -> bool:
    """Whether a DA, TM or DT value is valid in form and in the calendar (20251399 is not)."""
    m = {"DA": _DA, "TM": _TM, "DT": _DT}[vr].match(value.strip())
    if m is None:
        return False
    if vr == "DA":
        return _calendar(m.group(1), m.group(2), m.group(3))
    if vr == "TM":
        return _clock(m.group(1), m.group(3), m.group(5))
    offset = m.group(13)  # &ZZXX: -1200 to +1400
    if offset and not (int(offset[1:3]) <= 14 and int(offset[3:]) <= 59):
        return False
    return _calendar(m.group(1), m.group(3), m.group(5)) and _clock(m.group(7), m.group(9), m.group(11))


def _valid_dates(ds: Dataset, notes: list[str], where: str = "") -> None:
    """Empty the DA, TM and DT values (in sequences too) that are not valid in form and in the calendar."""
    for elem in ds:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                _valid_dates(item, notes, f"{where}{elem.keyword}[{i}].")
            continue
        if elem.VR not in ("DA", "TM", "DT") or elem.value in (None, ""):
            continue
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        if all(valid_date_time(elem.VR, str(v)) for v in values):
            continue
        elem.value = ""
        notes.append(f"{where}{elem.keyword or elem.tag} emptied: not a valid {elem.VR} value")


def _valid_or_empty(ds: Dataset, notes: list[str]) -> None:
    """Empty the dates and times not in the calendar, and the top-level CS and Patient's Sex values not valid."""
    _valid_dates(ds, notes)
    for elem in ds:
        if elem.VR != "CS" or elem.value in (None, ""):
            continue
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        if all(_CS.match(str(v).strip()) for v in values):
            continue
        elem.value = ""
        notes.append(f"{elem.keyword or elem.tag} emptied: not a valid CS value")
    for keyword, allowed in ENUMERATED.items():
        if keyword in ds and str(ds[keyword].value or "") not in allowed:
            ds[keyword].value = ""
            notes.append(f"{keyword} emptied: not {', '.join(sorted(allowed - {''}))}")
    orientation = ds.get("PatientOrientation")
    if orientation not in (None, "") and not all(_ORIENTATION.match(str(v)) for v in _values(ds["PatientOrientation"])):
        ds.PatientOrientation = ""
        notes.append("PatientOrientation emptied: not patient direction letters (A, P, R, L, H, F)")
    for keyword, count in GEOMETRY.items():
        if keyword in ds and not _finite_numbers(ds[keyword], count, positive=keyword not in _SIGNED_GEOMETRY):
            del ds[keyword]
            notes.append(f"{keyword} left out: not {count} finite number{'s' if count > 1 else ''}")


def _values(elem: DataElement) -> list[object]:
    """An element's values as a list (one value, or each of a multi-valued one)."""
    return list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]


def _finite_numbers(elem: DataElement, count: int, positive: bool) -> bool:
    """Whether an element holds exactly count finite numbers (positive ones, if asked)."""
    try:
        numbers = [float(str(v)) for v in _values(elem)]
    except (TypeError, ValueError):
        return False
    return len(numbers) == count and all(math.isfinite(x) and (x > 0 or not positive) for x in numbers)


def _readable(ds: Dataset, notes: list[str], where: str = "") -> None:
    """Leave out the elements (in sequences too) whose value pydicom cannot read as their VR."""
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
            items = list(elem.value or []) if elem.VR == "SQ" else []
        except Exception:  # pydicom raises many kinds on a value that does not fit its VR
            del ds[tag]
            notes.append(f"{where}{ds_keyword(tag)} left out: its value cannot be read as its VR")
            continue
        expected = dictionary_vrs(elem.tag)
        if expected and elem.VR not in expected:  # highdicom and dciodvfy take a standard attribute by its VR
            del ds[tag]
            notes.append(f"{where}{ds_keyword(tag)} left out: VR {elem.VR}, the dictionary says {'/'.join(expected)}")
            continue
        for i, item in enumerate(items):
            _readable(item, notes, f"{where}{elem.keyword}[{i}].")


def dictionary_vrs(tag: BaseTag) -> tuple[str, ...]:
    """The VRs the data dictionary allows a standard attribute ("US or SS": both); () for a private or unknown one."""
    if tag.is_private:
        return ()
    try:
        return tuple(dictionary_VR(tag).split(" or "))
    except KeyError:
        return ()


def _single_frame(ds: Dataset, notes: list[str]) -> None:
    """Leave out Number of Frames of an instance whose SOP class is single-frame (the SR/SC then reference no frame)."""
    if str(ds.get("SOPClassUID", "")) in SINGLE_FRAME_SOP_CLASSES and "NumberOfFrames" in ds:
        del ds.NumberOfFrames
        notes.append("NumberOfFrames left out: the SOP class is single-frame")


def ds_keyword(tag: BaseTag) -> str:
    """The keyword of a tag, or the tag itself."""
    return keyword_for_tag(tag) or str(tag)


def _decode_to_utf8(ds: Dataset, notes: list[str]) -> None:
    """Decode every text value with the source's character set and mark the copy as UTF-8."""
    declared = ds.get("SpecificCharacterSet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds.decode()
        except Exception:  # not a character set value at all (a number, a wrong VR): pydicom's default
            ds.pop(0x00080005, None)  # Specific Character Set
            ds.decode()
            notes.append("Specific Character Set not usable; decoded as the default repertoire")
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


def reference_header(source: Dataset, frames: Collection[int] = ()) -> tuple[Dataset, list[str]]:
    """A copy of a source header that SR and SC builders can copy from, and notes on what changed.

    frames: the (0-based) frames of a multi-frame source whose per-frame functional groups are
    made valid now; the other frames' are made valid when first read (`FrameItems`).
    """
    top = Dataset()
    top.update(source)  # the same elements, less the per-frame items and pixels, deep-copied below
    per_frame = source.get("PerFrameFunctionalGroupsSequence")
    top.pop(0x52009230, None)  # Per-Frame Functional Groups Sequence: a FrameItems view of it is added last
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in top:
            del top[keyword]
    ds = copy.deepcopy(top)
    notes: list[str] = []
    _readable(ds, notes)
    _decode_to_utf8(ds, notes)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    _valid_or_empty(ds, notes)
    _fit_all(ds, notes)
    _single_frame(ds, notes)
    if not str(ds.get("Modality", "") or "").strip():  # Type 1: highdicom's image library reads it
        ds.Modality = "OT"
        notes.append("Modality missing: OT (other) used for the SR's image library entry")
    if isinstance(ds.PatientName, PersonName) and not str(ds.PatientName):
        ds.PatientName = ""
    _deidentification_method(ds, notes)
    if per_frame is not None:  # last: each pass above would read every item
        ds.PerFrameFunctionalGroupsSequence = Sequence()  # set as a value: setting the element reads every item
        ds["PerFrameFunctionalGroupsSequence"].value = FrameItems(per_frame, _encoding(source), frames, notes)
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


def _encoding(source: Dataset) -> str | list[str]:
    """The Python encoding(s) of the source's text values (pydicom's default where its character set is unusable)."""
    try:
        return convert_encodings(source.get("SpecificCharacterSet") or "ISO_IR 6")
    except Exception:  # not a character set value at all: pydicom's default, as _decode_to_utf8 does
        return convert_encodings("ISO_IR 6")


class FrameItems(Sequence):
    """The per-frame functional groups of a reference header, each copied and made valid on first
    read (about half a millisecond an item); the frames named at construction at once, their notes
    into notes. The notes of an item made valid later are logged (the caller has used its notes)."""

    def __init__(self, source: list[Dataset], encoding: str | list[str], frames: Collection[int], notes: list[str]):
        super().__init__()
        self._source, self._encoding = source, encoding
        self._list: list[Dataset | None] = [None] * len(source)  # type: ignore[assignment]
        for i in sorted({f for f in frames if 0 <= f < len(source)}):
            self._list[i] = self._valid(i, notes)

    def _valid(self, i: int, notes: list[str]) -> Dataset:
        """A copy of item i (0-based) made valid as the top level is: readable, UTF-8, dates, lengths."""
        item = copy.deepcopy(self._source[i])
        where = f"PerFrameFunctionalGroupsSequence[{i}]."
        _readable(item, notes, where)
        item._parent_encoding = self._encoding
        with warnings.catch_warnings():  # a character set pydicom only partly knows is noted once, at the top level
            warnings.simplefilter("ignore")
            item.decode()
        _valid_dates(item, notes, where)
        _fit_all(item, notes, where)
        return item

    def _item(self, i: int) -> Dataset:
        """Item i (0-based, or from the end), made valid on first read."""
        i = range(len(self._list))[i]  # IndexError as a list's
        item = self._list[i]
        if item is None:
            late: list[str] = []
            item = self._list[i] = self._valid(i, late)
            for note in late:
                log.warning("source header copied into the result objects with a change: %s", note)
        return item

    @overload
    def __getitem__(self, index: int) -> Dataset: ...
    @overload
    def __getitem__(self, index: slice) -> list[Dataset]: ...
    def __getitem__(self, index: int | slice) -> Dataset | list[Dataset]:
        if isinstance(index, slice):
            return [self._item(i) for i in range(len(self._list))[index]]
        return self._item(index)

    def __iter__(self) -> Iterator[Dataset]:
        return (self._item(i) for i in range(len(self._list)))

    def __eq__(self, other: Any) -> Any:
        return list(self) == other

    def __deepcopy__(self, memo: dict[int, Any]) -> Sequence:
        return Sequence(copy.deepcopy(item, memo) for item in self)
