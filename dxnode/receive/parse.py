"""A received instance parsed and checked before anything is stored, whichever transport carried it.

The bounds (size, inflated size) and the UID rules are the same for C-STORE and STOW-RS: UIDs from the
network name files and folders only once they are valid (PS3.5 9.1, at most 64 characters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from pydicom import Dataset

from dxnode.bounds import MB, inflated_size_exceeds
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


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """An attribute as text, at most limit characters ('' if absent)."""
    value = ds.get(keyword, "")
    return "" if value is None else str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    """An IS attribute as int, or None."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def check_size(raw: BinaryIO, size: int, deflated: bool, max_instance_mb: float) -> None:
    """StoreRefused(0xA700) if an encoded dataset of size bytes is, or inflates to, more than max_instance_mb.

    Runs before the dataset is decoded: pydicom inflates a Deflated dataset whole in memory, so that
    one is first inflated here in bounded chunks, the output thrown away. raw is read from its
    current position and left there."""
    limit = int(max_instance_mb * MB)
    if size > limit:
        raise StoreRefused(OUT_OF_RESOURCES, f"dataset over [node] max_instance_mb {max_instance_mb:g}")
    if deflated:
        start = raw.tell()
        try:
            too_big = inflated_size_exceeds(raw, limit)
        finally:
            raw.seek(start)
        if too_big:
            raise StoreRefused(OUT_OF_RESOURCES, f"inflates over [node] max_instance_mb {max_instance_mb:g}")


def _check_uid_elements(ds: Dataset) -> None:
    """The dataset's own UIDs: SOP Class and Instance present, every UID attribute of VR UI."""
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in ds:
            raise StoreRefused(CANNOT_UNDERSTAND, f"missing {keyword}")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in ds and ds[keyword].VR != "UI":
            raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} has VR {ds[keyword].VR}, not UI")


def parse_dataset(ds: Dataset, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> Received:
    """Validate a received dataset against the UIDs it came with (C-STORE request or STOW-RS file meta)."""
    try:
        _check_uid_elements(ds)
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
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
    if str(ds.get("SOPInstanceUID", rec.sop_instance_uid)) != rec.sop_instance_uid:
        raise StoreRefused(CANNOT_UNDERSTAND, "SOPInstanceUID differs from request")
    return rec
