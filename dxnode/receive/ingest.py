"""Ingest: one received instance made durable and recorded, for every transport (C-STORE, STOW-RS).

Durability: an instance is written as received (file meta + encoded dataset, never decoded and
re-encoded) to a temporary name beside its final path, fsynced, renamed, the folder fsynced, its
rows committed, and only then reported stored, so the transport can acknowledge it. Any failure
raises StoreRefused with 0xA700 (out of resources: disk, file system, database); the transport
answers with it and logs it, so the sender retries or reports it. ``Activity`` tells the
stable-study sweep which studies are still arriving.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dxnode import metrics
from dxnode.config import Settings
from dxnode.durable import place, publish, remove_stale, temporary_name, withdraw, write_new_file
from dxnode.receive import chunked
from dxnode.receive.activity import Activity
from dxnode.receive.chunked import Spooled
from dxnode.receive.committer import CommitClient, CommitFailed
from dxnode.receive.group import GroupCommit, Pending
from dxnode.receive.parse import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    InflightBudget,
    Received,
    StoreRefused,
    read_file_meta,
    read_part10,
    read_received,
)
from dxnode.receive.part10 import file_header
from dxnode.receive.rows import Arrival, SeenSeries, statements, upsert_series, upsert_study
from dxnode.store import Instance, Store, audit_core, audit_values, utcnow

log = logging.getLogger("dxnode.receive.ingest")


class Ingest:
    """The durable store of received instances under data_dir/incoming, shared by every transport."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.data_dir = settings.data_dir
        self.incoming = self.data_dir / "incoming"
        # Threads that write and fsync received files while the storing thread hashes and records them.
        self.writer = ThreadPoolExecutor(settings.node.max_associations + 4, thread_name_prefix="dxnode-write")
        self._lock = threading.Lock()
        self._sweep: threading.Timer | None = None
        self._seen: dict[str, SeenSeries] = {}  # series UID -> rows after the last commit
        self._group = GroupCommit(store.engine, self.writer)
        self._sql = statements(store.engine.dialect, bool(store.engine.echo))  # each instance's three statements
        self.activity = Activity()
        self.committer: CommitClient | None = None  # with [node] receive_processes > 1 (receivers.py)
        # The bytes of instances being handled now, by every transport that stores through this ingest.
        self.inflight = InflightBudget(settings.node.max_inflight_mb)

    def open(self) -> None:
        """Make incoming/ and sweep the temporary files a killed receiver left (once now, once later)."""
        with self._lock:
            if self._sweep is not None:
                return
            self.incoming.mkdir(parents=True, exist_ok=True)
            self.remove_stale_temporaries()
            # Files of a receiver killed just before this start are younger than the cutoff: once more later.
            self._sweep = threading.Timer(self._quiet_s() + 1, self.remove_stale_temporaries)
            self._sweep.daemon = True
            self._sweep.start()

    def close(self) -> None:
        """Stop the later sweep; instances being stored finish."""
        if self._sweep is not None:
            self._sweep.cancel()

    def remove_stale_temporaries(self) -> int:
        """Remove temporary files a killed receiver left in incoming/; returns how many.

        Only files untouched for dimse_timeout and network_timeout go: a live receiver (this node's or
        another's sharing the data dir) writes its file as the fragments arrive, then holds it for the
        length of one commit. pynetdicom's files of received datasets (chunked.py) are among them.
        """
        removed = remove_stale(self.incoming, self._quiet_s())
        if removed:
            log.warning("removed %d temporary file(s) left by an interrupted receive", removed)
        return removed

    def _quiet_s(self) -> float:
        """How long a live receiver's temporary file can go untouched."""
        return max(self.settings.node.dimse_timeout, self.settings.node.network_timeout)

    def store_c_store(self, event: Event, calling_aet: str, address: str, actor: str | None = None) -> int:
        """The dataset of a C-STORE request (the node's SCP, or a C-GET sub-operation) stored; returns its
        size. pynetdicom has received it to a file (chunked.py) or, where chunked receive is off in this
        process, into memory. StoreRefused with the status to send."""
        req = event.request
        if not isinstance(req, C_STORE):  # only bound to EVT_C_STORE
            raise TypeError(f"not a C-STORE request: {type(req).__name__}")
        uids = (str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID), str(event.context.transfer_syntax))
        received = chunked.received_file(req)
        if received is None:
            if not isinstance(req.DataSet, BytesIO):
                raise StoreRefused(CANNOT_UNDERSTAND, "no dataset")
            self.store_dataset(req.DataSet, uids, calling_aet, address, id(event.assoc), actor)
            return len(req.DataSet.getbuffer())
        with received as (spooled, size), self.inflight.hold(size):  # on disk, yet handled now: as STOW-RS
            rec = read_received(spooled.file, size, uids, self.settings.node.max_instance_mb, self.incoming)
            self.store_received(rec, spooled, calling_aet, address, id(event.assoc), actor)
        return size

    def store_dataset(
        self,
        received: BytesIO,
        uids: tuple[str, str, str],
        calling_aet: str,
        address: str,
        sender: int,
        actor: str | None = None,
    ) -> Received:
        """An encoded dataset as a C-STORE or C-GET carries it in memory, uids its (SOP Class, SOP Instance,
        transfer syntax): bounded and parsed (read_received) within the in-flight budget, then stored after its
        Part 10 header, written and hashed from the transport's own buffer. StoreRefused with the status."""
        with received.getbuffer() as body, self.inflight.hold(body.nbytes):
            received.seek(0)
            rec = read_received(received, body.nbytes, uids, self.settings.node.max_instance_mb, self.incoming)
            head = file_header(rec.sop_class_uid, rec.sop_instance_uid, rec.transfer_syntax_uid)
            self.store_received(rec, (head, body), calling_aet, address, sender, actor)
        return rec

    def store_part10(
        self, data: bytes, calling_aet: str, address: str, sender: int, actor: str | None = None
    ) -> Received:
        """A whole Part 10 file (WADO-RS): a STOW-RS part's bounds (read_part10), then stored as received."""
        with self.inflight.hold(len(data)):
            part = BytesIO(data)
            rec = read_part10(part, read_file_meta(part), self.settings.node.max_instance_mb, self.incoming)
            self.store_received(rec, (data,), calling_aet, address, sender, actor)
        return rec

    def store_received(
        self,
        rec: Received,
        body: Sequence[bytes | memoryview] | Spooled,
        calling_aet: str,
        address: str,
        sender: int,
        actor: str | None = None,
    ) -> bool:
        """Write a parsed instance durably and commit its rows; True if new. body is the file's bytes, in
        parts, or the whole file as received to disk (then fsynced and renamed into place, not copied).

        C-STORE and STOW-RS both store through here. sender identifies the association (or STOW-RS
        request) it came on: while it is stored its study is busy for the stable-study sweep, and
        the sender's end (activity.closed) starts the study's quiet time.

        Raises StoreRefused with the status to report; returns only once file and rows are durable.
        """
        self.activity.begin(sender, rec.study_instance_uid)
        try:
            return self._store(rec, body, calling_aet, address, actor)
        finally:
            self.activity.end(rec.study_instance_uid)

    def _store(
        self,
        rec: Received,
        body: Sequence[bytes | memoryview] | Spooled,
        calling_aet: str,
        address: str,
        actor: str | None,
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
        # The file is written (or, received to disk, made durable where it lies) and fsynced on another
        # thread while this one hashes it and runs the statements; _commit waits for the fsync before
        # the rename, and the rename before the commit.
        if isinstance(body, Spooled):
            size = body.size
            # A file received elsewhere (another file system) is copied beside its final path.
            tmp = body.path if body.path.parent == self.incoming else temporary_name(path)
            written = body.durable(tmp, path.parent, self.writer)
        else:
            size = sum(len(part) for part in body)
            tmp = temporary_name(path)
            written = self.writer.submit(write_new_file, tmp, body)
        try:
            sha256 = body.sha256() if isinstance(body, Spooled) else _sha256(body)
            arrival = Arrival(tmp, path, rec, rel, size, sha256, calling_aet, address, actor)
            if self.committer is not None:  # the commit process commits it (receivers.py), once the file is durable
                # Placed here, each receiving process fsyncs its own folder entries in parallel with the
                # others, and the commit process, which every instance waits for in turn, only commits.
                inode = place(tmp, path, written)  # None: the name is taken, renamed there instead
                placed = inode is not None
                new = self.committer.commit(arrival, written.result() if inode is None else inode, placed)
            else:  # concurrent associations share the commit and the folder fsync (group.py); each waits for its own
                new = self._group.commit(self.pending(arrival, written))
        except OSError as exc:
            raise StoreRefused(OUT_OF_RESOURCES, f"cannot write file: {exc.strerror or exc}"[:64]) from exc
        except SQLAlchemyError as exc:
            raise StoreRefused(OUT_OF_RESOURCES, f"database error: {type(exc).__name__}"[:64]) from exc
        except CommitFailed as exc:
            raise StoreRefused(OUT_OF_RESOURCES, str(exc)[:64]) from exc
        finally:
            concurrent.futures.wait([written])  # the writer reads body: it stays valid until it is done
            tmp.unlink(missing_ok=True)
        if new:
            metrics.INSTANCES_RECEIVED.labels(calling_aet=calling_aet).inc()
            metrics.BYTES_RECEIVED.inc(size)
        else:
            metrics.INSTANCES_DUPLICATE.inc()
        log.debug("stored %s (%d bytes) from %s", rec.sop_instance_uid, size, actor or calling_aet)
        return new

    def pending(self, arrival: Arrival, written: Future[int] | int, placed: bool = False) -> Pending:
        """An instance for the group commit; written is its file's fsync (its inode when done); placed:
        the file is durable under its final name already (durable.place), to be withdrawn if no row
        of its commits."""
        if isinstance(written, int):
            inode, written = written, Future()
            written.set_result(inode)
        durable = written
        return Pending(
            arrival.tmp,
            arrival.path,
            durable,
            rows=lambda conn: self._rows(conn, arrival),
            alone=lambda: self._commit(arrival, durable, placed),
            committed=lambda seen: self._remember(arrival.rec, seen),
            placed=placed,
        )

    def settle(self, items: list[Pending]) -> None:
        """Commit items as one batch now (the commit process's way: receivers.committer_main)."""
        self._group.settle(items)

    def _commit(self, arrival: Arrival, written: Future[int], placed: bool = False) -> bool:
        """_commit_rows, and a placed file withdrawn unless its row committed (a duplicate is not kept)."""
        try:
            new = self._commit_rows(arrival, written, placed)
        except BaseException:
            if placed:
                withdraw(arrival.path, written.result())
            raise
        if placed and not new:
            withdraw(arrival.path, written.result())
        return new

    def _commit_rows(self, arrival: Arrival, written: Future[int], placed: bool) -> bool:
        """One instance in its own transaction (group.py's way for an instance committed alone, or
        whose batch failed): a repeat is counted; for a new instance the rows are written, the file is
        renamed into place and the rows committed. Returns False for a duplicate.

        The rename comes after the instance row is inserted: while that row is uncommitted no other
        writer can insert the same SOP Instance UID (PostgreSQL makes it wait on the unique key), so no
        other writer renames onto this path, and a lost race on a unique key (two senders starting the
        same study) happens before the rename, with the temporary file still there for the retry.
        written is the write and fsync of arrival.tmp (its inode), still running when this starts."""
        for attempt in range(3):
            renamed = False
            try:
                with self.store.engine.begin() as conn:
                    seen = self._rows(conn, arrival, attempt)
                    if seen is None:
                        return False
                    inode = written.result()  # the bytes are durable (or its OSError ends the transaction)
                    if not placed:
                        publish(arrival.tmp, arrival.path)  # durable under its final name before the rows commit
                        renamed = True
                self._remember(arrival.rec, seen)
                return True
            except IntegrityError:
                if renamed:
                    withdraw(arrival.path, inode)
                if renamed or attempt == 2:
                    raise
            except BaseException:
                if renamed:
                    withdraw(arrival.path, inode)  # no row: the sender gets a failure and retries
                raise
        return False

    def _rows(self, conn: Connection, arrival: Arrival, attempt: int = 0) -> SeenSeries | None:
        """The statements of one instance, in the caller's transaction; None for a duplicate (counted).
        Core statements keep this cheap; the three of every instance run on SQLite's own cursor (rows.py)."""
        rec, calling_aet, address = arrival.rec, arrival.calling_aet, arrival.address
        actor = arrival.actor or calling_aet
        # The common case, one more instance of a series seen before that adds nothing to the study
        # row: bump the study and insert, without reading anything first (a duplicate then fails the
        # insert's unique key and the next attempt counts it).
        seen = self._seen.get(rec.series_instance_uid) if attempt == 0 else None
        if seen is not None and seen.covers(rec):
            bumped = self._sql.bump(conn, {"b_id": seen.study_id, "b_aet": calling_aet, "b_now": utcnow()})
            if bumped != 1:  # the study is gone: the full path below recreates it
                seen = None
        else:
            seen = None
        existing = (
            None
            if seen is not None
            else conn.execute(select(Instance.id).where(Instance.sop_instance_uid == rec.sop_instance_uid)).scalar()
        )
        if existing is not None:
            conn.execute(update(Instance).where(Instance.id == existing).values(duplicates=Instance.duplicates + 1))
            audit_core(conn, actor, "instance.duplicate", f"instance:{existing}", address)
            return None
        if seen is None:
            study_id, filled, modalities = upsert_study(conn, rec, calling_aet)
            seen = SeenSeries(study_id, upsert_series(conn, study_id, rec), filled, modalities)
        instance_id = self._sql.insert_instance(
            conn,
            {
                "series_id": seen.series_id,
                "study_id": seen.study_id,
                "sop_class_uid": rec.sop_class_uid,
                "sop_instance_uid": rec.sop_instance_uid,
                "transfer_syntax_uid": rec.transfer_syntax_uid,
                "instance_number": rec.instance_number,
                "file_path": str(arrival.rel),
                "size_bytes": arrival.size,
                "sha256": arrival.sha256,
                "calling_aet": calling_aet,
                "received_at": utcnow(),
                "duplicates": 0,
            },
        )
        self._sql.audit(
            conn,
            audit_values(
                actor,
                "instance.received",
                f"instance:{instance_id}",
                address,
                study_id=seen.study_id,
                bytes=arrival.size,
            ),
        )
        return seen

    def _remember(self, rec: Received, seen: SeenSeries) -> None:
        """Keep the study and series rows a commit made true (only by the thread leading a commit: group.py)."""
        if len(self._seen) >= _SEEN_MAX:
            self._seen.clear()
        self._seen[rec.series_instance_uid] = seen


def _sha256(parts: Sequence[bytes | memoryview]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


_SEEN_MAX = 4096  # series remembered per process; the map is simply emptied when full
