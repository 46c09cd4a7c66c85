"""The store's readiness check: a boolean for /readyz, the reason logged once per change."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import free_port

from dxnode.store import Store, upgrade


def test_ping_logs_why_the_database_does_not_answer_once_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    down = Store(f"postgresql+psycopg://dxnode:pg-password@127.0.0.1:{free_port()}/dxnode")
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    up = Store(url)
    try:
        with caplog.at_level(logging.INFO, logger="dxnode.store"):
            assert [down.ping(), down.ping(), down.ping()] == [False, False, False]
            assert up.ping() and up.ping()
        lines = [r.getMessage() for r in caplog.records if r.name == "dxnode.store"]
        assert len(lines) == 1, lines
        assert "does not answer" in lines[0] and "127.0.0.1" in lines[0] and "pg-password" not in lines[0]
        assert "refused" in lines[0].lower() or "connect" in lines[0].lower(), lines[0]
    finally:
        down.dispose()
        up.dispose()


@pytest.mark.postgres
def test_ping_logs_when_the_database_answers_again(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A database dropped while the node runs, then made again: one line each way."""
    import sqlalchemy
    from conftest import PG_ADMIN_URL

    name = pg_url.rsplit("/", 1)[1]
    store = Store(pg_url)
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with caplog.at_level(logging.INFO, logger="dxnode.store"):
            assert store.ping()
            store.dispose()
            with admin.connect() as c:
                c.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            assert not store.ping() and not store.ping()
            with admin.connect() as c:
                c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
            assert store.ping() and store.ping()
        lines = [r.getMessage() for r in caplog.records if r.name == "dxnode.store"]
        assert len(lines) == 2 and "does not answer" in lines[0] and name in lines[0], lines
        assert "answers again" in lines[1], lines
    finally:
        store.dispose()
        admin.dispose()


def test_state_columns_are_plain_text_and_load_stored_strings_as_enum_members(store: Store) -> None:
    """Rows written as text (by an older dxnode, or raw SQL) come back as the enums; the columns stay
    VARCHAR without a CHECK or a database enum type, so existing databases need no migration."""
    import sqlalchemy as sa

    from dxnode.states import DeliveryState, InstanceState, JobState, OutputKind
    from dxnode.store import Delivery, InstanceResult, Job, Output, Study

    with store.session() as s:
        study = Study(study_instance_uid="1.2.3.4")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id)
        s.add(job)
        s.flush()
        assert job.state is JobState.QUEUED
        s.add(
            Output(
                study_id=study.id,
                kind=OutputKind.SR,
                sop_class_uid="1.2",
                sop_instance_uid="1.2.5",
                series_instance_uid="1.2.6",
                file_path="x.dcm",
            )
        )
        ids = study.id, job.id
    with store.engine.begin() as c:
        c.execute(sa.text("UPDATE job SET state = 'done' WHERE id = :j"), {"j": ids[1]})
        c.execute(
            sa.text(
                "INSERT INTO instance_result (job_id, sop_instance_uid, state, reason, probabilities)"
                " VALUES (:j, '1.2.7', 'skipped', 'small', '{}')"
            ),
            {"j": ids[1]},
        )
        out_id = c.execute(sa.text("SELECT id FROM output")).scalar_one()
        c.execute(
            sa.text(
                "INSERT INTO delivery (output_id, destination, state, attempts, next_attempt_at, last_error,"
                " created_at, leased_by) VALUES (:o, 'pacs', 'orphaned', 0, :t, '', :t, '')"
            ),
            {"o": out_id, "t": "2026-01-01 00:00:00"},
        )
        assert c.execute(sa.text("SELECT state FROM job")).scalar_one() == "done"  # text in the database
    with store.session() as s:
        assert s.get(Job, ids[1]).state is JobState.DONE  # type: ignore[union-attr]
        assert s.scalars(sa.select(InstanceResult.state)).one() is InstanceState.SKIPPED
        assert s.scalars(sa.select(Output.kind)).one() is OutputKind.SR
        assert s.scalars(sa.select(Delivery.state)).one() is DeliveryState.ORPHANED
        assert s.scalars(sa.select(Job.id).where(Job.state == "no-such-state")).all() == []
    columns = {c["name"]: c for c in sa.inspect(store.engine).get_columns("job")}
    assert isinstance(columns["state"]["type"], sa.String) and columns["state"]["type"].length == 16
