"""Logging policy: the node's log format and level, and the one place that sets every library's logger."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Log lines with time, level and stage name to stderr."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in (
        "pynetdicom",
        "apscheduler",
        "uvicorn.access",
        "PIL",
        "matplotlib",
        "alembic",
        "highdicom",
        "multipart",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # While a job runs, APScheduler warns every poll that the runner is still busy: expected, not news.
    logging.getLogger("apscheduler.scheduler").setLevel(max(logging.ERROR, logging.getLevelName(level)))
