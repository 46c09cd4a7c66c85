"""Studies still arriving, whichever transport carries them, for the stable-study sweep."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Hashable

from dxnode.store import utcnow


class Activity:
    """Studies still arriving, for the stable-study sweep (worklist.StudyActivity).

    A study is busy while one of its instances is being stored or an association that sent to
    it is open; its quiet time then counts from that association's release. The database cannot
    tell: under write contention an instance may wait for the lock longer than stable_seconds."""

    KEEP = dt.timedelta(hours=1)  # how long a release time is remembered

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._by_association: dict[Hashable, set[str]] = {}
        self._released: dict[str, dt.datetime] = {}

    def begin(self, association: Hashable, study_uid: str) -> None:
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

    def closed(self, association: Hashable) -> None:
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
