"""HL7 results out: a done job's findings as an ORU^R01 to a real HL7 receiver (the `hl7` library's asyncio
MLLP server, on a thread), and as a FHIR transaction Bundle to a small HTTP server, through the
hl7_result outbox with its retries. Real SQLite and PostgreSQL stores (conftest); nothing mocked."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from fhir.resources.R4B.bundle import Bundle
from hl7peers import FhirServer, Hl7Receiver
from sqlalchemy import select

from dxnode.config import Settings
from dxnode.hl7 import results
from dxnode.states import DeliveryState, JobState, OrderState
from dxnode.store import FindingRow, Hl7Order, Hl7Result, Job, Store, Study

FINDINGS = [("Effusion", 0.91, 0.5, True), ("Nodule | mass", 0.12, 0.4, False), ("Cardiomegaly", 0.3, 0.5, False)]


def settings_for(store: Store, tmp: Path, *destinations: dict[str, Any], **dispatch: Any) -> Settings:
    return Settings(
        node={"data_dir": tmp / "var"},
        database={"url": store.url},
        hl7={"sending_facility": "AI-LAB", "destinations": list(destinations)},
        dispatch={"backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.01, "timeout_seconds": 5, **dispatch},
    )


def done_job(store: Store, accession: str = "ACC9", order: bool = True, demo: bool = True) -> int:
    """A study with a done job and three findings (and an open HL7 order for its accession number)."""
    with store.session() as s:
        study = Study(
            study_instance_uid="1.2.826.0.1.3680043.8.498.1",
            patient_id="PAT9",
            patient_name="Doe^Jane",
            accession_number=accession,
            modalities="CR",
        )
        s.add(study)
        s.flush()
        now = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
        job = Job(study_id=study.id, state=JobState.DONE, model_name="demo", model_version="1", finished_at=now)
        s.add(job)
        s.flush()
        for rank, (label, p, t, pos) in enumerate(FINDINGS):
            s.add(
                FindingRow(
                    job_id=job.id,
                    study_id=study.id,
                    label=label,
                    probability=p,
                    threshold=t,
                    positive=pos,
                    rank=rank,
                    model_name="demo",
                    model_version="1",
                    model_demo=demo,
                )
            )
        if order:
            s.add(
                Hl7Order(
                    source="pacs",
                    accession_number=accession,
                    wait_minutes=60,
                    state=OrderState.PENDING,
                    placer_order="PL9",
                    filler_order="FI9",
                    procedure_code="CXR2V",
                    procedure_text="Chest 2 views",
                )
            )
        return job.id


def rows(store: Store) -> list[Hl7Result]:
    with store.session() as s:
        return list(s.scalars(select(Hl7Result).order_by(Hl7Result.id)))


def send_until(store: Store, settings: Settings, state: DeliveryState, rounds: int = 50) -> Hl7Result:
    """Run the outbox round by round until the row reaches state (retries are due after 10 ms)."""
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)
    while dt.datetime.now(dt.UTC) < deadline:
        results.send_due(store, settings, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
        [row] = rows(store)
        if row.state == state:
            return row
    raise AssertionError(f"the row stayed {rows(store)[0].state}: {rows(store)[0].last_error}")


def test_an_oru_with_one_obx_per_finding_reaches_an_hl7_receiver(store: Store, tmp_path: Path) -> None:
    receiver = Hl7Receiver(["AA"])
    try:
        dest = {"name": "ris", "host": "127.0.0.1", "port": receiver.port, "receiving_application": "RIS"}
        settings = settings_for(store, tmp_path, dest)
        job_id = done_job(store)
        assert results.enqueue(store, settings, job_id) == 1
        assert results.enqueue(store, settings, job_id) == 0  # a re-run queues nothing twice
        row = send_until(store, settings, DeliveryState.SENT)
        assert row.ack_code == "AA" and row.attempts == 1
        [oru] = receiver.messages
    finally:
        receiver.stop()
    assert oru["MSH.F9.R1.C1"] == "ORU" and oru["MSH.F9.R1.C2"] == "R01" and oru["MSH.F10"] == row.control_id
    assert oru["MSH.F4"] == "AI-LAB" and oru["MSH.F5"] == "RIS" and oru["MSH.F12"] == "2.5.1"
    assert oru["PID.F3"] == "PAT9" and oru["OBR.F18"] == "ACC9" and oru["OBR.F4.R1.C1"] == "CXR2V"
    assert oru["ORC.F2"] == "PL9" and oru["OBR.F25"] == "F"
    assert "AI-generated" in oru["NTE.F3"] and "UNTRAINED DEMO MODEL" in oru["NTE.F3"]
    findings = [seg for seg in oru.segments("OBX") if str(seg(3)(1)(3)) == "99DXNODE"]
    assert len(findings) == len(FINDINGS)
    for seg, (label, p, t, pos) in zip(findings, FINDINGS, strict=True):
        assert oru.unescape(str(seg(3)(1)(1))) == label  # "|" travels escaped
        assert float(str(seg(5))) == pytest.approx(p) and str(seg(7)) == f"<{t:g}"
        assert str(seg(8)) == ("A" if pos else "N") and str(seg(11)) == "F"
        assert str(seg(17)(1)(1)) == "AIAST" and str(seg(18)) == "demo 1"
    study_obx = [seg for seg in oru.segments("OBX") if str(seg(3)(1)(1)) == "113014"]
    assert str(study_obx[0](5)) == "1.2.826.0.1.3680043.8.498.1"


def test_ae_is_retried_with_the_same_control_id_and_ar_is_final(store: Store, tmp_path: Path) -> None:
    receiver = Hl7Receiver(["AE", "AA"])
    try:
        settings = settings_for(store, tmp_path, {"name": "ris", "host": "127.0.0.1", "port": receiver.port})
        results.enqueue(store, settings, done_job(store))
        row = send_until(store, settings, DeliveryState.SENT)
        assert row.attempts == 2
        assert [m["MSH.F10"] for m in receiver.messages] == [row.control_id] * 2
    finally:
        receiver.stop()
    refusing = Hl7Receiver(["AR"])
    try:
        with store.session() as s:
            s.execute(Hl7Result.__table__.delete())
            for job in s.scalars(select(Job)):
                job_id = job.id
        settings = settings_for(store, tmp_path, {"name": "ris", "host": "127.0.0.1", "port": refusing.port})
        results.enqueue(store, settings, job_id)
        row = send_until(store, settings, DeliveryState.FAILED)
        assert row.attempts == 1 and row.ack_code == "AR" and "answered AR" in row.last_error
    finally:
        refusing.stop()


def test_a_receiver_that_is_down_is_retried_then_failed(store: Store, tmp_path: Path) -> None:
    port = free_port()
    settings = settings_for(store, tmp_path, {"name": "ris", "host": "127.0.0.1", "port": port}, max_attempts=3)
    results.enqueue(store, settings, done_job(store))
    results.send_due(store, settings)
    [row] = rows(store)
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 1) and f"127.0.0.1:{port}" in row.last_error
    assert row.next_attempt_at > dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1) and row.leased_by == ""
    row = send_until(store, settings, DeliveryState.FAILED)
    assert row.attempts == 3


def test_ordered_destinations_take_only_ordered_studies(store: Store, tmp_path: Path) -> None:
    ordered = {"name": "ris", "host": "127.0.0.1", "port": 1}
    every = {"name": "all", "host": "127.0.0.1", "port": 2, "studies": "all"}
    settings = settings_for(store, tmp_path, ordered, every)
    job_id = done_job(store, order=False)
    assert results.enqueue(store, settings, job_id) == 1
    assert [r.destination for r in rows(store)] == ["all"]


def test_rows_of_a_destination_no_longer_configured_are_orphaned(store: Store, tmp_path: Path) -> None:
    settings = settings_for(store, tmp_path, {"name": "ris", "host": "127.0.0.1", "port": 1})
    results.enqueue(store, settings, done_job(store))
    results.send_due(store, settings_for(store, tmp_path))
    [row] = rows(store)
    assert row.state == DeliveryState.ORPHANED and "ris" in row.last_error and row.attempts == 0


def test_a_fhir_diagnostic_report_is_validated_and_posted(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FhirServer([503, 200])
    monkeypatch.setenv("DXNODE_TEST_FHIR_TOKEN", "s3cret-token")
    try:
        dest = {"name": "fhir", "kind": "fhir", "url": server.url, "secret_env": "DXNODE_TEST_FHIR_TOKEN"}
        settings = settings_for(store, tmp_path, dest)
        results.enqueue(store, settings, done_job(store))
        row = send_until(store, settings, DeliveryState.SENT)
    finally:
        server.stop()
    assert row.http_status == 200 and row.attempts == 2
    assert server.headers[0]["Authorization"] == "Bearer s3cret-token"
    bundle = server.bodies[-1]
    Bundle.model_validate(bundle)  # what arrived is valid R4B
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Observation"] * len(FINDINGS) + ["DiagnosticReport"] and bundle["type"] == "transaction"
    report = bundle["entry"][-1]["resource"]
    assert [r["reference"] for r in report["result"]] == [e["fullUrl"] for e in bundle["entry"][:-1]]
    assert {"type", "value"} <= report["identifier"][1].keys() and report["identifier"][1]["value"] == "ACC9"
    for entry, (label, p, t, pos) in zip(bundle["entry"][:-1], FINDINGS, strict=True):
        obs = entry["resource"]
        assert obs["code"]["coding"][0]["code"] == label and obs["valueQuantity"]["value"] == pytest.approx(p)
        assert obs["referenceRange"][0]["high"]["value"] == t
        assert obs["interpretation"][0]["coding"][0]["code"] == ("POS" if pos else "NEG")
        assert obs["meta"]["security"][0]["code"] == "AIAST"


def test_a_fhir_server_refusing_the_bundle_fails_it_for_good(store: Store, tmp_path: Path) -> None:
    server = FhirServer([422])
    try:
        settings = settings_for(store, tmp_path, {"name": "fhir", "kind": "fhir", "url": server.url})
        results.enqueue(store, settings, done_job(store))
        row = send_until(store, settings, DeliveryState.FAILED)
    finally:
        server.stop()
    assert row.attempts == 1 and row.http_status == 422 and "HTTP 422" in row.last_error


def test_a_study_analysed_again_goes_out_as_a_correction(store: Store, tmp_path: Path) -> None:
    receiver = Hl7Receiver(["AA"])
    try:
        settings = settings_for(store, tmp_path, {"name": "ris", "host": "127.0.0.1", "port": receiver.port})
        first = done_job(store)
        results.enqueue(store, settings, first)
        send_until(store, settings, DeliveryState.SENT)
        with store.session() as s:
            old = s.get(Job, first)
            assert old is not None
            again = Job(study_id=old.study_id, state=JobState.DONE, model_name="demo", model_version="1")
            s.add(again)
            s.flush()
            s.add(
                FindingRow(
                    job_id=again.id,
                    study_id=old.study_id,
                    label="Effusion",
                    probability=0.2,
                    threshold=0.5,
                    positive=False,
                    model_name="demo",
                    model_version="1",
                )
            )
            second = again.id
        results.enqueue(store, settings, second)
        wait = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)
        while len(receiver.messages) < 2 and dt.datetime.now(dt.UTC) < wait:
            results.send_due(store, settings)
    finally:
        receiver.stop()
    first_oru, second_oru = receiver.messages
    assert first_oru["OBR.F25"] == "F" and second_oru["OBR.F25"] == "C"
    assert [str(seg(11)) for seg in second_oru.segments("OBX")] == ["C", "C"]
