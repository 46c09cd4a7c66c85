"""pynetdicom's reactors woken by what they wait for instead of polling every millisecond.

pynetdicom runs two loops per association that sleep 1 ms whenever there is nothing to do: the
association's reactor (a decoded message, a release, an abort, the network timeout) and the DUL
reader (bytes on the socket, a PDU to send). With 4 senders that is 8,000 wake-ups a second and up
to a millisecond of added latency per PDU and per response (measured: docs/benchmarks.md).
``install`` gives pynetdicom's association and DUL modules a ``time`` whose 1 ms sleep waits instead:

- an acceptor's association reactor, on its message queue (Queue.put notifies it), nudged too by
  its reader when a release or abort request comes (to_user_queue) and when the reader ends;
- an acceptor's DUL reader, on its socket and an eventfd that ``send_pdu``, ``kill_dul`` and
  ``stop_dul`` signal.

Each returns as soon as there is something to do, and at the latest after WAIT_S, so a timer (ARTIM,
the network timeout) or a flag set elsewhere is seen at most WAIT_S later than before. A requestor's
reactor and reader keep polling: its send_* calls pause the reactor, which can be caught between
leaving its pause and clearing its flag (a race in pynetdicom), and then takes the response off the
queue itself if it comes that fast ("Received unexpected C-ECHO service message", seen in a CI run
with the waiting reader on requestors too). ``install`` also reads a PDU's bytes with as few recv
calls as the socket allows, where pynetdicom asks for 4,096 at a time.

``install`` also counts the threads pynetdicom (3.0.4) starts to serve an N-EVENT-REPORT request
(a Storage Commitment report on the outbox's association), for ``release``: such a thread sets the
association's ``_is_paused`` flag to False when its handler ends, and pynetdicom's ``release()``,
which waits for the reactor to pause, then waits for ever if the reactor had paused meanwhile.
"""

from __future__ import annotations

import os
import select
import ssl
import threading
import time
from types import ModuleType
from typing import Any

from pynetdicom import association, dul, transport

_POLL_S = 0.001  # the reactor loops' sleep in pynetdicom (Association._run_reactor, DULServiceProvider.run_reactor)
WAIT_S = 0.01  # the longest a reactor now waits with nothing to do
_SERVE = association.Association._serve_request
_ORIGINAL = (
    dul.DULServiceProvider.run_reactor,
    dul.DULServiceProvider.send_pdu,
    dul.DULServiceProvider.kill_dul,
    dul.DULServiceProvider.stop_dul,
)


class _Wake:
    """An eventfd a DUL reader waits on beside its socket; closed when the reader ends."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()  # no signal to an fd number closed and reused since

    def signal(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _wake(provider: dul.DULServiceProvider) -> _Wake | None:
    return provider.__dict__.get("_dxnode_wake")


def _nudge(assoc: association.Association) -> None:
    """Wake assoc's reactor if it waits (a release or abort request for it, or its reader ended)."""
    waiting = assoc.dimse.msg_queue.not_empty
    with waiting:
        assoc._dxnode_nudged = True  # type: ignore[attr-defined]  # (a nudge before its wait is not lost)
        waiting.notify_all()


def _run_reactor(self: dul.DULServiceProvider) -> None:
    """pynetdicom's DUL loop, with a wake-up fd for the time of the loop; what it passes up to the
    association (A-RELEASE, A-ABORT: to_user_queue) nudges the association's reactor. An acceptor's
    only: see the module's note on requestors."""
    if not self.assoc.is_acceptor:
        return _ORIGINAL[0](self)
    self._dxnode_wake = _Wake()  # type: ignore[attr-defined]
    user, put = self.to_user_queue, self.to_user_queue.put  # the same queue object: others may wait on it

    def put_and_nudge(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        _nudge(self.assoc)

    user.put = put_and_nudge  # type: ignore[method-assign]
    try:
        _ORIGINAL[0](self)
    finally:
        self._dxnode_wake.close()  # type: ignore[attr-defined]
        _nudge(self.assoc)


def _send_pdu(self: dul.DULServiceProvider, primitive: Any) -> None:
    _ORIGINAL[1](self, primitive)
    wake = _wake(self)
    if wake is not None:
        wake.signal()


def _kill_dul(self: dul.DULServiceProvider) -> None:
    _ORIGINAL[2](self)
    wake = _wake(self)
    if wake is not None:
        wake.signal()


def _stop_dul(self: dul.DULServiceProvider) -> bool:
    """pynetdicom's: ends the reader if the association is over (Sta1), now woken to see it at once."""
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        wake = _wake(self)
        if wake is not None:
            wake.signal()
    return bool(_ORIGINAL[3](self))


def _wait_dul(provider: dul.DULServiceProvider, wake: _Wake) -> None:
    """Until the socket has bytes, a PDU is queued to send, the loop is told to end, or WAIT_S."""
    if provider.to_provider_queue.queue or provider._kill_thread:
        return
    wanted: list[Any] = [wake.fd]
    sock = provider.socket.socket if provider.socket is not None else None
    if sock is not None and provider.socket._is_connected:  # type: ignore[union-attr]
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes select cannot see
        wanted.append(sock)
    try:
        select.select(wanted, [], [], WAIT_S)
    except (OSError, ValueError):  # the socket closed meanwhile: the loop sees it
        return
    wake.drain()


class _ReactorTime:
    """The time module of one pynetdicom module, but for its reactor's 1 ms sleep on the reactor's own
    thread (dul's for a DUL reader, association's for an acceptor's reactor); any other sleep is real."""

    def __init__(self, real: ModuleType, module: ModuleType) -> None:
        self._real, self._module = real, module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if seconds != _POLL_S:
            self._real.sleep(seconds)
        elif self._module is dul and isinstance(thread, dul.DULServiceProvider) and (wake := _wake(thread)):
            _wait_dul(thread, wake)
        elif self._module is association and isinstance(thread, association.Association) and thread.is_acceptor:
            queued = thread.dimse.msg_queue
            with queued.not_empty:  # Queue.put and _nudge notify it
                if not queued.queue and not thread.__dict__.get("_dxnode_nudged"):  # (qsize takes the mutex held here)
                    queued.not_empty.wait(WAIT_S)
                thread._dxnode_nudged = False  # type: ignore[attr-defined]
        else:
            self._real.sleep(seconds)


def _recv(self: transport.AssociationSocket, nr_bytes: int) -> bytearray:
    """nr_bytes from the socket, fewer only if the peer closed it: pynetdicom's recv in large reads."""
    sock = self.socket
    assert sock is not None
    data = bytearray(nr_bytes)
    view = memoryview(data)
    got = 0
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            break
        got += n
    view.release()
    del data[got:]
    return data


_reports = threading.Condition()  # guards and signals each association's count of report threads


def _serve_request(self: association.Association, msg: Any, context_id: int) -> None:
    """pynetdicom's; on the thread it starts for an N-EVENT-REPORT (not the reactor's), counted for release()."""
    if threading.current_thread() is self:
        return _SERVE(self, msg, context_id)
    with _reports:
        self.__dict__["_dxnode_reports"] = self.__dict__.get("_dxnode_reports", 0) + 1
    try:
        return _SERVE(self, msg, context_id)
    finally:
        with _reports:
            self.__dict__["_dxnode_reports"] -= 1
            _reports.notify_all()


def release(assoc: association.Association, wait_s: float) -> None:
    """Release assoc once no N-EVENT-REPORT is being served on it (see above); abort it if one still
    is after wait_s. For an association that may receive reports (the outbox's Storage Commitment)."""
    with _reports:
        idle = _reports.wait_for(lambda: not assoc.__dict__.get("_dxnode_reports"), wait_s)
    if not assoc.is_established:
        return
    if idle:
        assoc.release()
    else:
        assoc.abort()


def install() -> None:
    """Put the waiting reactors, the large reads and the count of report threads in pynetdicom's place
    (once; process-wide): by the listener, and by the outbox before it associates."""
    if isinstance(association.time, _ReactorTime):
        return
    association.Association._serve_request = _serve_request  # type: ignore[method-assign]
    association.time = _ReactorTime(time, association)  # type: ignore[assignment]
    dul.time = _ReactorTime(time, dul)  # type: ignore[assignment]
    dul.DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
    dul.DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    dul.DULServiceProvider.kill_dul = _kill_dul  # type: ignore[method-assign]
    dul.DULServiceProvider.stop_dul = _stop_dul  # type: ignore[method-assign]
    transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
