"""Fetching with `dxnode serve` and real peers: Orthanc as Q/R SCP (C-FIND, C-MOVE to the node, C-GET) and as
DICOMweb server (QIDO-RS, WADO-RS), DCMTK dcmqrscp as a second SCP, a storescp PACS for the SRs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port
from nodeproc import Node, StoreSCP, node_config, wait_port, wait_until
from sources_peers import Dcmqrscp, Orthanc, Silent, srs_for, study_files, wait_outbox_idle, wait_sr

REQUESTER = "request-token-0123456789"
READER = "read-token-0123456789xx"


def fetch(node: Node, *args: str) -> tuple[int, dict[str, Any]]:
    """`dxnode fetch ... --json`: (exit status, the request at its end)."""
    out = node.cli("fetch", *args, "--json", "--timeout", "180")
    body = out.stdout[out.stdout.find("{") :] if "{" in out.stdout else "{}"
    return out.returncode, {"stderr": out.stderr, **json.loads(body)}


def dimse_source(name: str, port: int, **keys: Any) -> dict[str, Any]:
    return {"name": name, "kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port, **keys}


@pytest.mark.slow
def test_orthanc_by_c_move_c_get_and_dicomweb_each_study_gets_one_sr(tmp_path: Path) -> None:
    node_port, pacs_port, web_port = free_port(), free_port(), free_port()
    pacs = StoreSCP(tmp_path / "pacs", pacs_port)
    orthanc = Orthanc(tmp_path / "orthanc", {"dxnode": ("DXNODE", node_port), "nowhere": ("NOWHERE", free_port())})
    node = None
    try:
        a_uid, a_files = study_files(tmp_path / "a", 2, "ACC-A", "PAT-A")
        b_uid, b_files = study_files(tmp_path / "b", 1, "ACC-B", "PAT-B")
        c_uid, c_files = study_files(tmp_path / "c", 2, "ACC-C", "PAT-C", study_date="20250301")
        _, old_files = study_files(tmp_path / "old", 1, "ACC-OLD", "PAT-C", study_date="19990101")
        orthanc.upload(a_files + b_files + c_files + old_files)
        web = f"http://127.0.0.1:{orthanc.http}/dicom-web"
        cfg = node_config(
            tmp_path,
            node={"port": node_port},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            web={
                "enabled": True,
                "host": "127.0.0.1",
                "port": web_port,
                "tokens": [
                    {"name": "ris", "token": REQUESTER, "role": "request"},
                    {"name": "viewer", "token": READER, "role": "read"},
                ],
            },
            worklist={"fetch_interval_seconds": 0.5, "stable_seconds": 1},
            sources=[
                dimse_source("orthanc-move", orthanc.dicom),
                dimse_source("orthanc-get", orthanc.dicom, retrieve="get"),
                {"name": "orthanc-web", "kind": "dicomweb", "url": web},
                dimse_source("orthanc-small", orthanc.dicom, max_instances=1),
                dimse_source("orthanc-tiny", orthanc.dicom, retrieve="get", max_mb=0.01),
                dimse_source(
                    "orthanc-badmove",
                    orthanc.dicom,
                    move_destination="NOWHERE",
                    max_attempts=2,
                    retry_backoff_seconds=0.2,
                ),
            ],
        )
        node = Node(cfg)
        wait_port(web_port, timeout=60)

        rc, a = fetch(node, "--source", "orthanc-move", "--study", a_uid, "--priority", "stat")
        assert rc == 0, a
        assert a["state"] == "done" and a["total"] == 2 and a["retrieved"] == 2, a
        assert [(j["study_instance_uid"], j["priority"], j["state"]) for j in a["jobs"]] == [(a_uid, "STAT", "done")]

        rc, b = fetch(node, "--source", "orthanc-get", "--accession", "ACC-B")
        assert rc == 0 and b["state"] == "done" and b["studies"] == [b_uid], b

        rc, c = fetch(
            node, "--source", "orthanc-web", "--patient", "PAT-C", "--modality", "CT", "--since", "2020-01-01"
        )
        assert rc == 0 and c["state"] == "done" and c["studies"] == [c_uid] and c["retrieved"] == 2, c

        studies = {
            s["study_instance_uid"]: s["num_instances"] for s in json.loads(node.cli("studies", "--json").stdout)
        }
        assert studies == {a_uid: 2, b_uid: 1, c_uid: 2}  # the older study of PAT-C was not fetched
        for uid in (a_uid, b_uid, c_uid):
            assert len(wait_sr(pacs, uid)) == 1

        # The same request again: the study is there and analysed already; nothing arrives twice.
        rc, again = fetch(node, "--source", "orthanc-move", "--study", a_uid)
        assert rc == 0 and [j["id"] for j in again["jobs"]] == [j["id"] for j in a["jobs"]], again
        wait_outbox_idle(node)
        assert len(srs_for(pacs, a_uid)) == 1

        # Over a bound: refused with the reason, nothing retrieved.
        rc, small = fetch(node, "--source", "orthanc-small", "--study", a_uid)
        assert rc == 1 and small["state"] == "failed" and "max_instances 1" in small["error"], small
        assert small["attempts"] == 1 and small["retrieved"] == 0
        rc, tiny = fetch(node, "--source", "orthanc-tiny", "--study", c_uid)  # stopped at its first instance
        assert rc == 1 and tiny["state"] == "failed" and "max_mb 0.01 (stopped)" in tiny["error"], tiny
        assert tiny["attempts"] == 1 and tiny["jobs"] == []

        # A C-MOVE the source cannot carry out: recorded, retried, then failed with the status.
        rc, bad = fetch(node, "--source", "orthanc-badmove", "--study", b_uid)
        assert rc == 1 and bad["attempts"] == 2 and "C-MOVE of study" in bad["error"], bad

        # The REST API: a "request" token asks, a read token may only look.
        api = f"http://127.0.0.1:{web_port}/api/requests"
        body = {"source": "orthanc-web", "identifiers": {"accession_number": "ACC-B"}, "priority": "HIGH"}
        refused = httpx.post(api, json=body, headers={"Authorization": f"Bearer {READER}"}, timeout=30)
        assert refused.status_code == 403
        made = httpx.post(api, json=body, headers={"Authorization": f"Bearer {REQUESTER}"}, timeout=30)
        assert made.status_code == 201, made.text
        url = f"http://127.0.0.1:{web_port}{made.json()['url']}"

        def finished() -> dict[str, Any] | None:
            got = httpx.get(url, headers={"Authorization": f"Bearer {READER}"}, timeout=30).json()
            return got if got["state"] in ("done", "failed") else None

        got = wait_until(finished, timeout=120, what="the API request to end")
        assert got["state"] == "done" and got["jobs"][0]["id"] == b["jobs"][0]["id"], got
        assert got["jobs"][0]["links"]["results"] == f"/api/results?study_instance_uid={b_uid}"
        unknown = httpx.post(
            api, json={**body, "source": "nope"}, headers={"Authorization": f"Bearer {REQUESTER}"}, timeout=30
        )
        assert unknown.status_code == 404 and "nope" in unknown.text
        wait_outbox_idle(node)
        assert [len(srs_for(pacs, uid)) for uid in (a_uid, b_uid, c_uid)] == [1, 1, 1]
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
        pacs.stop()


@pytest.mark.slow
def test_dcmqrscp_by_c_move_and_c_get(tmp_path: Path) -> None:
    node_port, pacs_port = free_port(), free_port()
    pacs = StoreSCP(tmp_path / "pacs", pacs_port)
    qr = Dcmqrscp(tmp_path / "dcmqrscp", "DXNODE", node_port)
    node = None
    try:
        m_uid, m_files = study_files(tmp_path / "m", 2, "QR-MOVE", "PAT-QR")
        g_uid, g_files = study_files(tmp_path / "g", 1, "QR-GET", "PAT-QR")
        qr.upload(m_files + g_files)
        source = {"kind": "dimse", "ae_title": "QRSCP", "host": "127.0.0.1", "port": qr.port}
        cfg = node_config(
            tmp_path,
            node={"port": node_port},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            worklist={"fetch_interval_seconds": 0.5},
            sources=[{"name": "qr-move", **source}, {"name": "qr-get", "retrieve": "get", **source}],
        )
        node = Node(cfg)
        rc, moved = fetch(node, "--source", "qr-move", "--study", m_uid)
        assert rc == 0 and moved["state"] == "done" and moved["total"] == 2, moved
        rc, got = fetch(node, "--source", "qr-get", "--accession", "QR-GET")
        assert rc == 0 and got["state"] == "done" and got["studies"] == [g_uid], got
        assert len(wait_sr(pacs, m_uid)) == 1 and len(wait_sr(pacs, g_uid)) == 1
    finally:
        if node is not None:
            node.stop()
        qr.stop()
        pacs.stop()


@pytest.mark.slow
def test_a_source_that_does_not_answer_never_holds_up_pushed_studies(tmp_path: Path) -> None:
    from nodeproc import make_study, storescu

    pacs_port = free_port()
    pacs = StoreSCP(tmp_path / "pacs", pacs_port)
    silent = Silent()
    node = None
    try:
        cfg = node_config(
            tmp_path,
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            worklist={"fetch_interval_seconds": 0.5},
            sources=[
                {
                    "name": "down",
                    "ae_title": "DOWN",
                    "host": "127.0.0.1",
                    "port": silent.port,
                    "timeout_seconds": 15,
                    "max_attempts": 2,
                    "retry_backoff_seconds": 0.2,
                }
            ],
        )
        node = Node(cfg)
        out = node.cli("fetch", "--source", "down", "--accession", "X1", "--no-wait")
        assert out.returncode == 0 and out.stdout.startswith("request 1:"), out.stdout + out.stderr
        study_uid, files = make_study(tmp_path / "pushed", n=1)
        storescu(node.port, files)
        wait_sr(pacs, study_uid, timeout=60)  # while the fetcher waits on the silent source
        db = tmp_path / "var" / "dxnode.db"
        import sqlite3

        with sqlite3.connect(db) as conn:
            state, attempts = conn.execute("SELECT state, attempts FROM request WHERE id = 1").fetchone()
        assert state in ("querying", "pending") and attempts <= 2

        def failed() -> tuple[str, str] | None:
            with sqlite3.connect(db) as conn:
                row = conn.execute("SELECT state, error FROM request WHERE id = 1").fetchone()
            return row if row[0] == "failed" else None

        _, error = wait_until(failed, timeout=120, what="the request to the silent source to fail")
        assert "DOWN@127.0.0.1" in error, error
    finally:
        if node is not None:
            node.stop()
        silent.close()
        pacs.stop()
