"""DICOM reception: a pynetdicom SCP for C-ECHO and durable C-STORE.

Presentation contexts: the 128-context limit of PS3.8 applies to what one association *requests*;
as an acceptor the node may *support* any number, so it supports every storage SOP class
pynetdicom knows (``AllStoragePresentationContexts``) and a sender proposes the ones it needs.
For each proposed context pynetdicom accepts the first transfer syntax of *our* list that the
sender offers, so the list puts compressed syntaxes first: a sender proposes a compressed syntax
only for data already in it (Deflate included), and then never has to decompress or inflate.
Native syntaxes follow, Explicit VR Little Endian first. Nothing is transcoded on receipt.

Durability: an instance is written as received (file meta + encoded dataset, never decoded and
re-encoded) to a temporary name beside its final path, fsynced, renamed, the folder fsynced, its
rows committed, and only then acknowledged with 0x0000. Any failure gives 0xA700 (out of
resources: disk, file system, database) or 0xC000 (cannot understand: unparseable dataset or an
invalid UID) and a log line, so the sender retries or reports it. UIDs from the network are
validated before they name a file or folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import shutil
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dxnode import metrics
from dxnode.config import Settings
from dxnode.store import Instance, Series, Store, Study, audit, utcnow, write_durably
from dxnode.uids import is_valid_uid

log = logging.getLogger("dxnode.scp")

# Order matters: pynetdicom accepts the first of these that the sender proposes (see above).
TRANSFER_SYNTAXES = [
    JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1, JPEGLossless, RLELossless, HTJ2KLossless, HTJ2KLosslessRPCL,
    JPEG2000, JPEGLSNearLossless, JPEGBaseline8Bit, JPEGExtended12Bit, HTJ2K, DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
MAX_PDU = 262144  # bytes we accept per P-DATA PDU: fewer, larger PDUs for big images


class StoreRefused(Exception):
    """A C-STORE that must be answered with a failure status."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


@dataclass(frozen=True)
class Received:
    """The attributes of a received instance that the store keeps."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    study_description: str
    modality: str
    body_part_examined: str
    series_number: int | None
    series_description: str
    instance_number: int | None


def set_tcp_nodelay(server: Any) -> Any:
    """Make a pynetdicom server disable Nagle's algorithm on each accepted socket.

    pynetdicom leaves it on; a small C-STORE response then can wait for a delayed ACK.
    """
    accept = server.get_request

    def get_request() -> tuple[socket.socket, Any]:
        sock, address = accept()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    server.get_request = get_request
    return server


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """An attribute as text, at most limit characters ('' if absent)."""
    value = ds.get(keyword, "")
    return "" if value is None else str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    """An IS attribute as int, or None."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def parse_received(event: Any) -> Received:
    """Read and validate what the store needs; StoreRefused(0xC000) if it cannot be understood."""
    req = event.request
    try:
        ds = event.dataset
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
        fields = dict(
            patient_id=_text(ds, "PatientID", 64), patient_name=_text(ds, "PatientName", 324),
            accession_number=_text(ds, "AccessionNumber", 16), study_date=_text(ds, "StudyDate", 8),
            study_description=_text(ds, "StudyDescription", 64), modality=_text(ds, "Modality", 16),
            body_part_examined=_text(ds, "BodyPartExamined", 64), series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 64), instance_number=_int(ds, "InstanceNumber"),
        )
    except AttributeError as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"missing attribute: {exc}"[:64]) from exc
    except Exception as exc:  # pydicom raises many kinds on a corrupt stream
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}"[:64]) from exc
    uids = {
        "SOPClassUID": str(req.AffectedSOPClassUID), "SOPInstanceUID": str(req.AffectedSOPInstanceUID),
        "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
    }
    for name, value in uids.items():
        if not is_valid_uid(value):
            raise StoreRefused(CANNOT_UNDERSTAND, f"invalid {name}")
    if str(ds.get("SOPInstanceUID", uids["SOPInstanceUID"])) != uids["SOPInstanceUID"]:
        raise StoreRefused(CANNOT_UNDERSTAND, "SOPInstanceUID differs from request")
    return Received(
        sop_class_uid=uids["SOPClassUID"], sop_instance_uid=uids["SOPInstanceUID"], study_instance_uid=study_uid,
        series_instance_uid=series_uid, transfer_syntax_uid=str(event.context.transfer_syntax), **fields,
    )


class StorageSCP:
    """The node's DICOM listener(s): plain, and optionally DICOM TLS."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.incoming = settings.data_dir / "incoming"
        self._servers: list[Any] = []
        self._lock = threading.Lock()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = node.acse_timeout, node.dimse_timeout, node.network_timeout
        ae.maximum_pdu_size = MAX_PDU
        ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def _handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
        ]

    def start(self) -> None:
        """Start listening (returns at once; associations run on pynetdicom's threads)."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        node = self.settings.node
        self._servers.append(set_tcp_nodelay(self.ae.start_server((node.host, node.port), block=False, evt_handlers=self._handlers())))
        if node.tls_port is not None:
            self._servers.append(set_tcp_nodelay(
                self.ae.start_server((node.host, node.tls_port), block=False, evt_handlers=self._handlers(), ssl_context=self._tls_context())
            ))

    def _tls_context(self) -> ssl.SSLContext:
        """Server TLS context from node.tls_cert/tls_key, verifying clients against tls_ca if set."""
        node = self.settings.node
        if not (node.tls_cert and node.tls_key):
            raise ValueError("node.tls_port is set but node.tls_cert and node.tls_key are not")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(node.tls_cert), str(node.tls_key))
        if node.tls_ca:
            ctx.load_verify_locations(str(node.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if node.tls_require_client_cert else ssl.CERT_OPTIONAL if node.tls_ca else ssl.CERT_NONE
        return ctx

    def stop(self) -> None:
        """Stop listening and end open associations."""
        for server in self._servers:
            server.shutdown()
        self._servers.clear()

    @property
    def port(self) -> int:
        """The bound plain port (config port 0 means any free port)."""
        return int(self._servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port, if TLS is on."""
        return int(self._servers[1].server_address[1]) if len(self._servers) > 1 else None

    @property
    def listening(self) -> bool:
        """True while the listener threads run."""
        return bool(self._servers) and all(s.socket.fileno() != -1 for s in self._servers)

    # --- event handlers ----------------------------------------------------------------------

    def _on_established(self, event: Any) -> None:
        log.info("association from %s (%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _on_rejected(self, event: Any) -> None:
        log.warning("association from %r (%s) rejected: calling AE title not allowed",
                    event.assoc.requestor.ae_title, event.assoc.requestor.address)
        metrics.ASSOCIATIONS_REJECTED.labels(reason="calling_aet").inc()

    def _on_store(self, event: Any) -> int | Dataset:
        """Store one instance durably, then acknowledge; failure statuses otherwise."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            status = self.store_instance(event, calling)
        except StoreRefused as exc:
            log.error("C-STORE from %s refused (0x%04X): %s", calling, exc.status, exc.comment)
            metrics.INSTANCES_REFUSED.labels(status=f"0x{exc.status:04X}").inc()
            reply = Dataset()
            reply.Status = exc.status
            reply.ErrorComment = exc.comment[:64]
            return reply
        except Exception as exc:  # never let a bad instance take the node down
            log.exception("C-STORE from %s failed: %s", calling, exc)
            metrics.INSTANCES_REFUSED.labels(status=f"0x{OUT_OF_RESOURCES:04X}").inc()
            return OUT_OF_RESOURCES
        return status

    def store_instance(self, event: Any, calling_aet: str) -> int:
        """Parse, write and record one instance; raise StoreRefused with the status to send."""
        rec = parse_received(event)
        free = shutil.disk_usage(self.incoming).free if self.incoming.exists() else 0
        if free < self.settings.node.min_free_mb * 1024 * 1024:
            raise StoreRefused(OUT_OF_RESOURCES, f"disk nearly full: {free // 2**20} MB free")
        if self._is_duplicate(rec, calling_aet, event):
            return SUCCESS
        rel = Path("incoming") / rec.study_instance_uid / rec.series_instance_uid / f"{rec.sop_instance_uid}.dcm"
        path = self.settings.data_dir / rel
        data = event.encoded_dataset(include_meta=True)
        try:
            write_durably(path, data)
        except OSError as exc:
            raise StoreRefused(OUT_OF_RESOURCES, f"cannot write file: {exc.strerror or exc}"[:64]) from exc
        try:
            new = self._record(rec, rel, len(data), hashlib.sha256(data).hexdigest(), calling_aet, str(event.assoc.requestor.address))
        except SQLAlchemyError as exc:
            path.unlink(missing_ok=True)
            raise StoreRefused(OUT_OF_RESOURCES, f"database error: {type(exc).__name__}"[:64]) from exc
        if new:
            metrics.INSTANCES_RECEIVED.labels(calling_aet=calling_aet).inc()
            metrics.BYTES_RECEIVED.inc(len(data))
        log.debug("stored %s (%d bytes) from %s", rec.sop_instance_uid, len(data), calling_aet)
        return SUCCESS

    def _is_duplicate(self, rec: Received, calling_aet: str, event: Any) -> bool:
        """Record a repeat of an instance already stored; True if it was one."""
        with self.store.session() as session:
            existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid))
            if existing is None:
                return False
            existing.duplicates += 1
            audit(session, calling_aet, "instance.duplicate", target=f"instance:{existing.id}", source=str(event.assoc.requestor.address))
        metrics.INSTANCES_DUPLICATE.inc()
        return True

    def _record(self, rec: Received, rel: Path, size: int, sha256: str, calling_aet: str, address: str) -> bool:
        """Upsert study and series and insert the instance in one transaction; False if a duplicate."""
        for attempt in range(3):
            try:
                with self.store.session() as session:
                    if session.scalar(select(Instance.id).where(Instance.sop_instance_uid == rec.sop_instance_uid)) is not None:
                        return False  # a concurrent association stored it first
                    study = self._upsert_study(session, rec, calling_aet)
                    series = self._upsert_series(session, study, rec)
                    inst = Instance(
                        series_id=series.id, study_id=study.id, sop_class_uid=rec.sop_class_uid, sop_instance_uid=rec.sop_instance_uid,
                        transfer_syntax_uid=rec.transfer_syntax_uid, instance_number=rec.instance_number, file_path=str(rel),
                        size_bytes=size, sha256=sha256, calling_aet=calling_aet,
                    )
                    session.add(inst)
                    session.flush()
                    audit(session, calling_aet, "instance.received", target=f"instance:{inst.id}", source=address, study_id=study.id, bytes=size)
                return True
            except IntegrityError:
                if attempt == 2:
                    raise
        return False

    @staticmethod
    def _upsert_study(session: Any, rec: Received, calling_aet: str) -> Study:
        now = utcnow()
        study = session.scalar(select(Study).where(Study.study_instance_uid == rec.study_instance_uid))
        if study is None:
            study = Study(study_instance_uid=rec.study_instance_uid, first_received_at=now, num_instances=0)
            session.add(study)
        for attr in ("patient_id", "patient_name", "accession_number", "study_date", "study_description"):
            if getattr(rec, attr) and not getattr(study, attr):
                setattr(study, attr, getattr(rec, attr))
        if rec.modality:
            mods = set(filter(None, (study.modalities or "").split("\\"))) | {rec.modality}
            study.modalities = "\\".join(sorted(mods))[:128]
        study.calling_aet = calling_aet
        study.last_received_at = now
        study.num_instances = (study.num_instances or 0) + 1
        session.flush()
        return study

    @staticmethod
    def _upsert_series(session: Any, study: Study, rec: Received) -> Series:
        series = session.scalar(select(Series).where(Series.series_instance_uid == rec.series_instance_uid))
        if series is None:
            series = Series(
                study_id=study.id, series_instance_uid=rec.series_instance_uid, modality=rec.modality,
                body_part_examined=rec.body_part_examined, series_number=rec.series_number, series_description=rec.series_description,
            )
            session.add(series)
            session.flush()
        return series


def echo(host: str, port: int, calling_aet: str, called_aet: str, timeout: float = 10) -> tuple[bool, str]:
    """C-ECHO a remote node; (success, a line saying what happened)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        return False, f"C-ECHO {called_aet}@{host}:{port}: association {reason}"
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == SUCCESS:
        return True, f"C-ECHO {called_aet}@{host}:{port}: success"
    return False, f"C-ECHO {called_aet}@{host}:{port}: " + ("no response" if code is None else f"status 0x{code:04X}")
