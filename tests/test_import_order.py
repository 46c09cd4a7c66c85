"""What importing the CLI and the composition root loads: prometheus_client must wait for share_metrics."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_and_daemon_load_no_metrics_before_the_node_shares_them() -> None:
    # share_metrics() sets PROMETHEUS_MULTIPROC_DIR; a prometheus_client imported earlier counts for its
    # own process only, and the job processes' counters never reach /metrics (test_metrics).
    code = "import sys, dxnode.cli, dxnode.daemon; print(sorted(m for m in sys.modules if m.startswith('prometheus')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
