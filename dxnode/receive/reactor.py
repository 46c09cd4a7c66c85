"""pynetdicom's acceptor reactor woken by the next DIMSE message instead of polling every millisecond.

pynetdicom runs a loop per association that sleeps 1 ms, then looks for a decoded message, a release,
an abort, a dead reader thread or the network timeout: about 15 ms of CPU a second per open
association while it waits (measured: docs/benchmarks.md), which is most of what a C-STORE costs
beyond the durable write when 4 senders are connected. ``install`` gives pynetdicom's association
module a ``time`` whose 1 ms sleep, in an acceptor's reactor, waits on the association's message
queue instead: it returns as soon as a message is queued (sooner than the poll), and at the latest
after WAIT_S, so a release, an abort or a timeout is seen at most WAIT_S later than before. A
requestor's reactor (the outbox, sources) keeps polling: its send_* calls wait for it to pause.
"""

from __future__ import annotations

import threading
import time
from types import ModuleType
from typing import Any

from pynetdicom import association

_POLL_S = 0.001  # the reactor loop's sleep in pynetdicom (association.Association._run_reactor)
WAIT_S = 0.01  # the longest an acceptor's reactor now waits without a message


class _ReactorTime:
    """The time module, but for the reactor's 1 ms sleep on an acceptor's own thread."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        assoc = threading.current_thread()
        if seconds != _POLL_S or not isinstance(assoc, association.Association) or not assoc.is_acceptor:
            self._real.sleep(seconds)
            return
        queued = assoc.dimse.msg_queue
        with queued.not_empty:  # Queue.put notifies it
            if not queued.queue:  # (qsize would take the mutex held here)
                queued.not_empty.wait(WAIT_S)


def install() -> None:
    """Put _ReactorTime in place of pynetdicom's association.time (once; process-wide)."""
    if not isinstance(association.time, _ReactorTime):
        association.time = _ReactorTime(time)  # type: ignore[assignment]
