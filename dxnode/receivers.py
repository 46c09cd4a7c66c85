"""Several receiving processes on one DICOM port ([node] receive_processes), committing through one.

serve's listener is one Python interpreter: with several senders its associations' readers and
reactors, the parse of each instance and the group commit all wait for it in turn (measured:
docs/benchmarks.md). With ``receive_processes = N`` (N > 1) serve starts N - 1 more receiving
processes and one commit process (committer_main below; the receiving side: receive/committer.py):

- every receiving process serves the same listening sockets (DICOM, DICOM TLS), bound once by serve:
  each new association goes to the process with the fewest open, round robin between equals
  (receive/server.py, AcceptShare);
  each runs the same listener
  (``build_listener``: C-ECHO, C-STORE, Storage Commitment and UPS reports, UPS Watch);
- each receives, checks, hashes and fsyncs its instances itself and gives each file its final name
  (a link, and the folder fsynced: durable.place), and the commit process commits the rows of them
  all in shared batches, so the processes do not contend for the database's write lock; an instance
  is acknowledged only once committed, as before;
- each tells serve which studies it is receiving (``ForwardedActivity``), so the stable-study sweep
  sees every association wherever it runs;
- ``[node] max_inflight_mb`` is shared out evenly between them (serve's part also covers STOW-RS);
  ``max_associations`` holds in each process, so the node admits up to N times as many.

A receiving or commit process that dies stops the node (exit status 1, part "receive"); systemd then
starts it again. SIGTERM stops the other receiving processes first, the commit process last.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import selectors
import signal
import socket
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from dxnode.config import Settings
from dxnode.logs import setup_logging
from dxnode.receive.activity import Activity
from dxnode.receive.committer import (
    MAX_BATCH,
    CommitClient,
    CommitFailed,
    Inbox,
    Outcome,
    Request,
    await_ready,
    hang_up,
)
from dxnode.receive.ingest import Ingest
from dxnode.receive.server import AcceptShare
from dxnode.receive.walsync import Answers, WalSync, commit_without_sync, send_all, wal_of
from dxnode.scp import StorageSCP
from dxnode.store import Store

log = logging.getLogger("dxnode.receivers")


class CommitProcess:
    """The commit process, started with one connection per receiving process (clients)."""

    def __init__(self, settings: Settings, clients: int, log_level: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        pairs = [ctx.Pipe() for _ in range(clients)]
        self.clients: list[Connection] = [ours for ours, _ in pairs]  # one for each receiving process
        self.process = ctx.Process(
            target=committer_main,
            args=(settings, [theirs for _, theirs in pairs], log_level),
            name="dxnode-commit",
            daemon=True,
        )
        self.process.start()
        for _, theirs in pairs:
            theirs.close()
        why = await_ready(self.clients[0], self.process)
        if why is not None:
            self.stop()
            raise CommitFailed(f"the commit process could not start: {why}")

    def failure(self) -> str | None:
        """Why the commit process no longer runs; None while it runs."""
        return None if self.process.is_alive() else f"the commit process exited (status {self.process.exitcode})"

    def stop(self) -> None:
        """End it once every client has closed its connection (waits a little, then kills)."""
        for conn in self.clients:
            hang_up(conn)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def committer_main(settings: Settings, conns: list[Connection], log_level: str) -> None:
    """Body of the commit process: commit what has arrived from every receiving process as one batch,
    answer each, repeat until they have all closed their connections."""
    setup_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: serve decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # serve ends it by closing the connections, after the receivers
    try:
        store = Store(settings.database.url, settings.database.busy_timeout_s, settings.database.echo)
        ingest = Ingest(settings, store)
    except Exception as exc:  # said to serve, which refuses to start
        conns[0].send(("failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        raise SystemExit(1) from None
    wal = wal_of(store.engine)
    if wal is not None:  # SQLite in WAL mode: one flush for the batches committed meanwhile (receive/walsync.py)
        commit_without_sync(store.engine)
    conns[0].send(("ready",))
    log.info("commit process %d ready for %d receiving process(es)", os.getpid(), len(conns))
    flusher = WalSync(wal) if wal is not None else None
    try:
        _serve(ingest, conns, flusher)
    finally:
        if flusher is not None:
            flusher.flush()  # answers held when the last connection closed (their senders are gone)
        store.dispose()


def _serve(ingest: Ingest, conns: list[Connection], flusher: WalSync | None) -> None:
    inboxes = {conn.fileno(): Inbox(conn) for conn in conns}
    with selectors.DefaultSelector() as selector:
        for fd in inboxes:
            selector.register(fd, selectors.EVENT_READ)

        def close(fd: int) -> None:  # that receiving process closed it (stopping) or is gone
            if inboxes.pop(fd, None) is not None:
                selector.unregister(fd)

        while inboxes:
            gone: list[Connection] = []  # receiving processes an answer could not reach
            waiting = selector.select(0 if flusher is not None and flusher.holding else None)
            if not waiting and flusher is not None:  # nothing more to commit now: one flush answers it all
                gone = flusher.flush()
            requests: list[tuple[Connection, Request]] = []
            for key, _ in waiting:
                inbox = inboxes[key.fd]
                try:
                    requests += [(inbox.conn, request) for request in inbox.read()]
                except (EOFError, OSError):
                    close(key.fd)
            for start in range(0, len(requests), MAX_BATCH):
                answers = _commit(ingest, requests[start : start + MAX_BATCH])
                if flusher is None:
                    gone += send_all(answers)
                    continue
                flusher.hold(answers)
                if flusher.full:
                    gone += flusher.flush()
            for conn in gone:
                close(conn.fileno())


def _commit(ingest: Ingest, requests: list[tuple[Connection, Request]]) -> Answers:
    """Commit requests as one batch; the answer to each, by connection."""
    items = [ingest.pending(r.arrival, r.inode, r.placed) for _, r in requests]
    ingest.settle(items)
    answers: Answers = {}
    for (conn, request), item in zip(requests, items, strict=True):
        answers.setdefault(conn, []).append((request.id, _outcome(item.done)))
    return answers


def _outcome(done: Future[bool]) -> Outcome:
    exc = done.exception()
    if exc is None:
        return ("ok", done.result())
    if isinstance(exc, OSError):
        return ("os", exc.errno, exc.strerror or str(exc))
    if isinstance(exc, SQLAlchemyError):
        return ("sql", type(exc).__name__)
    log.error("commit failed: %s", exc)
    return ("error", f"commit failed: {type(exc).__name__}")


def build_listener(settings: Settings, store: Store, ingest: Ingest, share: AcceptShare | None = None) -> StorageSCP:
    """The node's DICOM listener with every service it offers, the same in each receiving process
    (share: this process's slot in the count of open associations, with several)."""
    # start-up time: loaded only when this part of the node starts
    from dxnode.outbox.commitment import report_handler
    from dxnode.worklist import ups_events

    watch = [ups_events.UpsWatch(settings, store)] if settings.ups_watch.enabled else []  # UPS Watch and Pull
    scp = StorageSCP(settings, ingest, report_handler(store), watch, share)  # Commitment reports go to the outbox
    if settings.ups:
        # start-up time: loaded only when this part of the node starts
        from dxnode.sources import ups

        # UPS Event reports of [[ups]] Task Managers come to the same listener (sources/ups.py)
        scp.commitment_report = ups.listen_for_events(scp.ae, store, report_handler(store))
    return scp


def shared_out(settings: Settings) -> Settings:
    """settings with [node] max_inflight_mb shared out between the receiving processes."""
    n = settings.node.receive_processes
    if n == 1:
        return settings
    node = settings.node.model_copy(update={"max_inflight_mb": settings.node.max_inflight_mb / n})
    return settings.model_copy(update={"node": node})


FLUSH_S = 0.02  # how long a receiving process gathers activity events before it sends them to serve


class ForwardedActivity(Activity):
    """A receiving process's Activity: its events go to serve's (apply), keyed by this process.

    They go in batches: a thread sends what has gathered FLUSH_S after the first of them. Sent one
    by one (two per instance, each pickled and written alone) they cost serve's process a tenth of
    its interpreter time (docs/benchmarks.md); FLUSH_S later is nothing to a sweep that waits
    stable_seconds. close() sends what is left."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self._conn = conn
        self._pid = os.getpid()
        self._events: list[tuple[Any, ...]] = []
        self._gathered = threading.Condition()
        self._closing = False
        self._sender = threading.Thread(target=self._send_batches, name="dxnode-activity-out", daemon=True)
        self._sender.start()

    def _send(self, *event: Any) -> None:
        with self._gathered:
            self._events.append(event)
            if len(self._events) == 1:
                self._gathered.notify()

    def _send_batches(self) -> None:
        while True:
            with self._gathered:
                self._gathered.wait_for(lambda: self._events or self._closing)
                self._gathered.wait_for(lambda: self._closing, FLUSH_S)  # let the batch gather; close() cuts it short
                batch, self._events, closing = self._events, [], self._closing
            if batch:
                with contextlib.suppress(OSError):  # serve gone: this process is stopping anyway
                    self._conn.send(("events", batch))
            if closing:
                return

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what has gathered, then no more."""
        with self._gathered:
            self._closing = True
            self._gathered.notify()
        self._sender.join(timeout_s)

    def begin(self, association: Hashable, study_uid: str) -> None:
        self._send("begin", (self._pid, association), study_uid)

    def end(self, study_uid: str) -> None:
        self._send("end", study_uid)

    def closed(self, association: Hashable) -> None:
        self._send("closed", (self._pid, association))


def apply(activity: Activity, event: tuple[Any, ...]) -> None:
    """One ForwardedActivity message (a batch of events) applied to serve's Activity."""
    kind, *args = event
    if kind == "events":
        for each in args[0]:
            apply(activity, each)
    elif kind == "begin":
        activity.begin(args[0], args[1])
    elif kind == "end":
        activity.end(args[0])
    elif kind == "closed":
        activity.closed(args[0])


class Receivers:
    """serve's side: the commit process and the other receiving processes, started, watched, stopped."""

    def __init__(self, settings: Settings, ingest: Ingest, log_level: str) -> None:
        self.settings, self.ingest, self.log_level = settings, ingest, log_level
        self.commit: CommitProcess | None = None
        # serve's slot (0) in the open associations of every receiving process (receive/server.py)
        self.share = AcceptShare.create(multiprocessing.get_context("spawn"), settings.node.receive_processes)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._activity: list[Connection] = []
        self._stopping = False

    def start_commit(self) -> None:
        """The commit process, and serve's own ingest committing through it (before the listener starts)."""
        self.commit = CommitProcess(self.settings, self.settings.node.receive_processes, self.log_level)
        self.ingest.committer = CommitClient(self.commit.clients[0])

    def start_receivers(self, sockets: Sequence[socket.socket]) -> None:
        """The other receiving processes on serve's listening sockets; RuntimeError if one cannot start."""
        assert self.commit is not None
        ctx = multiprocessing.get_context("spawn")
        for index, conn in enumerate(self.commit.clients[1:], start=1):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=receive_process_main,
                args=(
                    self.settings,
                    self.log_level,
                    list(sockets),
                    conn,
                    theirs,
                    os.getpid(),
                    self.share.part(index),
                ),
                name="dxnode-receive",
                daemon=True,
            )
            process.start()
            theirs.close()
            conn.close()  # the receiving process has its own copy
            self.processes.append(process)
            self._activity.append(ours)
        for started, conn in zip(self.processes, self._activity, strict=True):
            why = await_ready(conn, started)
            if why is not None:
                raise RuntimeError(f"a receiving process could not start: {why}")
        threading.Thread(target=self._forward, name="dxnode-receive-activity", daemon=True).start()

    def _forward(self) -> None:
        """Apply the receiving processes' activity events to serve's, until they have all gone."""
        open_conns = list(self._activity)
        while open_conns:
            for conn in wait(open_conns):
                assert isinstance(conn, Connection)
                try:
                    while True:
                        apply(self.ingest.activity, conn.recv())
                        if not conn.poll():
                            break
                except (EOFError, OSError):
                    open_conns.remove(conn)

    def failure(self) -> str | None:
        """Why a receiving or the commit process no longer runs, while the node does; None while all run."""
        if self._stopping:
            return None
        for process in self.processes:
            if not process.is_alive():
                return f"receiving process {process.pid} exited (status {process.exitcode})"
        return self.commit.failure() if self.commit is not None else None

    def stop_receivers(self) -> None:
        """Stop the other receiving processes (SIGTERM: no new association, the open ones finish)."""
        self._stopping = True
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)

    def stop_commit(self) -> None:
        """Stop the commit process, once serve's own instances are committed (after the listener stopped)."""
        self._stopping = True
        settle(self.ingest)
        if self.ingest.committer is not None:
            self.ingest.committer.close()
        if self.commit is not None:
            self.commit.stop()


def settle(ingest: Ingest, within_s: float = 5.0) -> None:
    """Wait (a little) for the instances this process is storing to be answered, before its commits end."""
    ingest.inflight.wait_idle(within_s)


def receive_process_main(
    settings: Settings,
    log_level: str,
    sockets: list[socket.socket],
    commit: Connection,
    activity: Connection,
    parent: int,
    share: tuple[Any, Any, int],
) -> None:
    """Body of one more receiving process: serve's listener on serve's sockets until SIGTERM or serve goes."""
    setup_logging(log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: serve decides
    try:
        store = Store(settings.database.url, settings.database.busy_timeout_s, settings.database.echo)
        ingest = Ingest(shared_out(settings), store)
        ingest.committer = CommitClient(commit)
        forwarded = ForwardedActivity(activity)
        ingest.activity = forwarded
        scp = build_listener(settings, store, ingest, AcceptShare(*share))
    except Exception as exc:  # said to serve, which refuses to start
        activity.send(("failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        raise SystemExit(1) from None
    activity.send(("ready",))  # before the first association's events on the same connection
    scp.start(sockets)
    log.info("receiving process %d ready", os.getpid())
    try:
        while not stop.wait(1.0) and os.getppid() == parent and scp.failure() is None:
            pass
    finally:
        scp.stop()
        settle(ingest)
        ingest.committer.close()
        forwarded.close()
        store.dispose()
    log.info("receiving process %d stopped", os.getpid())
