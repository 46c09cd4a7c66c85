"""Server-rendered pages (Jinja2): login, dashboard, study, results search, requests, orders, upload-and-predict."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from dxnode.queries import (
    ResultFilter,
    StudyFilter,
    dashboard_counters,
    list_orders,
    list_results,
    list_studies,
    request_ids,
    study_detail,
)
from dxnode.schemas import Identifiers, ResultOut
from dxnode.sources.fetch import request_fetch, request_out
from dxnode.states import PRIORITY_ORDER, Priority
from dxnode.store import Store, audit
from dxnode.web.auth import Principal, check_token, end_session, principal, require_requester, start_session
from dxnode.web.services import Svc, services

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def person_name(value: str) -> str:
    """A DICOM PN (Family^Given^Middle^Prefix^Suffix) as 'Family, Given Middle', with its
    ideographic and phonetic groups (Japanese, Korean, Chinese names) after it in parentheses."""

    def group(text: str) -> str:
        parts = [p.strip() for p in text.split("^")]
        family, given = parts[0] if parts else "", " ".join(p for p in parts[1:3] if p)
        return f"{family}, {given}" if family and given else family or given

    names = [n for n in (group(g) for g in (value or "").split("=")[:3]) if n]
    return f"{names[0]} ({' / '.join(names[1:])})" if len(names) > 1 else "".join(names)


def dicom_date(value: str | None) -> str:
    """A DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    text = (value or "").strip()
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date().isoformat() if len(text) == 8 else text
    except ValueError:
        return text


def timestamp(value: str | None) -> str:
    """ISO 8601 text (UTC when it names no zone) as 'YYYY-MM-DD HH:MM' in the node's local time with its zone."""
    if not value:
        return ""
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()


TEMPLATES.env.filters["pn"] = person_name
TEMPLATES.env.filters["da"] = dicom_date
TEMPLATES.env.filters["when"] = timestamp


class LoginRequired(Exception):
    """Raised by page dependencies to send the browser to /login."""


def page_user(request: Request) -> Principal:
    """The logged-in user of a page, or a redirect to the login form."""
    who = principal(request)
    if who is None:
        raise LoginRequired()
    if who.role == "store":
        raise HTTPException(403, "a 'store' token may only send studies by STOW-RS")
    return who


def _context(request: Request, who: Principal, **extra: Any) -> dict[str, Any]:
    clf = services(request).model()
    return {"request": request, "user": who, "model": clf.identity, "label_count": len(clf.manifest.labels), **extra}


def dashboard_data(store: Store) -> dict[str, Any]:
    """Counters and recent studies with their top findings."""
    with store.session() as s:
        counters = dashboard_counters(s)
        studies: list[dict[str, Any]] = []
        for st in list_studies(s, StudyFilter(limit=25)):
            top = list_results(s, ResultFilter(study_instance_uid=st.study_instance_uid, limit=3))
            studies.append(
                st.model_dump()
                | {
                    "top": [r.model_dump(include={"label", "probability", "positive"}) for r in top],
                    "study_date_shown": dicom_date(st.study_date),  # what the page shows; the JSON keeps the values
                    "last_received_shown": timestamp(st.last_received_at),
                }
            )
    return {"counters": counters.model_dump(), "studies": studies}


def page_result_filter(
    label: str, min_prob: str, positive: bool, model_name: str, model_version: str, date_from: str, date_to: str
) -> tuple[ResultFilter, list[str]]:
    """The results search form as a ResultFilter (the API's filters), and what was wrong in it."""
    errors: list[str] = []

    def day(text: str, name: str) -> dt.datetime | None:
        try:
            return dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), tzinfo=dt.UTC) if text else None
        except ValueError:
            errors.append(f"{name}: expected a date as YYYY-MM-DD, got {text!r}")
            return None

    p = None
    if min_prob:
        try:
            p = float(min_prob)
        except ValueError:
            p = None
        if p is None or not 0 <= p <= 1:
            errors.append(f"min probability: expected a number from 0 to 1, got {min_prob!r}")
            p = None
    since, until = day(date_from, "from"), day(date_to, "to")
    until = until + dt.timedelta(days=1) if until else None
    return ResultFilter(
        label or None, p, positive, model_name or None, model_version or None, since, until, limit=500
    ), errors


PAGE_ROWS = 50  # rows of the Requests and Orders pages, newest first


def _pager(page: int, total: int) -> dict[str, Any]:
    """The page number, the total and the neighbouring pages (None where there is none)."""
    pages = max(1, -(-total // PAGE_ROWS))
    return {
        "page": page,
        "pages": pages,
        "total": total,
        "newer": page - 1 or None,
        "older": page + 1 if page < pages else None,
    }


def _requests_response(
    request: Request, svc: Svc, who: Principal, page: int, error: str = "", status: int = 200, only: int = 0
) -> Response:
    """The Requests page: a page of requests (or the one asked for) as GET /api/requests/{id} shows them, and
    the form for requesters."""
    with svc.store.session() as s:
        ids, total = ([only], 1) if only else request_ids(s, PAGE_ROWS, (page - 1) * PAGE_ROWS)
        rows = [out for i in ids if (out := request_out(s, i)) is not None]
        total = len(rows) if only else total
        audit(s, who.name, "web.requests", source=who.address, rows=len(rows))
    settings = svc.settings
    form = {
        "may_ask": who.role in ("admin", "request"),
        "sources": [x.name for x in settings.sources],
        "models": [m.name for m in settings.models],
        "destinations": [d.name for d in settings.destinations],
        "priorities": list(PRIORITY_ORDER),
    }
    return TEMPLATES.TemplateResponse(
        request,
        "requests.html",
        _context(request, who, rows=rows, error=error, form=form, **_pager(page, total)),
        status_code=status,
    )


def pages_router() -> APIRouter:
    """The HTML routes (not part of the OpenAPI document)."""
    r = APIRouter(include_in_schema=False)

    @r.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, svc: Svc, error: str = "") -> Response:
        return TEMPLATES.TemplateResponse(
            request, "login.html", {"error": error, "no_tokens": not svc.settings.web.tokens}
        )

    @r.post("/login")
    def login(request: Request, svc: Svc, token: str = Form(...)) -> Response:
        address = request.client.host if request.client else ""
        store = svc.store
        try:
            t = check_token(request, token.strip(), "anonymous", "web.login_throttled", "web.login_failed")
        except HTTPException as refusal:
            return TEMPLATES.TemplateResponse(
                request,
                "login.html",
                {"error": str(refusal.detail).capitalize() + ".", "no_tokens": False},
                status_code=refusal.status_code,
                headers=refusal.headers,
            )
        if t is None:
            return TEMPLATES.TemplateResponse(
                request, "login.html", {"error": "Unknown token.", "no_tokens": False}, status_code=401
            )
        with store.session() as s:
            audit(s, t.name, "web.login", source=address)
        end_session(store, request.session.get("sid"))
        request.session.clear()  # a new key at each login (no session fixation)
        request.session["sid"] = start_session(store, t, address, svc.settings.web.session_hours)
        return RedirectResponse("/", status_code=303)

    @r.post("/logout")
    def logout(request: Request, svc: Svc) -> Response:
        who = principal(request)
        end_session(svc.store, request.session.get("sid"))
        if who is not None:
            with svc.store.session() as s:
                audit(s, who.name, "web.logout", source=who.address)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    @r.get("/", response_class=HTMLResponse)
    def dashboard(request: Request, svc: Svc, who: Principal = Depends(page_user)) -> Response:
        data = dashboard_data(svc.store)
        with svc.store.session() as s:
            audit(s, who.name, "web.dashboard", source=who.address)
        return TEMPLATES.TemplateResponse(request, "dashboard.html", _context(request, who, **data))

    @r.get("/dashboard.json")
    def dashboard_json(request: Request, svc: Svc, who: Principal = Depends(page_user)) -> Response:
        """The dashboard's live refresh. Opening the dashboard is the audited read; the 5-second
        polls that follow are not audited one by one (that would be 720 rows an hour per tab)."""
        return JSONResponse(dashboard_data(svc.store))

    @r.get("/studies/{study_instance_uid}", response_class=HTMLResponse)
    def study_page(
        request: Request, svc: Svc, study_instance_uid: str, who: Principal = Depends(page_user)
    ) -> Response:
        with svc.store.session() as s:
            detail = study_detail(s, study_instance_uid, svc.settings.destinations)
        if detail is None:
            return TEMPLATES.TemplateResponse(
                request, "message.html", _context(request, who, message="No such study."), status_code=404
            )
        with svc.store.session() as s:
            audit(s, who.name, "web.study", target=study_instance_uid, source=who.address)
        sr = next((o for o in detail.outputs if o.kind == "sr" and o.current), None)
        heatmaps = [o for o in detail.outputs if o.kind == "sc" and o.current]
        sources = sorted({f.source_sop_instance_uid for f in detail.findings if f.source_sop_instance_uid})
        return TEMPLATES.TemplateResponse(
            request, "study.html", _context(request, who, s=detail, sr=sr, heatmaps=heatmaps, sources=sources)
        )

    @r.get("/results", response_class=HTMLResponse)
    def results_page(
        request: Request,
        svc: Svc,
        who: Principal = Depends(page_user),
        label: str = "",
        min_prob: str = "",
        positive: bool = False,
        model_name: str = "",
        model_version: str = "",
        date_from: str = "",
        date_to: str = "",
    ) -> Response:
        f, errors = page_result_filter(label, min_prob, positive, model_name, model_version, date_from, date_to)
        rows: list[ResultOut] = []
        with svc.store.session() as s:
            if not errors:
                rows = list_results(s, f)
            audit(s, who.name, "web.results", source=who.address, rows=len(rows))
        # the CSV link carries the filled-in fields only: the API refuses empty numbers and dates
        query = urlencode([(k, v) for k, v in request.query_params.multi_items() if v])
        return TEMPLATES.TemplateResponse(
            request,
            "results.html",
            _context(request, who, rows=rows, q=request.query_params, query=query, errors=errors),
            status_code=422 if errors else 200,
        )

    @r.get("/upload", response_class=HTMLResponse)
    def upload_page(request: Request, svc: Svc, who: Principal = Depends(page_user)) -> Response:
        return TEMPLATES.TemplateResponse(
            request, "upload.html", _context(request, who, max_mb=svc.settings.web.max_upload_mb)
        )

    _request_pages(r)
    return r


def _request_pages(r: APIRouter) -> None:
    """The Requests page (with its form for requesters) and the Orders page."""

    @r.get("/requests", response_class=HTMLResponse)
    def requests_page(
        request: Request,
        svc: Svc,
        who: Principal = Depends(page_user),
        page: int = Query(1, ge=1, le=1_000_000),
        id: int = Query(0, ge=0, le=2**31 - 1, description="show this request only"),
    ) -> Response:
        return _requests_response(request, svc, who, page, only=id)

    @r.post("/requests", response_class=HTMLResponse)
    def request_form(
        request: Request,
        svc: Svc,
        who: Principal = Depends(require_requester),
        source: str = Form(..., max_length=64),
        what: str = Form(..., pattern="^(study_instance_uid|accession_number|patient_id)$"),
        value: str = Form(..., max_length=64),
        priority: Priority = Form(Priority.MEDIUM),
        model: str = Form("", max_length=64),
        destinations: list[str] = Form([]),
    ) -> Response:
        try:
            ids = Identifiers(**{what: value})
            request_fetch(svc.store, svc.settings, source, ids, priority, model, destinations, who.name, who.address)
        except (ValueError, ValidationError) as exc:  # a pydantic ValidationError is a ValueError too
            reason = str(exc.errors()[0]["msg"]) if isinstance(exc, ValidationError) else str(exc)
            return _requests_response(request, svc, who, 1, error=reason.removeprefix("Value error, "), status=422)
        return RedirectResponse("/requests", status_code=303)

    @r.get("/orders", response_class=HTMLResponse)
    def orders_page(
        request: Request, svc: Svc, who: Principal = Depends(page_user), page: int = Query(1, ge=1, le=1_000_000)
    ) -> Response:
        with svc.store.session() as s:
            rows, total = list_orders(s, PAGE_ROWS, (page - 1) * PAGE_ROWS)
            audit(s, who.name, "web.orders", source=who.address, rows=len(rows))
        return TEMPLATES.TemplateResponse(
            request, "orders.html", _context(request, who, rows=rows, **_pager(page, total))
        )


async def login_redirect(request: Request, exc: LoginRequired) -> Response:
    """Pages send an anonymous browser to the login form."""
    return RedirectResponse("/login", status_code=303)
