"""pynetdicom's reactors woken by what they wait for instead of polling every millisecond.

pynetdicom runs two loops per association that sleep 1 ms whenever there is nothing to do: the
association's reactor (a decoded message, a release, an abort, the network timeout) and the DUL
reader (bytes on the socket, a PDU to send). With 4 senders that is 8,000 wake-ups a second and up
to a millisecond of added latency per PDU and per response (measured: docs/benchmarks.md).
``install`` gives pynetdicom's association and DUL modules a ``time`` whose 1 ms sleep waits instead:

- an acceptor's association reactor, on its message queue (Queue.put notifies it), nudged too by
  its reader when a release or abort request comes (to_user_queue) and when the reader ends;
- a DUL reader, on its socket and an eventfd that ``send_pdu``, ``kill_dul`` and ``stop_dul`` signal.

Each returns as soon as there is something to do, and at the latest after WAIT_S, so a timer (ARTIM,
the network timeout) or a flag set elsewhere is seen at most WAIT_S later than before. A requestor's
association reactor keeps polling: its send_* calls wait for it to pause. ``install`` also reads a
PDU's bytes with as few recv calls as the socket allows, where pynetdicom asks for 4,096 at a time.

``install`` also mends a race in pynetdicom (3.0.4) that can hang any association: it serves an
N-EVENT-REPORT request (a Storage Commitment or UPS report) on a thread of its own (dimse.py), which
sets the association's ``_is_paused`` flag to False when its handler ends. If the association's
reactor has meanwhile paused for a ``release()`` or a ``send_*`` on another thread, that thread waits
for a pause already reached, forever (seen in tests/test_commitment.py). Now only the reactor's own
thread can clear the flag.
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
    association (A-RELEASE, A-ABORT: to_user_queue) nudges the association's reactor."""
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


def _get_paused(self: association.Association) -> bool:
    return bool(self.__dict__.get("_dxnode_paused", False))


def _set_paused(self: association.Association, value: bool) -> None:
    """pynetdicom's writes of ``_is_paused``, less a False from any thread but the reactor's (see above)."""
    if value or threading.current_thread() is self:
        self.__dict__["_dxnode_paused"] = value


def install() -> None:
    """Put the waiting reactors, the large reads and the pause flag in pynetdicom's place (once;
    process-wide). Called wherever the node opens or accepts associations."""
    if isinstance(association.time, _ReactorTime):
        return
    association.Association._is_paused = property(_get_paused, _set_paused)  # type: ignore[assignment]
    association.time = _ReactorTime(time, association)  # type: ignore[assignment]
    dul.time = _ReactorTime(time, dul)  # type: ignore[assignment]
    dul.DULServiceProvider.run_reactor = _run_reactor  # type: ignore[method-assign]
    dul.DULServiceProvider.send_pdu = _send_pdu  # type: ignore[method-assign]
    dul.DULServiceProvider.kill_dul = _kill_dul  # type: ignore[method-assign]
    dul.DULServiceProvider.stop_dul = _stop_dul  # type: ignore[method-assign]
    transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
