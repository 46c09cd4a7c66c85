"""Access control: bearer tokens from [[web.tokens]] with a role, or a login session.

Every endpoint but /healthz needs a token: missing or wrong gives 401, a "read" token on an
admin action gives 403. A "request" token reads like a "read" one and may also ask for fetches
(POST /api/requests); a "store" token may only send studies by STOW-RS. The web pages log in with the same token; the signed session cookie
carries a random key whose hash is a `web_session` row, so logging out revokes it server-side
and it expires after [web] session_hours. Tokens are compared in constant time, and wrong ones
are throttled per client address (LoginThrottle), valid ones never. The client address is the
connection's, or the one a proxy of [web] trusted_proxies forwards (X-Forwarded-For).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from sqlalchemy import delete, select

from dxnode.config import WebToken
from dxnode.store import Store, WebSession, audit, utcnow
from dxnode.web.services import services


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role, and from where."""

    name: str
    role: str
    address: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def check_token(request: Request, presented: str, actor: str, throttled: str, failed: str) -> WebToken | None:
    """The configured token presented by the caller, or None (audited as `failed`); a wrong one raises 429
    (audited as `throttled`) while the caller's address must wait after too many wrong tokens."""
    address = client_address(request)
    svc = services(request)
    tokens = svc.settings.web.tokens
    t, wait = svc.login_throttle.attempt(address, lambda: find_token(tokens, presented))
    if wait > 0:
        with svc.store.session() as s:
            audit(s, actor, throttled, source=address, retry_after_s=round(wait, 1))
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many wrong tokens from this address: try again in {wait:.0f} s",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    if t is None:
        with svc.store.session() as s:
            audit(s, actor, failed, source=address)
    return t


def find_token(tokens: list[WebToken], presented: str) -> WebToken | None:
    """The configured token equal to the presented one (constant-time comparison)."""
    match = None
    for t in tokens:
        if hmac.compare_digest(t.token.encode(), presented.encode()):
            match = t
    return match


def principal(request: Request) -> Principal | None:
    """The caller from the Authorization header or the session cookie, or None.

    A wrong bearer token counts as a failed attempt of its address; while that address is throttled
    a wrong one gets 429 (a valid one is never throttled). Worked out once per request: BodyGuard
    asks before the body is read, the route's dependency again.
    """
    if _PRINCIPAL in request.scope:
        cached: Principal | None = request.scope[_PRINCIPAL]
        return cached
    who = _find_principal(request)
    request.scope[_PRINCIPAL] = who
    return who


_PRINCIPAL = "dxnode.principal"  # the scope key principal() keeps its answer under


def _find_principal(request: Request) -> Principal | None:
    """principal()'s work: the bearer token, else the session cookie."""
    svc = services(request)
    tokens = svc.settings.web.tokens
    address = client_address(request)
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        t = check_token(request, header[7:].strip(), "anonymous", "web.token_throttled", "web.token_failed")
        return Principal(t.name, t.role, address) if t else None
    key = request.session.get("sid") if "session" in request.scope else None
    if not isinstance(key, str) or not key:
        return None
    with svc.store.session() as s:
        row = s.scalar(
            select(WebSession).where(WebSession.key_hash == _key_hash(key), WebSession.expires_at > utcnow())
        )
        if row is None:
            return None
        name, token_digest = row.token_name, row.token_digest
    for t in tokens:
        if t.name == name and hmac.compare_digest(token_digest, digest(t.token)):
            return Principal(t.name, t.role, address)
    return None


def digest(token: str) -> str:
    """What a session keeps of a token (so revoking the token ends the session)."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def start_session(store: Store, token: WebToken, address: str, hours: float) -> str:
    """A new session row for a login; returns the key the cookie carries. Expired rows are removed."""
    key = secrets.token_urlsafe(32)
    now = utcnow()
    with store.session() as s:
        s.execute(delete(WebSession).where(WebSession.expires_at <= now))
        s.add(
            WebSession(
                key_hash=_key_hash(key),
                token_name=token.name,
                token_digest=digest(token.token),
                source=address,
                created_at=now,
                expires_at=now + dt.timedelta(hours=hours),
            )
        )
    return key


def end_session(store: Store, key: object) -> None:
    """Revoke a session: its cookie opens nothing any more, even if kept."""
    if isinstance(key, str) and key:
        with store.session() as s:
            s.execute(delete(WebSession).where(WebSession.key_hash == _key_hash(key)))


def require_read(request: Request) -> Principal:
    """Dependency: a valid read or admin token (401 otherwise; 403 for a STOW-RS-only "store" token)."""
    who = principal(request)
    if who is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"}
        )
    if who.role == "store":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "a 'store' token may only send studies by STOW-RS")
    return who


def require_store(request: Request) -> Principal:
    """Dependency: a token whose role may store instances by STOW-RS, "store" or "admin" (401, else 403)."""
    who = principal(request)
    if who is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"}
        )
    if who.role not in ("store", "admin"):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "STOW-RS needs a token with role 'store' or 'admin'")
    return who


def require_admin(request: Request) -> Principal:
    """Dependency: an admin token (401 without a valid token, 403 for a read token)."""
    who = require_read(request)
    if not who.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this action needs an admin token")
    return who


def require_requester(request: Request) -> Principal:
    """Dependency: an admin or a "request" token, which may ask for fetches (401/403 otherwise)."""
    who = require_read(request)
    if who.role not in ("admin", "request"):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "making requests needs an admin or a 'request' token")
    return who


# The access dependencies a route may declare, most particular first: the body guard
# (web/security.py BodyGuard) finds a route's own among them and answers before reading its body.
ACCESS_GATES = (require_admin, require_store, require_requester, require_read)
