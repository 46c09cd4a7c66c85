"""REST API and access control over a real database with a study processed by the real job body."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from sqlalchemy import select
from webnode import ADMIN, READER, make_store, node_settings, processed_study

from dxnode.store import Audit, Store, Study
from dxnode.web.app import create_app

H_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
H_READ = {"Authorization": f"Bearer {READER}"}


@pytest.fixture
def node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> Iterator[tuple[TestClient, Store, str, object]]:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    settings = node_settings(tmp_path, db_url, max_upload_mb=1)
    store = make_store(settings)
    uid = processed_study(store, settings)
    client = TestClient(create_app(settings, store, lambda: {"database": store.ping(), "model": True, "scp": False}))
    yield client, store, uid, settings
    store.dispose()


def test_every_endpoint_but_healthz_and_readyz_needs_a_token(node) -> None:  # type: ignore[no-untyped-def]
    client, _, uid, _ = node
    assert client.get("/healthz").status_code == 200
    assert set(client.get("/readyz").json()["checks"].values()) <= {True, False}  # probes: booleans only
    for path in [
        "/metrics",
        "/api/studies",
        "/api/jobs",
        "/api/results",
        "/api/results.csv",
        "/api/outbox",
        "/api/model",
        f"/api/studies/{uid}",
        "/openapi.json",
    ]:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    assert client.post("/api/predict", files={"file": ("x.png", b"x")}).status_code == 401


def test_read_token_reads_but_admin_actions_need_admin(node) -> None:  # type: ignore[no-untyped-def]
    client, store, uid, _ = node
    assert client.get("/api/studies", headers=H_READ).status_code == 200
    for path in [
        f"/api/studies/{uid}/requeue",
        f"/api/studies/{uid}/ignore",
        "/api/jobs/1/requeue",
        "/api/outbox/1/resend",
    ]:
        assert client.post(path, headers=H_READ).status_code == 403, path
    assert client.post(f"/api/studies/{uid}/ignore", headers=H_ADMIN).json()["ignored"] is True
    assert client.post("/api/outbox/1/resend", headers=H_ADMIN).json()["requeued"] == 1
    requeued = client.post("/api/jobs/1/requeue", headers=H_ADMIN).json()
    assert (
        requeued["state"] == "queued" and requeued["requeued_from"] == 1 and requeued["job_id"] != 1
    )  # a done job keeps its results
    assert client.get("/api/results", headers=H_READ).json()  # still visible while the new job waits
    assert client.post("/api/jobs/999/requeue", headers=H_ADMIN).status_code == 404
    with store.session() as s:
        assert s.scalar(select(Study.ignored)) is True
        actions = {(a.actor, a.action) for a in s.scalars(select(Audit))}
    assert {("alice", "study.ignore"), ("alice", "delivery.resend"), ("alice", "job.requeue")} <= actions


def test_studies_jobs_results_outbox_and_model(node) -> None:  # type: ignore[no-untyped-def]
    client, store, uid, _ = node
    studies = client.get("/api/studies", params={"patient_id": "PID-WEB-1"}, headers=H_READ).json()
    assert [s["study_instance_uid"] for s in studies] == [uid] and studies[0]["num_instances"] == 1
    assert client.get("/api/studies", params={"patient_id": "nobody"}, headers=H_READ).json() == []
    assert client.get(
        "/api/studies", params={"date_from": "20240101", "date_to": "20240131", "modality": "CT"}, headers=H_READ
    ).json()
    assert client.get("/api/studies", params={"date_from": "2024-01"}, headers=H_READ).status_code == 422
    assert [j["state"] for j in client.get("/api/jobs", params={"state": "done"}, headers=H_READ).json()] == ["done"]
    results = client.get("/api/results", headers=H_READ).json()
    assert {"study_instance_uid", "label", "probability", "positive", "model_name", "model_version"} <= set(results[0])
    assert results[0]["probability"] == max(r["probability"] for r in results)
    positive = client.get("/api/results", params={"positive": True, "min_prob": 0.5}, headers=H_READ).json()
    assert all(r["positive"] and r["probability"] >= 0.5 for r in positive)
    rows = list(csv.DictReader(io.StringIO(client.get("/api/results.csv", headers=H_READ).text)))
    assert [r["label"] for r in rows] == [r["label"] for r in results]
    outbox = client.get("/api/outbox", headers=H_READ).json()
    assert sorted(d["kind"] for d in outbox) == ["sc", "sr"] and {d["state"] for d in outbox} == {"pending"}
    model = client.get("/api/model", headers=H_READ).json()
    assert model["demo"] is True and model["labels"]
    detail = client.get(f"/api/studies/{uid}", headers=H_READ).json()
    assert detail["findings"] and detail["outputs"] and detail["jobs"][0]["log"]
    assert detail["jobs"][0]["timings"]["model"] > 0 and "queued_to_done" in detail["jobs"][0]["timings"]
    sc = next(o for o in detail["outputs"] if o["kind"] == "sc")
    png = client.get(f"/api/outputs/{sc['id']}.png", headers=H_READ)
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    src = client.get(f"/api/instances/{detail['findings'][0]['source_sop_instance_uid']}.png", headers=H_READ)
    assert src.status_code == 200 and src.content[:4] == b"\x89PNG"
    with store.session() as s:
        reads = [a for a in s.scalars(select(Audit)) if a.action.startswith("api.")]
    assert {a.action for a in reads} >= {"api.studies.read", "api.results.read", "api.results.export", "api.study.read"}
    assert all(a.actor == "bob" and a.source for a in reads)


def test_cli_results_equal_the_api(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _store, _, settings = node
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[node]\ndata_dir = "{settings.data_dir}"\n[database]\nurl = "{settings.database.url}"\n')
    out = subprocess.run(
        [str(Path(sys.executable).with_name("dxnode")), "--config", str(cfg), "results", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == client.get("/api/results", headers=H_READ).json()


def test_predict_upload(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, _, _, settings = node
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        r = client.post("/api/predict", files={"file": ("ct.dcm", f)}, headers=H_READ)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["findings"]) == 3 and body["model"]["demo"] is True
    assert body["heatmap_png"].startswith("data:image/png;base64,")
    assert not (settings.data_dir / "uploads").exists()  # not kept
    bad = client.post("/api/predict", files={"file": ("notes.txt", b"just text, not an image")}, headers=H_READ)
    assert bad.status_code == 415 and "not a readable" in bad.json()["detail"]
    sr = client.post(
        "/api/predict", files={"file": ("sr.dcm", Path(get_testdata_file("reportsi.dcm")).read_bytes())}, headers=H_READ
    )
    assert sr.status_code == 415 and "Structured Report" in sr.json()["detail"]
    big = client.post("/api/predict", files={"file": ("big.dcm", b"0" * (2 * 1024 * 1024))}, headers=H_READ)
    assert big.status_code == 413


def test_readyz_and_metrics(node) -> None:  # type: ignore[no-untyped-def]
    client, _, _, _ = node
    r = client.get("/readyz", headers=H_READ)
    assert r.status_code == 503 and r.json()["checks"] == {"database": True, "model": True, "scp": False}
    text = client.get("/metrics", headers=H_READ).text
    assert 'dxnode_jobs{state="done"} 1.0' in text and "dxnode_outbox_backlog 2.0" in text
    assert (
        "dxnode_inference_seconds_bucket" in text and 'dxnode_associations_rejected_total{reason="calling_aet"}' in text
    )


def test_login_page_sets_a_session_cookie(node) -> None:  # type: ignore[no-untyped-def]
    client, _, uid, _ = node
    assert client.get("/", follow_redirects=False).status_code == 303
    assert client.post("/login", data={"token": "nope"}).status_code == 401
    r = client.post("/login", data={"token": READER}, follow_redirects=False)
    assert r.status_code == 303 and "dxnode_session" in r.cookies
    page = client.get("/")
    assert page.status_code == 200 and "UNTRAINED DEMO MODEL" in page.text and "PID-WEB-1" in page.text
    study_page = client.get(f"/studies/{uid}").text
    assert "Web, Patient" in study_page and 'id="timings-' in study_page and "queued_to_done" in study_page
    assert client.get("/api/studies").status_code == 200  # the cookie works for the API too (upload page)
    assert client.post(f"/api/studies/{uid}/ignore").status_code == 403  # still a read role


def test_no_patient_data_in_info_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    settings = node_settings(tmp_path)
    store = make_store(settings)
    with caplog.at_level(logging.INFO):
        uid = processed_study(store, settings, patient_id="SECRET-PID-42")
        client = TestClient(create_app(settings, store))
        client.get("/api/studies", headers=H_READ)
        client.get(f"/api/studies/{uid}", headers=H_READ)
    # httpx is the test's own client; the node's web server runs with its access log off.
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and not r.name.startswith("httpx")]
    assert info and not any("SECRET-PID-42" in m or "Web^Patient" in m or uid in m for m in info)
