"""A request naming a destination for a study analysed already (`dxnode serve`, DCMTK dcmqrscp as the source,
two storescp PACSes): the results go to that destination once, nothing goes anywhere twice; another model gets
a job of its own. Then sources/reuse.py on real databases: rows for a done job, a re-run for a missing kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from nodeproc import Node, StoreSCP, node_config, wait_until
from sources_peers import Dcmqrscp, srs_for, study_files, wait_outbox_idle, wait_sr
from sqlalchemy import select

from dxnode.config import Settings
from dxnode.sources.reuse import deliver_also
from dxnode.states import DeliveryState, JobState, OutputKind, Priority
from dxnode.store import Delivery, Job, Output, Store, Study, utcnow
from dxnode.worklist import queue


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
def test_a_model_added_later_gets_a_job_of_its_own_and_the_same_model_none(tmp_path: Path) -> None:
    node_port, pacs_port = free_port(), free_port()
    pacs = StoreSCP(tmp_path / "pacs", pacs_port)
    qr = Dcmqrscp(tmp_path / "dcmqrscp", "DXNODE", node_port)
    node = None

    def config(*models: str) -> Path:
        return node_config(
            tmp_path,
            node={"port": node_port},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            worklist={"fetch_interval_seconds": 0.5},
            sources=[{"name": "qr", "retrieve": "get", "ae_title": "QRSCP", "host": "127.0.0.1", "port": qr.port}],
            models=[{"name": m, "bundle": "demo"} for m in models],
        )

    try:
        uid, files = study_files(tmp_path / "study", 1, "MODEL-1", "PAT-MODEL")
        qr.upload(files)
        node = Node(config("chest"))
        routed = fetch(node, "--source", "qr", "--study", uid)
        assert len(wait_sr(pacs, uid)) == 1
        node.stop()
        node = Node(config("chest", "other"))  # a second model configured after the study was analysed
        same = fetch(node, "--source", "qr", "--study", uid, "--model", "chest")
        assert [j["id"] for j in same["jobs"]] == [j["id"] for j in routed["jobs"]], same
        other = fetch(node, "--source", "qr", "--study", uid, "--model", "other")
        assert other["jobs"][0]["id"] not in [j["id"] for j in routed["jobs"]], other
        assert other["jobs"][0]["state"] == "done"
        wait_until(lambda: len(srs_for(pacs, uid)) == 2, timeout=60, what="the second model's SR at the PACS")
        again = fetch(node, "--source", "qr", "--study", uid, "--model", "other")
        assert [j["id"] for j in again["jobs"]] == [j["id"] for j in other["jobs"]], again
        wait_outbox_idle(node)
        assert len(srs_for(pacs, uid)) == 2
    finally:
        if node is not None:
            node.stop()
        qr.stop()
        pacs.stop()


def _settings(url: str) -> Settings:
    dest = {"ae_title": "X", "host": "127.0.0.1", "port": 104}
    return Settings(
        database={"url": url},
        destinations=[
            {"name": "pacs", **dest},
            {"name": "viewer", **dest, "outputs": ["sr"], "return_only": True},
            {"name": "ohif", **dest, "outputs": ["sr", "seg"], "return_only": True},
        ],
    )


def _job(store: Store, uid: str, state: JobState, kinds: list[str]) -> int:
    """A study with a job in that state and, once done, its SR and SC written and sent to pacs."""
    with store.session() as s:
        study = Study(study_instance_uid=uid, last_received_at=utcnow(), first_received_at=utcnow())
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, state=state, kinds=kinds, model_name="m", model_version="1")
        s.add(job)
        s.flush()
        for n, kind in enumerate(kinds):
            out = Output(
                job_id=job.id,
                study_id=study.id,
                kind=OutputKind(kind),
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                sop_instance_uid=f"{uid}.{n}",
                series_instance_uid=f"{uid}.9",
                model_name="m",
                model_version="1",
                file_path="outputs/x.dcm",
            )
            s.add(out)
            s.flush()
            s.add(Delivery(output_id=out.id, destination="pacs", state=DeliveryState.SENT))
        return job.id


def _rows(store: Store) -> list[tuple[str, str]]:
    with store.session() as s:
        q = select(Output.sop_instance_uid, Delivery.destination).join(Output).order_by(Delivery.id)
        return [(o, d) for o, d in s.execute(q)]


def test_a_done_job_gets_rows_for_the_named_destination_once(store: Store) -> None:
    settings = _settings(store.url)
    job_id = _job(store, "1.2.70", JobState.DONE, ["sr", "sc"])
    for _ in range(2):  # the same request twice: one row
        with store.session() as s:
            assert deliver_also(s, settings, job_id, ["viewer"], Priority.MEDIUM) == job_id
    assert _rows(store) == [("1.2.70.0", "pacs"), ("1.2.70.1", "pacs"), ("1.2.70.0", "viewer")]
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.destinations == ["pacs", "viewer"]  # [] stood for pacs


def test_a_kind_the_job_was_not_asked_for_runs_it_again_for_every_destination(store: Store) -> None:
    settings = _settings(store.url)
    job_id = _job(store, "1.2.71", JobState.DONE, ["sr", "sc"])
    with store.session() as s:
        rerun = deliver_also(s, settings, job_id, ["ohif"], Priority.HIGH)
    assert rerun != job_id
    with store.session() as s:
        job = s.get(Job, rerun)
        assert job is not None and job.state == JobState.QUEUED and job.priority == Priority.HIGH
        assert job.destinations == ["ohif", "pacs"]
    assert _rows(store) == [("1.2.71.0", "pacs"), ("1.2.71.1", "pacs")]  # the re-run's outputs make the rows
    with store.session() as s:  # a waiting job is only widened
        assert deliver_also(s, settings, rerun, ["viewer"], Priority.MEDIUM) == rerun
        job = s.get(Job, rerun)
        assert job is not None and job.destinations == ["ohif", "pacs", "viewer"]


def test_a_waiting_job_for_every_destination_keeps_them_and_adds_the_named_one(store: Store) -> None:
    """A study pushed in part waits with [] (as configured); a request that fetches the rest and names a
    destination adds it to the configured ones rather than putting it in their place."""
    settings = _settings(store.url)
    with store.session() as s:
        study = Study(study_instance_uid="1.2.72", last_received_at=utcnow(), first_received_at=utcnow())
        s.add(study)
        s.flush()
        waiting = queue.queued_job(s, study.id)
        study.queued_through = study.last_received_at
    with store.session() as s:  # more instances arrive by the fetch
        study_row = s.scalar(select(Study).where(Study.study_instance_uid == "1.2.72"))
        assert study_row is not None
        study_row.last_received_at = utcnow()
    with store.session() as s:
        job_id = queue.queue_retrieved(s, "1.2.72", "request:1", Priority.MEDIUM, destinations=["viewer"])
        assert job_id == waiting
        assert deliver_also(s, settings, job_id, ["viewer"], Priority.MEDIUM) == waiting
        job = s.get(Job, waiting)
        assert job is not None and job.destinations == ["pacs", "viewer"]
