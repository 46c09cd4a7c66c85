"""Fetch requests in the store (real SQLite and PostgreSQL): checks on what is asked, the claim order per source,
retries with backoff, and the state a reader sees once the jobs end."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from pydantic import ValidationError
from sqlalchemy import update

from dxnode.config import Settings
from dxnode.schemas import Identifiers, RequestIn
from dxnode.sources import dimse, fetch
from dxnode.sources.found import FetchError
from dxnode.states import JobState, Priority, RequestState
from dxnode.store import FetchRequest, Job, Store, Study, utcnow
from dxnode.worklist import queue

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def settings_for(url: str) -> Settings:
    return Settings(
        database={"url": url},
        sources=[{**PACS, "max_attempts": 2, "retry_backoff_seconds": 30}, {**PACS, "name": "other"}],
        destinations=[{"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": 105}],
        models=[{"name": "chest", "bundle": "demo"}],
    )


def ask(store: Store, settings: Settings, source: str = "pacs", priority: Priority = Priority.MEDIUM) -> int:
    return fetch.request_fetch(store, settings, source, Identifiers(accession_number="A1"), priority, actor="test")


def test_what_is_asked_is_checked_against_the_configuration(store: Store) -> None:
    settings = settings_for(store.url)
    with pytest.raises(ValueError, match="no \\[\\[sources\\]\\] entry named 'nope' \\(pacs, other\\)"):
        ask(store, settings, "nope")
    ids = Identifiers(study_instance_uid="1.2.3")
    with pytest.raises(ValueError, match="\\[\\[models\\]\\] entry named 'lungs'"):
        fetch.request_fetch(store, settings, "pacs", ids, model="lungs")
    with pytest.raises(ValueError, match="\\[\\[destinations\\]\\] entry named 'pacs'"):
        fetch.request_fetch(store, settings, "pacs", ids, destinations=["archive", "pacs"])
    for bad in (
        {},
        {"accession_number": "A1", "patient_id": "P"},
        {"accession_number": "A*"},
        {"study_instance_uid": "1.02"},
    ):
        with pytest.raises(ValidationError):
            Identifiers(**bad)
    with pytest.raises(ValidationError, match="narrow a patient_id only"):
        Identifiers(accession_number="A1", modality="CR")
    assert Identifiers(patient_id="P", since="2026-01-31").since == "20260131"


@pytest.mark.parametrize("value", ["\u00a0", "P\u2003", "\u3000P"])
def test_an_identifier_the_api_schema_accepts_is_kept_as_given(value: str) -> None:
    """Only DICOM's padding (spaces) is stripped: a no-break space, which the API's pattern allows, once
    made a patient ID of one such space empty, and the request was refused (found by schemathesis in CI)."""
    request = RequestIn(source="pacs", identifiers={"patient_id": value})
    assert request.fetch_identifiers().patient_id == value
    assert Identifiers(patient_id=f"  {value} ").patient_id == value


def test_each_source_claims_its_own_requests_most_urgent_first(store: Store) -> None:
    settings = settings_for(store.url)
    routine, other, stat = (
        ask(store, settings),
        ask(store, settings, "other"),
        ask(store, settings, priority=Priority.STAT),
    )
    assert fetch.claim_request(store, "pacs", "w:1") == stat
    assert fetch.claim_request(store, "pacs", "w:1") == routine
    assert fetch.claim_request(store, "pacs", "w:1") is None
    assert fetch.claim_request(store, "other", "w:1") == other


def test_a_failure_is_retried_after_a_backoff_then_the_request_fails_with_the_reason(store: Store) -> None:
    settings = settings_for(store.url)
    source = fetch.configured_source(settings, "pacs")
    request_id = ask(store, settings)
    assert fetch.claim_request(store, "pacs", "w:1") == request_id
    assert fetch._failed(store, request_id, source, FetchError("C-MOVE failed: status 0xA702")) == RequestState.PENDING
    assert fetch.claim_request(store, "pacs", "w:1") is None  # backing off
    later = utcnow() + dt.timedelta(seconds=31)
    assert fetch.claim_request(store, "pacs", "w:1", now=later) == request_id
    assert fetch._failed(store, request_id, source, FetchError("warning 0xB000, 1 sub-operation(s) failed")) == "failed"
    with store.session() as s:
        out = fetch.request_out(s, request_id)
    assert out is not None and out.state == RequestState.FAILED and out.attempts == 2
    assert out.error == "warning 0xB000, 1 sub-operation(s) failed" and out.progress.startswith("failed: warning")
    refused = ask(store, settings)
    fetch.claim_request(store, "pacs", "w:1")
    assert fetch._failed(store, refused, source, FetchError("refused: over max_instances", permanent=True)) == "failed"


def test_a_queued_request_reads_done_once_its_jobs_end_and_failed_when_one_fails(store: Store) -> None:
    settings = settings_for(store.url)
    with store.session() as s:
        s.add(Study(study_instance_uid="1.2.40", last_received_at=utcnow(), first_received_at=utcnow()))
        s.add(Study(study_instance_uid="1.2.41", last_received_at=utcnow(), first_received_at=utcnow()))
    request_id = ask(store, settings, priority=Priority.HIGH)
    with store.session() as s:
        jobs = [
            queue.queue_retrieved(s, uid, "request:1", Priority.HIGH, destinations=["archive"])
            for uid in ("1.2.40", "1.2.41")
        ]
        row = s.get(FetchRequest, request_id)
        assert row is not None
        row.state, row.job_ids, row.studies, row.total, row.retrieved = (
            RequestState.QUEUED,
            jobs,
            ["1.2.40", "1.2.41"],
            2,
            2,
        )
    with store.session() as s:
        out = fetch.request_out(s, request_id)
    assert out is not None and out.state == RequestState.QUEUED and out.progress == "queued 2 job(s)"
    assert [j.priority for j in out.jobs] == [Priority.HIGH, Priority.HIGH]
    for _ in jobs:
        job_id = queue.claim(store, "w:1")
        assert job_id is not None
        queue.finish(store, settings, job_id, JobState.DONE)
    with store.session() as s:
        out = fetch.request_out(s, request_id)
    assert out is not None and out.state == RequestState.DONE
    assert out.jobs[1].links == {"study": "/api/studies/1.2.41", "results": "/api/results?study_instance_uid=1.2.41"}
    with store.session() as s:
        failed = s.get(FetchRequest, request_id)
        assert failed is not None
        s.execute(
            update(Study)
            .where(Study.study_instance_uid == "1.2.41")
            .values(last_received_at=utcnow() + dt.timedelta(seconds=1))
        )
        again = queue.queue_retrieved(s, "1.2.41", "request:1", Priority.HIGH)
        failed.job_ids = [jobs[0], again]
    job_id = queue.claim(store, "w:1")
    assert job_id == again
    queue.finish(store, settings, again, None, error="ValueError: no instance could be analysed", permanent=True)
    with store.session() as s:
        out = fetch.request_out(s, request_id)
    assert out is not None and out.state == RequestState.FAILED and "no instance could be analysed" in out.error


def test_requests_a_stopped_fetcher_left_running_are_retried(store: Store) -> None:
    settings = settings_for(store.url)
    dead, elsewhere = ask(store, settings), ask(store, settings)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    fetch.claim_request(store, "pacs", queue.worker_id(gone.pid))  # a process of this host that has ended
    fetch.claim_request(store, "pacs", "another-host:4242")  # alive, as far as anyone here knows
    assert fetch.recover_requests(store) == 1
    assert fetch.claim_request(store, "pacs", "w:2") == dead
    assert fetch.recover_requests(store, now=utcnow() + dt.timedelta(hours=2)) == 2  # untouched for too long
    assert {fetch.claim_request(store, "pacs", "w:3"), fetch.claim_request(store, "pacs", "w:3")} == {dead, elsewhere}


def test_a_retrieve_with_failed_sub_operations_or_no_answer_is_a_failure_to_retry() -> None:
    source = settings_for("sqlite://").sources[0]
    dimse._check_final(0x0000, 0, "C-MOVE", source)
    for code, failed, words in [
        (0xB000, 2, "warning 0xB000, 2 sub-operation(s) failed"),
        (0x0000, 1, "warning 0x0000, 1 sub-operation(s) failed"),
        (0xA702, 0, "failed: status 0xA702"),
        (None, 0, "no answer within 60 s"),
    ]:
        with pytest.raises(FetchError, match=words.replace("(", "\\(").replace(")", "\\)")) as caught:
            dimse._check_final(code, failed, "C-MOVE", source)
        assert not caught.value.permanent


def test_a_request_waiting_for_its_study_looks_again_without_using_attempts(store: Store) -> None:
    settings = settings_for(store.url)
    source = fetch.configured_source(settings, "pacs")
    ids = Identifiers(accession_number="ORDERED")
    request_id = fetch.request_fetch(store, settings, "pacs", ids, wait_seconds=600)
    for _ in range(3):  # more than max_attempts (2) looks
        assert fetch.claim_request(store, "pacs", "w:1", now=utcnow() + dt.timedelta(days=1)) == request_id
        state = fetch._failed(store, request_id, source, fetch._NotYet("no study for accession ORDERED yet"))
        assert state == RequestState.PENDING
    with store.session() as s:
        row = s.get(FetchRequest, request_id)
        assert row is not None and row.attempts == 0 and row.wait_until is not None


def test_a_dicomweb_source_without_its_secret_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from dxnode.sources import web

    monkeypatch.delenv("PACS_WEB_TOKEN", raising=False)
    settings = Settings(
        sources=[
            {
                "name": "web",
                "kind": "dicomweb",
                "url": "https://pacs.example.org/dicom-web",
                "auth": "bearer",
                "secret_env": "PACS_WEB_TOKEN",
            }
        ]
    )
    with pytest.raises(FetchError, match="PACS_WEB_TOKEN \\(secret of source web\\) is not set"):
        web._client(settings.sources[0])


def test_a_requests_destinations_are_the_only_ones_its_outputs_go_to(store: Store) -> None:
    from dxnode.outbox.dispatch import enqueue
    from dxnode.states import OutputKind
    from dxnode.store import Output

    settings = settings_for(store.url)
    settings.destinations.append(settings.destinations[0].model_copy(update={"name": "pacs"}))
    with store.session() as s:
        for uid in ("1.2.50", "1.2.51"):
            s.add(Study(study_instance_uid=uid, last_received_at=utcnow(), first_received_at=utcnow()))
    with store.session() as s:
        only = queue.queue_retrieved(s, "1.2.50", "request:1", Priority.MEDIUM, destinations=["archive"])
        every = queue.queue_retrieved(s, "1.2.51", "request:2", Priority.MEDIUM)
        sent = {}
        for n, job_id in enumerate((only, every)):
            job = s.get(Job, job_id)
            assert job is not None
            out = Output(
                job_id=job_id,
                study_id=job.study_id,
                kind=OutputKind.SR,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                sop_instance_uid=f"2.25.7{n}",
                series_instance_uid=f"2.25.8{n}",
                file_path="outputs/x.dcm",
            )
            s.add(out)
            s.flush()
            sent[job_id] = sorted(d.destination for d in enqueue(s, out, settings))
    assert sent == {only: ["archive"], every: ["archive", "pacs"]}
