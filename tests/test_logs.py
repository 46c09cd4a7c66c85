"""dxnode.logs owns the library log switches: nothing is switched at import, all of it by setup_logging."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import logging
from pynetdicom import _config
import dxnode.outputs.report, dxnode.scp, dxnode.outputs.sr, dxnode.outputs.sc
print(logging.getLogger("highdicom").level, _config.LOG_HANDLER_LEVEL)
from dxnode.logs import setup_logging
setup_logging("DEBUG")
print(logging.getLogger("highdicom").level, _config.LOG_HANDLER_LEVEL)
"""


def test_importing_the_outputs_switches_no_library_log_and_setup_logging_switches_them() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    at_import, after_setup = out.stdout.splitlines()
    assert at_import == "0 standard"  # highdicom's logger unset, pynetdicom's handlers as shipped
    # highdicom logs source UIDs at INFO: kept at WARNING even at DEBUG; pynetdicom's per-PDU handlers unbound.
    assert after_setup == "30 none"
