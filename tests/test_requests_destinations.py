"""A request naming a destination for a study analysed already (`dxnode serve`, DCMTK dcmqrscp as the source,
two storescp PACSes): the results go to that destination once, nothing goes anywhere twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from nodeproc import Node, StoreSCP, node_config, wait_until
from sources_peers import Dcmqrscp, srs_for, study_files, wait_outbox_idle, wait_sr


def fetch(node: Node, *args: str) -> dict[str, Any]:
    """`dxnode fetch ... --json` followed to its end; the request as it ended."""
    out = node.cli("fetch", *args, "--json", "--timeout", "180")
    assert out.returncode == 0, out.stdout + out.stderr
    request: dict[str, Any] = json.loads(out.stdout[out.stdout.find("{") :])
    assert request["state"] == "done", request
    return request


def deliveries(node: Node, destination: str) -> list[str]:
    """The SOP Instance UIDs of the outbox rows for a destination, one per row."""
    rows = json.loads(node.cli("outbox", "--json").stdout)
    return sorted(r["output_sop_instance_uid"] for r in rows if r["destination"] == destination)


@pytest.mark.slow
def test_a_second_destination_gets_the_results_once_and_the_first_nothing_again(tmp_path: Path) -> None:
    node_port, first_port, second_port = free_port(), free_port(), free_port()
    first = StoreSCP(tmp_path / "first", first_port)
    second = StoreSCP(tmp_path / "second", second_port, aet="SECOND")
    qr = Dcmqrscp(tmp_path / "dcmqrscp", "DXNODE", node_port)
    node = None
    try:
        uid, files = study_files(tmp_path / "study", 2, "DEST-1", "PAT-DEST")
        qr.upload(files)
        cfg = node_config(
            tmp_path,
            node={"port": node_port},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": first_port},
                # only what a request names goes here
                {"name": "second", "ae_title": "SECOND", "host": "127.0.0.1", "port": second_port, "return_only": True},
            ],
            worklist={"fetch_interval_seconds": 0.5},
            sources=[{"name": "qr", "retrieve": "get", "ae_title": "QRSCP", "host": "127.0.0.1", "port": qr.port}],
        )
        node = Node(cfg)
        analysed = fetch(node, "--source", "qr", "--study", uid)
        assert len(wait_sr(first, uid)) == 1
        wait_outbox_idle(node)
        first_count = len(first.datasets())
        assert deliveries(node, "second") == [] and srs_for(second, uid) == []

        again = fetch(node, "--source", "qr", "--study", uid, "--destination", "second")
        assert [j["id"] for j in again["jobs"]] == [j["id"] for j in analysed["jobs"]], again  # no new analysis
        assert again["jobs"][0]["links"]["results"] == f"/api/results?study_instance_uid={uid}"
        sr = wait_sr(second, uid)
        wait_outbox_idle(node)
        sent = deliveries(node, "second")
        assert (
            len(sr) == 1
            and sr[0].SOPInstanceUID in sent
            and deliveries(node, "pacs") == sorted({d.SOPInstanceUID for d in first.datasets()})
        )
        second_count = len(second.datasets())
        assert second_count == len(sent)

        twice = fetch(node, "--source", "qr", "--study", uid, "--destination", "second")
        assert [j["id"] for j in twice["jobs"]] == [j["id"] for j in analysed["jobs"]], twice
        wait_outbox_idle(node)
        assert deliveries(node, "second") == sent
        assert len(first.datasets()) == first_count and len(second.datasets()) == second_count
        assert len(srs_for(first, uid)) == 1 and len(srs_for(second, uid)) == 1
    finally:
        if node is not None:
            node.stop()
        qr.stop()
        first.stop()
        second.stop()


@pytest.mark.slow
def test_another_model_gets_a_job_of_its_own(tmp_path: Path) -> None:
    node_port, pacs_port = free_port(), free_port()
    pacs = StoreSCP(tmp_path / "pacs", pacs_port)
    qr = Dcmqrscp(tmp_path / "dcmqrscp", "DXNODE", node_port)
    node = None
    try:
        uid, files = study_files(tmp_path / "study", 1, "MODEL-1", "PAT-MODEL")
        qr.upload(files)
        cfg = node_config(
            tmp_path,
            node={"port": node_port},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            worklist={"fetch_interval_seconds": 0.5},
            sources=[{"name": "qr", "retrieve": "get", "ae_title": "QRSCP", "host": "127.0.0.1", "port": qr.port}],
            models=[{"name": "other", "bundle": "demo"}],
        )
        node = Node(cfg)
        routed = fetch(node, "--source", "qr", "--study", uid)
        chosen = fetch(node, "--source", "qr", "--study", uid, "--model", "other")
        assert chosen["jobs"][0]["id"] not in [j["id"] for j in routed["jobs"]], chosen
        jobs = json.loads(node.cli("jobs", "--json").stdout)
        ran = {j["id"]: j for j in jobs}
        assert ran[chosen["jobs"][0]["id"]]["state"] == "done"
        wait_until(lambda: srs_for(pacs, uid), timeout=60, what="an SR at the PACS")
    finally:
        if node is not None:
            node.stop()
        qr.stop()
        pacs.stop()
