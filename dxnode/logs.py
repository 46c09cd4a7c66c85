"""Logging policy: the node's log format and level, and the one place that sets every library's logger."""

from __future__ import annotations

import logging
import sys

# Libraries whose INFO lines are chatter (or patient data: highdicom logs the UIDs of the datasets it
# copies from at INFO), shown from WARNING up whatever the node's level.
NOISY_LOGGERS = (
    "pynetdicom",
    "apscheduler",
    "uvicorn.access",
    "PIL",
    "matplotlib",
    "alembic",
    "highdicom",
    "multipart",
)


def setup_logging(level: str) -> None:
    """Log lines with time, level and stage name to stderr, and set the libraries' switches."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    library_switches(level)


def library_switches(level: str) -> None:
    """Every library log switch for a node logging at level; called once at start, never at import."""
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # While a job runs, APScheduler warns every poll that the runner is still busy: expected, not news.
    logging.getLogger("apscheduler.scheduler").setLevel(max(logging.ERROR, logging.getLevelName(level)))
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # start-up time: pynetdicom loads only when this runs
        from pynetdicom import _config

        # pynetdicom's "standard" handlers log every DIMSE message and PDU at INFO/DEBUG, and the
        # C-STORE one copies the whole received dataset just to print "Present": unbind them
        # unless their lines would be shown. Read when each association starts.
        _config.LOG_HANDLER_LEVEL = "none"
