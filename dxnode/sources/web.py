"""A DICOMweb source: QIDO-RS to find studies, WADO-RS to retrieve them, through dicomweb-client.

Instances are asked for in the transfer syntax the source stores them in (``transfer-syntax=*``),
one part at a time as the response streams, and each goes through the node's ingest with the bounds
of every received instance. dicomweb-client hands back parsed datasets, so each is written again as
a Part 10 file (same transfer syntax, pixel data untouched) before it is stored. Auth is as for a
DICOMweb destination: none, basic (username + the password in secret_env) or bearer (the token in
secret_env), read when the request runs and never logged; https is verified (ca_file replaces the
system CAs when set).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from io import BytesIO
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from dxnode.config import Settings, Source
from dxnode.receive.ingest import Ingest
from dxnode.receive.parse import StoreRefused
from dxnode.schemas import Identifiers
from dxnode.sources.found import FetchError, Found, Progress

log = logging.getLogger("dxnode.sources.web")

STUDY_INSTANCE_UID, INSTANCES = "0020000D", "00201208"


def _client(source: Source) -> DICOMwebClient:
    """A dicomweb-client for the source, with its auth; FetchError when the secret is missing."""
    session = requests.Session()
    if source.ca_file is not None:
        session.verify = str(source.ca_file)
    headers: dict[str, str] = {}
    if source.auth != "none":
        secret = os.environ.get(source.secret_env, "")
        if not secret:
            raise FetchError(f"environment variable {source.secret_env} (secret of source {source.name}) is not set")
        if source.auth == "basic":
            session.auth = (source.username, secret)
        else:
            headers["Authorization"] = f"Bearer {secret}"
    return DICOMwebClient(source.url, session=session, headers=headers, timeout=source.timeout_seconds)


def _value(item: dict[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute, or None."""
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def _http_error(source: Source, what: str, exc: Exception) -> FetchError:
    """A FetchError in words for a failed request (the URL's query is left out: it may carry identifiers)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    reason = f"HTTP {status}" if status else type(exc).__name__
    return FetchError(f"{what} at {source.name} ({source.url}) failed: {reason}")


def find_studies(settings: Settings, source: Source, identifiers: Identifiers) -> list[Found]:
    """QIDO-RS: the studies the source holds for the identifiers, with their instance counts."""
    filters = {
        "StudyInstanceUID": identifiers.study_instance_uid,
        "AccessionNumber": identifiers.accession_number,
        "PatientID": identifiers.patient_id,
        "ModalitiesInStudy": identifiers.modality,
        "StudyDate": f"{identifiers.since}-" if identifiers.since else "",
    }
    client = _client(source)
    try:
        matches = client.search_for_studies(
            search_filters={k: v for k, v in filters.items() if v}, fields=["NumberOfStudyRelatedInstances"]
        )
        found = []
        for match in matches:
            uid = str(_value(match, STUDY_INSTANCE_UID) or "")
            count = _value(match, INSTANCES)
            if count is None:  # a server that does not say: count the instances
                count = len(client.search_for_instances(study_instance_uid=uid))
            found.append(Found(uid, int(count)))
        return found
    except (requests.RequestException, ValueError) as exc:
        raise _http_error(source, "QIDO-RS", exc) from None


def get_study(
    settings: Settings,
    source: Source,
    ingest: Ingest,
    study_uid: str,
    expected: int,
    progress: Progress,
    over: Callable[[int], str],
) -> None:
    """WADO-RS one study, each instance stored through the ingest as it arrives."""
    client = _client(source)
    sender = id(client)
    stored = size = refused = 0
    try:
        for ds in client.iter_study(study_uid, media_types=(("application/dicom", "*"),)):
            buffer = BytesIO()
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            data = buffer.getvalue()
            try:
                ingest.store_part10(data, "", source.url, sender, actor=f"source:{source.name}")
            except StoreRefused as exc:
                refused += 1
                log.error("WADO-RS from %s: instance refused (0x%04X): %s", source.name, exc.status, exc.comment)
            stored, size = stored + 1, size + len(data)
            progress(stored, max(expected, stored))
            why = over(size)
            if why:
                raise FetchError(why, permanent=True)
    except (requests.RequestException, ValueError) as exc:
        raise _http_error(source, f"WADO-RS of study {study_uid}", exc) from None
    finally:
        ingest.activity.closed(sender)
    if refused:
        raise FetchError(f"WADO-RS of study {study_uid} from {source.name}: {refused} instance(s) could not be stored")
