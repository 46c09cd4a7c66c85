"""The REST API, health and metrics endpoints; pages are added from dxnode.web.pages.

Stable paths for scripts: /healthz, /readyz, /metrics, /api/studies, /api/jobs, /api/results,
/api/outbox, /api/model, /api/predict (multipart field ``file``), /api/requests (dxnode.web.requests).
Lists are JSON arrays with ``limit``/``offset`` paging. Every read of patient data and every admin action is audited
(token name, action, client address).
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import re
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from dxnode.config import Settings
from dxnode.metrics import exposition
from dxnode.queries import (
    JobFilter,
    ResultFilter,
    StudyFilter,
    heatmap_file,
    instance_file,
    list_deliveries,
    list_jobs,
    list_results,
    list_studies,
    results_csv,
    study_detail,
)
from dxnode.schemas import (
    DeliveryOut,
    Health,
    JobOut,
    JobQueued,
    JobRequeued,
    ModelInfo,
    ReadyOut,
    Requeued,
    ResultOut,
    StudyDetail,
    StudyIgnored,
    StudyOut,
    UploadPrediction,
)
from dxnode.states import DeliveryState, JobState
from dxnode.store import Store, audit
from dxnode.web.auth import ACCESS_GATES, Principal, require_admin, require_read
from dxnode.web.errors import ERRORS
from dxnode.web.images import output_png, png_bytes
from dxnode.web.pages import LoginRequired, login_redirect, pages_router
from dxnode.web.requests import requests_router
from dxnode.web.security import SESSION_COOKIE, BodyGuard, BodyRule, CsrfGuard, SecureCookies, SecurityHeaders
from dxnode.web.services import Readiness, Svc, WebServices, attach, given_receiver, own_receiver
from dxnode.web.stow import stow_router
from dxnode.web.throttle import LoginThrottle

if TYPE_CHECKING:
    from dxnode.model import ModelRegistry
    from dxnode.receive.ingest import Ingest

log = logging.getLogger("dxnode.web")


def _audit(svc: WebServices, who: Principal, action: str, target: str = "", **detail: Any) -> None:
    with svc.store.session() as session:
        audit(session, who.name, action, target=target, source=who.address, **detail)


def _iso_date_only(value: Any) -> Any:
    """Refuse epoch numbers, which pydantic would otherwise read as dates."""
    if isinstance(value, str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("expected a date as YYYY-MM-DD")
    return value


IsoDate = Annotated[dt.date, BeforeValidator(_iso_date_only)]
RowId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="row id")]  # the id columns are 32-bit integers


def _day(value: dt.date | None, plus_days: int = 0) -> dt.datetime | None:
    """Midnight UTC of a date (plus some days)."""
    return dt.datetime.combine(value + dt.timedelta(days=plus_days), dt.time(), tzinfo=dt.UTC) if value else None


def api_router() -> APIRouter:  # noqa: C901, PLR0915  the routes are nested functions: split per resource with the web folder (issue 20)
    """The /api routes."""
    r = APIRouter(prefix="/api", responses=ERRORS)

    @r.get("/studies", summary="Received studies, most recent first")
    def studies(
        svc: Svc,
        who: Principal = Depends(require_read),
        patient_id: str | None = None,
        accession_number: str | None = None,
        date_from: str | None = Query(None, pattern=r"^\d{8}$", description="Study Date from, YYYYMMDD"),
        date_to: str | None = Query(None, pattern=r"^\d{8}$"),
        modality: str | None = None,
        calling_aet: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=10**9),
    ) -> list[StudyOut]:
        with svc.store.session() as s:
            rows = list_studies(
                s, StudyFilter(patient_id, accession_number, date_from, date_to, modality, calling_aet, limit, offset)
            )
        _audit(svc, who, "api.studies.read", rows=len(rows))
        return rows

    @r.get("/studies/{study_instance_uid}", summary="One study with its series, jobs, findings, outputs and deliveries")
    def study(svc: Svc, study_instance_uid: str, who: Principal = Depends(require_read)) -> StudyDetail:
        with svc.store.session() as s:
            detail = study_detail(s, study_instance_uid, svc.settings.destinations)
        if detail is None:
            raise HTTPException(404, "no such study")
        _audit(svc, who, "api.study.read", target=study_instance_uid)
        return detail

    @r.post("/studies/{study_instance_uid}/requeue", summary="Queue the study's analysis again (admin)")
    def requeue(svc: Svc, study_instance_uid: str, who: Principal = Depends(require_admin)) -> JobQueued:
        # start-up time: loaded on the first request that needs it
        from dxnode.worklist.queue import requeue_study

        try:
            with svc.store.session() as s:
                job_id = requeue_study(s, study_instance_uid, actor=who.name, source=who.address)
        except LookupError:
            raise HTTPException(404, "no such study") from None
        return JobQueued(job_id=job_id)

    @r.post("/studies/{study_instance_uid}/ignore", summary="Mark a study to be ignored (admin)")
    def ignore(
        svc: Svc, study_instance_uid: str, who: Principal = Depends(require_admin), ignored: bool = True
    ) -> StudyIgnored:
        # start-up time: loaded on the first request that needs it
        from dxnode.worklist.queue import set_study_ignored

        try:
            with svc.store.session() as s:
                set_study_ignored(s, study_instance_uid, ignored, actor=who.name, source=who.address)
        except LookupError:
            raise HTTPException(404, "no such study") from None
        return StudyIgnored(study_instance_uid=study_instance_uid, ignored=ignored)

    @r.get("/jobs", summary="Jobs, newest first")
    def jobs(
        svc: Svc,
        who: Principal = Depends(require_read),
        state: JobState | None = None,
        since: IsoDate | None = Query(None, description="created on or after, YYYY-MM-DD (UTC)"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=10**9),
    ) -> list[JobOut]:
        with svc.store.session() as s:
            rows = list_jobs(s, JobFilter(state=state, since=_day(since), limit=limit, offset=offset))
        _audit(svc, who, "api.jobs.read", rows=len(rows))  # jobs name their study
        return rows

    @r.post(
        "/jobs/{job_id}/requeue",
        summary="Re-queue a job (admin)",
        responses={409: {"description": "The job cannot be re-queued now (e.g. it is queued or running)"}},
    )
    def requeue_job(svc: Svc, job_id: RowId, who: Principal = Depends(require_admin)) -> JobRequeued:
        # start-up time: loaded on the first request that needs it
        from dxnode.worklist.queue import requeue_job as do_requeue

        try:
            with svc.store.session() as s:
                queued = do_requeue(s, job_id, actor=who.name, source=who.address)
        except LookupError:
            raise HTTPException(404, "no such job") from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        return JobRequeued(job_id=queued, requeued_from=job_id, state=JobState.QUEUED)

    def result_filter(
        label: str | None = None,
        min_prob: float | None = Query(None, ge=0, le=1),
        positive: bool = False,
        model_name: str | None = None,
        model_version: str | None = None,
        date_from: IsoDate | None = Query(None, description="YYYY-MM-DD (UTC), inclusive"),
        date_to: IsoDate | None = Query(None, description="YYYY-MM-DD (UTC), inclusive"),
        include_superseded: bool = False,
        limit: int = Query(1000, ge=1, le=10000),
        offset: int = Query(0, ge=0, le=10**9),
    ) -> ResultFilter:
        return ResultFilter(
            label,
            min_prob,
            positive,
            model_name,
            model_version,
            _day(date_from),
            _day(date_to, 1),
            None,
            include_superseded,
            limit,
            offset,
        )

    @r.get("/results", summary="Study-level findings (the newest done job of each study unless include_superseded)")
    def results(
        svc: Svc, f: ResultFilter = Depends(result_filter), who: Principal = Depends(require_read)
    ) -> list[ResultOut]:
        with svc.store.session() as s:
            rows = list_results(s, f)
        _audit(svc, who, "api.results.read", rows=len(rows))
        return rows

    @r.get(
        "/results.csv",
        summary="The same results as CSV",
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}}},
    )
    def results_as_csv(
        svc: Svc, f: ResultFilter = Depends(result_filter), who: Principal = Depends(require_read)
    ) -> Response:
        with svc.store.session() as s:
            rows = list_results(s, f)
        _audit(svc, who, "api.results.export", rows=len(rows))
        return Response(
            results_csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="dxnode-results.csv"'},
        )

    @r.get("/outbox", summary="Deliveries of outputs to destinations")
    def outbox(
        svc: Svc,
        who: Principal = Depends(require_read),
        state: DeliveryState | None = None,
        destination: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=10**9),
    ) -> list[DeliveryOut]:
        with svc.store.session() as s:
            rows = list_deliveries(s, state, destination, limit, offset, destinations=svc.settings.destinations)
        _audit(svc, who, "api.outbox.read", rows=len(rows))
        return rows

    @r.post("/outbox/{delivery_id}/resend", summary="Re-send a delivery (admin)")
    def resend(svc: Svc, delivery_id: RowId, who: Principal = Depends(require_admin)) -> Requeued:
        # start-up time: loaded on the first request that needs it
        from dxnode.outbox.dispatch import resend as do_resend

        with svc.store.session() as s:
            n = do_resend(s, str(delivery_id), actor=who.name, source=who.address)
        if not n:
            raise HTTPException(404, "no such delivery")
        return Requeued(requeued=n)

    @r.get("/model", summary="The served model's manifest")
    def model(svc: Svc, who: Principal = Depends(require_read)) -> ModelInfo:
        clf = svc.model()
        m = clf.manifest
        extra = {"label_count": len(m.labels), "engine": clf.engine.name, "engine_reason": clf.engine_reason}
        return ModelInfo.model_validate(m.to_dict() | extra)

    @r.get(
        "/outputs/{output_id}.png",
        summary="A heatmap Secondary Capture as PNG",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def output_image(svc: Svc, output_id: RowId, who: Principal = Depends(require_read)) -> Response:
        with svc.store.session() as s:
            found = heatmap_file(s, output_id)
        if found is None:
            raise HTTPException(404, "no such heatmap")
        sop_instance_uid, file_path = found
        _audit(svc, who, "api.output.image", target=sop_instance_uid)
        return Response(output_png(svc.settings.data_dir / file_path), media_type="image/png")

    @r.get(
        "/instances/{sop_instance_uid}.png",
        summary="A source image, windowed as the model saw it",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def instance_image(svc: Svc, sop_instance_uid: str, who: Principal = Depends(require_read)) -> Response:
        # start-up time: loaded on the first request that needs it
        from dxnode.pipeline import PipelineError, read_frames

        with svc.store.session() as s:
            file_path = instance_file(s, sop_instance_uid)
        if file_path is None:
            raise HTTPException(404, "no such instance")
        settings = svc.settings
        try:
            frame = read_frames(
                settings.data_dir / file_path,
                settings.pipeline,
                svc.model().manifest.preprocessing,
            )[0]
        except PipelineError as exc:
            raise HTTPException(422, str(exc)) from None
        _audit(svc, who, "api.instance.image", target=sop_instance_uid)
        return Response(png_bytes(frame.display), media_type="image/png")

    @r.post(
        "/predict",
        summary="Predict one uploaded DICOM, PNG or JPEG file (multipart field 'file')",
        responses={413: {"description": "Too large"}, 415: {"description": "Not an image"}},
    )
    async def predict(
        svc: Svc, file: UploadFile, who: Principal = Depends(require_read), top_k: int = Query(3, ge=1, le=20)
    ) -> UploadPrediction:
        return await predict_upload(svc, file, who, top_k)

    return r


async def predict_upload(svc: Svc, file: UploadFile, who: Principal, top_k: int) -> UploadPrediction:
    """Run the model on an upload; the file is deleted afterwards unless [web] keep_uploads.

    Decoding and inference run on a worker thread, so the event loop keeps answering other requests."""
    settings = svc.settings
    limit = int(settings.web.max_upload_mb * 1024 * 1024)
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"file larger than [web] max_upload_mb = {settings.web.max_upload_mb}")
    if not data:
        raise HTTPException(422, "empty file")
    return await run_in_threadpool(_predict_bytes, svc, data, file.filename or "", who, top_k)


def _predict_bytes(svc: Svc, data: bytes, filename: str, who: Principal, top_k: int) -> UploadPrediction:
    """The blocking part of predict_upload: write, decode, infer, audit, encode the PNGs."""
    # start-up time: loaded on the first request that needs it
    from dxnode.analysis.predict import predict_file

    settings = svc.settings
    keep = settings.web.keep_uploads
    folder = settings.data_dir / "uploads" if keep else Path(tempfile.mkdtemp(prefix="dxnode-upload-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{secrets.token_hex(8)}.upload"
    path.write_bytes(data)
    try:
        pred = predict_file(path, svc.model(), settings, top_k=top_k)
    finally:
        if not keep:
            path.unlink(missing_ok=True)
            folder.rmdir()
    _audit(svc, who, "api.predict", filename=filename[:100], error=pred.error or "")
    if pred.error:
        code = (
            415 if pred.error.startswith(("not a readable", "not an image", "no pixel data", "no such file")) else 422
        )
        raise HTTPException(code, pred.error)
    body = pred.to_dict(None)
    body["file"] = filename or "upload"
    body["heatmap_png"] = (
        "data:image/png;base64," + base64.b64encode(png_bytes(pred.heatmap)).decode()
        if pred.heatmap is not None
        else None
    )
    body["image_png"] = (
        "data:image/png;base64," + base64.b64encode(png_bytes(pred.display)).decode()
        if pred.display is not None
        else None
    )
    return UploadPrediction.model_validate(body)


def metrics_text(store: Store, multiproc_dir: Path | None = None) -> bytes:
    """The /metrics text: counters of every process of the node (from multiproc_dir when the node runs
    in prometheus_client's multiprocess mode) plus figures read from the store at scrape time."""
    return exposition(store, multiproc_dir)


def health_routes(app: FastAPI) -> None:
    """/healthz, /readyz and /metrics.

    /healthz and /readyz need no token: load balancers and systemd probes call them without one, and
    they reveal only booleans (is the process up; are the database, model, DICOM listener and job
    processes ready). /metrics needs a read token: it names calling AE titles and destinations.
    """

    @app.get("/healthz", summary="The process is up (no token needed)")
    async def healthz() -> Health:  # on the event loop: answers even when every worker thread is busy
        return Health(status="ok")

    @app.get(
        "/readyz",
        summary="Database reachable, model loaded, DICOM listener and job processes up (no token needed)",
        response_model=ReadyOut,
        responses={503: {"description": "Not ready", "model": ReadyOut}},
    )
    def readyz(svc: Svc) -> JSONResponse:
        checks = svc.readiness() if svc.readiness else {"database": svc.store.ping()}
        body = ReadyOut(ready=all(checks.values()), checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics of every process of this node (read token)",
        response_class=PlainTextResponse,
        responses={401: ERRORS[401], 200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
    )
    def metrics(svc: Svc, who: Principal = Depends(require_read)) -> Response:
        return Response(metrics_text(svc.store, svc.metrics_dir), media_type=CONTENT_TYPE_LATEST)


SMALL_BODY = BodyRule(64 * 1024, "body larger than 64 KiB")  # forms, and routes that take no body


def trust_proxies(app: FastAPI, proxies: list[str]) -> None:
    """Outermost: X-Forwarded-For and -Proto set the client address and scheme, from these proxies only."""
    if proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=proxies)


def _base_app(svc: WebServices, title: str) -> FastAPI:
    app = FastAPI(
        title=title,
        version=__import__("dxnode").__version__,
        description="REST API of a dxnode DICOM AI node. Send `Authorization: Bearer TOKEN`.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )  # served below, behind a token (no CDN-based UI: nodes run offline)
    attach(app, svc)
    return app


def create_metrics_app(
    settings: Settings, store: Store, readiness: Readiness | None = None, metrics_dir: Path | None = None
) -> FastAPI:
    """What a `dxnode worker` serves: /healthz, /readyz and /metrics only (same tokens as the node)."""
    svc = WebServices(settings, store, LoginThrottle.from_settings(settings.web), readiness, metrics_dir)
    app = _base_app(svc, "dxnode worker")
    app.add_middleware(BodyGuard, router=app.router, gates=(require_read,), rules={}, default=SMALL_BODY)
    app.add_middleware(SecurityHeaders)
    trust_proxies(app, settings.web.trusted_proxies)
    health_routes(app)
    return app


def create_app(
    settings: Settings,
    store: Store,
    readiness: Readiness | None = None,
    metrics_dir: Path | None = None,
    ingest: Ingest | None = None,
    registry: ModelRegistry | None = None,
) -> FastAPI:
    """The web application of a node (metrics_dir: its prometheus_client multiprocess folder, if any;
    scp: the node's SCP, that STOW-RS parts are stored by, default one made on first use;
    registry: the process's models, a new one when not given)."""
    # start-up time: loaded on the first request that needs it
    from dxnode.model import ModelRegistry

    models = registry or ModelRegistry()

    svc = WebServices(
        settings,
        store,
        LoginThrottle.from_settings(settings.web),
        readiness,
        metrics_dir,
        classifier=lambda: models.get(settings.model, data_dir=settings.data_dir),
        stow_receiver=own_receiver(settings, store) if ingest is None else given_receiver(ingest),
    )
    app = _base_app(svc, "dxnode")
    app.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")
    upload = BodyRule(
        int(settings.web.max_upload_mb * 1024 * 1024) + 64 * 1024,  # room for the multipart envelope
        f"file larger than [web] max_upload_mb = {settings.web.max_upload_mb}",
    )
    stow = BodyRule(
        int(settings.web.stow_max_body_mb * 1024 * 1024),
        f"body larger than [web] stow_max_body_mb = {settings.web.stow_max_body_mb}",
    )
    rules = {"/api/predict": upload, "/dicomweb/studies": stow, "/dicomweb/studies/{study}": stow}
    app.add_middleware(BodyGuard, router=app.router, gates=ACCESS_GATES, rules=rules, default=SMALL_BODY)
    app.add_middleware(CsrfGuard, trusted_origins=settings.web.trusted_origins)
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.web.session_secret or secrets.token_urlsafe(32),
        session_cookie=SESSION_COOKIE,
        same_site="strict",
        https_only=False,
        max_age=round(settings.web.session_hours * 3600),
    )
    app.add_middleware(SecureCookies)
    app.add_middleware(SecurityHeaders)  # on every answer, the guards' refusals included
    trust_proxies(app, settings.web.trusted_proxies)

    health_routes(app)
    app.include_router(api_router())
    app.include_router(requests_router())
    app.include_router(stow_router())
    app.include_router(pages_router())
    # Starlette types handlers as taking any Exception; this one only ever gets LoginRequired
    app.add_exception_handler(LoginRequired, login_redirect)  # type: ignore[arg-type]

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(who: Principal = Depends(require_read)) -> JSONResponse:
        return JSONResponse(app.openapi())

    return app
