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

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import logging
import shutil
import socket
import socketserver
import ssl
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
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
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time from a table
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dxnode import metrics
from dxnode.bounds import MB, inflated_size_exceeds
from dxnode.config import Settings
from dxnode.durable import publish, temporary_name, write_new_file
from dxnode.listen import StartError, bind_error
from dxnode.listen import address as host_port
from dxnode.part10 import file_header
from dxnode.store import (
    Instance,
    Series,
    Store,
    Study,
    audit_core,
    utcnow,
)
from dxnode.uids import is_valid_uid

log = logging.getLogger("dxnode.scp")

# Order matters: pynetdicom accepts the first of these that the sender proposes (see above).
TRANSFER_SYNTAXES = [
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    HTJ2K,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
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


class NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with Nagle's algorithm off on each accepted socket.

    pynetdicom leaves it on; a small C-STORE response then can wait for a delayed ACK.
    """

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def shutdown(self) -> None:
        """Stop serving and close the socket. (pynetdicom's shutdown also removes the server from the
        AE's private list of servers that AE.start_server made, where a server from make_server is not.)"""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


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


def check_received_size(event: Any, max_instance_mb: float) -> None:
    """StoreRefused(0xA700) if the dataset is, or inflates to, more than max_instance_mb.

    Runs before pynetdicom decodes the dataset: it inflates a Deflated dataset whole in memory,
    so that one is first inflated here in bounded chunks, the output thrown away.
    """
    raw = event.request.DataSet
    limit = int(max_instance_mb * MB)
    if raw is None or not hasattr(raw, "getbuffer"):
        return
    if raw.getbuffer().nbytes > limit:
        raise StoreRefused(OUT_OF_RESOURCES, f"dataset over [node] max_instance_mb {max_instance_mb:g}")
    if event.context.transfer_syntax.is_deflated:
        raw.seek(0)
        try:
            too_big = inflated_size_exceeds(raw, limit)
        finally:
            raw.seek(0)
        if too_big:
            raise StoreRefused(OUT_OF_RESOURCES, f"inflates over [node] max_instance_mb {max_instance_mb:g}")


def _check_uid_elements(ds: Dataset) -> None:
    """The dataset's own UIDs: SOP Class and Instance present, every UID attribute of VR UI."""
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in ds:
            raise StoreRefused(CANNOT_UNDERSTAND, f"missing {keyword}")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in ds and ds[keyword].VR != "UI":
            raise StoreRefused(CANNOT_UNDERSTAND, f"{keyword} has VR {ds[keyword].VR}, not UI")


def parse_received(event: Event) -> Received:
    """Read and validate what the store needs from a C-STORE; StoreRefused(0xC000) if it cannot be understood."""
    req = event.request
    if not isinstance(req, C_STORE):  # only bound to EVT_C_STORE
        raise TypeError(f"not a C-STORE request: {type(req).__name__}")
    sop_class_uid, sop_instance_uid = str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID)
    try:
        ds = event.dataset
    except Exception as exc:  # pydicom raises many kinds on a corrupt stream
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}"[:64]) from exc
    return parse_dataset(ds, sop_class_uid, sop_instance_uid, str(event.context.transfer_syntax))


def parse_dataset(ds: Dataset, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> Received:
    """Validate a received dataset against the UIDs it came with (C-STORE request or STOW-RS file meta)."""
    try:
        _check_uid_elements(ds)
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
        rec = Received(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            patient_id=_text(ds, "PatientID", 64),
            patient_name=_text(ds, "PatientName", 324),
            accession_number=_text(ds, "AccessionNumber", 16),
            study_date=_text(ds, "StudyDate", 8),
            study_description=_text(ds, "StudyDescription", 64),
            modality=_text(ds, "Modality", 16),
            body_part_examined=_text(ds, "BodyPartExamined", 64),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 64),
            instance_number=_int(ds, "InstanceNumber"),
        )
    except AttributeError as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"missing attribute: {exc}"[:64]) from exc
    except StoreRefused:
        raise
    except Exception as exc:  # pydicom raises many kinds on a corrupt stream
        raise StoreRefused(CANNOT_UNDERSTAND, f"cannot parse dataset: {type(exc).__name__}"[:64]) from exc
    uids = {
        "SOPClassUID": sop_class_uid,
        "SOPInstanceUID": sop_instance_uid,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "TransferSyntaxUID": transfer_syntax_uid,
    }
    for name, value in uids.items():
        if not is_valid_uid(value):
            raise StoreRefused(CANNOT_UNDERSTAND, f"invalid {name}")
    if str(ds.get("SOPInstanceUID", rec.sop_instance_uid)) != rec.sop_instance_uid:
        raise StoreRefused(CANNOT_UNDERSTAND, "SOPInstanceUID differs from request")
    return rec


class Activity:
    """Studies still arriving, for the stable-study sweep (worklist.StudyActivity).

    A study is busy while one of its instances is being stored or an association that sent to
    it is open; its quiet time then counts from that association's release. The database cannot
    tell: under write contention an instance may wait for the lock longer than stable_seconds."""

    KEEP = dt.timedelta(hours=1)  # how long a release time is remembered

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._by_association: dict[int, set[str]] = {}
        self._released: dict[str, dt.datetime] = {}

    def begin(self, association: int, study_uid: str) -> None:
        """An instance of the study arrived on the association (storing starts)."""
        with self._lock:
            self._in_flight[study_uid] += 1
            self._by_association.setdefault(association, set()).add(study_uid)

    def end(self, study_uid: str) -> None:
        """Storing the instance ended (committed or refused)."""
        with self._lock:
            self._in_flight[study_uid] -= 1
            if self._in_flight[study_uid] <= 0:
                del self._in_flight[study_uid]

    def closed(self, association: int) -> None:
        """The association ended (released, aborted or dropped)."""
        now = utcnow()
        with self._lock:
            for uid in self._by_association.pop(association, set()):
                self._released[uid] = now
            if len(self._released) > 10000:
                self._released = {u: t for u, t in self._released.items() if now - t < self.KEEP}

    def busy_studies(self) -> set[str]:
        with self._lock:
            return set(self._in_flight).union(*self._by_association.values())

    def released_at(self) -> dict[str, dt.datetime]:
        with self._lock:
            return dict(self._released)


class StorageSCP:
    """The node's DICOM listener(s): plain, and optionally DICOM TLS."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.data_dir = settings.data_dir
        self.incoming = self.data_dir / "incoming"
        # Threads that write and fsync received files while the storing thread hashes and records them.
        self._writer = ThreadPoolExecutor(settings.node.max_associations + 4, thread_name_prefix="dxnode-write")
        self._servers: list[NoDelayServer] = []
        self._threads: list[tuple[str, threading.Thread]] = []  # (part, thread serving it)
        self._stopping = False
        self._lock = threading.Lock()
        self._sweep: threading.Timer | None = None
        self._seen: dict[str, _SeenSeries] = {}  # series UID -> rows after the last commit
        self.activity = Activity()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (
            node.acse_timeout,
            node.dimse_timeout,
            node.network_timeout,
        )
        ae.maximum_pdu_size = MAX_PDU
        ae.require_calling_aet = list(node.allowed_calling_aets)
        # A sender configured with the wrong called AE title is refused (A-ASSOCIATE-RJ reason 7,
        # "called AE title not recognised") instead of going unnoticed.
        ae.require_called_aet = not node.accept_any_called_ae
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:  # always set in pynetdicom's own list
                ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def _handlers(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, lambda event: self.activity.closed(id(event.assoc))),
        ]

    def remove_stale_temporaries(self) -> int:
        """Remove temporary files a killed receiver left in incoming/; returns how many.

        Only files older than dimse_timeout go: a live receiver (this node's or another's sharing
        the data dir) holds its temporary file for the length of one write and commit.
        """
        cutoff = time.time() - self.settings.node.dimse_timeout
        removed = 0
        for tmp in self.incoming.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
        if removed:
            log.warning("removed %d temporary file(s) left by an interrupted receive", removed)
        return removed

    def start(self) -> None:
        """Start listening (returns at once; associations run on pynetdicom's threads).

        Raises StartError naming the listener ("dicom", "dicom-tls") and the cause when one cannot
        start; the listeners started before it keep running until stop().
        """
        node = self.settings.node
        tls = None
        if node.tls_port is not None:
            try:
                tls = self._tls_context()
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise StartError("dicom-tls", f"cannot load the TLS certificate or key: {exc}") from None
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()
        # Files of a receiver killed just before this start are younger than the cutoff: once more later.
        self._sweep = threading.Timer(self.settings.node.dimse_timeout + 1, self.remove_stale_temporaries)
        self._sweep.daemon = True
        self._sweep.start()
        self._serve("dicom", (node.host, node.port), None)
        if node.tls_port is not None:
            self._serve("dicom-tls", (node.host, node.tls_port), tls)

    def _serve(self, part: str, address: tuple[str, int], ssl_context: ssl.SSLContext | None) -> None:
        """Bind one listener and serve it on a daemon thread (what AE.start_server(block=False) does)."""
        try:
            server = self.ae.make_server(
                address, ssl_context=ssl_context, evt_handlers=self._handlers(), server_class=NoDelayServer
            )
        except OSError as exc:
            raise bind_error(part, address[0], address[1], exc) from None
        assert isinstance(server, NoDelayServer)
        thread = threading.Thread(target=server.serve_forever, name=f"dxnode-scp:{address[1]}", daemon=True)
        thread.start()
        self._servers.append(server)
        self._threads.append((part, thread))

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
        ctx.verify_mode = (
            ssl.CERT_REQUIRED if node.tls_require_client_cert else ssl.CERT_OPTIONAL if node.tls_ca else ssl.CERT_NONE
        )
        return ctx

    def stop(self) -> None:
        """Stop listening and end open associations."""
        self._stopping = True
        if self._sweep is not None:
            self._sweep.cancel()
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
        return (
            bool(self._servers)
            and all(s.socket is not None and s.socket.fileno() != -1 for s in self._servers)
            and all(thread.is_alive() for _, thread in self._threads)
        )

    def failure(self) -> tuple[str, str] | None:
        """(part, why) of a listener that stopped serving while the node runs; None while all serve."""
        if self._stopping:
            return None
        for (part, thread), server in zip(self._threads, self._servers, strict=False):
            if not thread.is_alive():
                host, port = server.server_address[:2]
                return part, f"the listener on {host_port(str(host), int(port))} stopped"
        return None

    # --- event handlers ----------------------------------------------------------------------

    def _on_established(self, event: Event) -> None:
        log.info("association from %s (%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _on_rejected(self, event: Event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "") or "").strip()
        node = self.settings.node
        # pynetdicom checks the calling AE title, then the called one (its reason wins), then the association limit.
        if self.ae.require_called_aet and called != node.ae_title:
            reason, why = "called_aet", f"called AE title {called!r} not recognised (this node is {node.ae_title!r})"
        elif node.allowed_calling_aets and calling not in node.allowed_calling_aets:
            reason, why = "calling_aet", "calling AE title not allowed"
        else:
            reason, why = "max_associations", f"more than {node.max_associations} associations"
        log.warning("association from %r (%s) rejected: %s", calling, event.assoc.requestor.address, why)
        metrics.ASSOCIATIONS_REJECTED.labels(reason=reason).inc()

    def _on_store(self, event: Event) -> int | Dataset:
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

    def store_instance(self, event: Event, calling_aet: str) -> int:
        """Parse, write and record one instance; raise StoreRefused with the status to send."""
        check_received_size(event, self.settings.node.max_instance_mb)
        rec = parse_received(event)
        # The file is the preamble and file meta, then the dataset as received: written and hashed
        # from pynetdicom's own buffer, without joining them into one more copy.
        head = file_header(rec.sop_class_uid, rec.sop_instance_uid, rec.transfer_syntax_uid)
        received = event.request.DataSet if isinstance(event.request, C_STORE) else None
        if not isinstance(received, BytesIO):  # parse_received checked the request; this is for the type
            raise StoreRefused(CANNOT_UNDERSTAND, "no dataset")
        with received.getbuffer() as body:
            self.store_received(rec, (head, body), calling_aet, str(event.assoc.requestor.address), id(event.assoc))
        return SUCCESS

    def store_received(
        self,
        rec: Received,
        parts: Sequence[bytes | memoryview],
        calling_aet: str,
        address: str,
        sender: int,
        actor: str | None = None,
    ) -> bool:
        """Write a parsed instance (the file's bytes, in parts) durably and commit its rows; True if new.

        C-STORE and STOW-RS both store through here. sender identifies the association (or STOW-RS
        request) it came on: while it is stored its study is busy for the stable-study sweep, and
        the sender's end (activity.closed) starts the study's quiet time.

        Raises StoreRefused with the status to report; returns only once file and rows are durable.
        """
        self.activity.begin(sender, rec.study_instance_uid)
        try:
            return self._store(rec, parts, calling_aet, address, actor)
        finally:
            self.activity.end(rec.study_instance_uid)

    def _store(
        self, rec: Received, parts: Sequence[bytes | memoryview], calling_aet: str, address: str, actor: str | None
    ) -> bool:
        """store_received's work: free space checked, file written and fsynced, rows committed."""
        try:  # incoming/ is made at start; gone since, nothing can be stored
            free = shutil.disk_usage(self.incoming).free
        except OSError:
            free = 0
        if free < self.settings.node.min_free_mb * 1024 * 1024:
            raise StoreRefused(OUT_OF_RESOURCES, f"disk nearly full: {free // 2**20} MB free")
        rel = Path("incoming") / rec.study_instance_uid / rec.series_instance_uid / f"{rec.sop_instance_uid}.dcm"
        path = self.data_dir / rel
        size = sum(len(part) for part in parts)
        # The file is created, written and fsynced on another thread while this one hashes it and runs
        # the statements; _commit waits for the fsync before the rename, and the rename before the commit.
        tmp = temporary_name(path)
        written = self._writer.submit(write_new_file, tmp, parts)
        try:
            digest = hashlib.sha256()
            for part in parts:
                digest.update(part)
            new = self._commit(rec, tmp, written, path, rel, size, digest.hexdigest(), calling_aet, address, actor)
        except OSError as exc:
            raise StoreRefused(OUT_OF_RESOURCES, f"cannot write file: {exc.strerror or exc}"[:64]) from exc
        except SQLAlchemyError as exc:
            raise StoreRefused(OUT_OF_RESOURCES, f"database error: {type(exc).__name__}"[:64]) from exc
        finally:
            concurrent.futures.wait([written])  # the writer reads parts: they stay valid until it is done
            tmp.unlink(missing_ok=True)
        if new:
            metrics.INSTANCES_RECEIVED.labels(calling_aet=calling_aet).inc()
            metrics.BYTES_RECEIVED.inc(size)
        else:
            metrics.INSTANCES_DUPLICATE.inc()
        log.debug("stored %s (%d bytes) from %s", rec.sop_instance_uid, size, actor or calling_aet)
        return new

    def _commit(
        self,
        rec: Received,
        tmp: Path,
        written: Future[int],
        path: Path,
        rel: Path,
        size: int,
        sha256: str,
        calling_aet: str,
        address: str,
        actor: str | None = None,
    ) -> bool:
        """One transaction: a repeat is counted; for a new instance the rows are written, the file is
        renamed into place and the rows committed. Returns False for a duplicate. Core statements keep this cheap.

        The rename comes after the instance row is inserted: while that row is uncommitted no other
        writer can insert the same SOP Instance UID (PostgreSQL makes it wait on the unique key), so no
        other writer renames onto this path, and a lost race on a unique key (two senders starting the
        same study) happens before the rename, with the temporary file still there for the retry.
        written is the write and fsync of tmp (its inode), still running when this starts."""
        actor = actor or calling_aet
        for attempt in range(3):
            renamed = False
            try:
                with self.store.engine.begin() as conn:
                    # The common case, one more instance of a series seen before that adds nothing to
                    # the study row: bump the study and insert, without reading anything first (a
                    # duplicate then fails the insert's unique key and the next attempt counts it).
                    seen = self._seen.get(rec.series_instance_uid) if attempt == 0 else None
                    if seen is not None and seen.covers(rec):
                        bumped = conn.execute(
                            _BUMP_STUDY, {"b_id": seen.study_id, "b_aet": calling_aet, "b_now": utcnow()}
                        ).rowcount
                        if bumped != 1:  # the study is gone: the full path below recreates it
                            seen = None
                    else:
                        seen = None
                    existing = (
                        None
                        if seen is not None
                        else conn.execute(
                            select(Instance.id).where(Instance.sop_instance_uid == rec.sop_instance_uid)
                        ).scalar()
                    )
                    if existing is not None:
                        conn.execute(
                            update(Instance).where(Instance.id == existing).values(duplicates=Instance.duplicates + 1)
                        )
                        audit_core(conn, actor, "instance.duplicate", f"instance:{existing}", address)
                        return False
                    if seen is None:
                        study_id, filled, modalities = self._upsert_study(conn, rec, calling_aet)
                        seen = _SeenSeries(study_id, self._upsert_series(conn, study_id, rec), filled, modalities)
                    instance_id = conn.execute(
                        _INSERT_INSTANCE,
                        {
                            "series_id": seen.series_id,
                            "study_id": seen.study_id,
                            "sop_class_uid": rec.sop_class_uid,
                            "sop_instance_uid": rec.sop_instance_uid,
                            "transfer_syntax_uid": rec.transfer_syntax_uid,
                            "instance_number": rec.instance_number,
                            "file_path": str(rel),
                            "size_bytes": size,
                            "sha256": sha256,
                            "calling_aet": calling_aet,
                            "received_at": utcnow(),
                            "duplicates": 0,
                        },
                    ).scalar_one()
                    audit_core(
                        conn,
                        actor,
                        "instance.received",
                        f"instance:{instance_id}",
                        address,
                        study_id=seen.study_id,
                        bytes=size,
                    )
                    inode = written.result()  # the bytes are durable (or its OSError ends the transaction)
                    publish(tmp, path)  # durable under its final name before the rows commit
                    renamed = True
                if len(self._seen) >= _SEEN_MAX:
                    self._seen.clear()
                self._seen[rec.series_instance_uid] = seen  # only what a commit made true
                return True
            except IntegrityError:
                if renamed:
                    _withdraw(path, inode)
                if renamed or attempt == 2:
                    raise
            except BaseException:
                if renamed:
                    _withdraw(path, inode)  # no row: the sender gets a failure and retries
                raise
        return False

    @staticmethod
    def _upsert_study(conn: Connection, rec: Received, calling_aet: str) -> tuple[int, frozenset[str], frozenset[str]]:
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

    @staticmethod
    def _upsert_series(conn: Connection, study_id: int, rec: Received) -> int:
        """The series row's id, created on its first instance."""
        series_id = conn.execute(
            select(Series.id).where(Series.series_instance_uid == rec.series_instance_uid)
        ).scalar()
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


_STUDY_TEXT = ("patient_id", "patient_name", "accession_number", "study_date", "study_description")
_SEEN_MAX = 4096  # series remembered per process; the map is simply emptied when full
_BUMP_STUDY = (
    update(Study)
    .where(Study.id == bindparam("b_id"))
    .values(num_instances=Study.num_instances + 1, calling_aet=bindparam("b_aet"), last_received_at=bindparam("b_now"))
)
_INSERT_INSTANCE = insert(Instance).returning(Instance.id)


@dataclass(frozen=True)
class _SeenSeries:
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


def _withdraw(path: Path, inode: int) -> None:
    """Remove a renamed file whose rows did not commit, unless another writer has replaced it since."""
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


@contextlib.contextmanager
def _pynetdicom_errors() -> Any:
    """Collect pynetdicom's log lines instead of showing them (unless DEBUG logging asks for them)."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("pynetdicom")
    if logger.isEnabledFor(logging.DEBUG):
        yield records
        return

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, propagate = Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _connect_error(records: Sequence[logging.LogRecord]) -> str | None:
    """The socket error pynetdicom logged when it could not connect (e.g. '[Errno 111] Connection refused')."""
    for r in records:
        text = r.getMessage()
        if text.startswith("TCP Initialisation Error:"):
            return text.split(":", 1)[1].strip()
    return None


def echo(host: str, port: int, calling_aet: str, called_aet: str, timeout: float = 10) -> tuple[bool, str]:
    """C-ECHO a remote node; (success, one line saying what happened)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    where = f"{host}:{port}"
    with _pynetdicom_errors() as records:
        try:
            assoc = ae.associate(host, port, ae_title=called_aet)
        except socket.gaierror as exc:
            return False, f"cannot resolve host {host!r}: {exc.strerror or exc}"
        if not assoc.is_established:
            if assoc.is_rejected:
                rsp = assoc.acceptor.primitive
                reason = str(getattr(rsp, "reason_str", "") or "no reason given")
                return (
                    False,
                    f"association rejected by {where} (called AE {called_aet}): {reason[:1].lower()}{reason[1:]}",
                )
            error = _connect_error(records)
            if error is not None:
                if "refused" in error.lower():
                    return False, f"connection refused by {where}"
                if "timed out" in error.lower():
                    return False, f"no answer from {where} within {timeout:g} s"
                return False, f"cannot connect to {where}: {error}"
            if assoc.is_aborted:
                return False, f"association with {where} aborted (called AE {called_aet})"
            return False, f"no answer from {where} within {timeout:g} s"
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
    code = getattr(status, "Status", None)
    if code == SUCCESS:
        return True, f"C-ECHO {called_aet}@{where}: success"
    return False, f"C-ECHO {called_aet}@{where}: " + ("no response" if code is None else f"status 0x{code:04X}")
