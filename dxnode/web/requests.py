"""The fetch request routes: POST /api/requests (an admin or a "request" token) and GET /api/requests/{id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException
from fastapi import Path as PathParam
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from dxnode.schemas import RequestCreated, RequestIn, RequestOut
from dxnode.sources.fetch import request_fetch, request_out
from dxnode.states import RequestState
from dxnode.store import audit
from dxnode.web.auth import Principal, require_read, require_requester
from dxnode.web.errors import ERRORS
from dxnode.web.services import Svc

RequestId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="request id")]


def requests_router() -> APIRouter:
    """The /api/requests routes."""
    r = APIRouter(prefix="/api", responses=ERRORS)

    @r.post(
        "/requests",
        status_code=201,
        summary="Fetch studies from a source and analyse them (an admin or a 'request' token)",
        responses={
            403: {"description": "Needs an admin or a 'request' token"},
            404: {"description": "No such source, model or destination in the configuration"},
        },
    )
    async def create(svc: Svc, body: RequestIn, who: Principal = Depends(require_requester)) -> RequestCreated:
        try:
            ids = body.fetch_identifiers()
        except ValidationError as exc:
            raise HTTPException(422, str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None
        try:
            request_id = await run_in_threadpool(
                request_fetch,
                svc.store,
                svc.settings,
                body.source,
                ids,
                body.priority,
                body.model,
                body.destinations,
                who.name,
                who.address,
            )
        except ValueError as exc:  # it names a source, model or destination that is not configured
            raise HTTPException(404, str(exc)) from None
        return RequestCreated(id=request_id, state=RequestState.PENDING, url=f"/api/requests/{request_id}")

    @r.get(
        "/requests/{request_id}",
        summary="A fetch request: querying, retrieving n of m, queued, done (with links to the results) or failed",
        responses={404: {"description": "No such request"}},
    )
    def read(svc: Svc, request_id: RequestId, who: Principal = Depends(require_read)) -> RequestOut:
        with svc.store.session() as s:
            out = request_out(s, request_id)
            if out is not None:
                audit(s, who.name, "api.request.read", target=f"request:{request_id}", source=who.address)
        if out is None:
            raise HTTPException(404, "no such request")
        return out

    return r
