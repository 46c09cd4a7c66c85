"""Deliveries follow the configuration: a corrected address reaches rows already queued, a removed
destination orphans its rows, and `dxnode outbox cancel|retry` act on a delivery, a study or a destination."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import test_dispatch
from conftest import free_port, need_tool
from nodeproc import Node, StoreSCP, node_config, wait_until, write_config
from sqlalchemy import select
from test_dicomweb_out import ScriptedStow
from test_dispatch import BOTH, PickySCP, audit_actions, deliveries, enqueue_all, extra_outputs, settings_for

from dxnode import cli
from dxnode.config import Settings
from dxnode.outbox import dispatch
from dxnode.outputs.report import WrittenOutput
from dxnode.store import Audit, Output, Store, Study, UTCDateTime, upgrade, utcnow

written, outputs = test_dispatch.written, test_dispatch.outputs  # shared fixtures: a real SR + SC as outbox rows


def config_file(tmp: Path, store: Store, *destinations: dict[str, Any]) -> Path:
    """A dxnode.toml for the CLI over this test's database and data dir."""
    return write_config(
        tmp / "cli.toml",
        {
            "node": {"data_dir": str(tmp / "var")},
            "database": {"url": store.url},
            "destinations": list(destinations),
        },
    )


def pacs(port: int, name: str = "pacs", ae_title: str = "PACS") -> dict[str, Any]:
    return {"name": name, "ae_title": ae_title, "host": "127.0.0.1", "port": port}


def run_cli(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    """dxnode with this config: (exit status, stdout, stderr)."""
    rc = cli.main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def study_uid(store: Store) -> str:
    with store.session() as s:
        return str(s.scalar(select(Study.study_instance_uid)))


def audit_rows(store: Store, action: str) -> list[Audit]:
    with store.session() as s:
        return list(s.scalars(select(Audit).where(Audit.action == action).order_by(Audit.id)))


def test_queued_deliveries_go_to_the_corrected_address_after_a_restart(
    store: Store, tmp_path: Path, outputs: list[Output]
) -> None:
    """The incident: rows queued while the PACS port was wrong. After the config is fixed and the node
    restarted, every row reaches the right storescp and none the storescp that now listens on the old port."""
    need_tool("storescp")
    wrong, right = free_port(), free_port()
    outs = outputs + extra_outputs(store, tmp_path / "var", outputs[1], 4)
    enqueue_all(store, settings_for(store, tmp_path, wrong), outs)

    def config(port: int) -> Path:
        return node_config(
            tmp_path,
            database={"url": store.url},
            destinations=[pacs(port)],
            dispatch={"max_attempts": 100, "timeout_seconds": 5},
        )

    node = Node(config(wrong))
    try:
        wait_until(
            lambda: all(d.attempts >= 1 and "refused" in d.last_error for d in deliveries(store)),
            what="every delivery tried at the wrong port",
        )
    finally:
        node.stop()
    assert {d.state for d in deliveries(store)} == {"pending"}
    old_pacs = StoreSCP(tmp_path / "old-port", wrong)  # something listens on the old port now
    new_pacs = StoreSCP(tmp_path / "right-port", right)
    try:
        fixed = config(right)
        listed = json.loads(node.cli("outbox", "--json").stdout)
        assert {d["address"] for d in listed} == {f"PACS@127.0.0.1:{right}"} and len(listed) == 6
        resent = node.cli("resend", study_uid(store))  # what the operator tried: it must not pin the old port
        assert resent.returncode == 0 and "re-queued 6 deliveries" in resent.stdout
        node = Node(fixed)
        try:
            wait_until(lambda: {d.state for d in deliveries(store)} == {"sent"}, what="every delivery sent")
            wait_until(lambda: len(list(new_pacs.folder.iterdir())) == 6, timeout=20, what="6 files at the right port")
        finally:
            node.stop()
        assert sorted(d.SOPInstanceUID for d in new_pacs.datasets()) == sorted(o.sop_instance_uid for o in outs)
        assert list(old_pacs.folder.iterdir()) == []
        assert len(audit_rows(store, "delivery.sent")) == 6
    finally:
        old_pacs.stop()
        new_pacs.stop()


def test_ae_title_and_kind_are_read_when_sent(
    store: Store, tmp_path: Path, outputs: list[Output], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AE title of the configuration in force is called; a destination turned into a DICOMweb one
    gets its rows by STOW-RS, with the auth configured then."""
    scp = PickySCP(sop_classes=BOTH, ae_title="NEWAE", require_called_aet=True)
    stow = ScriptedStow()
    try:
        old = settings_for(store, tmp_path, scp.port)
        old.destinations[0] = old.destinations[0].model_copy(update={"ae_title": "OLDAE"})
        enqueue_all(store, old, outputs[:1])
        assert dispatch.send_due(store, old) == 0
        assert f"association rejected by OLDAE@127.0.0.1:{scp.port}" in deliveries(store)[0].last_error
        new = settings_for(store, tmp_path, scp.port)
        new.destinations[0] = new.destinations[0].model_copy(update={"ae_title": "NEWAE"})
        assert dispatch.send_due(store, new, now=utcnow() + dt.timedelta(seconds=5)) == 1
        assert scp.received == [outputs[0].sop_instance_uid]

        enqueue_all(store, old, outputs[1:])  # queued while "pacs" was a DIMSE node
        monkeypatch.setenv("WEB_TOKEN", "tok-123")
        web = Settings(
            node={"data_dir": tmp_path / "var"},
            database={"url": store.url},
            destinations=[
                {
                    "name": "pacs",
                    "kind": "dicomweb",
                    "url": f"http://127.0.0.1:{stow.port}/dw",
                    "auth": "bearer",
                    "secret_env": "WEB_TOKEN",
                }
            ],
        )
        assert dispatch.send_due(store, web) == 1
        assert stow.requests[0]["uids"] == [outputs[1].sop_instance_uid]
        assert stow.requests[0]["auth"] == "Bearer tok-123"
        assert scp.received == [outputs[0].sop_instance_uid]
    finally:
        scp.stop()
        stow.server.shutdown()


def test_a_removed_destination_orphans_its_rows_until_retried(
    store: Store, tmp_path: Path, outputs: list[Output], capsys: pytest.CaptureFixture[str]
) -> None:
    main, archive = PickySCP(sop_classes=BOTH), PickySCP(sop_classes=BOTH, ae_title="ARCHIVE")
    try:
        both = settings_for(store, tmp_path, main.port)
        both.destinations.append(
            both.destinations[0].model_copy(update={"name": "archive", "ae_title": "ARCHIVE", "port": archive.port})
        )
        enqueue_all(store, both, outputs)
        only_pacs = settings_for(store, tmp_path, main.port)
        assert dispatch.send_due(store, only_pacs) == 2
        for later in (10, 3600):  # never tried again, however long it waits
            assert dispatch.send_due(store, only_pacs, now=utcnow() + dt.timedelta(seconds=later)) == 0
        rows = {(d.destination, d.state, d.attempts, d.last_error) for d in deliveries(store)}
        assert rows == {
            ("pacs", "sent", 1, ""),
            ("archive", "orphaned", 0, "no destination named archive in [[destinations]]"),
        }
        assert archive.received == [] and len(main.received) == 2
        (orphaned,) = audit_rows(store, "delivery.orphaned")
        assert orphaned.actor == "system" and orphaned.target == "destination:archive"
        assert len(json.loads(orphaned.detail)["ids"]) == 2

        without = config_file(tmp_path, store, pacs(main.port))
        rc, out, _ = run_cli(capsys, without, "outbox", "--destination", "archive", "--json")
        listed = json.loads(out)
        assert rc == 0 and len(listed) == 2
        assert all(not d["configured"] and d["address"] == "" and d["state"] == "orphaned" for d in listed)
        rc, out, _ = run_cli(capsys, without, "outbox", "--state", "orphaned")
        assert out.count("(not configured)") == 2 and out.count("no destination named archive") == 2
        rc, out, _ = run_cli(capsys, without, "outbox", "retry", "--destination", "archive")
        assert rc == 1
        assert "re-queued 0 deliveries" in out and "left 2 as they were, no destination named archive" in out
        assert {d.state for d in deliveries(store) if d.destination == "archive"} == {"orphaned"}

        with_archive = config_file(tmp_path, store, pacs(main.port), pacs(archive.port, "archive", "ARCHIVE"))
        rc, out, _ = run_cli(capsys, with_archive, "outbox", "retry", "--destination", "archive")
        assert rc == 0 and out.startswith("re-queued 2 deliveries (ids ")
        assert {(d.state, d.attempts, d.last_error) for d in deliveries(store) if d.destination == "archive"} == {
            ("pending", 0, "")
        }
        assert dispatch.send_due(store, both) == 2
        assert archive.received == [o.sop_instance_uid for o in outputs]
        retried = audit_rows(store, "delivery.retry")[-1]
        assert retried.actor == "cli" and retried.target == "destination:archive"
        assert len(json.loads(retried.detail)["ids"]) == 2 and json.loads(retried.detail)["user"]
    finally:
        main.stop()
        archive.stop()


def test_cancel_and_retry_by_delivery_study_and_destination(
    store: Store, tmp_path: Path, outputs: list[Output], capsys: pytest.CaptureFixture[str]
) -> None:
    scp = PickySCP(sop_classes=BOTH)
    try:
        settings = settings_for(store, tmp_path, scp.port)
        enqueue_all(store, settings, outputs)
        config = config_file(tmp_path, store, pacs(scp.port))
        uid = study_uid(store)
        first, second = (d.id for d in deliveries(store))

        rc, _, err = run_cli(capsys, config, "outbox", "cancel")
        assert rc == 2 and "give --delivery ID, --study UID or --destination NAME" in err
        rc, _, err = run_cli(capsys, config, "outbox", "retry", "--study", uid, "--destination", "nope")
        assert rc == 1 and f"no delivery matches study:{uid} destination:nope" in err

        rc, out, _ = run_cli(capsys, config, "outbox", "cancel", "--study", uid)
        assert rc == 0 and out.strip() == f"cancelled 2 deliveries (ids {first}, {second})"
        for later in (0, 3600):
            assert dispatch.send_due(store, settings, now=utcnow() + dt.timedelta(seconds=later)) == 0
        assert scp.received == []
        assert all(d.state == "cancelled" and d.last_error.startswith("cancelled by cli (") for d in deliveries(store))
        cancelled = audit_rows(store, "delivery.cancel")[-1]
        assert cancelled.actor == "cli" and cancelled.target == f"study:{uid}" and cancelled.source == "local"
        assert json.loads(cancelled.detail)["ids"] == [first, second]
        rc, out, _ = run_cli(capsys, config, "outbox", "cancel", "--destination", "pacs")
        assert rc == 0 and "left 2 as they were, already cancelled" in out

        rc, out, _ = run_cli(capsys, config, "outbox", "retry", "--delivery", str(first))
        assert rc == 0 and out.strip() == f"re-queued 1 delivery (id {first})"
        assert dispatch.send_due(store, settings) == 1
        assert scp.received == [outputs[0].sop_instance_uid]
        assert [d.state for d in deliveries(store)] == ["sent", "cancelled"]

        rc, out, _ = run_cli(capsys, config, "outbox", "cancel", "--delivery", str(first))
        assert rc == 1 and f"left 1 as they were, already sent (id {first})" in out
        rc, out, _ = run_cli(capsys, config, "outbox", "retry", "--destination", "pacs", "--study", uid, "--json")
        change = json.loads(out)
        assert rc == 0 and change["changed"] == [second] and list(change["skipped"].values()) == [[first]]
        assert dispatch.send_due(store, settings) == 1
        assert scp.received == [o.sop_instance_uid for o in outputs]
        assert [a for a, _ in audit_actions(store) if a.startswith("delivery.") and a != "delivery.sent"] == [
            "delivery.cancel",  # an attempt that matched no row is not audited: it changed nothing
            "delivery.cancel",
            "delivery.retry",
            "delivery.cancel",
            "delivery.retry",
        ]
    finally:
        scp.stop()


def test_retry_sends_a_backing_off_row_at_once_and_leaves_a_row_being_sent(
    store: Store, tmp_path: Path, outputs: list[Output]
) -> None:
    port = free_port()
    settings = settings_for(
        store, tmp_path, port, max_attempts=50, backoff_initial_seconds=600, backoff_max_seconds=600
    )
    enqueue_all(store, settings, outputs)
    assert dispatch.send_due(store, settings) == 0  # nothing listens: both rows back off for 10 minutes
    assert all(d.attempts == 1 and d.next_attempt_at > utcnow() + dt.timedelta(minutes=5) for d in deliveries(store))
    scp = PickySCP(sop_classes=BOTH, port=port)
    try:
        with store.session() as s:
            s.get(dispatch.Delivery, deliveries(store)[1].id).leased_by = "otherhost:7"  # type: ignore[union-attr]
        with store.session() as s:
            change = dispatch.retry(s, dispatch.Selection(destination="pacs"), settings, actor="test")
        assert change.changed == [deliveries(store)[0].id]
        assert change.skipped == {"being sent now by otherhost:7": [deliveries(store)[1].id]}
        head = deliveries(store)[0]
        assert (head.attempts, head.last_error, head.dimse_status) == (0, "", None)
        assert head.next_attempt_at <= utcnow()
        assert dispatch.send_due(store, settings) >= 1  # at once, not in 10 minutes
        assert scp.received[0] == outputs[0].sop_instance_uid
    finally:
        scp.stop()


def test_a_row_cancelled_after_its_batch_was_claimed_is_not_sent(
    store: Store, tmp_path: Path, outputs: list[Output]
) -> None:
    scp = PickySCP(sop_classes=BOTH)
    try:
        settings = settings_for(store, tmp_path, scp.port)
        enqueue_all(store, settings, outputs)
        (batch,) = dispatch._claim(store, settings, utcnow())
        assert len(batch) == 2
        with store.session() as s:
            dispatch.cancel(s, dispatch.Selection(delivery_ids=(batch[1].id,)), actor="test")
        assert dispatch._send_batch(store, settings, batch) == 1
        assert scp.received == [batch[0].sop_instance_uid]
        assert [d.state for d in deliveries(store)] == ["sent", "cancelled"]
    finally:
        scp.stop()


def test_the_study_page_and_api_show_the_configured_address(
    store: Store, tmp_path: Path, outputs: list[Output], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from dxnode.web.app import create_app

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    token = "read-token-0123456789"
    settings = Settings(
        node={"data_dir": tmp_path / "var"},
        database={"url": store.url},
        destinations=[pacs(4100), {"name": "web", "kind": "dicomweb", "url": "https://pacs.example/dw"}],
        web={"tokens": [{"name": "bob", "token": token, "role": "read"}]},
    )
    enqueue_all(store, settings, outputs)
    with store.session() as s:  # a row of a destination removed since
        s.add(dispatch.Delivery(output_id=outputs[0].id, destination="gone", state="orphaned"))
    client = TestClient(create_app(settings, store, lambda: {"database": True, "model": True, "scp": False}))
    headers = {"Authorization": f"Bearer {token}"}
    uid = study_uid(store)
    detail = client.get(f"/api/studies/{uid}", headers=headers).json()
    by_dest = {(d["destination"], d["address"], d["configured"]) for d in detail["deliveries"]}
    assert by_dest == {
        ("pacs", "PACS@127.0.0.1:4100", True),
        ("web", "https://pacs.example/dw", True),
        ("gone", "", False),
    }
    page = client.get(f"/studies/{uid}", headers=headers).text
    assert page.count("PACS@127.0.0.1:4100") == 2 and page.count("https://pacs.example/dw") == 2
    assert "not configured" in page
    listed = client.get("/api/outbox", params={"destination": "pacs"}, headers=headers).json()
    assert {(d["ae_title"], d["host"], d["port"]) for d in listed} == {("PACS", "127.0.0.1", 4100)}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def blank_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database not migrated yet: a new SQLite file, or a new PostgreSQL database."""
    yield f"sqlite:///{tmp_path / 'old.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def downgrade(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(dispatch.__file__).parents[1] / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    command.downgrade(cfg, revision)


def raw_insert(conn: sa.Connection, name: str, **values: Any) -> None:
    """Insert a row by column name, the way the schema of that revision has it (no ORM model involved)."""
    cols = [sa.column(k, UTCDateTime() if isinstance(v, dt.datetime) else None) for k, v in values.items()]
    conn.execute(sa.insert(sa.table(name, *cols)).values(**values))


def test_migration_0009_keeps_pinned_rows_and_sends_them_by_name(
    blank_url: str, tmp_path: Path, written: tuple[Path, list[WrittenOutput]]
) -> None:
    """A 0004 database with rows pinned to a wrong port: after 0009 they go to the configured address and
    the row of a destination removed since is orphaned; down to 0004 again, the address columns are
    back and the orphaned row reads as failed; up again works."""
    root, outs = written
    shutil.copytree(root / "outputs", tmp_path / "var" / "outputs")
    upgrade(blank_url, "0004")
    store = Store(blank_url)
    right, wrong = PickySCP(sop_classes=BOTH), PickySCP(sop_classes=BOTH)
    try:
        now = utcnow()
        with store.engine.begin() as c:
            raw_insert(
                c,
                "study",
                id=1,
                study_instance_uid="1.2.826.0.1.3680043.10.511.9",
                patient_id="P",
                patient_name="",
                accession_number="",
                study_date="",
                study_description="",
                modalities="",
                calling_aet="",
                first_received_at=now,
                last_received_at=now,
                num_instances=1,
                ignored=False,
            )
            for i, w in enumerate(outs, 1):
                raw_insert(
                    c,
                    "output",
                    id=i,
                    study_id=1,
                    kind=w.kind,
                    label=w.label,
                    sop_class_uid=w.sop_class_uid,
                    sop_instance_uid=w.sop_instance_uid,
                    series_instance_uid=w.series_instance_uid,
                    model_name="",
                    model_version="",
                    file_path=str(w.path.relative_to(root)),
                    summary="",
                    created_at=now,
                )
                raw_insert(
                    c,
                    "delivery",
                    id=i,
                    output_id=i,
                    destination=["pacs", "old-archive"][i - 1],
                    ae_title="PACS",
                    host="127.0.0.1",
                    port=wrong.port,  # pinned when queued
                    state="pending",
                    attempts=3,
                    next_attempt_at=now,
                    last_error="cannot connect",
                    created_at=now,
                )
        upgrade(blank_url)
        assert {"ae_title", "host", "port"}.isdisjoint(
            c["name"] for c in sa.inspect(store.engine).get_columns("delivery")
        )
        assert dispatch.send_due(store, settings_for(store, tmp_path, right.port)) == 1
        assert right.received == [outs[0].sop_instance_uid] and wrong.received == []
        assert [(d.destination, d.state) for d in deliveries(store)] == [("pacs", "sent"), ("old-archive", "orphaned")]

        downgrade(blank_url, "0004")
        with store.engine.connect() as c:
            rows = c.execute(sa.text("SELECT state, ae_title, host, port FROM delivery ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [("sent", "", "", 0), ("failed", "", "", 0)]
        upgrade(blank_url)
        assert [d.state for d in deliveries(store)] == ["sent", "failed"]
    finally:
        right.stop()
        wrong.stop()
        store.dispose()
