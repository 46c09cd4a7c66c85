"""Login throttling: wrong token guesses per client address, with a delay that doubles.

Only wrong guesses are throttled: a valid token is always let in, so an attacker guessing from the
admin's address (or behind the same proxy) cannot lock the admin out. Tokens are at least 20
characters (config.MIN_TOKEN_LENGTH), so guessing one is not what the delay protects against; it
keeps a guesser from flooding the audit log and the token checks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from dxnode.config import WebSettings

THROTTLE_WINDOW_S = 3600  # failures older than this no longer count
T = TypeVar("T")


class LoginThrottle:
    """Failed token guesses per client address: the first few are free, then each attempt must wait
    a delay that doubles with every further failure (up to a maximum) within the last hour."""

    def __init__(self, free_attempts: int, delay_s: float, max_delay_s: float, max_addresses: int = 10000) -> None:
        self.free, self.delay_s, self.max_delay_s = free_attempts, delay_s, max_delay_s
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self.clock: Callable[[], float] = time.monotonic

    @classmethod
    def from_settings(cls, web: WebSettings) -> LoginThrottle:
        return cls(web.login_free_attempts, web.login_delay_s, web.login_max_delay_s)

    def _recent(self, address: str, now: float) -> deque[float]:
        q = self._failures.get(address, deque())
        while q and q[0] < now - THROTTLE_WINDOW_S:
            q.popleft()
        return q

    def _wait(self, address: str, now: float) -> float:
        q = self._recent(address, now)
        if len(q) < self.free:
            return 0.0
        return max(0.0, q[-1] + min(self.delay_s * 2 ** min(len(q) - self.free, 60), self.max_delay_s) - now)

    def attempt(self, address: str, verify: Callable[[], T | None]) -> tuple[T | None, float]:
        """verify(), and its result with the wait: a valid result (not None) is never made to wait. A None
        result counts as a failure, unless the address is already waiting (then it is answered with the
        wait, and not counted). Check, verification and count happen under one lock, so parallel
        guesses get no more."""
        with self._lock:
            now = self.clock()
            result = verify()
            if result is not None:
                return result, 0.0
            wait = self._wait(address, now)
            if wait > 0:
                return None, wait
            if address not in self._failures and len(self._failures) >= self.max_addresses:
                for stale in [a for a, q in self._failures.items() if not q or q[-1] < now - THROTTLE_WINDOW_S]:
                    del self._failures[stale]
                while len(self._failures) >= self.max_addresses:  # all recent: forget the oldest address
                    del self._failures[next(iter(self._failures))]
            q = self._recent(address, now)
            q.append(now)
            self._failures[address] = q
            return None, 0.0
