"""Every web route that takes a body: the caller checked before it is read, and no more of it read than
its limit; login throttling that stops wrong guesses, never a valid token; forwarded headers believed
only from [web] trusted_proxies; cookies Secure over https."""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select as sql_select
from webnode import ADMIN, READER, make_store, node_settings

from dxnode.config import Settings, WebToken
from dxnode.store import Audit, Store
from dxnode.web.app import create_app
from dxnode.web.auth import ACCESS_GATES, require_admin, require_read, require_requester, require_store
from dxnode.web.security import flat_routes, route_gate
from dxnode.web.server import WebServer

STORER = "store-token-0123456789"
TWO_GB = 2 << 30
CHUNK = 64 * 1024
READ_LIMIT = 16 << 20  # bytes a client may get into the socket buffers before the server closes: far below 2 GB
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Store]]:
    tmp = tmp_path_factory.mktemp("bounds-web")
    settings = node_settings(tmp, stow_max_body_mb=4, login_free_attempts=1000)
    settings.web.tokens.append(WebToken(name="pacs", token=STORER, role="store"))
    store = make_store(settings)
    yield settings, store
    store.dispose()


def with_web(settings: Settings, **web: object) -> Settings:
    return settings.model_copy(update={"web": settings.web.model_copy(update=web)})


@pytest.fixture
def served(base: tuple[Settings, Store]) -> Iterator[tuple[WebServer, Settings, Store]]:
    settings, store = base
    server = WebServer(create_app(settings, store), "127.0.0.1", 0)
    server.start()
    yield server, settings, store
    server.stop()


def send_lazily(port: int, path: str, headers: dict[str, str], total: int = TWO_GB) -> tuple[int, int, float]:
    """send_once, again (at most 3 tries) when the connection was reset before the answer could be read:
    a server that answers early closes with the client's bytes unread, and the reset that closing sends
    can overtake the answer on the client's side (TCP's old "lingering close" problem), whatever the server."""
    for _ in range(2):
        code, sent, answered = send_once(port, path, headers, total)
        if code is not None:
            return code, sent, answered
    code, sent, answered = send_once(port, path, headers, total)
    assert code is not None, f"no answer to POST {path} in 3 tries, {sent} bytes sent in the last"
    return code, sent, answered


def send_once(port: int, path: str, headers: dict[str, str], total: int) -> tuple[int | None, int, float]:
    """POST a chunked body of total bytes, made a chunk at a time, and go on sending after the answer
    (as a client that sends its whole body does) until the server closes the connection.

    Returns (HTTP status, bytes the socket accepted in all, seconds to the answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n{head}\r\n".encode())
    chunk = b"%x\r\n%s\r\n" % (CHUNK, b"\0" * CHUNK)
    sent, started, answer, pending = 0, time.monotonic(), b"", memoryview(chunk)
    answered = float("inf")
    sock.setblocking(False)
    try:
        while sent < total and time.monotonic() - started < 60:
            readable, writable, _ = select.select([sock], [sock], [], 1)
            if readable:
                try:
                    more = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    break  # reset: the server closed with our bytes unread
                if not more:
                    break  # the server closed
                answer += more
                if b"\r\n" in answer:
                    answered = min(answered, time.monotonic() - started)
            elif writable:
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    continue
                except OSError:
                    break  # the server closed
                sent += n  # the chunk framing included
                pending = pending[n:] or memoryview(chunk)
    finally:
        sock.close()
    found = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert found or not answer, f"not an HTTP answer to POST {path} after {sent} bytes: {answer[:200]!r}"
    return (int(found.group(1)) if found else None), sent, answered


def body_routes(app: object) -> list[tuple[str, object]]:
    """(a path for it, its access gate) for every route of the app that takes a body."""
    found = []
    for route in flat_routes(app.routes):  # type: ignore[attr-defined]
        if isinstance(route, APIRoute) and route.methods & BODY_METHODS:
            path = re.sub(r"\{[^}]+\}", "1", route.path)  # "1": a valid row id and a valid UID
            found.append((path, route_gate(route, ACCESS_GATES)))
    return found


LOW_ROLE = {require_admin: READER, require_read: STORER, require_store: READER, require_requester: READER}


def test_every_body_route_answers_before_reading_2_gb(served: tuple[WebServer, Settings, Store]) -> None:
    server, settings, store = served
    routes = body_routes(create_app(settings, store))
    paths = {path for path, _ in routes}
    assert {"/dicomweb/studies", "/dicomweb/studies/1", "/api/predict", "/login", "/api/jobs/1/requeue"} <= paths
    for path, gate in routes:
        callers: list[tuple[str, dict[str, str], set[int]]] = [
            # /login reads its form to the 64 KiB limit (413); /logout reads nothing and redirects (303).
            ("no token", {}, {401} if gate else {303, 413}),
            ("a wrong token", {"Authorization": "Bearer wrong-token-0123456789"}, {401} if gate else {303, 413}),
        ]
        if gate is not None:
            callers.append(("a low-role token", {"Authorization": f"Bearer {LOW_ROLE[gate]}"}, {403}))
        for who, headers, expected in callers:
            code, sent, seconds = send_lazily(
                server.port, path, {"Content-Type": "application/x-www-form-urlencoded", **headers}
            )
            assert code in expected, (path, who, code)
            assert sent < READ_LIMIT, f"{path} with {who}: {sent} bytes read before the answer {code}"
            assert seconds < 10, f"{path} with {who}: answered after {seconds:.1f} s"
    assert httpx.get(server.url + "healthz").status_code == 200


def test_stow_rs_with_a_store_token_stops_reading_at_its_limit(served: tuple[WebServer, Settings, Store]) -> None:
    server, _, _ = served
    ctype = 'multipart/related; type="application/dicom"; boundary=b'
    headers = {"Content-Type": ctype, "Authorization": f"Bearer {STORER}"}
    code, sent, seconds = send_lazily(server.port, "/dicomweb/studies", headers)
    assert code == 413 and 4 << 20 <= sent < (4 << 20) + READ_LIMIT and seconds < 20, (code, sent, seconds)
    # A body-less action with a valid admin token is answered, and the rest of the body is not drained.
    code, sent, seconds = send_lazily(server.port, "/api/jobs/1/requeue", {"Authorization": f"Bearer {ADMIN}"})
    assert code == 404 and sent < READ_LIMIT and seconds < 10, (code, sent)


# --- throttling and forwarded headers ---------------------------------------------------------


def audits(store: Store, action: str) -> list[Audit]:
    with store.session() as s:
        return list(s.scalars(sql_select(Audit).where(Audit.action == action).order_by(Audit.id)))


def test_a_valid_token_works_after_30_wrong_ones_from_the_same_address(base: tuple[Settings, Store]) -> None:
    settings, store = base
    client = TestClient(create_app(with_web(settings, login_free_attempts=10, login_delay_s=60), store))
    codes = [
        client.get("/api/studies", headers={"Authorization": f"Bearer guess-{i:020d}"}).status_code for i in range(30)
    ]
    assert codes == [401] * 10 + [429] * 20
    assert client.get("/api/studies", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
    login = client.post(
        "/login", data={"token": ADMIN}, headers={"Origin": "http://testserver"}, follow_redirects=False
    )
    assert login.status_code == 303 and "dxnode_session" in login.cookies
    # The guesser is still held back.
    assert client.get("/api/studies", headers={"Authorization": "Bearer guess-again-0123456789"}).status_code == 429
    assert client.post("/login", data={"token": "guess"}, headers={"Origin": "http://testserver"}).status_code == 429


def _guesses(url: str, forwarded: list[str]) -> list[int]:
    return [
        httpx.get(
            url + "api/studies", headers={"Authorization": "Bearer wrong-token-0123456789", "X-Forwarded-For": xff}
        ).status_code
        for xff in forwarded
    ]


@pytest.mark.parametrize("proxies", [[], ["10.0.0.0/8"]])
def test_forwarded_for_from_an_untrusted_peer_is_ignored(base: tuple[Settings, Store], proxies: list[str]) -> None:
    settings, store = base
    app = create_app(with_web(settings, login_free_attempts=10, login_delay_s=60, trusted_proxies=proxies), store)
    server = WebServer(app, "127.0.0.1", 0)
    server.start()
    try:
        codes = _guesses(server.url, [f"198.51.100.{i}" for i in range(30)])
    finally:
        server.stop()
    assert codes == [401] * 10 + [429] * 20  # rotating X-Forwarded-For bought nothing


def test_forwarded_for_from_a_trusted_proxy_names_the_client(base: tuple[Settings, Store]) -> None:
    settings, store = base
    web = with_web(settings, login_free_attempts=10, login_delay_s=60, trusted_proxies=["127.0.0.0/8"])
    server = WebServer(create_app(web, store), "127.0.0.1", 0)
    server.start()
    try:
        before = len(audits(store, "web.token_failed"))
        assert _guesses(server.url, [f"198.51.100.{i}" for i in range(30)]) == [401] * 30  # 30 clients, 1 guess each
        assert audits(store, "web.token_failed")[before].source == "198.51.100.0"
        assert _guesses(server.url, ["203.0.113.9"] * 12) == [401] * 10 + [429] * 2  # one client, throttled
        # The client is the right-most address not itself a trusted proxy: a forged left-most one is ignored.
        assert _guesses(server.url, ["203.0.113.9, 192.0.2.1"]) == [401]
    finally:
        server.stop()


def test_trusted_proxies_are_addresses_or_networks() -> None:
    with pytest.raises(ValueError, match=r"'proxy\.example' is not an IP address or network"):
        Settings(web={"trusted_proxies": ["proxy.example"]})
    assert Settings(web={"trusted_proxies": ["10.0.0.0/8", "::1"]}).web.trusted_proxies == ["10.0.0.0/8", "::1"]


# --- Secure cookies ---------------------------------------------------------------------------


def _login_cookie(url: str, headers: dict[str, str], transport: object = None) -> str:
    """The Set-Cookie of a browser login at url (http or https)."""
    with httpx.Client(base_url=url, transport=transport) as client:  # type: ignore[arg-type]
        r = client.post("/login", data={"token": READER}, headers=headers, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["set-cookie"]


def test_cookies_are_secure_over_https_or_behind_a_trusted_proxy_that_says_so(base: tuple[Settings, Store]) -> None:
    settings, store = base
    # TLS at the server (the ASGI scheme is https): Secure; plain http: not.
    app = create_app(settings, store)
    https = TestClient(app, base_url="https://testserver")
    r = https.post("/login", data={"token": READER}, headers={"Origin": "https://testserver"}, follow_redirects=False)
    assert r.status_code == 303 and "; secure" in r.headers["set-cookie"].lower()
    http = TestClient(app, base_url="http://testserver")
    r = http.post("/login", data={"token": READER}, headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert r.status_code == 303 and "secure" not in r.headers["set-cookie"].lower()
    # Behind a proxy: X-Forwarded-Proto counts only from a trusted one.
    for proxies, secure in [([], False), (["127.0.0.1"], True)]:
        server = WebServer(create_app(with_web(settings, trusted_proxies=proxies), store), "127.0.0.1", 0)
        server.start()
        try:
            origin = server.url.rstrip("/")
            cookie = _login_cookie(origin, {"Origin": origin, "X-Forwarded-Proto": "https"})
        finally:
            server.stop()
        assert ("; secure" in cookie.lower()) is secure, (proxies, cookie)
