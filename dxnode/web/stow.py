"""STOW-RS on the node's web server (PS3.18 10.5): POST /dicomweb/studies[/{study}].

Each part of a ``multipart/related; type="application/dicom"`` body is a Part 10 file. It is
parsed and validated like a C-STORE (``dxnode.receive.parse``) and stored by the same durable
ingest (``Ingest.store_received``: temporary file, fsync, rename, rows committed)
before the response lists it as stored, so the contract is the one C-STORE senders get; the
study then joins the worklist like any other. The response (DICOM JSON) lists stored instances
and failed ones with a Failure Reason: 200 all stored, 202 some, 409 none. A body over
``[web] stow_max_body_mb`` is refused with 413 while it is read; a part over
``stow_max_part_mb`` fails alone, and every part is held to C-STORE's bounds (``[node]
max_instance_mb``, inflated size included, and ``max_inflight_mb``). The body is spooled to an
unnamed temporary file beside the received files, not held in memory: a request costs one part's
worth of memory at a time. Needs a token with role "store" or "admin", checked before a byte of
the body is read (dxnode.web.security.BodyGuard).
"""

from __future__ import annotations

import logging
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from dxnode.outbox.dicomweb import DICOM_JSON, FileBuffer, part_spans, response_body
from dxnode.receive.ingest import Ingest
from dxnode.receive.parse import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, StoreRefused, read_file_meta, read_part10
from dxnode.store import audit
from dxnode.uids import is_valid_uid
from dxnode.web.auth import Principal, require_store
from dxnode.web.services import services

log = logging.getLogger("dxnode.stow")

# Failure Reason for an instance of another study than the one in the request path.
STUDY_MISMATCH = 0xC409


def _boundary(content_type: str) -> str:
    """The boundary of a multipart/related; type=application/dicom body, else 415."""
    kind, _, params = content_type.partition(";")
    values: dict[str, str] = {}
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        values[name.strip().lower()] = value.strip().strip('"')
    if kind.strip().lower() != "multipart/related" or values.get("type", "").lower() != "application/dicom":
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, 'expected multipart/related; type="application/dicom"'
        )
    if not values.get("boundary") or len(values["boundary"]) > 200:  # RFC 2046 says 70; Orthanc sends 73
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "multipart/related body without a valid boundary")
    return values["boundary"]


async def _spool_body(request: Request, folder: Path) -> BinaryIO:
    """The request body in an unnamed temporary file in folder (gone when closed, or if the node
    dies): memory holds one chunk at a time. BodyGuard refuses it with 413 past stow_max_body_mb."""
    folder.mkdir(parents=True, exist_ok=True)
    spool = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 (returned open; the caller closes it)
    try:
        async for chunk in request.stream():
            spool.write(chunk)
        spool.flush()
        return spool
    except BaseException:
        spool.close()
        raise


def _store_part(
    ingest: Ingest, data: bytes, study: str | None, who: Principal, request_key: int
) -> tuple[str, str, int, str]:
    """Check, parse and store one Part 10 file: (SOP class, SOP instance, Failure Reason or 0, comment).

    The bounds are C-STORE's (read_part10: size and inflated size, a Deflated part inflated in steps
    to a spool file, never whole in memory), and the part counts against [node] max_inflight_mb while
    it is handled. The request is the sender, as an association is for C-STORE (see Ingest.store_received)."""
    cls = inst = ""
    try:
        with ingest.inflight.hold(len(data)):
            part = BytesIO(data)
            meta = read_file_meta(part)
            cls, inst = meta.sop_class_uid, meta.sop_instance_uid
            rec = read_part10(part, meta, ingest.settings.node.max_instance_mb, ingest.incoming)
            if study is not None and rec.study_instance_uid != study:
                return cls, inst, STUDY_MISMATCH, "Study Instance UID differs from the request path"
            ingest.store_received(rec, (data,), "", who.address, request_key, actor=f"stow:{who.name}")
        return cls, inst, 0, ""
    except StoreRefused as exc:
        # A hostile UID is never echoed back.
        return cls if is_valid_uid(cls) else "", inst if is_valid_uid(inst) else "", exc.status, exc.comment
    except Exception:  # one bad part must not fail the others; the client gets a fixed message, the log the reason
        log.exception("STOW-RS part %s failed", inst if is_valid_uid(inst) else "(no valid SOP Instance UID)")
        return (
            cls if is_valid_uid(cls) else "",
            inst if is_valid_uid(inst) else "",
            OUT_OF_RESOURCES,
            "the node could not store it (see its log)",
        )


def _store_all(request: Request, spool: BinaryIO, boundary: str, study: str | None, who: Principal) -> dict[str, Any]:
    """Store every part of the spooled body in order; the PS3.18 response pieces.

    Its structure is checked whole first (a malformed body stores nothing), then each part is read
    from the file, stored and dropped in turn."""
    body = FileBuffer(spool.fileno())
    svc = services(request)
    settings, store, ingest = svc.settings, svc.store, svc.receiver()
    part_limit = int(settings.web.stow_max_part_mb * 1024 * 1024)
    stored: list[tuple[str, str, str]] = []
    failed: list[tuple[str, str, int]] = []
    comments: list[str] = []
    try:
        spans = part_spans(body, boundary)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed multipart body: {exc}") from exc
    if not spans:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "multipart body without parts")
    try:
        for headers, start, end in spans:
            part_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if part_type != "application/dicom":
                failed.append(("", "", CANNOT_UNDERSTAND))
                comments.append(f"part of type {part_type[:64]!r}: only application/dicom is accepted")
                continue
            if end - start > part_limit:
                failed.append(("", "", OUT_OF_RESOURCES))
                comments.append(f"part larger than [web] stow_max_part_mb = {settings.web.stow_max_part_mb}")
                continue
            cls, inst, reason, comment = _store_part(ingest, body[start:end], study, who, id(request))
            if reason:
                failed.append((cls, inst, reason))
                comments.append(f"{inst or 'instance'}: 0x{reason:04X} {comment}")
            else:
                stored.append((cls, inst, ""))
    finally:  # the request's studies start their quiet time now (as at an association's release)
        ingest.activity.closed(id(request))
    with store.session() as session:
        audit(
            session,
            who.name,
            "stow.received",
            target=f"study:{study}" if study else "",
            source=who.address,
            stored=len(stored),
            failed=len(failed),
        )
    for line in comments:
        log.warning("STOW-RS from %s (%s): %s", who.name, who.address, line)
    return {"stored": stored, "failed": failed}


def stow_router() -> APIRouter:
    """The STOW-RS endpoints (outside the OpenAPI schema: PS3.18 defines them)."""
    router = APIRouter()

    async def stow(request: Request, study: str | None, who: Principal) -> Response:
        if study is not None and not is_valid_uid(study):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "the study in the path is not a valid UID")
        boundary = _boundary(request.headers.get("content-type", ""))
        settings = services(request).settings
        incoming = settings.data_dir / "incoming"
        with await _spool_body(request, incoming) as spool:
            outcome = await run_in_threadpool(_store_all, request, spool, boundary, study, who)
        stored, failed = outcome["stored"], outcome["failed"]
        code = 200 if not failed else 202 if stored else 409
        return JSONResponse(response_body(stored, failed), status_code=code, media_type=DICOM_JSON)

    @router.post("/dicomweb/studies", include_in_schema=False)
    async def stow_any(request: Request, who: Principal = Depends(require_store)) -> Response:
        return await stow(request, None, who)

    @router.post("/dicomweb/studies/{study}", include_in_schema=False)
    async def stow_study(request: Request, study: str, who: Principal = Depends(require_store)) -> Response:
        return await stow(request, study, who)

    return router
