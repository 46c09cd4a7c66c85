"""The IHE AIW-I task performer against a real UPS provider (tests/ups_provider.py, over loopback):
the provider's rules (Transaction UID, Pull for Change State), refused claims, events on a real
listener, a Task Manager that is down, and the whole chain with `dxnode serve`, dcmqrscp as the
source and a storescp PACS."""

from __future__ import annotations

import datetime
import sqlite3
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from nodeproc import Node, StoreSCP, node_config, wait_port, wait_until
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    UnifiedProcedureStepPull,
    UnifiedProcedureStepPush,
)
from sources_peers import Dcmqrscp, study_files, wait_sr
from sqlalchemy import select
from ups_provider import (
    ALREADY_IN_PROGRESS,
    FINAL_NOT_MET,
    INVALID_VALUE,
    MISSING_VALUE,
    NO_LONGER_UPDATABLE,
    NO_SUCH_ACTION,
    NO_SUCH_ATTRIBUTE,
    NOT_IN_PROGRESS,
    NOT_SETTABLE,
    WRONG_TRANSACTION,
    UpsProvider,
    change_state_over,
    type1_missing,
    workitem,
)

from dxnode import metrics
from dxnode.config import ConfigError, Settings, load_settings
from dxnode.sources import ups, ups_report, ups_scu
from dxnode.states import JobState, OutputKind, Priority, UpsState
from dxnode.store import Delivery, FetchRequest, Job, Output, Store, Study, UpsWorkitem, utcnow

PULL, PUSH = str(UnifiedProcedureStepPull), str(UnifiedProcedureStepPush)


def settings_for(url: str, port: int, **entry: Any) -> Settings:
    return Settings(
        database={"url": url},
        node={"ae_title": "DXNODE"},
        sources=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        ups=[{"name": "tm", "ae_title": "TASKMGR", "host": "127.0.0.1", "port": port, "source": "pacs", **entry}],
    )


def rows(store: Store) -> dict[str, UpsWorkitem]:
    with store.session() as s:
        found = s.scalars(select(UpsWorkitem)).all()
        s.expunge_all()
    return {r.workitem_uid: r for r in found}


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ('source = "pac"', "ups: [[ups]] 'tm': source 'pac' is no [[sources]] name (pacs)"),
        ('source = "pacs"\npoll_second = 3', "ups[0].poll_second: unknown key (did you mean poll_seconds?)"),
        ('source = "pacs"\nae_title = "A VERY LONG AE TITLE"', "ups[0].ae_title"),
    ],
)
def test_a_wrong_ups_section_is_one_clear_line(tmp_path: Path, extra: str, error: str) -> None:
    path = tmp_path / "dxnode.toml"
    path.write_text(
        '[[sources]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n'
        f'[[ups]]\nname = "tm"\nhost = "h"\nport = 11112\n{extra}\n'
        + ("" if "ae_title" in extra else 'ae_title = "TM"\n')
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert error in str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture(autouse=True)
def fresh_managers() -> Any:
    """What serve keeps in memory per Task Manager (backoff, subscription) starts empty in each test."""
    ups._managers.clear()
    yield
    ups._managers.clear()


@pytest.fixture
def provider() -> Any:
    p = UpsProvider({})
    yield p
    p.stop()


def test_the_provider_keeps_the_transaction_uid_and_pull_rules(provider: UpsProvider) -> None:
    settings = settings_for("sqlite://", provider.port)
    entry = settings.ups[0]
    uid = provider.create(workitem(generate_uid()))
    mine = generate_uid()
    # Change State over UPS Push is no action of that SOP Class: a performer must use Pull.
    assert change_state_over(provider.port, UnifiedProcedureStepPush, uid, "IN PROGRESS", mine) == NO_SUCH_ACTION
    assert provider.state(uid) == "SCHEDULED"
    with ups_scu.pull(settings, entry) as assoc:
        assert ups_scu.change_state(assoc, entry, uid, "IN PROGRESS", mine) == 0
        assert ups_scu.change_state(assoc, entry, uid, "IN PROGRESS", mine) == ALREADY_IN_PROGRESS  # even ours
        assert ups_scu.state_of(assoc, entry, uid) == (0, "IN PROGRESS")
        # The node's own calls with a wrong Transaction UID are refused, and change nothing.
        wrong = generate_uid()
        assert ups_scu.n_set(assoc, entry, uid, ups.ups_report.progress(wrong, 10, "x")) == WRONG_TRANSACTION
        assert ups_scu.change_state(assoc, entry, uid, "CANCELED", wrong) == WRONG_TRANSACTION
        assert ups_scu.n_set(assoc, entry, uid, ups.ups_report.progress(mine, 10, "ten")) == 0
        assert ups_scu.change_state(assoc, entry, uid, "COMPLETED", mine) == 0xC304  # final state not met
    assert change_state_over(provider.port, UnifiedProcedureStepPull, uid, "IN PROGRESS", generate_uid()) == (
        ALREADY_IN_PROGRESS
    )
    assert provider.state(uid) == "IN PROGRESS"
    assert provider.item(uid).ProcedureStepProgressInformationSequence[0].ProcedureStepProgress == 10
    assert {op.context for op in provider.ops("N-ACTION 1") if op.calling == "DXNODE"} == {PULL}


def test_claims_match_rules_and_a_refused_claim_is_recorded_and_skipped(store: Store, provider: UpsProvider) -> None:
    settings = settings_for(store.url, provider.port, workitem_codes=["AI-CXR"], subscribe=False)
    entry = settings.ups[0]
    high = provider.create(workitem(generate_uid(), priority="HIGH"))
    other_code = provider.create(workitem(generate_uid(), code="NOT-OURS"))
    raced = provider.create(workitem(generate_uid()))
    assert change_state_over(provider.port, UnifiedProcedureStepPull, raced, "IN PROGRESS", generate_uid()) == 0
    provider.stale_find.add(raced)  # the C-FIND still shows it SCHEDULED: the node's claim comes second
    provider.bare_find = True  # the inputs are then read by N-GET
    claimed, refused = (metrics.UPS_WORKITEMS.labels(ups="tm", outcome=o) for o in ("claimed", "refused"))
    claimed_before, refused_before = claimed._value.get(), refused._value.get()

    ups.poll(store, settings, entry)
    ups.poll(store, settings, entry)
    got = rows(store)
    # dxnode_ups_workitems_total, watched in docs/operations.md: both claims attempted, one refused
    assert claimed._value.get() - claimed_before == 1 and refused._value.get() - refused_before == 1
    assert set(got) == {high, raced}  # the other code is never claimed
    assert got[high].state == UpsState.IN_PROGRESS and got[high].priority == Priority.HIGH
    assert provider.item(high).TransactionUID == got[high].transaction_uid
    assert got[raced].state == UpsState.REFUSED and got[raced].status == ALREADY_IN_PROGRESS
    assert "0xC302" in got[raced].detail
    assert [op.status for op in provider.ops("N-SET", raced)] == [WRONG_TRANSACTION]  # asked: not ours
    assert len([op for op in provider.ops("N-ACTION 1", raced) if op.calling == "DXNODE"]) == 1  # never retried
    assert provider.state(other_code) == "SCHEDULED"
    with store.session() as s:
        [request] = s.scalars(select(FetchRequest)).all()
        assert request.priority == Priority.HIGH and request.actor == "ups:tm"
        assert request.identifiers["study_instance_uid"] == got[high].inputs[0][0]


def test_a_workitem_that_disappears_is_recorded_and_the_node_goes_on(store: Store, provider: UpsProvider) -> None:
    settings = settings_for(store.url, provider.port, subscribe=False)
    entry = settings.ups[0]
    gone = provider.create(workitem(generate_uid()))
    ups.poll(store, settings, entry)
    provider.delete(gone)
    later = provider.create(workitem(generate_uid()))
    ups.poll(store, settings, entry)
    got = rows(store)
    assert got[gone].state == UpsState.GONE and "0xC307" in got[gone].detail
    assert got[later].state == UpsState.IN_PROGRESS
    with store.session() as s:
        request = s.get(FetchRequest, got[gone].request_ids[0])
        assert request is not None and request.state == "failed" and "cancelled" in request.error


def test_a_claim_interrupted_by_a_stop_is_sent_again_with_the_stored_transaction_uid(
    store: Store, provider: UpsProvider
) -> None:
    settings = settings_for(store.url, provider.port, subscribe=False)
    uid = provider.create(workitem(generate_uid()))
    kept = generate_uid()
    # The node stored its Transaction UID and its claim went through, then it stopped before recording it.
    assert change_state_over(provider.port, UnifiedProcedureStepPull, uid, "IN PROGRESS", kept, aet="DXNODE") == 0
    with store.session() as s:
        s.add(
            UpsWorkitem(
                ups="tm",
                workitem_uid=uid,
                transaction_uid=kept,
                state=UpsState.CLAIMING,
                inputs=[[generate_uid(), "pacs"]],
            )
        )
    ups.poll(store, settings, settings.ups[0])
    row = rows(store)[uid]
    assert row.state == UpsState.IN_PROGRESS and row.transaction_uid == kept and row.request_ids
    assert [op.status for op in provider.ops("N-ACTION 1", uid)] == [0, ALREADY_IN_PROGRESS]
    # The second claim's 0xC302 was taken as ours because the provider accepted an N-SET with the stored UID.
    assert next(op.status for op in provider.ops("N-SET", uid)) == 0


def test_a_task_manager_that_is_down_backs_off_and_holds_up_nothing(store: Store) -> None:
    port = free_port()  # nobody listens
    settings = settings_for(store.url, port, poll_seconds=5, retry_backoff_max_seconds=20)
    unreachable = metrics.UPS_UNREACHABLE.labels(ups="tm")
    before = unreachable._value.get()
    ups.tick(store, settings, "tm")
    manager = ups._manager("tm")
    assert manager.failures == 1 and not manager.subscribed
    assert unreachable._value.get() - before == 1  # dxnode_ups_unreachable_total, watched in docs/operations.md
    first = manager.next_round
    ups.tick(store, settings, "tm")  # not due: no second try
    assert manager.failures == 1 and manager.next_round == first
    manager.next_round = 0
    ups.tick(store, settings, "tm")
    assert manager.failures == 2


def test_a_cancel_request_event_reaches_the_listener_and_the_workitem_is_canceled(
    store: Store, provider: UpsProvider
) -> None:
    """The node's listener as serve wires it (daemon: ups.listen_for_events on the SCP's AE)."""
    settings = settings_for(store.url, provider.port)
    entry = settings.ups[0]
    listener = AE("DXNODE")
    handler = ups.listen_for_events(listener, store, lambda event: (0x0110, None))
    port = free_port()
    server = listener.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, handler)])
    provider.subscribers["DXNODE"] = ("127.0.0.1", port)
    try:
        uid = provider.create(workitem(generate_uid()))
        ups.poll(store, settings, entry)  # subscribes, claims
        assert provider.subscribed == {"DXNODE"} and rows(store)[uid].state == UpsState.IN_PROGRESS
        assert provider.request_cancel(uid) == 0
        wait_until(lambda: rows(store)[uid].cancel_requested, timeout=20, what="the cancel request recorded")
        assert ups._manager("tm").wake.is_set()
        ups.poll(store, settings, entry)
    finally:
        server.shutdown()
    row = rows(store)[uid]
    assert row.state == UpsState.CANCELED and provider.state(uid) == "CANCELED"
    item = provider.item(uid)
    reason = item.ProcedureStepProgressInformationSequence[0]
    assert reason.ReasonForCancellation == "cancel requested by RIS: asked by a user of the Task Manager"
    assert reason.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue == "110513"
    assert not any(op.detail == "COMPLETED" for op in provider.ops("N-ACTION 1", uid))


@pytest.mark.slow
def test_serve_performs_workitems_from_push_to_completed_with_the_sr_named(tmp_path: Path) -> None:
    node_port, pacs_port = free_port(), free_port()
    pacs = StoreSCP(tmp_path / "pacs", pacs_port)
    qr = Dcmqrscp(tmp_path / "qr", "DXNODE", node_port)
    provider = UpsProvider({"DXNODE": ("127.0.0.1", node_port)})
    node = None
    try:
        a_uid, a_files = study_files(tmp_path / "a", 1, "ACC-UA", "PAT-UA")
        b_uid, b_files = study_files(tmp_path / "b", 1, "ACC-UB", "PAT-UB")
        qr.upload(a_files + b_files)
        done = provider.create(workitem(a_uid, priority="HIGH", retrieve_ae="QRSCP"))
        cancel = provider.create(workitem(b_uid, retrieve_ae="QRSCP"))
        provider.on_claim[cancel] = "cancel"  # a user of the Task Manager asks to cancel once it is claimed
        gone = provider.create(workitem(generate_uid()))
        provider.on_claim[gone] = "delete"
        cfg = node_config(
            tmp_path,
            node={"port": node_port},
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            worklist={"fetch_interval_seconds": 0.5, "stable_seconds": 1},
            sources=[
                {"name": "elsewhere", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": free_port()},
                {"name": "qr", "ae_title": "QRSCP", "host": "127.0.0.1", "port": qr.port},
            ],
            ups=[
                {
                    "name": "tm",
                    "ae_title": "TASKMGR",
                    "host": "127.0.0.1",
                    "port": provider.port,
                    "source": "elsewhere",  # the inputs name QRSCP: that source is used instead
                    "poll_seconds": 1,
                }
            ],
        )
        node = Node(cfg)
        wait_port(node_port)
        try:
            wait_until(lambda: provider.state(done) == "COMPLETED", timeout=180, what="the workitem COMPLETED")
            wait_until(lambda: provider.state(cancel) == "CANCELED", timeout=60, what="the cancelled one CANCELED")
        except AssertionError:
            raise AssertionError("node output:\n" + "\n".join(node.lines[-60:])) from None
        [sr] = wait_sr(pacs, a_uid)
    finally:
        if node is not None:
            node.stop()
        provider.stop()
        qr.stop()
        pacs.stop()
    assert node.proc.returncode == 0, "\n".join(node.lines[-40:])
    assert not [line for line in node.lines if "round failed" in line or "Traceback" in line]
    item = provider.item(done)
    [performed] = item.UnifiedProcedureStepPerformedProcedureSequence
    outputs = {
        ref.ReferencedSOPInstanceUID: (out.StudyInstanceUID, out.DICOMRetrievalSequence[0].RetrieveAETitle)
        for out in performed.OutputInformationSequence
        for ref in out.ReferencedSOPSequence
    }
    assert outputs[sr.SOPInstanceUID] == (a_uid, "PACS")
    assert performed.PerformedProcedureStepEndDateTime and performed.PerformedWorkitemCodeSequence[0].CodeValue
    progress = [op.detail for op in provider.ops("N-SET", done) if op.calling == "DXNODE"]
    assert progress.count("TransactionUID,ProcedureStepProgressInformationSequence") == 3  # 30, 50, 90 %
    # Every Change State of the node came over UPS Pull, though the workitems were made with UPS Push.
    assert provider.ops("N-CREATE") and all(op.context == PUSH for op in provider.ops("N-CREATE"))
    assert {op.context for op in provider.ops("N-ACTION 1") if op.calling == "DXNODE"} == {PULL}
    # The cancelled one: CANCELED with the reason, never completed; the deleted one recorded as gone.
    assert not any(op.detail == "COMPLETED" for op in provider.ops("N-ACTION 1", cancel))
    [ended] = provider.item(cancel).UnifiedProcedureStepPerformedProcedureSequence
    assert not ended.get("OutputInformationSequence")
    db = sqlite3.connect(tmp_path / "var" / "dxnode.db")
    states = dict(db.execute("SELECT workitem_uid, state FROM ups_workitem").fetchall())
    assert states == {done: "completed", cancel: "canceled", gone: "gone"}
    [(priority,)] = db.execute(
        "SELECT job.priority FROM job JOIN study ON study.id = job.study_id WHERE study.study_instance_uid = ?",
        (a_uid,),
    ).fetchall()
    assert priority == "HIGH"


# --- PS3.4 Table CC.2.5-3 and dcm4chee-arc's checks: the provider enforces them, the node's datasets pass ---


def _claimed(provider: UpsProvider, **row: Any) -> tuple[Settings, UpsWorkitem]:
    """A workitem claimed by the node's own N-ACTION, and the ups_workitem row the report functions read."""
    settings = settings_for("sqlite://", provider.port)
    uid, mine = provider.create(workitem(generate_uid())), generate_uid()
    with ups_scu.pull(settings, settings.ups[0]) as assoc:
        assert ups_scu.change_state(assoc, settings.ups[0], uid, "IN PROGRESS", mine) == 0
    values = {"workitem_code": ["AI-CXR", "99TEST", "AI chest"], "progress": 90, "started_at": utcnow(), **row}
    return settings, UpsWorkitem(ups="tm", workitem_uid=uid, transaction_uid=mine, state=UpsState.IN_PROGRESS, **values)


def _send(settings: Settings, uid: str, *calls: tuple[str, Any]) -> list[int]:
    """N-SETs (("set", dataset)) and Change States (("state", (state, transaction))) in order; their statuses."""
    entry, out = settings.ups[0], []
    with ups_scu.pull(settings, entry) as assoc:
        for kind, arg in calls:
            out.append(
                ups_scu.n_set(assoc, entry, uid, arg)
                if kind == "set"
                else ups_scu.change_state(assoc, entry, uid, *arg)
            )
    return out


def _without(ds: Dataset, keyword: str, where: str = "") -> Dataset:
    """A copy of an N-SET dataset with one attribute removed, at the top or in the first item of where."""
    ds = deepcopy(ds)
    del (ds[where].value[0] if where else ds)[keyword]
    return ds


PERFORMED = "UnifiedProcedureStepPerformedProcedureSequence"
PROGRESS = "ProcedureStepProgressInformationSequence"


def test_completed_is_refused_without_each_final_state_requirement_and_the_nodes_completion_passes(
    provider: UpsProvider,
) -> None:
    settings, row = _claimed(provider, started_at=datetime.datetime(2026, 1, 2, 3, 4, 5))  # naive: UTC, as SQLite
    full = ups_report.final(settings, row, [], utcnow())
    done = ("state", ("COMPLETED", row.transaction_uid))
    missing = [
        (PERFORMED, ""),
        ("PerformedProcedureStepStartDateTime", PERFORMED),
        ("PerformedProcedureStepEndDateTime", PERFORMED),
        ("PerformedStationNameCodeSequence", PERFORMED),
        ("PerformedWorkitemCodeSequence", PERFORMED),
        ("OutputInformationSequence", PERFORMED),
    ]
    refused = {kw: _send(settings, row.workitem_uid, ("set", _without(full, kw, where)), done) for kw, where in missing}
    assert refused == {kw: [0, FINAL_NOT_MET] for kw, _ in missing}  # each N-SET accepted, COMPLETED refused
    [performed] = full.UnifiedProcedureStepPerformedProcedureSequence
    assert "ActualHumanPerformersSequence" not in performed  # RC "if known": an AI performer has none
    assert performed.OutputInformationSequence == []  # Type 2: present, no items when nothing was made
    assert performed.PerformedProcedureStepStartDateTime == "20260102030405+0000"  # DT with its offset
    assert _send(settings, row.workitem_uid, ("set", full), done) == [0, 0]
    assert provider.state(row.workitem_uid) == "COMPLETED"
    # Afterwards nothing may change it (PS3.4 CC.2.6.3).
    assert _send(settings, row.workitem_uid, ("set", full)) == [NO_LONGER_UPDATABLE]


def test_canceled_is_refused_without_the_discontinuation_reason_and_the_nodes_cancel_passes(
    provider: UpsProvider,
) -> None:
    settings, row = _claimed(provider)
    full = ups_report.canceled(settings, row, "fetch of 1.2.3 failed", utcnow())
    cancel = ("state", ("CANCELED", row.transaction_uid))
    no_reason = _without(full, "ProcedureStepDiscontinuationReasonCodeSequence", PROGRESS)
    assert _send(settings, row.workitem_uid, ("set", no_reason), cancel) == [0, FINAL_NOT_MET]
    assert _send(settings, row.workitem_uid, ("set", full), cancel) == [0, 0]
    info = provider.item(row.workitem_uid).ProcedureStepProgressInformationSequence[0]
    assert info.ProcedureStepCancellationDateTime and info.ReasonForCancellation == "fetch of 1.2.3 failed"
    assert info.ProcedureStepDiscontinuationReasonCodeSequence[0].CodeValue == "110513"
    assert provider.supplemented == []  # the provider had nothing to fill in


def test_n_set_rules_not_allowed_attributes_empty_type_1_values_and_the_transaction_uid(
    provider: UpsProvider,
) -> None:
    settings, row = _claimed(provider, workitem_code=["AI-CXR", "99TEST", ""])  # no meaning: the node's own code
    uid, mine = row.workitem_uid, row.transaction_uid
    progress = ups_report.progress(mine, 30, "inputs retrieved")
    node_sets = [
        progress,
        ups_report.final(settings, row, [], utcnow()),
        ups_report.canceled(settings, row, "x", utcnow()),
    ]
    for ds in node_sets:
        assert not [e.keyword for e in ds if e.keyword in NOT_SETTABLE] and type1_missing(ds) == ""
    performed = node_sets[1].UnifiedProcedureStepPerformedProcedureSequence[0]
    assert performed.PerformedWorkitemCodeSequence[0].CodeValue == ups_report.DEFAULT_WORKITEM_CODE[0]
    patient = deepcopy(progress)
    patient.PatientName = "Other^Name"
    no_meaning = deepcopy(node_sets[1])
    no_meaning[PERFORMED][0].PerformedStationNameCodeSequence[0].CodeMeaning = ""
    no_transaction = _without(progress, "TransactionUID")
    statuses = _send(settings, uid, ("set", patient), ("set", no_meaning), ("set", no_transaction), ("set", progress))
    assert statuses == [NO_SUCH_ATTRIBUTE, MISSING_VALUE, WRONG_TRANSACTION, 0]
    scheduled = provider.create(workitem(generate_uid()))
    assert _send(settings, scheduled, ("set", progress)) == [NOT_IN_PROGRESS]  # no Transaction UID before a claim


def test_a_non_ascii_reason_is_sent_with_its_character_set(provider: UpsProvider) -> None:
    settings, row = _claimed(provider)
    ds = ups_report.canceled(settings, row, "Quelle nicht erreichbar: Gerät aus", utcnow())
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert _send(settings, row.workitem_uid, ("set", _without(ds, "SpecificCharacterSet"))) == [INVALID_VALUE]
    assert _send(settings, row.workitem_uid, ("set", ds), ("state", ("CANCELED", row.transaction_uid))) == [0, 0]
    info = provider.item(row.workitem_uid).ProcedureStepProgressInformationSequence[0]
    assert info.ReasonForCancellation == "Quelle nicht erreichbar: Gerät aus"
    assert ups_report.progress(row.transaction_uid, 30, "ascii only").get("SpecificCharacterSet") is None


def test_output_references_name_only_where_outputs_are_and_pass_the_provider(
    store: Store, provider: UpsProvider
) -> None:
    """A series at a DIMSE destination, one at a DICOMweb one (its series URL, no empty Retrieve AE Title),
    and one that reached no destination (left out: it has no Type 1 place to name)."""
    settings = settings_for(store.url, provider.port).model_copy(
        update={
            "destinations": Settings(
                destinations=[
                    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                    {"name": "web", "kind": "dicomweb", "url": "http://web.example/dicom-web/"},
                ]
            ).destinations
        }
    )
    study_uid = generate_uid(prefix=None)  # 2.25.N: room for the series suffix within 64 characters
    with store.session() as s:
        study = Study(study_instance_uid=study_uid)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, state=JobState.DONE)
        s.add(job)
        s.flush()
        for n, (dest, state) in enumerate([("pacs", "sent"), ("web", "sent"), ("pacs", "failed")]):
            out = Output(
                job_id=job.id,
                study_id=study.id,
                kind=OutputKind.SR,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                sop_instance_uid=generate_uid(),
                series_instance_uid=f"{study_uid}.{n}",
                file_path=f"outputs/{n}.dcm",
            )
            s.add(out)
            s.flush()
            s.add(Delivery(output_id=out.id, destination=dest, state=state))
        job_id = job.id
    items = ups_report.output_items(store, settings, [job_id])
    by_series = {item.SeriesInstanceUID: item for item in items}
    assert set(by_series) == {f"{study_uid}.0", f"{study_uid}.1"}
    dimse, web = by_series[f"{study_uid}.0"], by_series[f"{study_uid}.1"]
    assert [r.RetrieveAETitle for r in dimse.DICOMRetrievalSequence] == [
        "PACS"
    ] and "WADORSRetrievalSequence" not in dimse
    assert "DICOMRetrievalSequence" not in web
    assert [r.RetrieveURL for r in web.WADORSRetrievalSequence] == [
        f"http://web.example/dicom-web/studies/{study_uid}/series/{study_uid}.1"
    ]
    _, row = _claimed(provider)
    final = ups_report.final(settings, row, items, utcnow())
    assert _send(settings, row.workitem_uid, ("set", final), ("state", ("COMPLETED", row.transaction_uid))) == [0, 0]
    # What the node sent before this review, an empty Retrieve AE Title for a DICOMweb-only series, is refused.
    old = deepcopy(final)
    old[PERFORMED][0].OutputInformationSequence[1].DICOMRetrievalSequence = [Dataset()]
    old[PERFORMED][0].OutputInformationSequence[1].DICOMRetrievalSequence[0].RetrieveAETitle = ""
    assert type1_missing(old) == f"{PERFORMED} > OutputInformationSequence > DICOMRetrievalSequence item"


def test_an_n_set_answered_with_a_warning_counts_as_done(store: Store, provider: UpsProvider) -> None:
    """0x0001 (optional attributes not supported) and 0xB305 (coerced) mean the N-SET was carried out."""
    settings, row = _claimed(provider)
    settings = settings_for(store.url, provider.port)
    with store.session() as s:
        s.add(row)
        s.flush()
        s.expunge(row)
    provider.set_answer = 0x0001
    with ups_scu.pull(settings, settings.ups[0]) as assoc:
        assert ups._ours(settings.ups[0], assoc, row)
        ups._cancel(store, settings, settings.ups[0], assoc, row, "the model was withdrawn")
    assert provider.state(row.workitem_uid) == "CANCELED"
    ended = rows(store)[row.workitem_uid]
    assert ended.state == UpsState.CANCELED and ended.detail == "the model was withdrawn"
