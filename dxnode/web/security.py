"""ASGI middleware that hardens every response and request of the web stage.

- SecurityHeaders: CSP without inline script or style, no framing, nosniff, a same-origin referrer,
  and no caching of anything but the static files.
- CsrfGuard: a state-changing request that does not carry a bearer token must come from this
  site's own pages (Origin, else Referer); bearer-token API calls are not affected.
- BodyGuard: bounded request bodies, counted while they stream (chunked bodies included), and
  for uploads the caller is authenticated before a byte of the body is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
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
                    response = JSONResponse({"detail": f"CSRF check failed: {reason}"}, status_code=403)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


@dataclass(frozen=True)
class BodyRule:
    """How much body a path may send, and whether the caller must be authenticated first."""

    max_bytes: int
    too_large: str  # the 413's detail
    authenticate: bool = False


class BodyGuard:
    """Bound request bodies of some paths while they stream; authenticate uploads before reading them.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as it
    arrives and cut off with 413 when it passes the limit (Starlette's multipart parser then closes
    and deletes its spooled file). Without authentication an upload gets 401 before any of it is read.
    """

    def __init__(
        self, app: ASGIApp, rules: dict[str, BodyRule], authenticate: Callable[[Request], object | None]
    ) -> None:
        self.app, self.rules, self.authenticate = app, rules, authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = self.rules.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if rule is None:
            await self.app(scope, receive, send)
            return
        if rule.authenticate:
            try:
                who = await run_in_threadpool(self.authenticate, Request(scope))
            except HTTPException as exc:  # throttled
                who, refusal = None, exc
            else:
                refusal = HTTPException(401, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"})
            if who is None:
                headers = {**(refusal.headers or {}), "Connection": "close"}
                await JSONResponse({"detail": refusal.detail}, refusal.status_code, headers)(scope, receive, send)
                return
        too_large = HTTPException(413, rule.too_large, headers={"Connection": "close"})
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > rule.max_bytes:
            await JSONResponse({"detail": too_large.detail}, 413, too_large.headers)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > rule.max_bytes:
                    raise too_large  # FastAPI re-raises HTTPExceptions from body reading; answered as 413
            return message

        await self.app(scope, counted, send)
