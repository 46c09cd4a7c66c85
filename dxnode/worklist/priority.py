"""Priority rules for studies that are pushed: by the calling AE title, and by the Requested
Procedure Priority the modality or RIS put in the images. A fetch request or an order sets its own."""

from __future__ import annotations

import logging

import pydicom
from pydicom.tag import Tag
from sqlalchemy import select
from sqlalchemy.orm import Session

from dxnode.config import Settings
from dxnode.states import Priority
from dxnode.store import Instance, Study

log = logging.getLogger("dxnode.worklist.priority")

REQUESTED_PROCEDURE_PRIORITY = Tag(0x0040, 0x1003)
REQUEST_ATTRIBUTES_SEQUENCE = Tag(0x0040, 0x0275)


def dataset_priority(settings: Settings, session: Session, study: Study) -> Priority | None:
    """The Requested Procedure Priority of the study's first instance (top level, or in its Request
    Attributes Sequence), None when absent, unknown or unreadable."""
    path = session.scalar(
        select(Instance.file_path).where(Instance.study_id == study.id).order_by(Instance.id).limit(1)
    )
    if path is None:
        return None
    try:
        ds = pydicom.dcmread(
            settings.data_dir / path,
            stop_before_pixels=True,
            specific_tags=[REQUESTED_PROCEDURE_PRIORITY, REQUEST_ATTRIBUTES_SEQUENCE],
        )
    except Exception as exc:  # an unreadable file fails its job later, with its reason; no rule here
        log.debug("priority of study %s: cannot read %s: %s", study.study_instance_uid, path, exc)
        return None
    values = [ds.get(REQUESTED_PROCEDURE_PRIORITY)]
    if REQUEST_ATTRIBUTES_SEQUENCE in ds:
        values += [item.get(REQUESTED_PROCEDURE_PRIORITY) for item in ds[REQUEST_ATTRIBUTES_SEQUENCE].value]
    found = []
    for element in values:
        if element is not None and element.value:
            try:
                found.append(Priority.parse(str(element.value)))
            except ValueError:
                continue
    return min(found, key=lambda p: p.rank) if found else None


def rule_priority(settings: Settings, session: Session, study: Study) -> Priority | None:
    """The most urgent of [worklist] priority_by_aet for the study's sender and, with
    priority_from_dataset, its Requested Procedure Priority; None when no rule says anything."""
    found = []
    by_aet = settings.worklist.priority_by_aet.get(study.calling_aet)
    if by_aet is not None:
        found.append(by_aet)
    if settings.worklist.priority_from_dataset:
        tagged = dataset_priority(settings, session, study)
        if tagged is not None:
            found.append(tagged)
    return min(found, key=lambda p: p.rank) if found else None
