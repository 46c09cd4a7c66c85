"""What the source kinds share: a study found at a source, progress reports, and the FetchError they raise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Progress = Callable[[int, int], None]  # (instances retrieved so far, instances expected) of one study


@dataclass(frozen=True)
class Found:
    """A study a source holds for a request, and how many instances it has."""

    study_instance_uid: str
    instances: int


class FetchError(Exception):
    """A query or retrieve failed: retried after a backoff, unless permanent (a bound it is over)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
