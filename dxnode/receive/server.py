"""pynetdicom's threaded association server as serve runs it: Nagle off, a cheap copy of the
supported contexts per association, and a listening socket several receiving processes can share,
each new association going to the process with the fewest open (AcceptShare)."""

from __future__ import annotations

import contextlib
import copy
import socket
import socketserver
import threading
import time
import weakref
from multiprocessing.context import SpawnContext
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

# The longest a busier process leaves a waiting connection to a less busy one: an idle process accepts
# within a millisecond; the rest is room for a loaded machine, spent only when the other is slow.
DEFER_S = 0.05


class AcceptShare:
    """The associations open in each receiving process, in memory they share ([node] receive_processes).

    Every process waits on the same listening socket, and the kernel wakes them all for a connection:
    whichever accepts first would take it, so four senders could land three on one interpreter and one
    on the other (seen in bench.receive: CPU split 3:1, and the slowest runs). A process with more
    open associations than another now leaves it the connection for up to DEFER_S, then takes it
    itself if it is still waiting (the other may be stuck or stopping): least connections, as a load
    balancer would do. Between processes with as many open, the one whose last accept is oldest takes
    it (round robin), so associations that come one after another alternate too: without that, the
    process that won the kernel's race kept winning (six in a row to one, four tries out of four).
    counts and last are multiprocessing RawArrays, one slot per process; a process writes only its
    own slots, counting accepts and closes and stamping each accept (CLOCK_MONOTONIC, the same in
    every process), and recounts its associations when its server loop is idle (a close pynetdicom
    never reported would otherwise count for ever)."""

    def __init__(self, counts: Any, last: Any, index: int) -> None:
        self.counts = counts
        self.last = last  # time.monotonic_ns() of each process's last accept
        self.index = index
        self._lock = threading.Lock()
        self._servers: list[ThreadedAssociationServer] = []  # this process's (plain, TLS)
        self._starting = 0  # accepted connections whose association has not started yet
        self._closed: weakref.WeakSet[Association] = weakref.WeakSet()  # closed, thread still ending

    @classmethod
    def create(cls, ctx: SpawnContext, processes: int) -> AcceptShare:
        """serve's share (index 0); process k takes AcceptShare(*share.part(k))."""
        return cls(ctx.RawArray("i", processes), ctx.RawArray("q", processes), 0)

    def part(self, index: int) -> tuple[Any, Any, int]:
        """What process index needs to build its AcceptShare (picklable to a spawned process)."""
        return self.counts, self.last, index

    def attach(self, server: ThreadedAssociationServer) -> None:
        """Count server's associations in this process's slot."""
        self._servers.append(server)

    def busier(self) -> bool:
        """True while another process has fewer associations open than this one, or as many and an older last accept."""
        mine = (self.counts[self.index], self.last[self.index])
        return any((self.counts[k], self.last[k]) < mine for k in range(len(self.counts)) if k != self.index)

    def defer(self) -> None:
        """Wait, at most DEFER_S, while another process is less busy (it takes the connection meanwhile)."""
        deadline = time.monotonic() + DEFER_S
        # Polled: another process's count lives in shared memory with no wake-up to wait on, and the
        # connection stays readable here until someone accepts it.
        while self.busier() and time.monotonic() < deadline:
            time.sleep(0.001)

    def accepted(self) -> None:
        with self._lock:
            self._starting += 1
            self.counts[self.index] += 1
            self.last[self.index] = time.monotonic_ns()

    def started(self, association: bool) -> None:
        """The accepted connection's request thread is done: an association runs on it, or none came of it."""
        with self._lock:
            self._starting -= 1
            if not association:
                self.counts[self.index] -= 1

    def closed(self, assoc: Association) -> None:
        with self._lock:
            if assoc not in self._closed:
                self._closed.add(assoc)
                self.counts[self.index] -= 1

    def recount(self) -> None:
        """The slot set to the associations running and not closed, unless one is starting."""
        with self._lock:
            if self._starting == 0:
                running = (a for server in self._servers for a in server.active_associations)
                self.counts[self.index] = sum(1 for a in running if a not in self._closed)


_request = threading.local()  # whether this request thread's connection became an association


class NoDelayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with Nagle's algorithm off on each accepted socket, and its
    supported contexts copied cheaply for each association.

    pynetdicom leaves Nagle on; a small C-STORE response then can wait for a delayed ACK.
    """

    def __init__(
        self, *args: Any, listening: socket.socket | None = None, share: AcceptShare | None = None, **kwargs: Any
    ) -> None:
        self._listening = listening  # a listening socket another receiving process bound (receivers.py)
        self._share = share
        super().__init__(*args, **kwargs)
        self.contexts = _Contexts(self.contexts)
        if share is not None:
            share.attach(self)
            self.bind(evt.EVT_CONN_OPEN, _opened)
            self.bind(evt.EVT_CONN_CLOSE, lambda event: share.closed(event.assoc))

    def server_bind(self) -> None:
        if self._listening is None:
            super().server_bind()
        else:
            if self.socket is not None:
                self.socket.close()
            self.socket = self._listening
            self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Listen, without blocking in accept: several receiving processes may share the socket, and
        the one that loses the race for a connection must go back to its loop, not wait in accept."""
        if self._listening is None:
            super().server_activate()
        if self.socket is not None:
            self.socket.setblocking(False)

    def server_close(self) -> None:
        """Close the socket; a shared one (listening) without shutdown, which would end it for every process."""
        if self._listening is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept, after letting a less busy process take the connection (OSError once one has)."""
        if self._share is not None:
            self._share.defer()
        sock, address = super().get_request()
        if self._share is not None:
            self._share.accepted()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's request thread; where it cannot start (no threads left), nothing will
        count its end, and socketserver closes the connection: counted here instead."""
        try:
            super().process_request(request, client_address)
        except BaseException:
            if self._share is not None:
                self._share.started(False)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """pynetdicom's, counting a connection that did not become an association as closed."""
        _request.opened = False
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self._share is not None:
                self._share.started(_request.opened)

    def service_actions(self) -> None:
        """Between connections (at least every poll interval): recount this process's associations."""
        if self._share is not None:
            self._share.recount()

    def shutdown(self) -> None:
        """Stop serving and close the socket. (pynetdicom's shutdown also removes the server from the
        AE's private list of servers that AE.start_server made, where a server from make_server is not.)"""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


def _opened(event: Event) -> None:
    """EVT_CONN_OPEN, on the request's thread: an association now owns the connection (and closes it)."""
    _request.opened = True


class _Contexts(list[PresentationContext]):
    """A server's supported presentation contexts. pynetdicom deep-copies them for every association
    it accepts, which for the ~160 storage contexts of 16 transfer syntaxes took most of the 30-50 ms
    an association took to set up; copied here one level down, sharing the UIDs (immutable strings)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [_copy_context(cx) for cx in self]


def _copy_context(cx: PresentationContext) -> PresentationContext:
    """cx copied with its own lists; any attribute not a list or immutable is deep-copied."""
    new = copy.copy(cx)
    for name, value in vars(cx).items():
        if isinstance(value, list):
            setattr(new, name, list(value))
        elif not isinstance(value, str | int | float | None):
            setattr(new, name, copy.deepcopy(value))
    return new
