"""Access control and audit details of the web stage: where admin actions came from, sessions, page forms, upload limit."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from webnode import ADMIN, BROWSER, READER, make_store, node_settings, processed_study

from dxnode.config import Settings
from dxnode.jobs.body import run_job
from dxnode.store import Audit, Job, Store
from dxnode.web.app import create_app
from dxnode.web.server import WebServer
from dxnode.worklist import queue

H_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
H_READ = {"Authorization": f"Bearer {READER}"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Store, str]]:
    tmp = tmp_path_factory.mktemp("webauth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp / "torch-home"))  # no ImageNet file: the demo model
        settings = node_settings(tmp, max_upload_mb=1, session_secret="a-fixed-secret-for-the-test")
        store = make_store(settings)
        uid = processed_study(store, settings, patient_id="PID-AUTH")
        yield settings, store, uid
    store.dispose()


def audits(store: Store, action: str) -> list[Audit]:
    with store.session() as s:
        return list(s.scalars(select(Audit).where(Audit.action == action).order_by(Audit.id)))


def login(client: TestClient, token: str) -> None:
    r = client.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_admin_actions_record_who_and_from_where(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, uid = node
    client = TestClient(create_app(settings, store))
    assert client.post(f"/api/studies/{uid}/requeue", headers=H_ADMIN).status_code == 200
    with store.session() as s:
        job_id = s.scalar(select(Job.id).where(Job.state == "done"))
    assert client.post(f"/api/jobs/{job_id}/requeue", headers=H_ADMIN).status_code == 200
    assert client.post("/api/outbox/1/resend", headers=H_ADMIN).json()["requeued"] == 1
    for action in ("study.requeue", "job.requeue", "delivery.resend"):
        rows = audits(store, action)
        assert rows and rows[-1].actor == "alice" and rows[-1].source == "testclient", action
        assert rows[-1].at is not None
    # Re-queueing the done job while the study is already queued joins that queued job (one re-run,
    # not two); the old results stay visible until it finishes, and the work really runs again.
    assert queue.drain(store, settings, run_job) == 1
    assert client.get("/api/jobs", params={"state": "done"}, headers=H_READ).json()[0]["id"] > job_id


def test_jobs_and_outbox_reads_are_audited(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    client = TestClient(create_app(settings, store))
    before = len(audits(store, "api.jobs.read")), len(audits(store, "api.outbox.read"))
    assert client.get("/api/jobs", headers=H_READ).json()
    assert client.get("/api/outbox", headers=H_READ).json()
    after = audits(store, "api.jobs.read"), audits(store, "api.outbox.read")
    assert (len(after[0]), len(after[1])) == (before[0] + 1, before[1] + 1)
    assert after[0][-1].actor == "bob" and after[1][-1].source == "testclient"


def test_session_cookie_is_strict_and_ends_with_logout_or_revoked_token(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    client = TestClient(create_app(settings, store), headers=BROWSER)
    r = client.post("/login", data={"token": READER}, follow_redirects=False)
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/", follow_redirects=False).status_code == 200
    assert client.post("/logout", follow_redirects=False).status_code == 303
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"

    login(client, READER)
    # The same secret, but bob's token is gone from the config: his cookie no longer opens anything.
    revoked = settings.model_copy(update={"web": settings.web.model_copy(update={"tokens": settings.web.tokens[:1]})})
    later = TestClient(create_app(revoked, store), cookies=dict(client.cookies))
    assert later.get("/", follow_redirects=False).status_code == 303
    assert later.get("/api/studies").status_code == 401
    assert audits(store, "web.login")[-1].actor == "bob"


def test_study_page_offers_admin_actions_to_admins_only(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, uid = node
    reader, admin = TestClient(create_app(settings, store)), TestClient(create_app(settings, store), headers=BROWSER)
    login(reader, READER)
    login(admin, ADMIN)
    assert 'id="admin-actions"' not in reader.get(f"/studies/{uid}").text
    page = admin.get(f"/studies/{uid}").text
    assert 'id="admin-actions"' in page and f'data-post="/api/studies/{uid}/requeue"' in page
    # What the button does: the admin API with the session cookie, audited with the address.
    r = admin.post(f"/api/studies/{uid}/ignore?ignored=true")
    assert r.status_code == 200 and r.json()["ignored"] is True
    assert "Stop ignoring" in admin.get(f"/studies/{uid}").text
    assert audits(store, "study.ignore")[-1].source == "testclient"
    assert admin.post(f"/api/studies/{uid}/ignore?ignored=false").json()["ignored"] is False


def test_results_page_filters_errors_and_csv_link(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    client = TestClient(create_app(settings, store))
    login(client, READER)
    api = client.get("/api/results").json()
    assert api
    model = api[0]["model_name"]
    # A submitted form sends its empty fields too; the CSV link must still be a valid API query.
    page = client.get(
        "/results",
        params={"label": "", "min_prob": "", "model_name": model, "model_version": "", "date_from": "", "date_to": ""},
    )
    assert page.status_code == 200 and page.text.count('href="/studies/') == len(api)
    link = page.text.split('id="csv" href="')[1].split('"')[0].replace("&amp;", "&")
    assert link == f"/api/results.csv?model_name={model}"
    csv = client.get(link)
    assert csv.status_code == 200 and len(csv.text.strip().splitlines()) == len(api) + 1
    assert "No results match" in client.get("/results", params={"model_name": "no-such-model"}).text
    bad = client.get("/results", params={"min_prob": "1.5", "date_from": "yesterday"})
    assert bad.status_code == 422 and "min probability" in bad.text and "from: expected a date" in bad.text
    assert 'id="filter-error"' in bad.text


def test_oversized_upload_is_refused_before_its_body_is_read(node) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    server = WebServer(create_app(settings, store), "127.0.0.1", 0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            # Announce 50 MB against a 1 MB limit and send only the headers: the answer must not wait for the body.
            sock.sendall(
                b"POST /api/predict HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {READER}\r\n".encode()
                + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 52428800\r\n\r\n--b\r\n"
            )
            t0, reply = time.monotonic(), b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert time.monotonic() - t0 < 5
        # A small upload still reaches the handler (and is refused there for not being an image).
        with TestClient(create_app(settings, store)) as client:
            r = client.post("/api/predict", files={"file": ("a.txt", b"hello")}, headers=H_READ)
        assert r.status_code == 415
    finally:
        server.stop()


def test_cli_results_filters_match_the_api_and_bad_input_is_refused(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store, _ = node
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[node]\ndata_dir = "{settings.data_dir}"\n[database]\nurl = "{settings.database.url}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).with_name("dxnode")), "--config", str(cfg), "results", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    client = TestClient(create_app(settings, store))
    api = client.get(
        "/api/results.csv", params={"min_prob": 0.3, "positive": True, "date_from": "2000-01-01"}, headers=H_READ
    ).text
    out = cli("--csv", "--min-prob", "0.3", "--positive", "--since", "2000-01-01")
    assert out.returncode == 0, out.stderr
    assert out.stdout == api and len(api.splitlines()) >= 2
    bad = cli("--min-prob", "7")
    assert bad.returncode == 2 and "--min-prob 7.0 is not a probability" in bad.stderr and not bad.stdout
    assert audits(store, "cli.results.read")[-1].source == "local"
