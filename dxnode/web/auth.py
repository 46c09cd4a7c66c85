"""Access control: bearer tokens from [[web.tokens]] with a role, or a login session cookie.

Every endpoint but /healthz needs a token: missing or wrong gives 401, a "read" token on an
admin action gives 403. The web pages log in with the same token and keep a signed session
cookie. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request, status

from dxnode.config import WebToken


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role, and from where."""

    name: str
    role: str
    address: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def find_token(tokens: list[WebToken], presented: str) -> WebToken | None:
    """The configured token equal to the presented one (constant-time comparison)."""
    match = None
    for t in tokens:
        if hmac.compare_digest(t.token.encode(), presented.encode()):
            match = t
    return match


def principal(request: Request) -> Principal | None:
    """The caller from the Authorization header or the session cookie, or None."""
    tokens: list[WebToken] = request.app.state.settings.web.tokens
    address = request.client.host if request.client else ""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        t = find_token(tokens, header[7:].strip())
        return Principal(t.name, t.role, address) if t else None
    name = request.session.get("token_name") if "session" in request.scope else None
    for t in tokens:
        if t.name == name and hmac.compare_digest(request.session.get("token_digest", ""), digest(t.token)):
            return Principal(t.name, t.role, address)
    return None


def digest(token: str) -> str:
    """What the session cookie keeps of a token (so revoking the token ends the session)."""
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()[:32]


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


def require_admin(request: Request) -> Principal:
    """Dependency: an admin token (401 without a valid token, 403 for a read token)."""
    who = require_read(request)
    if not who.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this action needs an admin token")
    return who
