"""Which studies are finished, and so may be purged: the oldest first.

Finished: no queued or running job; every delivery of its outputs delivered (``sent``, or
``committed`` for a destination with Storage Commitment) or cancelled by an admin; covered by a job
since its last instance, or ignored; quiet for its stable-study time and not busy in the receiver.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from dxnode.config import Settings
from dxnode.states import JobState
from dxnode.store import Delivery, Instance, Job, Output, Study
from dxnode.worklist.queue import stable_after

# "committed" by value: the state Storage Commitment adds (a result the PACS has taken custody of).
DELIVERED = ("sent", "committed")
SETTLED = (*DELIVERED, "cancelled")  # cancelled: an admin chose never to send it


@dataclass(frozen=True)
class Candidate:
    """A finished study: when it finished, and what its received instances hold on disk."""

    study_id: int
    study_uid: str
    finished_at: dt.datetime  # its last event: last instance, job end or delivery
    instances: int
    stored_bytes: int


def _undelivered(settings: Settings) -> ColumnElement[bool]:
    """A delivery of the study's outputs that is not yet delivered (or cancelled)."""
    waiting: ColumnElement[bool] = Delivery.state.not_in(SETTLED)
    # A destination that asks for Storage Commitment has its results delivered once committed, not sent.
    committing = [d.name for d in settings.destinations if getattr(d, "commitment", False)]
    if committing:
        waiting = or_(waiting, and_(Delivery.destination.in_(committing), Delivery.state == "sent"))
    return exists().where(Output.study_id == Study.id, Delivery.output_id == Output.id, waiting)


def finished_studies(
    session: Session,
    settings: Settings,
    now: dt.datetime,
    busy: Collection[str] = (),
    study_ids: Collection[int] | None = None,
    lock: bool = False,
) -> list[Candidate]:
    """The finished studies (or those of study_ids), oldest finished first.

    busy: study UIDs the receiver is storing into (its Activity). lock: take the study rows' lock
    (PostgreSQL) so that no job is queued for them before this transaction ends."""
    kept = (Instance.study_id == Study.id, Instance.purging.is_(False))
    active = exists().where(Job.study_id == Study.id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
    shortest = min([settings.worklist.stable_seconds, *settings.worklist.stable_seconds_by_aet.values()])
    q = (
        select(
            Study.id,
            Study.study_instance_uid,
            Study.calling_aet,
            Study.last_received_at,
            select(func.max(Job.finished_at)).where(Job.study_id == Study.id).scalar_subquery(),
            select(func.max(Delivery.sent_at))
            .join(Output, Output.id == Delivery.output_id)
            .where(Output.study_id == Study.id)
            .scalar_subquery(),
            select(func.count(Instance.id)).where(*kept).scalar_subquery(),
            select(func.coalesce(func.sum(Instance.size_bytes), 0)).where(*kept).scalar_subquery(),
        )
        .where(~active, ~_undelivered(settings), Study.expiring.is_(False))
        .where(or_(Study.ignored.is_(True), Study.queued_through >= Study.last_received_at))
        .where(Study.last_received_at <= now - dt.timedelta(seconds=shortest))
    )
    if study_ids is not None:
        q = q.where(Study.id.in_(list(study_ids)))
    if lock and session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(of=Study)
    found: list[Candidate] = []
    for sid, uid, aet, last, job_end, sent, count, size in session.execute(q).all():
        if uid in busy or last > now - stable_after(settings, aet):
            continue
        finished = max(t for t in (last, job_end, sent) if t is not None)
        found.append(Candidate(sid, uid, finished, int(count), int(size)))
    found.sort(key=lambda c: (c.finished_at, c.study_id))
    return found


def stored_bytes(session: Session) -> int:
    """Bytes of the received instances kept (rows not being purged)."""
    return int(
        session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)).where(Instance.purging.is_(False))) or 0
    )
