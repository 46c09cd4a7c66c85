"""A DIMSE source: C-FIND at the study level, then C-MOVE to this node or C-GET, per study.

C-MOVE sub-operations land on the node's own C-STORE SCP (the durable ingest every pushed study
takes); C-GET sub-operations arrive on the fetch association itself and are stored here through
the same functions: size bound, parse, Part 10 header, Ingest.store_received. A retrieve's final
status is checked: 0x0000 ends it, a warning (0xB000: some sub-operations failed), a failure or no
answer in timeout_seconds raises FetchError, which the request retries after a backoff.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time from a table
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dxnode.config import Settings, Source
from dxnode.outbox.dispatch import tls_client_context
from dxnode.receive.ingest import Ingest
from dxnode.receive.parse import OUT_OF_RESOURCES, SUCCESS, StoreRefused
from dxnode.schemas import Identifiers
from dxnode.scp import TRANSFER_SYNTAXES
from dxnode.sources.found import FetchError, Found, Progress
from dxnode.states import Priority

log = logging.getLogger("dxnode.sources.dimse")

PENDING = (0xFF00, 0xFF01)
WARNING = 0xB000
# DIMSE Priority (PS3.7 9.3.1): MEDIUM 0, HIGH 1, LOW 2.
DIMSE_PRIORITY = {Priority.STAT: 1, Priority.HIGH: 1, Priority.MEDIUM: 0, Priority.LOW: 2}
# C-GET: the storage SOP classes the source may send back, native syntaxes first (no transcoding asked).
GET_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian] + [
    ts for ts in TRANSFER_SYNTAXES if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
]


def _where(source: Source) -> str:
    return f"{source.ae_title}@{source.host}:{source.port}"


@contextmanager
def _association(settings: Settings, source: Source, ae: AE, **kwargs: Any) -> Iterator[Association]:
    """An association with the source (FetchError when it cannot be made), released at the end."""
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = source.timeout_seconds
    ae.connection_timeout = source.timeout_seconds
    tls_args = (tls_client_context(settings, source.host), source.host) if source.tls else None
    try:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, tls_args=tls_args, **kwargs)
    except Exception as exc:
        raise FetchError(f"cannot associate with {_where(source)}: {exc}") from None
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted or refused (is it up?)"
        raise FetchError(f"association with {_where(source)} {what}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _status(status: Dataset) -> int | None:
    """The Status of a response, None when there was none (timeout, abort)."""
    code = getattr(status, "Status", None)
    return int(code) if code is not None else None


def _query(identifiers: Identifiers) -> Dataset:
    """The study-level C-FIND identifier for what a request names."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = identifiers.study_instance_uid
    ds.AccessionNumber = identifiers.accession_number
    ds.PatientID = identifiers.patient_id
    ds.StudyDate = f"{identifiers.since}-" if identifiers.since else ""
    ds.ModalitiesInStudy = identifiers.modality
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def _find(assoc: Association, query: Dataset, source: Source) -> list[Dataset]:
    """Every match of a C-FIND; FetchError on a failure status or no answer."""
    found = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = _status(status)
        if code is None:
            raise FetchError(f"C-FIND at {_where(source)}: no answer within {source.timeout_seconds:g} s")
        if code in PENDING and identifier is not None:
            found.append(identifier)
        elif code != SUCCESS:
            raise FetchError(f"C-FIND at {_where(source)} failed: status 0x{code:04X}")
    return found


def _count(assoc: Association, study_uid: str, source: Source) -> int:
    """Instances of a study, counted series by series (for a source that does not say)."""
    series = Dataset()
    series.QueryRetrieveLevel, series.StudyInstanceUID, series.SeriesInstanceUID = "SERIES", study_uid, ""
    total = 0
    for match in _find(assoc, series, source):
        image = Dataset()
        image.QueryRetrieveLevel, image.StudyInstanceUID = "IMAGE", study_uid
        image.SeriesInstanceUID, image.SOPInstanceUID = str(match.get("SeriesInstanceUID", "")), ""
        total += len(_find(assoc, image, source))
    return total


def find_studies(settings: Settings, source: Source, identifiers: Identifiers) -> list[Found]:
    """The studies the source holds for the identifiers, with their instance counts."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    found: list[Found] = []
    with _association(settings, source, ae) as assoc:
        for match in _find(assoc, _query(identifiers), source):
            uid = str(match.get("StudyInstanceUID", ""))
            modalities = match.get("ModalitiesInStudy")
            if identifiers.modality and modalities and identifiers.modality not in list(modalities):
                continue  # a source that ignores the key: narrow here
            count = match.get("NumberOfStudyRelatedInstances")
            instances = int(count) if count not in (None, "") else _count(assoc, uid, source)
            found.append(Found(uid, instances))
    return found


def _retrieve_identifier(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", study_uid
    return ds


def _check_final(code: int | None, failed: int, what: str, source: Source) -> None:
    """FetchError unless a retrieve ended in success with no failed sub-operation."""
    if code is None:
        raise FetchError(f"{what} at {_where(source)}: no answer within {source.timeout_seconds:g} s")
    if code == WARNING or (code == SUCCESS and failed):
        raise FetchError(f"{what} at {_where(source)}: warning 0x{code:04X}, {failed} sub-operation(s) failed")
    if code != SUCCESS:
        raise FetchError(f"{what} at {_where(source)} failed: status 0x{code:04X}")


def _follow(
    responses: Iterator[tuple[Dataset, Dataset | None]],
    progress: Progress,
    over: Callable[[], str],
) -> tuple[int | None, int]:
    """Read a C-MOVE/C-GET's responses, reporting progress; (final status, failed sub-operations).

    over() says why to stop ('' to go on): the retrieve is then cancelled and a FetchError raised."""
    code, failed = None, 0
    for status, _ in responses:
        code = _status(status)
        failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
        if code in PENDING:
            done = int(getattr(status, "NumberOfCompletedSuboperations", 0) or 0)
            left = int(getattr(status, "NumberOfRemainingSuboperations", 0) or 0)
            progress(done + failed + int(getattr(status, "NumberOfWarningSuboperations", 0) or 0), done + left)
            why = over()
            if why:
                raise FetchError(why, permanent=True)
    return code, failed


def move_study(
    settings: Settings, source: Source, study_uid: str, priority: Priority, progress: Progress, over: Callable[[], str]
) -> None:
    """C-MOVE one study to this node (its instances arrive on the node's own SCP)."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    destination = source.move_destination or settings.node.ae_title
    with _association(settings, source, ae) as assoc:
        responses = assoc.send_c_move(
            _retrieve_identifier(study_uid),
            destination,
            StudyRootQueryRetrieveInformationModelMove,
            priority=DIMSE_PRIORITY[priority],
        )
        try:
            code, failed = _follow(responses, progress, over)
        except FetchError:
            assoc.abort()
            raise
    _check_final(code, failed, f"C-MOVE of study {study_uid} to {destination}", source)


class _GetStore:
    """The C-STORE sub-operations of a C-GET, stored through the node's ingest; counts the bytes."""

    def __init__(self, settings: Settings, source: Source, ingest: Ingest) -> None:
        self.settings, self.source, self.ingest = settings, source, ingest
        self.bytes = 0
        self.lock = threading.Lock()

    def __call__(self, event: Any) -> int | Dataset:
        try:
            size = self.ingest.store_c_store(
                event,
                self.source.ae_title,
                f"{self.source.host}:{self.source.port}",
                actor=f"source:{self.source.name}",
            )
            with self.lock:
                self.bytes += size
        except StoreRefused as exc:
            log.error("C-GET from %s: instance refused (0x%04X): %s", self.source.name, exc.status, exc.comment)
            reply = Dataset()
            reply.Status, reply.ErrorComment = exc.status, exc.comment[:64]
            return reply
        except Exception as exc:  # a bad instance fails alone, as on the node's own SCP
            log.exception("C-GET from %s: instance not stored: %s", self.source.name, exc)
            return OUT_OF_RESOURCES
        return SUCCESS


def get_study(
    settings: Settings,
    source: Source,
    ingest: Ingest,
    study_uid: str,
    priority: Priority,
    progress: Progress,
    over: Callable[[int], str],
) -> None:
    """C-GET one study; its instances are stored as they arrive. over(bytes so far) as in _follow."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    contexts = StoragePresentationContexts[:127]
    for cx in contexts:
        assert cx.abstract_syntax is not None  # always set in pynetdicom's own list
        ae.add_requested_context(cx.abstract_syntax, GET_SYNTAXES)
    roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in contexts if cx.abstract_syntax]
    store = _GetStore(settings, source, ingest)
    handlers = [(evt.EVT_C_STORE, store)]
    with _association(settings, source, ae, ext_neg=roles, evt_handlers=handlers) as assoc:
        try:
            responses = assoc.send_c_get(
                _retrieve_identifier(study_uid),
                StudyRootQueryRetrieveInformationModelGet,
                priority=DIMSE_PRIORITY[priority],
            )
            try:
                code, failed = _follow(responses, progress, lambda: over(store.bytes))
            except FetchError:
                assoc.abort()
                raise
        finally:
            ingest.activity.closed(id(assoc))
    _check_final(code, failed, f"C-GET of study {study_uid}", source)
