"""Each received instance's three statements run on SQLite's own cursor (receive/rows.py,
SQLiteStatements): the same rows, the same errors, as SQLAlchemy Core writes them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.exc import IntegrityError

from dxnode.receive.parse import Received
from dxnode.receive.rows import CoreStatements, SQLiteStatements, Statements, statements, upsert_series, upsert_study
from dxnode.store import Audit, Instance, Store, Study, audit_values, upgrade

REC = Received(
    "1.2.840.10008.5.1.4.1.1.2", "1.2.3.1", "1.2.3.100", "1.2.3.200", "1.2.840.10008.1.2.1",
    "P1", "Doe^Jane", "A1", "20200101", "CT HEAD", "CT", "HEAD", 1, "axial", 1,
)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Store:
    url = f"sqlite:///{tmp_path / 'dxnode.db'}"
    upgrade(url)
    return Store(url)


def one_instance(store: Store, sql: Statements, sop: str, at: dt.datetime) -> int:
    """The three statements of one more instance of REC's series, in their own transaction."""
    with store.engine.begin() as conn:
        study_id = conn.execute(select(Study.id).where(Study.study_instance_uid == REC.study_instance_uid)).scalar_one()
        series_id = upsert_series(conn, study_id, REC)
        assert sql.bump(conn, {"b_id": study_id, "b_aet": "CT1", "b_now": at}) == 1
        params: dict[str, Any] = {
            "series_id": series_id,
            "study_id": study_id,
            "sop_class_uid": REC.sop_class_uid,
            "sop_instance_uid": sop,
            "transfer_syntax_uid": REC.transfer_syntax_uid,
            "instance_number": 7,
            "file_path": f"incoming/a/b/{sop}.dcm",
            "size_bytes": 5_000_000_000,  # past 32 bits
            "sha256": "ab" * 32,
            "calling_aet": "CT1",
            "received_at": at,
            "duplicates": 0,
        }
        instance_id = sql.insert_instance(conn, params)
        values = audit_values("CT1", "instance.received", f"instance:{instance_id}", "127.0.0.1", bytes=5)
        values["at"] = at
        sql.audit(conn, values)
        return instance_id


def test_sqlite_statements_write_what_core_writes(store: Store) -> None:
    with store.engine.begin() as conn:
        upsert_study(conn, REC, "CT1")
    at = dt.datetime(2026, 12, 7, 19, 30, 0, tzinfo=dt.UTC)  # microsecond 0: the stored text keeps its format
    core = one_instance(store, CoreStatements(), "1.2.3.11", at)
    raw = one_instance(store, SQLiteStatements(store.engine.dialect), "1.2.3.12", at)
    assert raw == core + 1
    with store.session() as s:
        rows = {i.id: i for i in s.scalars(select(Instance))}
        audits = {a.target: a for a in s.scalars(select(Audit))}
        study = s.scalars(select(Study)).one()
        columns = [c.key for c in Instance.__table__.columns if c.key not in ("id", "sop_instance_uid", "file_path")]
        assert {k: getattr(rows[raw], k) for k in columns} == {k: getattr(rows[core], k) for k in columns}
        assert rows[raw].received_at == at and rows[raw].purging is False and rows[raw].size_bytes == 5_000_000_000
        assert (audits[f"instance:{raw}"].at, audits[f"instance:{raw}"].detail) == (
            audits[f"instance:{core}"].at,
            audits[f"instance:{core}"].detail,
        )
        assert study.num_instances == 3 and study.last_received_at == at
    # the stored text itself, as Core wrote it (SQLite keeps datetimes as text)
    with store.engine.connect() as conn:
        texts = conn.exec_driver_sql("SELECT received_at FROM instance WHERE id IN (?, ?)", (core, raw)).scalars().all()
    assert texts[0] == texts[1]


def test_a_repeated_instance_is_sqlalchemys_integrity_error(store: Store) -> None:
    """ingest._commit retries on IntegrityError (a race lost on the unique key): raw errors keep that type."""
    with store.engine.begin() as conn:
        upsert_study(conn, REC, "CT1")
    sql = SQLiteStatements(store.engine.dialect)
    at = dt.datetime.now(dt.UTC)
    one_instance(store, sql, "1.2.3.13", at)
    with pytest.raises(IntegrityError):
        one_instance(store, sql, "1.2.3.13", at)
    with store.session() as s:
        assert len(s.scalars(select(Instance)).all()) == 1  # the failed transaction left nothing


def test_core_runs_them_where_sql_is_logged_or_the_database_is_not_sqlite() -> None:
    sqlite = create_engine("sqlite://").dialect
    postgres = create_engine("postgresql+psycopg://u:p@127.0.0.1/db").dialect
    assert isinstance(statements(sqlite, echo=False), SQLiteStatements)
    assert isinstance(statements(sqlite, echo=True), CoreStatements)
    assert isinstance(statements(postgres, echo=False), CoreStatements)
