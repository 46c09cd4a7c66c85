"""The store: SQLAlchemy 2 models of everything the node knows, and the session factory.

The schema is made only by the Alembic migrations in dxnode/migrations/ (``dxnode db upgrade``;
``serve`` upgrades on start). SQLite runs in WAL mode with a busy timeout; the same code runs on
PostgreSQL. Times are stored as timezone-aware UTC.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
    insert,
    select,
)
from sqlalchemy import (
    Enum as SAEnum,
)
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeDecorator

from dxnode.states import (
    DeliveryState,
    Hl7ResultKind,
    InstanceState,
    JobState,
    OrderState,
    OutputKind,
    Priority,
    RequestState,
    UpsState,
)

if TYPE_CHECKING:
    from dxnode.config import Settings

log = logging.getLogger(__name__)


def state_column(states: type[StrEnum], length: int) -> SAEnum:
    """A column holding one of states' values as plain text (VARCHAR(length), no CHECK, no database
    enum type), so databases made before it load unchanged; rows come back as enum members."""
    return SAEnum(
        states,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=False,  # a query for an unknown state finds nothing, as it did with plain text
    )


def utcnow() -> dt.datetime:
    """Timezone-aware current UTC time."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A DateTime that always comes back timezone-aware UTC (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of all dxnode tables."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Study(Base):
    """A DICOM study as received; one row per Study Instance UID."""

    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")  # DICOM DA, YYYYMMDD
    study_description: Mapped[str] = mapped_column(String(64), default="")
    modalities: Mapped[str] = mapped_column(String(128), default="")  # backslash-separated, sorted
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    # last_received_at of the instances covered by the newest job; a later instance re-queues.
    queued_through: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    ignored: Mapped[bool] = mapped_column(Boolean, default=False)
    # Retention (dxnode/lifecycle/): when its received instances were purged; results being removed.
    purged_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    expiring: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete-orphan")


class Series(Base):
    """A series of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    """A stored SOP instance: one file under the data dir."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    file_path: Mapped[str] = mapped_column(String(1024))  # relative to the data dir
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)  # later sends of the same UID
    # Set in the transaction that starts its purge; the row goes only after its file (dxnode/lifecycle/).
    purging: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), index=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One run of the pipeline over a study (queued again when the study changes)."""

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_state_created", "state", "created_at"),
        Index("ix_job_study_routed_model", "study_id", "routed_model"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(state_column(JobState, 16), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    log: Mapped[str] = mapped_column(Text, default="")  # human-readable lines of what the job did
    worker: Mapped[str] = mapped_column(String(128), default="")  # host:pid that claimed it
    model_name: Mapped[str] = mapped_column(String(128), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    # seconds per stage of the last attempt: decode, decode_wait, model, cam, sr, sc, write, queued_to_done
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    # The [[models]] entry this job runs ("" for the single [model] section); see dxnode/worklist/routing.py.
    routed_model: Mapped[str] = mapped_column(String(64), default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Refreshed by the running worker between stages and batches; stale means its worker is gone.
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    stage: Mapped[str] = mapped_column(String(32), default="")  # last stage the running job reached
    not_before: Mapped[dt.datetime | None] = mapped_column(nullable=True)  # retry backoff: not claimed before
    lost: Mapped[int] = mapped_column(Integer, default=0)  # times its worker stopped while running it
    supervisor: Mapped[str] = mapped_column(String(128), default="")  # host:pid that started its worker
    # STAT first, then the oldest (worklist.queue.claim); the outbox sends a STAT job's outputs first too.
    priority: Mapped[Priority] = mapped_column(
        state_column(Priority, 8), default=Priority.MEDIUM, server_default="MEDIUM"
    )
    # [[destinations]] names its outputs go to (a fetch request's); [] = as configured (outbox.dispatch.enqueue)
    destinations: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default="[]")
    # the output kinds its run was asked to write ([] before it wrote any); see sources/fetch.deliver_also
    kinds: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default="[]")

    study: Mapped[Study] = relationship(back_populates="jobs")
    findings: Mapped[list[FindingRow]] = relationship(back_populates="job", cascade="all, delete-orphan")
    instance_results: Mapped[list[InstanceResult]] = relationship(back_populates="job", cascade="all, delete-orphan")


class InstanceResult(Base):
    """What the pipeline did with one instance in one job: done, skipped or failed, and why."""

    __tablename__ = "instance_result"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[InstanceState] = mapped_column(state_column(InstanceState, 16))
    reason: Mapped[str] = mapped_column(Text, default="")
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    job: Mapped[Job] = relationship(back_populates="instance_results")


class FindingRow(Base):
    """A study-level probability for one label from one job (table ``finding``)."""

    __tablename__ = "finding"
    __table_args__ = (Index("ix_finding_label_prob", "label", "probability"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(128))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    rank: Mapped[int] = mapped_column(Integer, default=0)  # 0 = most probable
    source_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    source_frame: Mapped[int] = mapped_column(Integer, default=0)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(64), default="")
    model_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)

    job: Mapped[Job] = relationship(back_populates="findings")


class Output(Base):
    """A DICOM object dxnode wrote (SR or heatmap SC), kept on disk before it is sent."""

    __tablename__ = "output"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id", ondelete="SET NULL"), nullable=True, index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    kind: Mapped[OutputKind] = mapped_column(state_column(OutputKind, 8))
    label: Mapped[str] = mapped_column(String(128), default="")  # the finding of an SC
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(128), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    file_path: Mapped[str] = mapped_column(String(1024))  # relative to the data dir
    summary: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="output", cascade="all, delete-orphan")


class Delivery(Base):
    """An outbox row: one output to one destination, with its retry state.

    The destination is referenced by its [[destinations]] name only: its address, AE title, TLS and
    auth are read from the configuration in force when the row is sent (migration 0009 dropped the
    address columns that used to pin it when queued).
    """

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("output_id", "destination", name="uq_delivery_output_destination"),
        Index("ix_delivery_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("output.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))  # the [[destinations]] name
    # pending, sent, committed, failed, cancelled or orphaned; last_error says why
    state: Mapped[DeliveryState] = mapped_column(state_column(DeliveryState, 16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    dimse_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # of the last STOW-RS attempt
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # The process (worklist.worker_id) holding the lease, refreshed while it sends; "" when not leased.
    leased_by: Mapped[str] = mapped_column(String(128), default="")
    lease_heartbeat_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # Storage Commitment (destination commitment = true, see outbox/commitment.py): the Transaction UID
    # of the request awaiting its report ("" when none), when it was asked, when the report committed it.
    commitment_uid: Mapped[str] = mapped_column(String(64), default="", server_default="", index=True)
    commitment_requested_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    committed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)

    output: Mapped[Output] = relationship(back_populates="deliveries")


class FetchRequest(Base):
    """A request to fetch studies from a [[sources]] entry and analyse them (table ``request``).

    Made by `dxnode fetch`, POST /api/requests or an order; carried out by its source's fetcher
    (dxnode/sources/requests.py), retried after a backoff, and linked to the jobs it queued."""

    __tablename__ = "request"
    __table_args__ = (Index("ix_request_state_source", "state", "source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64))  # the [[sources]] name
    # study_instance_uid, accession_number, patient_id, modality, since (schemas.Identifiers)
    identifiers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    model: Mapped[str] = mapped_column(String(64), default="")  # a [[models]] name; "" routes as usual
    destinations: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [[destinations]] names; [] = as usual
    priority: Mapped[Priority] = mapped_column(state_column(Priority, 8), default=Priority.MEDIUM)
    state: Mapped[RequestState] = mapped_column(state_column(RequestState, 16), default=RequestState.PENDING)
    total: Mapped[int] = mapped_column(Integer, default=0)  # instances the source reported
    retrieved: Mapped[int] = mapped_column(Integer, default=0)  # instances retrieved so far
    studies: Mapped[list[Any]] = mapped_column(JSON, default=list)  # Study Instance UIDs found
    job_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)  # the jobs it queued
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime | None] = mapped_column(nullable=True)  # retry backoff
    wait_until: Mapped[dt.datetime | None] = mapped_column(nullable=True)  # keep looking for the study until then
    error: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(128), default="")  # token name, "cli", an order's sender
    worker: Mapped[str] = mapped_column(String(128), default="")  # host:pid carrying it out
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class Audit(Base):
    """Who did what, when, from where: receptions, state changes, admin actions, reads of PHI."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # AE title, token name, "system"
    action: Mapped[str] = mapped_column(String(64))  # e.g. "instance.received", "job.state"
    target: Mapped[str] = mapped_column(String(256), default="")
    source: Mapped[str] = mapped_column(String(128), default="")  # peer address
    detail: Mapped[str] = mapped_column(Text, default="")


class WebSession(Base):
    """A web login: the cookie carries the key, the table keeps its hash; logout deletes the row."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the cookie's session key
    token_name: Mapped[str] = mapped_column(String(128))
    token_digest: Mapped[str] = mapped_column(String(64))  # ends the session when the token is revoked
    source: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)


class Hl7Order(Base):
    """An HL7 order (ORM^O01, OMI^O23) a [[hl7.rules]] entry matched: a fetch by accession number."""

    __tablename__ = "hl7_order"
    __table_args__ = (UniqueConstraint("source", "accession_number", name="uq_hl7_order_source_accession"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64))  # the [[sources]] name
    accession_number: Mapped[str] = mapped_column(String(64), index=True)
    priority: Mapped[Priority] = mapped_column(state_column(Priority, 8), default=Priority.MEDIUM)
    wait_minutes: Mapped[float] = mapped_column(Float)
    state: Mapped[OrderState] = mapped_column(state_column(OrderState, 16), default=OrderState.PENDING)
    rule: Mapped[str] = mapped_column(String(64), default="")
    placer_order: Mapped[str] = mapped_column(String(64), default="")  # ORC-2
    filler_order: Mapped[str] = mapped_column(String(64), default="")  # ORC-3
    procedure_code: Mapped[str] = mapped_column(String(64), default="")  # OBR-4.1
    procedure_text: Mapped[str] = mapped_column(String(128), default="")  # OBR-4.2
    modality: Mapped[str] = mapped_column(String(16), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")  # PID-3.1
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")  # IPC-3, when the order has one
    sender: Mapped[str] = mapped_column(String(128), default="")  # MSH-3^MSH-4
    control_id: Mapped[str] = mapped_column(String(64), default="")  # MSH-10 of the last message about it
    detail: Mapped[str] = mapped_column(Text, default="")  # why it is still pending, or what the fetch stage said
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    ack_code: Mapped[str] = mapped_column(String(2), default="", server_default="")  # MSA-1 of the last ACK
    request_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the fetch request it made


class Hl7Result(Base):
    """An HL7 outbox row: one job's findings to one [[hl7.destinations]] entry (ORU^R01 or FHIR), with retries."""

    __tablename__ = "hl7_result"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", name="uq_hl7_result_job_destination"),
        Index("ix_hl7_result_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    order_id: Mapped[int | None] = mapped_column(ForeignKey("hl7_order.id", ondelete="SET NULL"), nullable=True)
    destination: Mapped[str] = mapped_column(String(64))  # the [[hl7.destinations]] name
    kind: Mapped[Hl7ResultKind] = mapped_column(state_column(Hl7ResultKind, 8))
    state: Mapped[DeliveryState] = mapped_column(state_column(DeliveryState, 16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    control_id: Mapped[str] = mapped_column(String(64), default="")  # MSH-10 of the ORU (the same on every try)
    ack_code: Mapped[str] = mapped_column(String(2), default="")  # MSA-1 of the last answer (mllp)
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # of the last POST (fhir)
    leased_by: Mapped[str] = mapped_column(String(128), default="")  # the process sending it now
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class UpsWorkitem(Base):
    """A Task Manager's UPS workitem the node claimed, or tried to ([[ups]], dxnode/sources/ups.py).

    The Transaction UID is kept here before the claim is sent, so a restarted node goes on as its owner."""

    __tablename__ = "ups_workitem"
    __table_args__ = (UniqueConstraint("ups", "workitem_uid", name="uq_ups_workitem_ups_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ups: Mapped[str] = mapped_column(String(64))  # the [[ups]] name
    workitem_uid: Mapped[str] = mapped_column(String(64))  # its SOP Instance UID
    transaction_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[UpsState] = mapped_column(state_column(UpsState, 16), default=UpsState.CLAIMING, index=True)
    priority: Mapped[Priority] = mapped_column(state_column(Priority, 8), default=Priority.MEDIUM)
    label: Mapped[str] = mapped_column(String(128), default="")  # Procedure Step Label
    # [[study UID, [[sources]] name], ...] read from the Input Information Sequence
    inputs: Mapped[list[Any]] = mapped_column(JSON, default=list)
    workitem_code: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [value, scheme, meaning] scheduled
    request_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)  # the fetch requests made for its inputs
    progress: Mapped[int] = mapped_column(Integer, default=0)  # the last Procedure Step Progress reported
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)  # a UPS Cancel Requested event came
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the last refusing DIMSE status
    detail: Mapped[str] = mapped_column(Text, default="")  # why it was refused, cancelled or is gone
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UpsSubscription(Base):
    """An AE subscribed to the UPS event reports of one job's workitem, or of all (job_id NULL: global)."""

    __tablename__ = "ups_subscription"
    __table_args__ = (Index("ix_ups_subscription_ae_job", "ae_title", "job_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16))  # a [[ups_watch.subscribers]] AE title
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), nullable=True, index=True)
    deletion_lock: Mapped[bool] = mapped_column(Boolean, default=False)  # asked for; recorded, never enforced
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class UpsEvent(Base):
    """A UPS State Report owed to one subscriber: one job's workitem entered ups_state (sent in id order)."""

    __tablename__ = "ups_event"
    __table_args__ = (Index("ix_ups_event_state_ae", "state", "ae_title"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    ups_state: Mapped[str] = mapped_column(String(16))  # SCHEDULED, IN PROGRESS, COMPLETED, CANCELED
    reason: Mapped[str] = mapped_column(Text, default="")  # why it was canceled
    state: Mapped[DeliveryState] = mapped_column(state_column(DeliveryState, 16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


def audit_values(actor: str, action: str, target: str = "", source: str = "", **detail: Any) -> dict[str, Any]:
    """The columns of one audit row (the only place audit rows are shaped)."""
    return {
        "at": utcnow(),
        "actor": actor,
        "action": action,
        "target": target,
        "source": source,
        "detail": json.dumps(detail, default=str) if detail else "",
    }


def audit(session: Session, actor: str, action: str, target: str = "", source: str = "", **detail: Any) -> None:
    """Add an audit row to the session (committed with the caller's transaction)."""
    session.add(Audit(**audit_values(actor, action, target, source, **detail)))


def audit_core(conn: Connection, actor: str, action: str, target: str = "", source: str = "", **detail: Any) -> None:
    """Insert an audit row on a Core connection (the receiver's hot path uses no ORM session)."""
    conn.execute(INSERT_AUDIT, audit_values(actor, action, target, source, **detail))


INSERT_AUDIT = insert(Audit)  # one statement, its values as parameters: compiled once, not per row


def make_engine(url: str, busy_timeout_s: float = 30, echo: bool = False) -> Engine:
    """Create an engine; for SQLite: WAL, busy timeout, foreign keys, parent folder created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            assert isinstance(dbapi_conn, sqlite3.Connection)
            # Let SQLAlchemy issue BEGIN itself so BEGIN IMMEDIATE works (pysqlite quirk).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Take the write lock up front: no deadlock-prone read->write upgrades between processes.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


class Store:
    """The engine and session factory of one database."""

    def __init__(self, url: str, busy_timeout_s: float = 30, echo: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_s, echo)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.shown_url = make_url(url).render_as_string(hide_password=True)
        self._ping_failure: str | None = None  # the last reason ping() logged, None while it answers

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def ping(self) -> bool:
        """True when the database answers; the reason it does not is logged once per change."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
        except (SQLAlchemyError, OSError) as exc:
            text = str(getattr(exc, "orig", None) or exc).strip()
            reason = text.splitlines()[0] if text else type(exc).__name__
            if reason != self._ping_failure:
                log.warning("database %s does not answer: %s", self.shown_url, reason)
                self._ping_failure = reason
            return False
        if self._ping_failure is not None:
            log.info("database %s answers again", self.shown_url)
            self._ping_failure = None
        return True

    def dispose(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()


class DatabaseUnavailable(Exception):
    """The configured database is missing (and this command does not create one) or does not answer."""


def sqlite_file(url: str) -> Path | None:
    """The absolute file of a SQLite URL (relative to the working directory), None for other databases."""
    parsed = make_url(url)
    name = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name).expanduser().resolve()


def open_store(settings: Settings, migrate: bool = True, create: bool = True) -> Store:
    """The node's database as the CLI and the daemon open it, migrations applied.

    create (serve, worker, db upgrade): the data dir and a new SQLite file are made if missing.
    Otherwise a missing SQLite file is refused (DatabaseUnavailable naming its path) rather than
    created empty in whatever folder the command ran from; an unreachable server is refused too.
    """

    db = settings.database
    path = sqlite_file(db.url)
    if not create and path is not None and not path.is_file():
        raise DatabaseUnavailable(f"no database at {path}: run `dxnode db upgrade` or `dxnode serve` first")
    if create:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if migrate:
            upgrade(db.url)
        store = Store(db.url, db.busy_timeout_s, db.echo)
        if not migrate:
            with store.engine.connect():
                pass
    except OperationalError as exc:
        text = str(exc.orig or exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        shown = make_url(db.url).render_as_string(hide_password=True)
        raise DatabaseUnavailable(f"cannot open the database {shown}: {reason}") from exc
    return store


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations to the database at url (the only way the schema is made)."""
    # start-up time: alembic loads only when this runs
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(importlib.resources.files("dxnode.migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, revision)


def current_revision(store: Store) -> str | None:
    """The Alembic revision the database is at, or None if it was never migrated."""
    # start-up time: alembic loads only when this runs
    from alembic.runtime.migration import MigrationContext

    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
