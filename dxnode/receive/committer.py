"""The receiving processes' side of the commit process ([node] receive_processes; dxnode/receivers.py
starts it): instances sent to it over a connection, answers awaited.

With several senders, serve's one interpreter is shared by every association's reader and reactor
and by the thread leading the group commit. Each step of a commit (statements, rename, folder
fsync, commit) gives up the interpreter for a system call and must wait for it back, so a commit
that takes 0.8 ms with one sender took 3 ms with four (measured: docs/benchmarks.md), and every
instance waits for it. Here serve's storing thread makes the file durable (fsync) and sends the
instance's row data to this process; it commits what has arrived as one batch, with the same
GroupCommit and statements as in serve (ingest.py), and answers. The contract is unchanged: serve
acknowledges an instance only after its answer says file, folder entry and rows are durable.

Each receiving process gives its durable file its final name itself, by a link, and fsyncs the folder
(durable.place), in parallel with the others; this process then only commits the rows (and withdraws
the file of an instance whose row does not commit, or is a duplicate). Where the name is taken
already, the instance goes the rename way (renamed here after its row is written, as in serve).

If the commit process stops, every waiting and later instance is refused (0xA700) and serve's part
check stops the node (exit status 1), so systemd starts it again; a killed commit leaves at most a
placed or renamed file without its row, which the sender sends again (the name is then taken, so
the file is renamed over and the row's unique key finds no row and inserts it) and the start-up
sweep of temporaries cleans any temporary file.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from dxnode.receive.rows import Arrival

log = logging.getLogger("dxnode.receive.committer")
START_TIMEOUT_S = 60.0
MAX_BATCH = 64  # requests committed together (group.MAX_BATCH)
_READ = 1 << 16  # bytes an Inbox reads at once


@dataclass(frozen=True)
class Request:
    """One instance to commit: its file is durable as arrival.tmp (inode), and under arrival.path too
    where placed (durable.place)."""

    id: int
    arrival: Arrival
    inode: int
    placed: bool


# An answer: ("ok", new), ("os", errno, strerror), ("sql", exception type name), ("error", text).
Outcome = tuple[Any, ...]


class CommitFailed(Exception):
    """The commit process could not commit an instance, or is gone; str() is a short reason."""


class CommitClient:
    """One receiving process's side of the commit process: sends it instances, waits for their answers."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._waiting: dict[int, Future[Outcome]] = {}
        self._ids = itertools.count()
        self._gone = ""
        self._reader = threading.Thread(target=self._read, name="dxnode-commit-answers", daemon=True)
        self._reader.start()

    def commit(self, arrival: Arrival, inode: int, placed: bool) -> bool:
        """Commit one instance whose file is durable as arrival.tmp (and as arrival.path, placed); True
        if new, False for a duplicate. OSError as the commit process met it, CommitFailed for anything
        else or when it is gone (a placed file then stays: its row may have committed)."""
        done: Future[Outcome] = Future()
        with self._lock:
            if self._gone:
                raise CommitFailed(self._gone)
            rid = next(self._ids)
            self._waiting[rid] = done
            try:
                self._conn.send_bytes(dumps(Request(rid, arrival, inode, placed)))
            except OSError:
                self._waiting.pop(rid, None)
                raise CommitFailed("the commit process is gone") from None
        kind, *rest = done.result()
        if kind == "ok":
            return bool(rest[0])
        if kind == "os":
            raise OSError(rest[0], rest[1])
        if kind == "sql":
            raise CommitFailed(f"database error: {rest[0]}")
        raise CommitFailed(str(rest[0]))

    def _read(self) -> None:
        """Hand each answer to its waiting thread; when the process is gone, fail every waiter."""
        try:
            while True:
                answers = self._conn.recv()
                with self._lock:
                    settled = [(self._waiting.pop(rid), outcome) for rid, outcome in answers]
                for done, outcome in settled:
                    done.set_result(outcome)
        except (EOFError, OSError):
            pass
        with self._lock:
            self._gone = self._gone or "the commit process stopped"
            waiting, self._waiting = list(self._waiting.values()), {}
        for done in waiting:
            done.set_result(("error", self._gone))

    def close(self) -> None:
        """No more instances from this process (the commit process ends once every client has closed)."""
        with self._lock:
            self._gone = "stopped"
            hang_up(self._conn)


class Inbox:
    """The commit process's end of one receiving process's connection: every request that has arrived
    read at once, in one read (Connection.recv makes two reads for each, and polling it for more builds
    a selector each time). The framing is multiprocessing's: a 4-byte big-endian length (-1, then an
    8-byte one, for 2 GiB and more), then the pickle."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._fd = conn.fileno()
        self._buf = bytearray()

    def read(self) -> list[Request]:
        """Read what has arrived (call it once readable, or it blocks) and return the requests now
        whole; EOFError when the other end has closed."""
        data = os.read(self._fd, _READ)
        if not data:
            raise EOFError
        buf = self._buf
        buf += data
        whole: list[Request] = []
        while len(buf) >= 4:
            (size,), head = struct.unpack_from("!i", buf), 4
            if size == -1:
                if len(buf) < 12:
                    break
                (size,), head = struct.unpack_from("!Q", buf, 4), 12
            if len(buf) < head + size:
                break
            whole.append(pickle.loads(buf[head : head + size]))
            del buf[: head + size]
        return whole


def dumps(message: Any) -> bytes:
    """A message for Connection.send_bytes: what Connection.send would send (recv reads either), by plain
    pickle, without the ForkingPickler that send builds (copying copyreg's table) for each message."""
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


def send(conn: Connection, message: Any) -> bool:
    """Send message on conn (plain pickle: dumps); False if the other end is gone."""
    try:
        conn.send_bytes(dumps(message))
    except OSError:
        return False
    return True


def hang_up(conn: Connection) -> None:
    """Close conn so that both ends see it at once: a close() alone leaves a thread blocked in recv()
    on it, and the socket open, so the peer would never see the end."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def await_ready(conn: Connection, process: Any) -> str | None:
    """None once a started process has said ("ready",) on conn; else why not, in words."""
    try:
        if not conn.poll(START_TIMEOUT_S):
            return f"did not start within {START_TIMEOUT_S:g} s"
        said = conn.recv()
    except (EOFError, OSError):
        return f"exited (status {process.exitcode})"
    return None if said == ("ready",) else str(said[-1])
