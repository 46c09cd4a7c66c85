"""The called AE title is checked: a sender set to the wrong title is rejected, not silently served.

Real peers: DCMTK echoscu/storescu and the `dxnode echo` command against dxnode's StorageSCP.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_tool, run
from nodeproc import InProcessNode
from pydicom.data import get_testdata_file

DXNODE = str(Path(sys.executable).with_name("dxnode"))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[InProcessNode]:
    n = InProcessNode(tmp_path)
    yield n
    n.stop()


def test_wrong_called_ae_is_rejected_and_the_right_one_accepted(node: InProcessNode) -> None:
    need_tool("echoscu", "storescu")
    port = str(node.port)
    wrong = run(["echoscu", "-aec", "WRONGAE", "127.0.0.1", port])
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in (wrong.stdout + wrong.stderr), wrong
    ct = get_testdata_file("CT_small.dcm")
    refused = run(["storescu", "-aec", "WRONGAE", "127.0.0.1", port, ct])
    assert refused.returncode != 0 and node.instances() == {}
    assert run(["echoscu", "-aec", "DXNODE", "127.0.0.1", port]).returncode == 0
    assert run(["storescu", "-aec", "DXNODE", "127.0.0.1", port, ct]).returncode == 0
    assert len(node.instances()) == 1


def test_dxnode_echo_names_the_rejection(node: InProcessNode) -> None:
    def echo(aec: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DXNODE, "echo", "127.0.0.1", str(node.port), "--aec", aec], capture_output=True, text=True, timeout=120
        )

    out = echo("WRONGAE")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines == [
        f"dxnode echo: association rejected by 127.0.0.1:{node.port} (called AE WRONGAE): called AE title not recognised; give its AE title with --aec"
    ], out.stderr
    ok = echo("DXNODE")
    assert ok.returncode == 0 and "success" in ok.stdout


def test_accept_any_called_ae_relaxes_the_check(tmp_path: Path) -> None:
    need_tool("echoscu")
    n = InProcessNode(tmp_path, accept_any_called_ae=True)
    try:
        assert run(["echoscu", "-aec", "WRONGAE", "127.0.0.1", str(n.port)]).returncode == 0
        assert run(["echoscu", "-aec", "ANY-SCP", "127.0.0.1", str(n.port)]).returncode == 0
    finally:
        n.stop()
