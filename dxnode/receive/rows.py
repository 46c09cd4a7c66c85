"""The study and series rows of a received instance: created on its first instance, filled and
counted by the next (ingest.py runs them in the commit's transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from dxnode.receive.parse import Received
from dxnode.store import Instance, Series, Study, utcnow

_STUDY_TEXT = ("patient_id", "patient_name", "accession_number", "study_date", "study_description")
BUMP_STUDY = (
    update(Study)
    .where(Study.id == bindparam("b_id"))
    .values(num_instances=Study.num_instances + 1, calling_aet=bindparam("b_aet"), last_received_at=bindparam("b_now"))
)
INSERT_INSTANCE = insert(Instance).returning(Instance.id)


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
