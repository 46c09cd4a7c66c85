"""Logging policy: the node's log format and level, and the one place that sets every library's logger.

Tracebacks appear at DEBUG only: a library record that carries one (pydicom's decoders log every
plugin's failure with ``LOGGER.exception``) is written as one WARNING line, the exception's type
and first line, unless the node logs at DEBUG. The node's own records say what failed where.
"""

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


OWN_LOGGERS = ("dxnode", "__main__")


class OneLineLibraryErrors(logging.Filter):
    """A handler filter: a library record with a traceback becomes one WARNING line (the traceback at DEBUG only)."""

    def __init__(self, level: str) -> None:
        super().__init__()
        self.debug = logging.getLevelName(level) == logging.DEBUG

    def filter(self, record: logging.LogRecord) -> bool:
        if self.debug or not (record.exc_info or record.stack_info) or record.name.split(".")[0] in OWN_LOGGERS:
            return True
        text = _first_line(record.getMessage())
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            what = f"{type(exc).__name__}: {_first_line(str(exc))}".rstrip(": ")
            text = what if not text or text == _first_line(str(exc)) else f"{text} ({what})"
        record.msg, record.args = f"{text} (traceback at DEBUG)", None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno > logging.WARNING:  # a library's ERROR about one input is not the node's error
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _first_line(text: str) -> str:
    """The first non-empty line of text, stripped."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def setup_logging(level: str) -> None:
    """Log lines with time, level and stage name to stderr, and set the libraries' switches."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, OneLineLibraryErrors)]:
            handler.removeFilter(old)
        handler.addFilter(OneLineLibraryErrors(level))
    library_switches(level)


def library_switches(level: str) -> None:
    """Every library log switch for a node logging at level; called once at start, never at import."""
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # While a job runs, APScheduler warns every poll that the runner is still busy: expected, not news.
    logging.getLogger("apscheduler.scheduler").setLevel(max(logging.ERROR, logging.getLevelName(level)))
    logging.captureWarnings(True)  # a library's Python warning: a log line like any other, not raw stderr
    if logging.getLevelName(level) != logging.DEBUG:
        # start-up time: pydicom loads only when this runs
        from pydicom import config as pydicom_config

        # pydicom checks each value it reads against its VR and, by default, logs and warns for each
        # one that does not conform, quoting it: a received study's dates and names in the log, and a
        # dozen lines for one hostile instance. The node checks the values it relies on itself
        # (receive/parse.py) and says what it refused in one line; at DEBUG pydicom's lines come back.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        # pynetdicom's one warning there, a UID it finds nonconforming, quoted: the same reason.
        logging.getLogger("pynetdicom.utils").setLevel(logging.ERROR)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        # start-up time: pynetdicom loads only when this runs
        from pynetdicom import _config

        # pynetdicom's "standard" handlers log every DIMSE message and PDU at INFO/DEBUG, and the
        # C-STORE one copies the whole received dataset just to print "Present": unbind them
        # unless their lines would be shown. Read when each association starts.
        _config.LOG_HANDLER_LEVEL = "none"
