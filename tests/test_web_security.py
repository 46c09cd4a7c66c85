"""Edges of access control: forged or foreign session cookies, header rules, failed logins, no tokens, anonymous pages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from webnode import ADMIN, BROWSER, READER, make_store, node_settings, processed_study

from dxnode.config import Settings
from dxnode.store import Audit, Store
from dxnode.web.app import create_app

PID = "PID-SEC-7"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Store, str]]:
    tmp = tmp_path_factory.mktemp("websec")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp / "torch-home"))  # no ImageNet file: the demo model
        settings = node_settings(tmp, session_secret="secret-one-for-the-test")
        store = make_store(settings)
        uid = processed_study(store, settings, patient_id=PID)
        yield settings, store, uid
    store.dispose()


def with_web(settings: Settings, **web: object) -> Settings:
    """The same settings with some [web] keys changed."""
    return settings.model_copy(update={"web": settings.web.model_copy(update=web)})


def logged_in(settings: Settings, store: Store, token: str) -> TestClient:
    client = TestClient(create_app(settings, store), headers=BROWSER)
    assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303
    return client


def test_session_cookie_survives_a_restart_only_with_the_same_secret(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    client = logged_in(settings, store, READER)
    assert (
        "max-age=43200"
        in client.post("/login", data={"token": READER}, follow_redirects=False).headers["set-cookie"].lower()
    )
    cookie = client.cookies["dxnode_session"]  # logging in again replaced the first session
    restarted = TestClient(create_app(settings, store), cookies={"dxnode_session": cookie})
    assert (
        restarted.get("/api/studies").status_code == 200
    )  # [web] session_secret configured: sessions outlive the process
    other = TestClient(
        create_app(with_web(settings, session_secret="secret-two"), store), cookies={"dxnode_session": cookie}
    )
    assert other.get("/api/studies").status_code == 401
    # No configured secret: each process signs with its own random one.
    random_a, random_b = with_web(settings, session_secret=""), with_web(settings, session_secret="")
    a = logged_in(random_a, store, READER)
    assert a.get("/api/studies").status_code == 200
    b = TestClient(create_app(random_b, store), cookies={"dxnode_session": a.cookies["dxnode_session"]})
    assert b.get("/api/studies").status_code == 401


def test_a_forged_session_cookie_opens_nothing(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, uid = node
    cookie = logged_in(settings, store, READER).cookies["dxnode_session"]
    payload, _, signature = cookie.rpartition(".")
    for forged in [
        payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature,
        cookie[:-3] + "xyz",
        "e30=.bogus",
        "",
    ]:
        client = TestClient(create_app(settings, store), cookies={"dxnode_session": forged})
        assert client.get("/api/studies").status_code == 401, forged
        page = client.get(f"/studies/{uid}", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"


def test_bearer_header_rules(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, uid = node
    client = TestClient(create_app(settings, store))
    assert (
        client.get("/api/studies", headers={"Authorization": f"bearer {READER}"}).status_code == 200
    )  # the scheme is case-insensitive
    for header in [
        f"Basic {READER}",
        READER,
        f"Bearer {READER}x",
        f"Bearer {READER[:-1]}",
        f"Bearer {READER.upper()}",
        "Bearer ",
        "Bearer",
    ]:
        r = client.get("/api/studies", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.headers["www-authenticate"] == "Bearer" and PID not in r.text
    assert (
        client.get("/api/studies", params={"token": READER}).status_code == 401
    )  # never from the query string (it ends up in logs)
    # A wrong header is not rescued by a valid session cookie.
    browser = logged_in(settings, store, ADMIN)
    assert browser.get("/api/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.post(f"/api/studies/{uid}/ignore", headers={"Authorization": f"Bearer {READER}"})
    assert r.status_code == 403 and "admin" in r.json()["detail"]


def test_failed_logins_are_audited_without_the_guess(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    client = TestClient(create_app(settings, store))
    guess = "guessed-token-4711"
    r = client.post("/login", data={"token": guess})
    assert r.status_code == 401 and "Unknown token" in r.text and "dxnode_session" not in r.cookies
    assert client.get("/", follow_redirects=False).status_code == 303
    logged_in(settings, store, ADMIN)
    with store.session() as s:
        rows = list(s.scalars(select(Audit).where(Audit.action.in_(["web.login", "web.login_failed"]))))
    failed = [a for a in rows if a.action == "web.login_failed"]
    assert failed and failed[-1].actor == "anonymous" and failed[-1].source == "testclient"
    assert any(a.action == "web.login" and a.actor == "alice" for a in rows)
    texts = [f"{a.actor} {a.target} {a.source} {a.detail}" for a in rows]
    assert not any(guess in t or ADMIN in t for t in texts)  # neither a guess nor a real token is written down


def test_without_configured_tokens_nothing_opens(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    client = TestClient(create_app(with_web(settings, tokens=[]), store))
    assert client.get("/healthz").status_code == 200
    assert "No token is configured yet" in client.get("/login").text
    assert client.post("/login", data={"token": READER}).status_code == 401
    for path in ["/api/studies", "/api/results", "/metrics", "/openapi.json"]:
        assert client.get(path, headers={"Authorization": f"Bearer {READER}"}).status_code == 401, path


def test_anonymous_visitors_get_the_login_form_and_no_patient_data(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, uid = node
    client = TestClient(create_app(settings, store))
    for path in ["/", f"/studies/{uid}", "/results", "/upload", "/dashboard.json"]:
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
        assert PID not in r.text and uid not in r.text
    for path in [f"/api/studies/{uid}", "/api/results.csv", "/api/outputs/1.png", f"/api/instances/{uid}.png"]:
        r = client.get(path)
        assert r.status_code == 401 and PID not in r.text, path
    assert client.get("/docs").status_code in (401, 404)  # no interactive docs page without a token
    assert client.get("/static/dxnode.css").status_code == 200  # the stylesheet holds nothing private
    with store.session() as s:
        assert not list(s.scalars(select(Audit).where(Audit.actor == "anonymous", Audit.action.like("api.%"))))


def test_reads_of_study_images_are_audited(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, uid = node
    client = TestClient(create_app(settings, store))
    h = {"Authorization": f"Bearer {READER}"}
    detail = client.get(f"/api/studies/{uid}", headers=h).json()
    sc = next(o for o in detail["outputs"] if o["kind"] == "sc")
    source = detail["findings"][0]["source_sop_instance_uid"]

    def count() -> int:
        with store.session() as s:
            return len(list(s.scalars(select(Audit).where(Audit.actor == "bob", Audit.action.like("api.%image%")))))

    before = count()
    assert client.get(f"/api/outputs/{sc['id']}.png", headers=h).status_code == 200
    assert client.get(f"/api/instances/{source}.png", headers=h).status_code == 200
    assert count() == before + 2
