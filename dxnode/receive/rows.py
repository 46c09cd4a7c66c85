"""The study and series rows of a received instance: created on its first instance, filled and
counted by the next (ingest.py runs them in the commit's transaction)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Dialect, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert, Update

from dxnode.receive.parse import Received
from dxnode.store import INSERT_AUDIT, Instance, Series, Study, utcnow

_STUDY_TEXT = ("patient_id", "patient_name", "accession_number", "study_date", "study_description")
BUMP_STUDY = (
    update(Study)
    .where(Study.id == bindparam("b_id"))
    .values(num_instances=Study.num_instances + 1, calling_aet=bindparam("b_aet"), last_received_at=bindparam("b_now"))
)
INSERT_INSTANCE = insert(Instance).returning(Instance.id)


class Statements(Protocol):
    """The receive path's three statements of every instance, in the caller's transaction."""

    def bump(self, conn: Connection, params: dict[str, Any]) -> int:
        """BUMP_STUDY; the rows it changed."""
        ...

    def insert_instance(self, conn: Connection, params: dict[str, Any]) -> int:
        """INSERT_INSTANCE; the new row's id."""
        ...

    def audit(self, conn: Connection, values: dict[str, Any]) -> None:
        """The audit row (store.audit_values)."""
        ...


class CoreStatements:
    """The statements through SQLAlchemy Core (PostgreSQL, and SQLite with echo on)."""

    def bump(self, conn: Connection, params: dict[str, Any]) -> int:
        return int(conn.execute(BUMP_STUDY, params).rowcount)

    def insert_instance(self, conn: Connection, params: dict[str, Any]) -> int:
        return int(conn.execute(INSERT_INSTANCE, params).scalar_one())

    def audit(self, conn: Connection, values: dict[str, Any]) -> None:
        conn.execute(INSERT_AUDIT, values)


class _Compiled:
    """A Core statement compiled for a dialect (once per set of keys the caller gives), run on the
    DBAPI cursor of the caller's connection."""

    def __init__(self, stmt: Insert | Update, dialect: Dialect) -> None:
        self._stmt, self._dialect = stmt, dialect
        # keys given -> (SQL, per placeholder: the caller's key or None, the fixed value otherwise, the type's bind processor)
        self._forms: dict[tuple[str, ...], tuple[str, list[tuple[str | None, Any, Any]]]] = {}

    def _form(self, keys: tuple[str, ...]) -> tuple[str, list[tuple[str | None, Any, Any]]]:
        dialect = self._dialect
        compiled = self._stmt.compile(dialect=dialect, column_keys=list(keys))
        sql = str(compiled)
        binds: list[tuple[str | None, Any, Any]] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)  # as Core: the dialect's own type
            if name in keys:
                binds.append((name, None, processor))
            elif bind.value is not None:  # a literal of the statement (the + 1 of BUMP_STUDY)
                binds.append((None, bind.value, processor))
            else:  # a column default Core would fill in (Instance.purging)
                default = self._stmt.table.c[name].default
                if default is None or not default.is_scalar:
                    raise ValueError(f"{name}: no scalar default to run {sql!r} without Core")
                binds.append((None, default.arg, processor))
        return sql, binds

    def run(self, conn: Connection, params: dict[str, Any]) -> sqlite3.Cursor:
        """The statement on conn's DBAPI connection, inside its transaction; errors as SQLAlchemy's."""
        keys = tuple(params)
        form = self._forms.get(keys)
        if form is None:
            form = self._forms[keys] = self._form(keys)
        sql, binds = form
        values = []
        for key, fixed, processor in binds:
            value = params[key] if key is not None else fixed
            values.append(processor(value) if processor is not None else value)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            return cursor.execute(sql, values)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(sql, values, exc, sqlite3.Error) from exc


class SQLiteStatements:
    """The statements compiled once for SQLite and run on its own cursor: the same SQL, bind processing
    (each column's type) and errors (as SQLAlchemy's, so IntegrityError still means a lost race) as
    Core, without Core's work per execution (0.07 ms of CPU per instance where Core took 0.25 ms:
    docs/benchmarks.md). No SQL is logged this way: with [database] echo, Core runs them."""

    def __init__(self, dialect: Dialect) -> None:
        self._bump = _Compiled(BUMP_STUDY, dialect)
        self._insert = _Compiled(INSERT_INSTANCE, dialect)
        self._audit = _Compiled(INSERT_AUDIT, dialect)

    def bump(self, conn: Connection, params: dict[str, Any]) -> int:
        return int(self._bump.run(conn, params).rowcount)

    def insert_instance(self, conn: Connection, params: dict[str, Any]) -> int:
        row = self._insert.run(conn, params).fetchone()
        assert row is not None  # RETURNING gives the row or the insert raised
        return int(row[0])

    def audit(self, conn: Connection, values: dict[str, Any]) -> None:
        self._audit.run(conn, values)


def statements(dialect: Dialect, echo: bool) -> Statements:
    """SQLiteStatements where the database is SQLite and its SQL is not logged, else Core's."""
    return SQLiteStatements(dialect) if dialect.name == "sqlite" and not echo else CoreStatements()


@dataclass(frozen=True)
class Arrival:
    """A received instance on its way in: its file, written as tmp, to be renamed to path, and what its
    rows record (ingest.py commits it; with several receiving processes it travels to the commit process)."""

    tmp: Path
    path: Path
    rec: Received
    rel: Path  # path, relative to the data dir: the row's file_path
    size: int
    sha256: str
    calling_aet: str
    address: str
    actor: str | None  # who stored it, where not the calling AE (STOW-RS: the token's name)


@dataclass(frozen=True)
class SeenSeries:
    """Study and series rows as a committed transaction left them (text fields only ever get filled)."""

    study_id: int
    series_id: int
    filled: frozenset[str]  # study text attributes that are not empty
    modalities: frozenset[str]

    def covers(self, rec: Received) -> bool:
        """True when rec would change nothing in the study row but its counter, sender and time."""
        return (not rec.modality or rec.modality in self.modalities) and all(
            attr in self.filled or not getattr(rec, attr) for attr in _STUDY_TEXT
        )


def upsert_study(conn: Connection, rec: Received, calling_aet: str) -> tuple[int, frozenset[str], frozenset[str]]:
    """Create or update the study row; returns its id, its non-empty text attributes and modalities."""
    now = utcnow()
    row = conn.execute(
        select(
            Study.id,
            Study.modalities,
            Study.patient_id,
            Study.patient_name,
            Study.accession_number,
            Study.study_date,
            Study.study_description,
        ).where(Study.study_instance_uid == rec.study_instance_uid)
    ).first()
    values: dict[str, Any] = {"calling_aet": calling_aet, "last_received_at": now}
    if row is None:
        filled = frozenset(attr for attr in _STUDY_TEXT if getattr(rec, attr))
        study_id = int(
            conn.execute(
                insert(Study)
                .values(
                    study_instance_uid=rec.study_instance_uid,
                    patient_id=rec.patient_id,
                    patient_name=rec.patient_name,
                    accession_number=rec.accession_number,
                    study_date=rec.study_date,
                    study_description=rec.study_description,
                    modalities=rec.modality,
                    first_received_at=now,
                    num_instances=1,
                    ignored=False,
                    **values,
                )
                .returning(Study.id)
            ).scalar_one()
        )
        return study_id, filled, frozenset(filter(None, [rec.modality]))
    for attr in _STUDY_TEXT:
        if getattr(rec, attr) and not getattr(row, attr):
            values[attr] = getattr(rec, attr)
    mods = set(filter(None, (row.modalities or "").split("\\")))
    if rec.modality and rec.modality not in mods:
        values["modalities"] = "\\".join(sorted(mods | {rec.modality}))[:128]
        mods = set(filter(None, values["modalities"].split("\\")))
    conn.execute(update(Study).where(Study.id == row.id).values(num_instances=Study.num_instances + 1, **values))
    filled = frozenset(attr for attr in _STUDY_TEXT if getattr(row, attr) or attr in values)
    return int(row.id), filled, frozenset(mods)


def upsert_series(conn: Connection, study_id: int, rec: Received) -> int:
    """The series row's id, created on its first instance."""
    series_id = conn.execute(select(Series.id).where(Series.series_instance_uid == rec.series_instance_uid)).scalar()
    if series_id is not None:
        return int(series_id)
    return int(
        conn.execute(
            insert(Series)
            .values(
                study_id=study_id,
                series_instance_uid=rec.series_instance_uid,
                modality=rec.modality,
                body_part_examined=rec.body_part_examined,
                series_number=rec.series_number,
                series_description=rec.series_description,
            )
            .returning(Series.id)
        ).scalar_one()
    )
