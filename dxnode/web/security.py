"""ASGI middleware that hardens every response and request of the web stage.

- SecurityHeaders: CSP without inline script or style, no framing, nosniff, a same-origin referrer,
  and no caching of anything but the static files.
- CsrfGuard: a state-changing request that does not carry a bearer token must come from this
  site's own pages (Origin, else Referer); bearer-token API calls are not affected.
- BodyGuard: every route's body bounded, counted while it streams (chunked bodies included), the
  caller authenticated before a byte of it is read, and the connection closed rather than drained.
- SecureCookies: cookies marked Secure on requests that came over https.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.routing import BaseRoute, Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # "same-origin", not "no-referrer": browsers send "Origin: null" on POSTs under no-referrer
    "Referrer-Policy": "same-origin",
}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE"}
SESSION_COOKIE = "dxnode_session"


class SecurityHeaders:
    """Add the security headers to every HTTP response; Cache-Control no-store except under /static/."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cacheable = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    if name not in headers:
                        headers[name] = value
                if not cacheable:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host(netloc: str) -> str:
    """host[:port] in lower case, without a default port (80/443), for comparing origins."""
    netloc = netloc.strip().lower()
    for default in (":80", ":443"):
        if netloc.endswith(default):
            return netloc[: -len(default)]
    return netloc


class CsrfGuard:
    """403 for a state-changing request without a bearer token whose Origin (or Referer) is another site.

    With neither header, the request is refused only if it carries the session cookie (browsers send
    Origin on every POST; a script without a cookie has nothing to forge).
    """

    def __init__(self, app: ASGIApp, trusted_origins: list[str]) -> None:
        self.app = app
        self.trusted = {_host(urlsplit(o if "://" in o else "//" + o).netloc) for o in trusted_origins} - {""}

    def refusal(self, headers: Headers) -> str | None:
        """Why the request is refused, or None."""
        allowed = (self.trusted | {_host(headers.get("host", ""))}) - {""}
        origin = headers.get("origin")
        if origin is not None:
            return None if _host(urlsplit(origin).netloc) in allowed and origin != "null" else "cross-site request"
        referer = headers.get("referer")
        if referer is not None:
            return None if _host(urlsplit(referer).netloc) in allowed else "cross-site request"
        cookies = headers.get("cookie", "")
        return "request without Origin or Referer" if f"{SESSION_COOKIE}=" in cookies else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = Headers(scope=scope)
            if not headers.get("authorization", "").lower().startswith("bearer "):
                reason = self.refusal(headers)
                if reason is not None:
                    await _refuse(HTTPException(403, f"CSRF check failed: {reason}"), scope, receive, send)
                    return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class BodyRule:
    """How much body a route may send, and the 413's detail."""

    max_bytes: int
    too_large: str


Gate = Callable[[Request], object]  # raises HTTPException (401, 403, 429) to refuse the caller


def route_gate(route: BaseRoute, gates: Sequence[Gate]) -> Gate | None:
    """The first of gates (e.g. require_admin, require_read) among the route's dependencies, at any depth."""
    found: set[object] = set()
    pending = [getattr(route, "dependant", None)]
    while pending:
        dependant = pending.pop()
        if dependant is not None:
            found.add(dependant.call)
            pending.extend(dependant.dependencies)
    return next((gate for gate in gates if gate in found), None)


def flat_routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, those of included routers too (FastAPI 0.16x keeps an included router whole, as
    an object with original_router, where older versions copied its routes into the app's list)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from flat_routes(inner.routes)
        else:
            yield route


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length", "")
    return "chunked" in headers.get("transfer-encoding", "").lower() or (length != "" and length != "0")


class BodyGuard:
    """Every request body read only as far as needed, for every route of the app (one mechanism).

    For a request with a body to a route that declares an access dependency (one of gates:
    require_admin, require_store, require_read) the caller is checked first: 401, 403 or 429 is
    answered before a byte of the body is read. A body is bounded by its route's rule (else the
    default): a declared Content-Length over it is refused at once, a chunked body is counted as it
    arrives and cut off with 413 when it passes. Any answer sent before the body was read to its end
    says "Connection: close", so the server closes instead of reading (draining) the rest.
    """

    def __init__(
        self, app: ASGIApp, router: Router, gates: Sequence[Gate], rules: dict[str, BodyRule], default: BodyRule
    ) -> None:
        self.app, self.router, self.gates, self.rules, self.default = app, router, gates, rules, default

    def _route(self, scope: Scope) -> tuple[BodyRule, Gate | None]:
        """The matching route's body rule and gate (the default and none for a path no route takes)."""
        for route in flat_routes(self.router.routes):
            if route.matches(scope)[0] == Match.FULL:
                return self.rules.get(getattr(route, "path", ""), self.default), route_gate(route, self.gates)
        return self.default, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        rule, gate = self._route(scope)
        if gate is not None and scope["method"] not in SAFE_METHODS:
            try:
                await run_in_threadpool(gate, Request(scope))
            except HTTPException as refusal:
                await _refuse(refusal, scope, receive, send)
                return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > rule.max_bytes:
            await _refuse(HTTPException(413, rule.too_large), scope, receive, send)
            return
        received, complete = 0, False

        async def counted() -> Message:
            nonlocal received, complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > rule.max_bytes:
                    # FastAPI re-raises HTTPExceptions from body reading; answered as 413 (and closed below)
                    raise HTTPException(413, rule.too_large)
            return message

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                MutableHeaders(scope=message)["Connection"] = "close"
            await send(message)

        await self.app(scope, counted, closing)


async def _refuse(refusal: HTTPException, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer with the refusal and close the connection: the body stays unread."""
    headers = {**(refusal.headers or {}), "Connection": "close"}
    await JSONResponse({"detail": refusal.detail}, refusal.status_code, headers)(scope, receive, send)


class SecureCookies:
    """Mark every cookie Secure on a request that came over https: TLS here, or a trusted proxy's
    X-Forwarded-Proto (uvicorn's ProxyHeadersMiddleware, outside this one, sets the scheme from it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def secure(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (name, value + b"; secure")
                    if name.lower() == b"set-cookie" and b"; secure" not in value.lower()
                    else (name, value)
                    for name, value in message.get("headers", [])
                ]
            await send(message)

        await self.app(scope, receive, secure)
